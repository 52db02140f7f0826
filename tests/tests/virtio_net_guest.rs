//! A real Linux guest on our virtio-net device (see
//! `cloister_e2e::net_guest`): the kernel from `kernel-config/` under
//! QEMU/TCG `-M microvm`, its NIC served over vhost-user by `cloister-vmm
//! vhost-user --device net` on a tap in a network namespace of the test's
//! own, whose host side has 10.0.2.1. The test checks:
//!
//! - the guest's NIC has the MAC given to QEMU;
//! - 5 pings, 5 replies;
//! - guest→host: `seq 1 40000` (228 KiB) arrives byte for byte;
//! - host→guest: 4 MiB of text (large TSO/GSO frames over mergeable rx
//!   buffers), whose SHA-256 the guest prints and the host compares;
//! - the back end counted frames both ways and no drops;
//!
//! and once more with QEMU's `mrg_rxbuf=off`, where the legacy driver uses
//! the 10-byte header the device widens and narrows.
//!
//! Skips, with the reason, without root, QEMU, busybox-static, iproute2,
//! the built kernel or cloister-vmm.

use cloister_e2e::net_guest::{
    backend_counter, run_in_fresh_netns, sha256_hex, GuestSends, NetGuestFixture, NetGuestPlan,
    DONE, GUEST_MAC,
};

const PINGS: u32 = 5;
const GUEST_LINES: u32 = 40_000;
const HOST_BYTES: usize = 4 << 20;

/// Numbered text lines, `HOST_BYTES` long.
fn host_bytes() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HOST_BYTES + 64);
    let mut line = 0u64;
    while bytes.len() < HOST_BYTES {
        bytes.extend_from_slice(format!("host line {line:08}\n").as_bytes());
        line += 1;
    }
    bytes.truncate(HOST_BYTES);
    bytes
}

#[test]
fn guest_pings_and_exchanges_tcp_with_the_host_over_our_vhost_user_net() {
    exchange(true);
}

#[test]
fn guest_without_mergeable_buffers_talks_with_the_legacy_header() {
    exchange(false);
}

fn exchange(mergeable_rx: bool) {
    let (fixture, backend) = match NetGuestFixture::locate()
        .and_then(|f| NetGuestFixture::cloister_backend().map(|b| (f, b)))
    {
        Ok(found) => found,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let plan = NetGuestPlan {
        backend,
        pings: PINGS,
        guest_sends: GuestSends::Lines(GUEST_LINES),
        host_answer: host_bytes(),
        mergeable_rx,
    };
    let outcome = match run_in_fresh_netns(&fixture, &plan) {
        Ok(outcome) => outcome,
        Err(e) if e.starts_with("unshare") => {
            eprintln!("SKIP: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let lines = outcome.guest_lines();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));

    assert!(
        has("done"),
        "the guest script did not finish\n{}",
        outcome.context()
    );
    assert!(
        has(&format!("mac {GUEST_MAC}")),
        "guest MAC is not {GUEST_MAC}\n{}",
        outcome.context()
    );
    assert!(
        has(&format!(
            "{PINGS} packets transmitted, {PINGS} packets received"
        )),
        "ping lost packets\n{}",
        outcome.context()
    );
    let tcp = outcome
        .tcp
        .as_ref()
        .unwrap_or_else(|e| panic!("host TCP side: {e}\n{}", outcome.context()));
    assert!(
        tcp.received == GuestSends::Lines(GUEST_LINES).bytes(),
        "the host received other bytes than the guest sent\n{}",
        outcome.context()
    );
    let expected_sum = sha256_hex(&host_bytes());
    assert!(
        !expected_sum.is_empty() && has(&format!("received sha256 {expected_sum}")),
        "the guest did not receive the host's {HOST_BYTES} bytes intact (sha256 {expected_sum})\n{}",
        outcome.context()
    );
    let requests = backend_counter(&outcome.backend_log, "requests").unwrap_or(0);
    assert!(
        requests > 0,
        "back end counted no frames\n{}",
        outcome.context()
    );
    assert_eq!(
        backend_counter(&outcome.backend_log, "errors"),
        Some(0),
        "back end counted drops\n{}",
        outcome.context()
    );

    let rtt = lines
        .iter()
        .find(|l| l.contains("round-trip"))
        .copied()
        .unwrap_or("ping: no round-trip line");
    println!(
        "virtio-net over vhost-user (QEMU/TCG guest, mrg_rxbuf={mergeable_rx}): {rtt}; TCP guest→host {} bytes, host→guest {HOST_BYTES} bytes (sha256 ok); {requests} frames, 0 drops; guest done at {:?}",
        tcp.received.len(),
        outcome.console.find(DONE).map(|l| l.at)
    );
}
