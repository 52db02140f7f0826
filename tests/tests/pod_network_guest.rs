//! A pod's network, end to end through a real guest: CNI's stand-in (a
//! veth pair from a "pod" namespace to a "peer" namespace), the shim's
//! plumbing (`cloister_shim::network`: tap + tc mirred redirect in the pod
//! namespace), QEMU's virtio-net on the tap's fd with the veth's MAC
//! (QEMU itself runs in the host namespace), and our kernel with the agent
//! as PID 1, configured over vsock the way the shim will do it
//! (`UpdateInterfaces`, `UpdateRoutes` from the discovered pod network).
//!
//! A busybox container in the guest (sharing the guest's network
//! namespace) pings the peer and sends a known stream to a TCP listener
//! the test runs in the peer namespace; the listener checks every byte and
//! answers, and the container prints the answer. Afterwards teardown
//! leaves no tap and no qdisc, and the namespaces are removed. A second
//! test does the same on a pod made by the real CNI bridge plugin, talking
//! to the bridge's gateway address.
//!
//! The guest's interface is configured by the agent (the shim's path), not
//! by a shell-script `/init`. Skips, with the reason printed,
//! when not root, or when QEMU, the built kernel, the agent initramfs or the
//! `cloister-vmm` binary is missing.

use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloister_e2e::agent_guest::{
    busybox_spec, connect_agent, create_request, ctx, run_to_exit, shutdown, AgentGuest,
    AgentGuestFixture, AGENT_DEADLINE,
};
use cloister_e2e::pod_netns::{self, CniBridgePod, PodNetnsPair, TestNetns, CNI_GATEWAY, PEER_IP};
use cloister_e2e::qemu::QemuTap;
use cloister_shim::network::{setup_pod_network, teardown_pod_network, NetNs, PodNetwork};

/// The peer's TCP listener.
const PEER_PORT: u16 = 7777;
/// What the guest sends: `seq 1 N`, which the host can compute too.
const SEQ_COUNT: u32 = 20000;
/// Echo requests the guest sends.
const PINGS: u32 = 5;

/// `seq 1 n` as busybox prints it.
fn seq_output(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Accepts one connection on `listener` (made in the peer namespace), reads
/// to EOF, answers with a line naming the byte count; returns what it read.
fn serve_peer(listener: std::net::TcpListener, deadline: Duration) -> Result<Vec<u8>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > deadline {
                    return Err(format!("no connection to the peer in {deadline:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .map_err(|e| format!("read from the guest: {e}"))?;
    stream
        .write_all(format!("peer got {} bytes\n", received.len()).as_bytes())
        .map_err(|e| format!("answer the guest: {e}"))?;
    Ok(received)
}

/// The host side, as the shim will do it: the guest's network from the
/// pod network, then a container that uses it; returns its stdout.
async fn drive(uds: &std::path::Path, network: &PodNetwork, peer_ip: &str) -> String {
    let client = connect_agent(uds).await.expect("connect to the agent");
    client
        .update_interfaces(ctx(), &network.update_interfaces_request())
        .await
        .expect("UpdateInterfaces");
    client
        .update_routes(ctx(), &network.update_routes_request())
        .await
        .expect("UpdateRoutes");

    let script = format!(
        "ip addr show eth0 && ip route && ping -c {PINGS} {peer_ip} && \
         seq 1 {SEQ_COUNT} | nc {peer_ip} {PEER_PORT}"
    );
    let mut spec = busybox_spec(&["sh", "-c", &script]);
    // busybox ping opens a raw socket.
    let caps = ["CAP_NET_RAW"];
    spec["process"]["capabilities"] =
        serde_json::json!({ "bounding": caps, "effective": caps, "permitted": caps });
    let (output, status) = run_to_exit(&client, uds, create_request("net", &spec, true)).await;
    assert_eq!(status, 0, "the container failed; its output:\n{output}");
    shutdown(&client).await;
    output
}

/// busybox ping's "round-trip min/avg/max = a/b/c ms" → avg.
fn ping_average_ms(output: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.contains("round-trip"))?;
    let figures = line.split('=').nth(1)?.trim().split(' ').next()?;
    figures.split('/').nth(1)?.parse().ok()
}

/// Plumbs the pod namespace `pod`, boots a guest on it, and has the guest
/// ping `peer_ip` and stream to a listener made in the `peer` namespace;
/// checks everything, then tears down and checks nothing is left.
fn exchange_through_guest(
    fixture: AgentGuestFixture,
    pod: &TestNetns,
    peer: &TestNetns,
    peer_ip: &str,
) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let network = runtime.block_on(setup_pod_network(&pod.path())).unwrap();
    assert_eq!(network.endpoints.len(), 1, "{network:?}");
    let endpoint = &network.endpoints[0];
    let addresses: Vec<String> = endpoint
        .interface
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    println!(
        "pod network: {} mac {} mtu {} addresses {addresses:?} -> {} (ifindex {}); routes {:?}",
        endpoint.interface.name,
        endpoint.guest_mac(),
        endpoint.interface.mtu,
        endpoint.tap.name,
        endpoint.tap.index,
        network.routes,
    );

    // The peer's listener: a socket made in the peer namespace.
    let address = (peer_ip.to_string(), PEER_PORT);
    let listener = NetNs::open(&peer.path())
        .unwrap()
        .run(move || std::net::TcpListener::bind(address))
        .unwrap()
        .unwrap();
    let served = std::thread::spawn(move || serve_peer(listener, AGENT_DEADLINE * 2));

    // QEMU (in the host namespace) gets the tap's fd and the veth's MAC.
    let mut guest = AgentGuest::new(fixture).unwrap();
    guest.qemu_mut().taps.push(QemuTap {
        fd: std::os::fd::AsRawFd::as_raw_fd(&endpoint.tap.fd),
        mac: endpoint.guest_mac(),
    });
    let output = Mutex::new(String::new());
    let (network_ref, output_ref) = (&network, &output);
    guest.run(|uds| async move {
        let out = drive(&uds, network_ref, peer_ip).await;
        *output_ref.lock().unwrap() = out;
    });
    let output = output.into_inner().unwrap();
    println!("guest container output:\n{output}");

    // Ping went through; TCP carried every byte there and the answer back.
    assert!(
        output.contains(&format!(
            "{PINGS} packets transmitted, {PINGS} packets received"
        )),
        "{output}"
    );
    let received = served.join().unwrap().expect("peer exchange");
    let expected = seq_output(SEQ_COUNT);
    assert_eq!(received.len(), expected.len());
    assert!(
        received == expected,
        "the peer got other bytes than the guest sent"
    );
    assert!(
        output.contains(&format!("peer got {} bytes", expected.len())),
        "the peer's answer did not reach the guest:\n{output}"
    );
    println!(
        "ping avg rtt {:?} ms; tcp {} bytes guest -> peer checked, answer back",
        ping_average_ms(&output),
        expected.len()
    );

    // Teardown (our fd still open) removes the tap and both redirects.
    let report = runtime.block_on(teardown_pod_network(&pod.path())).unwrap();
    assert_eq!(report.taps_removed, ["tap0_clst"]);
    assert_eq!((report.filters_removed, report.qdiscs_removed), (1, 1));
    let links = pod.ip(&["-br", "link"]).unwrap();
    assert!(!links.contains("tap0_clst"), "{links}");
    let qdiscs = pod.tc(&["qdisc", "show", "dev", "eth0"]).unwrap();
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

fn assert_namespaces_gone(names: &[String]) {
    let namespaces = pod_netns::run("ip", &["netns", "list"]).unwrap();
    assert!(
        names.iter().all(|n| !namespaces.contains(n.as_str())),
        "{namespaces}"
    );
}

fn fixture_or_skip_reason() -> Result<AgentGuestFixture, String> {
    pod_netns::unavailable().map_or_else(AgentGuestFixture::locate, Err)
}

#[test]
fn guest_on_pod_tap_pings_and_talks_tcp_to_the_peer_through_tc_redirect() {
    let fixture = match fixture_or_skip_reason() {
        Ok(f) => f,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let pair = PodNetnsPair::new("guest").unwrap();
    let names = [pair.pod.name.clone(), pair.peer.name.clone()];
    exchange_through_guest(fixture, &pair.pod, &pair.peer, PEER_IP);
    drop(pair);
    assert_namespaces_gone(&names);
}

#[test]
fn guest_on_a_cni_bridge_pod_reaches_the_gateway_through_tc_redirect() {
    let fixture = match fixture_or_skip_reason()
        .and_then(|f| CniBridgePod::unavailable().map_or(Ok(f), Err))
    {
        Ok(f) => f,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    // The CNI bridge plugin's pod, as containerd's CRI plugin makes it;
    // the "peer" is the bridge's gateway address in the node namespace.
    let cni = CniBridgePod::new("guest-cni").unwrap();
    let names = [cni.pod.name.clone(), cni.node.name.clone()];
    exchange_through_guest(fixture, &cni.pod, &cni.node, CNI_GATEWAY);
    drop(cni);
    assert_namespaces_gone(&names);
}
