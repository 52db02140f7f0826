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
//! leaves no tap and no qdisc, and the namespaces are removed.
//!
//! Skips, with the reason printed, when not root, or when QEMU, the built
//! kernel, the agent initramfs or the `cloister-vmm` binary is missing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::console::{kill_process_group, ConsoleRun, WaitPolicy};
use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::pod_netns::{self, PodNetnsPair, PEER_IP};
use cloister_e2e::qemu::{
    qemu_available, Accel, QemuConfig, QemuMicrovm, QemuTap, VhostUserDevice, VhostUserKind,
    KERNEL_PANIC, PANIC_GRACE, QEMU_BINARY,
};
use cloister_e2e::vhost_user::VsockBackend;
use cloister_guest_image::paths;
use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::{attach_stdio, hybrid_vsock_connect};
use cloister_shim::network::{setup_pod_network, teardown_pod_network, NetNs, PodNetwork};
use tokio::io::AsyncReadExt;

const AGENT_PORT: u32 = 1024;
const STDIO_PORT: u32 = 1025;
/// Where build-agent-initramfs.sh puts the container rootfs in the image.
const GUEST_ROOTFS: &str = "/rootfs/busybox";
/// Boot under TCG takes seconds; a loaded 2-core CI machine needs more.
const AGENT_DEADLINE: Duration = Duration::from_secs(180);
/// The peer's TCP listener.
const PEER_PORT: u16 = 7777;
/// What the guest sends: `seq 1 N`, which the host can compute too.
const SEQ_COUNT: u32 = 20000;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

struct Fixture {
    image: GuestImage,
    initramfs: PathBuf,
    vmm: PathBuf,
}

fn fixture() -> Result<Fixture, String> {
    if let Some(reason) = pod_netns::unavailable() {
        return Err(reason);
    }
    if !qemu_available(Path::new(QEMU_BINARY)) {
        return Err(format!(
            "{QEMU_BINARY} does not run (Debian package qemu-system-x86)"
        ));
    }
    let image = GuestImage::locate().map_err(|e| e.to_string())?;
    let initramfs = paths::cache_dir().join("initramfs").join("agent.cpio");
    if !initramfs.exists() {
        return Err(format!(
            "{} missing (built by scripts/build-guest.sh)",
            initramfs.display()
        ));
    }
    let vmm = find_cloister_vmm().ok_or("cloister-vmm binary not found (set CLOISTER_VMM)")?;
    Ok(Fixture {
        image,
        initramfs,
        vmm,
    })
}

/// The vsock back end, killed on drop.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `seq 1 n` as busybox prints it.
fn seq_output(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// A container in the guest's network namespace (none of its own) that
/// may open raw sockets (busybox ping).
fn network_spec(script: &str) -> serde_json::Value {
    let caps = ["CAP_NET_RAW"];
    serde_json::json!({
        "ociVersion": "1.1.0",
        "hostname": "in-guest",
        "process": {
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs" },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"] }
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]
        }
    })
}

async fn connect_agent(uds: &Path) -> Result<AgentServiceClient, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < AGENT_DEADLINE {
        match hybrid_vsock_connect(uds, AGENT_PORT).await {
            Ok(stream) => {
                let socket = ttrpc::r#async::transport::Socket::new(stream);
                let client = AgentServiceClient::new(ttrpc::r#async::Client::new(socket));
                match client
                    .health_check(ctx(), &agent::HealthCheckRequest::new())
                    .await
                {
                    Ok(h) if h.serving => return Ok(client),
                    Ok(_) => last = "agent not serving yet".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("agent not reachable in {AGENT_DEADLINE:?}: {last}"))
}

/// What the peer's listener saw.
struct PeerExchange {
    received: Vec<u8>,
}

/// Accepts one connection on `listener` (made in the peer namespace), reads
/// to EOF, answers with a line naming the byte count, within `deadline`.
fn serve_peer(listener: std::net::TcpListener, deadline: Duration) -> Result<PeerExchange, String> {
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
    Ok(PeerExchange { received })
}

/// The host side: configure the guest's network from the pod network, run
/// the container, return its stdout.
async fn drive(uds: &Path, network: &PodNetwork) -> String {
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
        "ip addr show eth0; ip route; ping -c 5 {PEER_IP} && seq 1 {SEQ_COUNT} | nc {PEER_IP} {PEER_PORT}"
    );
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = "net".into();
    request.oci_spec_json = serde_json::to_vec(&network_spec(&script)).unwrap();
    let mut root = agent::Rootfs::new();
    root.set_directory(GUEST_ROOTFS.into());
    request.rootfs = Some(root).into();
    let mut stdio = agent::Stdio::new();
    stdio.stdout = true;
    request.stdio = Some(stdio).into();
    client.create_container(ctx(), &request).await.unwrap();
    let stream = hybrid_vsock_connect(uds, STDIO_PORT).await.unwrap();
    let mut stdout = attach_stdio(stream, "net", "", StreamKind::Stdout)
        .await
        .unwrap();
    let mut start = agent::StartContainerRequest::new();
    start.container_id = "net".into();
    client.start_container(ctx(), &start).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(120), stdout.read_to_string(&mut out))
        .await
        .expect("container stdout did not reach EOF")
        .unwrap();
    let mut wait = agent::WaitProcessRequest::new();
    wait.container_id = "net".into();
    let status = client.wait_process(ctx(), &wait).await.unwrap().exit_status;
    assert_eq!(status, 0, "container failed; its output:\n{out}");
    let mut remove = agent::RemoveContainerRequest::new();
    remove.container_id = "net".into();
    client.remove_container(ctx(), &remove).await.unwrap();
    client
        .shutdown(ctx(), &agent::ShutdownRequest::new())
        .await
        .unwrap();
    out
}

/// busybox ping's "round-trip min/avg/max = a/b/c ms" → avg.
fn ping_average_ms(output: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.contains("round-trip"))?;
    let figures = line.split('=').nth(1)?.trim().split(' ').next()?;
    figures.split('/').nth(1)?.parse().ok()
}

#[test]
fn guest_on_pod_tap_pings_and_talks_tcp_to_the_peer_through_tc_redirect() {
    let fixture = match fixture() {
        Ok(f) => f,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let pair = PodNetnsPair::new("guest").unwrap();
    let pod_names = (pair.pod.name.clone(), pair.peer.name.clone());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let network = runtime
        .block_on(setup_pod_network(&pair.pod.path()))
        .unwrap();
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
    let listener = NetNs::open(&pair.peer.path())
        .unwrap()
        .run(|| std::net::TcpListener::bind((PEER_IP, PEER_PORT)))
        .unwrap()
        .unwrap();
    let peer = std::thread::spawn(move || serve_peer(listener, AGENT_DEADLINE * 2));

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost-user.sock");
    let uds = dir.path().join("vsock.sock");
    let backend_log = dir.path().join("backend.log");
    let backend = VsockBackend::Cloister {
        binary: fixture.vmm.clone(),
    };
    let _backend = Backend(
        backend
            .command(&socket, &uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&backend_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "cloister-vmm vhost-user did not create {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut qemu = QemuConfig::new(Accel::Tcg, &fixture.image.vmlinux, Some(&fixture.initramfs));
    qemu.memory_mib = 512;
    qemu.vhost_user.push(VhostUserDevice {
        kind: VhostUserKind::Vsock,
        socket,
    });
    qemu.taps.push(QemuTap {
        fd: std::os::fd::AsRawFd::as_raw_fd(&endpoint.tap.fd),
        mac: endpoint.guest_mac(),
    });
    let vm = QemuMicrovm::spawn(&qemu).unwrap();
    let vm_pid = vm.id();
    let policy = WaitPolicy {
        timeout: AGENT_DEADLINE * 2,
        end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
        idle_limit: None,
    };
    let console = std::thread::spawn(move || vm.wait_until(&policy, |_| {}));

    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(drive(&uds, &network))
    }));
    if outcome.is_err() {
        // The guest waits forever for a host that gave up.
        kill_process_group(vm_pid);
    }
    let run: ConsoleRun = console.join().unwrap();
    let transcript = format!(
        "{}--- cloister-vmm vhost-user log ---\n{}",
        run.transcript(),
        std::fs::read_to_string(&backend_log).unwrap_or_default()
    );
    let output = match outcome {
        Ok(output) => output,
        Err(panic) => {
            eprintln!("{transcript}");
            std::panic::resume_unwind(panic);
        }
    };
    println!("guest container output:\n{output}");
    assert!(
        !run.timed_out,
        "QEMU did not exit after Shutdown:\n{transcript}"
    );

    // Ping went through, TCP carried every byte both ways.
    let rtt = ping_average_ms(&output);
    assert!(output.contains("5 packets received"), "{output}");
    let exchange = peer.join().unwrap().expect("peer exchange");
    let expected = seq_output(SEQ_COUNT);
    assert_eq!(exchange.received.len(), expected.len());
    assert!(
        exchange.received == expected,
        "the peer got other bytes than the guest sent"
    );
    assert!(
        output.contains(&format!("peer got {} bytes", expected.len())),
        "the peer's answer did not reach the guest:\n{output}"
    );
    println!(
        "ping avg rtt {rtt:?} ms; tcp {} bytes guest -> peer checked, answer back",
        expected.len()
    );

    // Teardown (our fd still open) removes the tap and both redirects.
    let report = runtime
        .block_on(teardown_pod_network(&pair.pod.path()))
        .unwrap();
    assert_eq!(report.taps_removed, ["tap0_clst"]);
    assert_eq!((report.filters_removed, report.qdiscs_removed), (1, 1));
    let links = pair.pod.ip(&["-br", "link"]).unwrap();
    assert!(!links.contains("tap0_clst"), "{links}");
    let qdiscs = pair.pod.tc(&["qdisc", "show", "dev", "eth0"]).unwrap();
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    drop(network);
    drop(pair);
    let namespaces = pod_netns::run("ip", &["netns", "list"]).unwrap();
    assert!(
        !namespaces.contains(&pod_names.0) && !namespaces.contains(&pod_names.1),
        "{namespaces}"
    );
}
