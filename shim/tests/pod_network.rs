//! The pod network plumbing against real namespaces, veths, taps and tc
//! (root only; each test prints SKIP with the reason when it cannot run).
//! State is checked with `ip -j` / `tc -j`, independently of our netlink
//! code; namespaces are removed on drop even when a test fails.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use cloister_e2e::pod_netns::{
    run, unavailable, CniBridgePod, PodNetnsPair, TestNetns, CNI_GATEWAY, PEER_IP, POD_IP, POD_MTU,
    PREFIX_LEN,
};
use cloister_shim::network::tc::REDIRECT_FILTER_PREF;
use cloister_shim::network::{
    setup_pod_interfaces, setup_pod_network, teardown_pod_network, NetNs, PodNetworkError,
    TeardownReport,
};
use serde_json::Value;

macro_rules! skip_unless_root {
    () => {
        if let Some(reason) = unavailable() {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}"))
}

fn link_names(netns: &TestNetns) -> Vec<String> {
    json(&netns.ip(&["-j", "link", "show"]).unwrap())
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect()
}

fn qdisc_kinds(netns: &TestNetns, dev: &str) -> Vec<String> {
    json(&netns.tc(&["-j", "qdisc", "show", "dev", dev]).unwrap())
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["kind"].as_str().unwrap().to_string())
        .collect()
}

/// The `mirred` targets of the filters at `pref` on `dev`'s ingress, and
/// whether they match protocol all.
fn redirects(netns: &TestNetns, dev: &str, pref: u16) -> Vec<(String, String, String)> {
    let text = netns
        .tc(&["-j", "filter", "show", "dev", dev, "ingress"])
        .unwrap();
    let mut found = Vec::new();
    for filter in json(&text).as_array().unwrap() {
        if filter["pref"].as_u64() != Some(u64::from(pref)) {
            continue;
        }
        for action in filter["options"]["actions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            found.push((
                filter["protocol"].as_str().unwrap_or("").to_string(),
                action["mirred_action"].as_str().unwrap_or("").to_string(),
                action["to_dev"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    found
}

fn assert_nothing_left(pair: &PodNetnsPair) {
    let links = link_names(&pair.pod);
    assert!(
        !links.iter().any(|l| l.ends_with("_clst")),
        "tap left: {links:?}"
    );
    assert_eq!(
        qdisc_kinds(&pair.pod, "eth0")
            .iter()
            .filter(|k| *k == "ingress")
            .count(),
        0
    );
}

#[tokio::test]
async fn network_setup_redirects_veth_and_tap_both_ways_and_teardown_removes_all() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("setup").unwrap();
    let mac = pair.pod_mac().unwrap();
    // IPv6 too: a global address (reported) next to the link-local one
    // (not reported: the guest makes the same from the same MAC) and a
    // static route through a gateway.
    pair.pod
        .ip(&["addr", "add", "fd99::2/64", "dev", "eth0", "nodad"])
        .unwrap();
    pair.pod
        .ip(&["route", "add", "fd98::/64", "via", "fd99::1", "dev", "eth0"])
        .unwrap();

    let started = Instant::now();
    let network = setup_pod_network(&pair.pod.path()).await.unwrap();
    let setup_took = started.elapsed();

    // What the guest will be told.
    assert_eq!(network.endpoints.len(), 1, "{network:?}");
    let endpoint = &network.endpoints[0];
    assert_eq!(endpoint.interface.name, "eth0");
    assert_eq!(endpoint.guest_mac(), mac);
    assert_eq!(endpoint.interface.mtu, POD_MTU);
    let interfaces = network.update_interfaces_request();
    assert_eq!(interfaces.interfaces[0].mac_address, mac);
    assert_eq!(
        interfaces.interfaces[0].addresses,
        [format!("{POD_IP}/{PREFIX_LEN}"), "fd99::2/64".into()]
    );
    let routes: Vec<(String, String, String)> = network
        .update_routes_request()
        .routes
        .iter()
        .map(|r| (r.destination.clone(), r.gateway.clone(), r.device.clone()))
        .collect();
    let route = |d: &str, g: &str| (d.to_string(), g.to_string(), "eth0".to_string());
    // Not the connected subnets (proto kernel): the guest's kernel makes
    // those from the addresses.
    assert_eq!(
        routes,
        [route("", PEER_IP), route("fd98::/64", "fd99::1")],
        "{routes:?}"
    );

    // The tap: in the pod namespace, up, the veth's MTU, our fd is its queue.
    let tap = &endpoint.tap;
    assert_eq!(tap.name.as_str(), "tap0_clst");
    let shown = json(
        &pair
            .pod
            .ip(&["-j", "-d", "link", "show", "tap0_clst"])
            .unwrap(),
    );
    let shown = &shown[0];
    assert_eq!(shown["mtu"].as_u64(), Some(u64::from(POD_MTU)));
    assert!(
        shown["flags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("UP")),
        "{shown}"
    );
    assert_eq!(shown["linkinfo"]["info_kind"], "tun");
    assert_eq!(shown["linkinfo"]["info_data"]["type"], "tap");
    assert_eq!(shown["linkinfo"]["info_data"]["pi"], false);
    assert_eq!(shown["linkinfo"]["info_data"]["vnet_hdr"], true);
    // No address of its own: the host says nothing on the guest's link.
    let addresses = json(&pair.pod.ip(&["-j", "addr", "show", "tap0_clst"]).unwrap());
    assert_eq!(
        addresses[0]["addr_info"],
        serde_json::json!([]),
        "{addresses}"
    );
    assert_eq!(shown["inet6_addr_gen_mode"], "none", "{shown}");
    let fdinfo =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", tap.fd.as_raw_fd())).unwrap();
    assert!(fdinfo.contains("iff:\ttap0_clst"), "{fdinfo}");
    assert!(!link_names(&pair.peer).iter().any(|l| l.contains("clst")));

    // Ingress qdiscs and mirred redirects, both ways.
    assert!(qdisc_kinds(&pair.pod, "eth0").contains(&"ingress".into()));
    assert!(qdisc_kinds(&pair.pod, "tap0_clst").contains(&"ingress".into()));
    let redirect = |to: &str| vec![("all".to_string(), "redirect".to_string(), to.to_string())];
    assert_eq!(
        redirects(&pair.pod, "eth0", REDIRECT_FILTER_PREF),
        redirect("tap0_clst")
    );
    assert_eq!(
        redirects(&pair.pod, "tap0_clst", REDIRECT_FILTER_PREF),
        redirect("eth0")
    );

    // Teardown, with the fd still open: it removes the tap itself.
    let started = Instant::now();
    let report = teardown_pod_network(&pair.pod.path()).await.unwrap();
    println!(
        "one interface: setup {setup_took:?}, teardown {:?}",
        started.elapsed()
    );
    assert_eq!(
        report,
        TeardownReport {
            netns_missing: false,
            filters_removed: 1,
            qdiscs_removed: 1,
            taps_removed: vec!["tap0_clst".into()],
        }
    );
    assert_nothing_left(&pair);
    assert!(link_names(&pair.pod).contains(&"eth0".to_string()));
    // Twice is fine and finds nothing.
    let again = teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(again, TeardownReport::default());
    drop(network);
}

/// Reads one frame from the tap (after its 10-byte virtio_net_hdr) that
/// `wanted` accepts, within 10 s; the panic shows the counters.
fn read_frame(
    pair: &PodNetnsPair,
    tap: &mut std::fs::File,
    wanted: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buffer = vec![0u8; 65536];
    while Instant::now() < deadline {
        match tap.read(&mut buffer) {
            Ok(n) if n > 10 && wanted(&buffer[10..n]) => return buffer[10..n].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("read from tap: {e}"),
        }
    }
    panic!(
        "no matching frame on the tap in 10 s\n{}\n{}",
        pair.pod.ip(&["-s", "link"]).unwrap_or_default(),
        pair.pod
            .tc(&["-s", "filter", "show", "dev", "eth0", "ingress"])
            .unwrap_or_default()
    );
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// An ARP reply from `sender` (MAC, IP) to `target`.
fn arp_reply(sender: ([u8; 6], [u8; 4]), target: ([u8; 6], [u8; 4])) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&target.0);
    frame.extend_from_slice(&sender.0);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]); // Ethernet/IPv4, reply
    frame.extend_from_slice(&sender.0);
    frame.extend_from_slice(&sender.1);
    frame.extend_from_slice(&target.0);
    frame.extend_from_slice(&target.1);
    frame
}

/// An IPv4/UDP frame (UDP checksum 0: "none", allowed for IPv4).
fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    ips: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let (src_mac, dst_mac) = macs;
    let udp_len = 8 + payload.len() as u16;
    let total_len = 20 + udp_len;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip.extend_from_slice(&ips.0);
    ip.extend_from_slice(&ips.1);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&ports.0.to_be_bytes());
    frame.extend_from_slice(&ports.1.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn network_frames_cross_the_redirect_both_ways_between_peer_and_tap() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("frames").unwrap();
    let pod_mac = parse_mac(&pair.pod_mac().unwrap());
    let mut network = setup_pod_network(&pair.pod.path()).await.unwrap();
    let fd: OwnedFd = network.endpoints.remove(0).tap.fd;
    let mut tap = std::fs::File::from(fd);
    let pod_ip: [u8; 4] = POD_IP.parse::<std::net::Ipv4Addr>().unwrap().octets();
    let peer_ip: [u8; 4] = PEER_IP.parse::<std::net::Ipv4Addr>().unwrap().octets();

    // A UDP socket made in the peer namespace keeps sending to the pod IP
    // until told to stop.
    let socket = NetNs::open(&pair.peer.path())
        .unwrap()
        .run(|| std::net::UdpSocket::bind((PEER_IP, 40000)))
        .unwrap()
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sender = socket.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let _ = sender.send_to(b"hello from the peer", (POD_IP, 40001));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // The peer's ARP request for the pod IP comes out of the tap (where the
    // guest will be), not into the pod namespace's own stack.
    let request = read_frame(&pair, &mut tap, |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == pod_ip
    });
    let peer_mac: [u8; 6] = request[6..12].try_into().unwrap();
    // Answered through the tap as the guest would, with the veth's MAC.
    let reply = arp_reply((pod_mac, pod_ip), (peer_mac, peer_ip));
    tap.write_all(&[&[0u8; 10][..], &reply].concat()).unwrap();
    // Then the datagrams follow, addressed to the veth's MAC.
    let datagram = read_frame(&pair, &mut tap, |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 17 && f[30..34] == pod_ip
    });
    assert_eq!(&datagram[0..6], &pod_mac);
    assert_eq!(&datagram[42..], b"hello from the peer");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sending.join().unwrap();

    // And a datagram written into the tap reaches the peer's socket.
    let frame = udp_frame(
        (pod_mac, peer_mac),
        (pod_ip, peer_ip),
        (40001, 40000),
        b"hello from the tap side",
    );
    tap.write_all(&[&[0u8; 10][..], &frame].concat()).unwrap();
    let mut buffer = [0u8; 256];
    loop {
        let (n, from) = socket
            .recv_from(&mut buffer)
            .expect("datagram from the tap side");
        if from.port() == 40001 {
            assert_eq!(from.ip().to_string(), POD_IP);
            assert_eq!(&buffer[..n], b"hello from the tap side");
            break;
        }
    }
    let neighbours = pair.peer.ip(&["neigh", "show", "dev", "peer0"]).unwrap();
    assert!(
        neighbours.contains(&format!("{POD_IP} lladdr {}", pair.pod_mac().unwrap())),
        "{neighbours}"
    );

    drop(tap);
    teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_nothing_left(&pair);
}

#[tokio::test]
async fn network_setup_gives_each_pod_interface_its_own_tap_and_routes() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("multi").unwrap();
    // A second network attachment (Multus-style): net1 with its own subnet
    // and a route through it.
    pair.pod
        .ip(&[
            "link",
            "add",
            "net1",
            "type",
            "veth",
            "peer",
            "name",
            "peer1",
            "netns",
            &pair.peer.name,
        ])
        .unwrap();
    pair.pod
        .ip(&["addr", "add", "10.98.0.2/24", "dev", "net1"])
        .unwrap();
    pair.pod
        .ip(&["link", "set", "net1", "mtu", "9000", "up"])
        .unwrap();
    pair.pod
        .ip(&[
            "route",
            "add",
            "10.97.0.0/16",
            "via",
            "10.98.0.1",
            "dev",
            "net1",
        ])
        .unwrap();

    let network = setup_pod_network(&pair.pod.path()).await.unwrap();
    let pairs: Vec<(&str, &str, u32)> = network
        .endpoints
        .iter()
        .map(|e| {
            (
                e.interface.name.as_str(),
                e.tap.name.as_str(),
                e.interface.mtu,
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [("eth0", "tap0_clst", POD_MTU), ("net1", "tap1_clst", 9000)]
    );
    let redirect = |to: &str| vec![("all".to_string(), "redirect".to_string(), to.to_string())];
    assert_eq!(
        redirects(&pair.pod, "net1", REDIRECT_FILTER_PREF),
        redirect("tap1_clst")
    );
    assert_eq!(
        redirects(&pair.pod, "tap1_clst", REDIRECT_FILTER_PREF),
        redirect("net1")
    );
    let shown = json(&pair.pod.ip(&["-j", "link", "show", "tap1_clst"]).unwrap());
    assert_eq!(shown[0]["mtu"].as_u64(), Some(9000));
    let routes: Vec<(String, String)> = network
        .update_routes_request()
        .routes
        .iter()
        .map(|r| (r.destination.clone(), r.device.clone()))
        .collect();
    assert_eq!(
        routes,
        [
            ("".into(), "eth0".into()),
            ("10.97.0.0/16".into(), "net1".into())
        ]
    );

    let report = teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!((report.filters_removed, report.qdiscs_removed), (2, 2));
    assert_eq!(report.taps_removed.len(), 2, "{report:?}");
    assert_nothing_left(&pair);
    assert!(!qdisc_kinds(&pair.pod, "net1").contains(&"ingress".into()));
    drop(network);
}

#[tokio::test]
async fn network_setup_on_a_real_cni_bridge_pod_and_teardown_before_cni_del() {
    skip_unless_root!();
    if let Some(reason) = CniBridgePod::unavailable() {
        eprintln!("SKIP: {reason}");
        return;
    }
    let cni = CniBridgePod::new("cni").unwrap();
    let veth = json(&cni.pod.ip(&["-j", "addr", "show", "eth0"]).unwrap());
    let cni_mac = veth[0]["address"].as_str().unwrap().to_string();
    let cni_ip = veth[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .unwrap();

    let network = setup_pod_network(&cni.pod.path()).await.unwrap();
    let interfaces = network.update_interfaces_request();
    assert_eq!(interfaces.interfaces.len(), 1, "{interfaces:?}");
    assert_eq!(interfaces.interfaces[0].name, "eth0");
    assert_eq!(interfaces.interfaces[0].mac_address, cni_mac);
    assert_eq!(interfaces.interfaces[0].addresses, [cni_ip]);
    let routes = network.update_routes_request();
    assert!(
        routes
            .routes
            .iter()
            .any(|r| r.destination.is_empty() && r.gateway == CNI_GATEWAY && r.device == "eth0"),
        "{routes:?}"
    );
    let redirect = |to: &str| vec![("all".to_string(), "redirect".to_string(), to.to_string())];
    assert_eq!(
        redirects(&cni.pod, "eth0", REDIRECT_FILTER_PREF),
        redirect("tap0_clst")
    );

    // Teardown first, then CNI DEL (in drop) finds its veth as it left it.
    let report = teardown_pod_network(&cni.pod.path()).await.unwrap();
    assert_eq!(report.taps_removed, ["tap0_clst"]);
    assert!(!link_names(&cni.pod).iter().any(|l| l.ends_with("_clst")));
    assert!(!qdisc_kinds(&cni.pod, "eth0").contains(&"ingress".into()));
    drop(network);
}

#[tokio::test]
async fn network_setup_with_unknown_netns_names_the_path() {
    skip_unless_root!();
    let path = std::path::Path::new("/var/run/netns/clst-does-not-exist");
    let err = setup_pod_network(path).await.unwrap_err();
    assert!(matches!(err, PodNetworkError::Netns(_)), "{err:?}");
    assert!(err.to_string().contains("clst-does-not-exist"), "{err}");
    // Teardown of a namespace that is gone has nothing to do.
    let report = teardown_pod_network(path).await.unwrap();
    assert!(report.netns_missing);
    // A file that is not a namespace.
    let file = tempfile::NamedTempFile::new().unwrap();
    let err = setup_pod_network(file.path()).await.unwrap_err();
    assert!(
        err.to_string().contains(&file.path().display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn network_setup_of_bad_interface_names_it_and_changes_nothing() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("badif").unwrap();
    let err = setup_pod_interfaces(&pair.pod.path(), &["nope0"])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PodNetworkError::UnknownInterface { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope0"), "{err}");
    let err = setup_pod_interfaces(&pair.pod.path(), &["lo"])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PodNetworkError::NotPodInterface { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"lo\""), "{err}");
    assert_nothing_left(&pair);
}

#[tokio::test]
async fn network_failed_setup_undoes_the_interfaces_it_had_done() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("undo").unwrap();
    // A second pod interface whose tap name is taken: eth0 is plumbed
    // completely, then eth1 fails.
    pair.pod
        .ip(&[
            "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
        ])
        .unwrap();
    pair.pod.ip(&["link", "set", "eth1", "up"]).unwrap();
    pair.pod
        .ip(&[
            "link",
            "add",
            "tap1_clst",
            "type",
            "veth",
            "peer",
            "name",
            "x1",
        ])
        .unwrap();

    let err = setup_pod_network(&pair.pod.path()).await.unwrap_err();
    assert!(matches!(err, PodNetworkError::TapExists { .. }), "{err:?}");
    assert!(err.to_string().contains("tap1_clst"), "{err}");

    let links = link_names(&pair.pod);
    assert!(!links.contains(&"tap0_clst".to_string()), "{links:?}");
    assert!(
        links.contains(&"tap1_clst".to_string()),
        "the foreign link stays"
    );
    assert!(!qdisc_kinds(&pair.pod, "eth0").contains(&"ingress".into()));
    // Teardown afterwards is fine; the dummy is not a tap of ours.
    let report = teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(report, TeardownReport::default());
}

#[tokio::test]
async fn network_teardown_leaves_a_foreign_ingress_filter_and_its_qdisc() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("foreign").unwrap();
    pair.pod
        .tc(&["qdisc", "add", "dev", "eth0", "ingress"])
        .unwrap();
    pair.pod
        .tc(&[
            "filter",
            "add",
            "dev",
            "eth0",
            "parent",
            "ffff:",
            "pref",
            "60000",
            "protocol",
            "ip",
            "u32",
            "match",
            "ip",
            "dst",
            "192.0.2.1/32",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            "lo",
        ])
        .unwrap();

    let network = setup_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(
        redirects(&pair.pod, "eth0", REDIRECT_FILTER_PREF).len(),
        1,
        "our filter joins the existing qdisc"
    );
    let report = teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(report.filters_removed, 1);
    assert_eq!(report.qdiscs_removed, 0);
    let left = pair
        .pod
        .tc(&["-j", "filter", "show", "dev", "eth0", "ingress"])
        .unwrap();
    assert!(left.contains("\"pref\":60000"), "{left}");
    assert!(redirects(&pair.pod, "eth0", REDIRECT_FILTER_PREF).is_empty());
    drop(network);
}

#[tokio::test]
async fn network_teardown_cleans_what_a_crashed_setup_left_and_setup_works_again() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("crash").unwrap();
    // What a shim killed mid-setup could leave: a (here persistent) tap,
    // the veth's ingress qdisc and our redirect filter, but no record.
    pair.pod
        .ip(&["tuntap", "add", "dev", "tap0_clst", "mode", "tap"])
        .unwrap();
    pair.pod
        .tc(&["qdisc", "add", "dev", "eth0", "ingress"])
        .unwrap();
    let pref = REDIRECT_FILTER_PREF.to_string();
    pair.pod
        .tc(&[
            "filter",
            "add",
            "dev",
            "eth0",
            "parent",
            "ffff:",
            "pref",
            &pref,
            "protocol",
            "all",
            "u32",
            "match",
            "u32",
            "0",
            "0",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            "tap0_clst",
        ])
        .unwrap();
    // Setup refuses to adopt the leftover tap.
    let err = setup_pod_network(&pair.pod.path()).await.unwrap_err();
    assert!(matches!(err, PodNetworkError::TapExists { .. }), "{err:?}");

    let report = teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(
        report,
        TeardownReport {
            netns_missing: false,
            filters_removed: 1,
            qdiscs_removed: 1,
            taps_removed: vec!["tap0_clst".into()],
        }
    );
    assert_nothing_left(&pair);
    let network = setup_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(network.endpoints[0].tap.name.as_str(), "tap0_clst");
    teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_nothing_left(&pair);
}

#[tokio::test]
async fn network_setup_shares_a_clsact_qdisc_and_teardown_keeps_it() {
    skip_unless_root!();
    let pair = PodNetnsPair::new("clsact").unwrap();
    // clsact (Cilium and others): ingress and egress hooks in one qdisc;
    // an egress filter teardown must not take away with the qdisc.
    pair.pod
        .tc(&["qdisc", "add", "dev", "eth0", "clsact"])
        .unwrap();
    pair.pod
        .tc(&[
            "filter",
            "add",
            "dev",
            "eth0",
            "egress",
            "pref",
            "7",
            "protocol",
            "ip",
            "u32",
            "match",
            "ip",
            "dst",
            "192.0.2.1/32",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            "lo",
        ])
        .unwrap();

    let network = setup_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!(
        redirects(&pair.pod, "eth0", REDIRECT_FILTER_PREF),
        [("all".into(), "redirect".into(), "tap0_clst".into())]
    );
    let report = teardown_pod_network(&pair.pod.path()).await.unwrap();
    assert_eq!((report.filters_removed, report.qdiscs_removed), (1, 0));
    assert!(redirects(&pair.pod, "eth0", REDIRECT_FILTER_PREF).is_empty());
    assert!(qdisc_kinds(&pair.pod, "eth0").contains(&"clsact".into()));
    let egress = pair
        .pod
        .tc(&["-j", "filter", "show", "dev", "eth0", "egress"])
        .unwrap();
    assert!(egress.contains("\"pref\":7"), "{egress}");
    drop(network);
}

#[test]
fn network_namespace_thread_runs_inside_the_pod_namespace_only() {
    skip_unless_root!();
    let pod = TestNetns::new("thread").unwrap();
    let ns_inode =
        |path: &str| std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let pod_inode = ns_inode(pod.path().to_str().unwrap()).unwrap();
    let own_inode = ns_inode("/proc/thread-self/ns/net").unwrap();
    assert_ne!(pod_inode, own_inode);

    let netns = NetNs::open(&pod.path()).unwrap();
    let inside = netns
        .run(move || ns_inode("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_eq!(inside, pod_inode);
    assert_eq!(ns_inode("/proc/thread-self/ns/net").unwrap(), own_inode);
    // What the thread saw is the pod's: only lo, no host interfaces.
    let links = netns
        .run(|| std::fs::read_dir("/sys/class/net").map(|d| d.count()))
        .unwrap();
    assert!(links.is_ok());
    let listed = run("ip", &["-n", &pod.name, "-br", "link"]).unwrap();
    assert!(listed.starts_with("lo"), "{listed}");
}
