//! The agent as PID 1 of a real guest: our kernel under QEMU/TCG, the
//! agent initramfs (`kernel-config/build-agent-initramfs.sh`: the agent as
//! `/init`, a busybox container rootfs at `/rootfs/busybox`), and our vsock
//! device served over vhost-user by `cloister-vmm vhost-user --device vsock`.
//! The host talks to the agent the way the shim does: hybrid vsock
//! (`CONNECT 1024`), ttrpc, stdio streams on port 1025.
//!
//! One boot drives every step in order: guest details (the guest's kernel
//! is ours, not the host's), a container printing to stdout with its exit
//! code, the spec's device rules enforced by the cgroup v2 eBPF filter, a
//! memory-limited container OOM-killed and reported (cgroup v2 memory exists
//! in the guest, not on this host), then a clean shutdown that ends QEMU.
//!
//! Skips, with the reason printed, when QEMU, the built kernel, the agent
//! initramfs or the `cloister-vmm` binary is missing.

use std::path::Path;
use std::time::Duration;

use cloister_e2e::agent_guest::{
    busybox_spec as spec, connect_agent, create_request, ctx, remove, run_to_exit, shutdown, start,
    wait, AgentGuest, AgentGuestFixture, STDIO_PORT,
};
use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::{attach_stdio, hybrid_vsock_connect};
use tokio::io::AsyncReadExt;

/// Every host-side step; panics (failing the test) name the step.
async fn drive(uds: &Path) {
    let client = connect_agent(uds).await.expect("connect to the agent");

    // The container runs on our kernel, not the host's.
    let details = client
        .guest_details(ctx(), &agent::GuestDetailsRequest::new())
        .await
        .unwrap();
    let host_release = nix::sys::utsname::uname().unwrap();
    let host_release = host_release.release().to_string_lossy();
    println!(
        "guest: kernel {} (host {host_release}), agent {}, {} cpu(s), {} MiB",
        details.kernel_release,
        details.agent_version,
        details.online_cpus,
        details.memory_total_bytes >> 20
    );
    assert!(details.is_guest_init, "the agent is not PID 1 of the guest");
    assert_ne!(details.kernel_release, host_release);

    // Output and exit status of a container.
    let events_client = connect_agent(uds).await.expect("second connection");
    let mut events = events_client
        .events(
            ttrpc::context::with_timeout(0),
            &agent::EventsRequest::new(),
        )
        .await
        .unwrap();
    let request = create_request(
        "hello",
        &spec(&["sh", "-c", "echo hello from $(uname -r); exit 3"]),
        true,
    );
    let (out, status) = run_to_exit(&client, uds, request).await;
    assert_eq!(out, format!("hello from {}\n", details.kernel_release));
    assert_eq!(status, 3);

    // The cgroup v2 device filter (eBPF) holds in the guest's kernel: with
    // deny-all rules a node the container made itself cannot be opened
    // (without the filter the open reaches the kernel: "No such device").
    let mut devices_spec = spec(&["sh", "-c", "mknod /dev/x c 240 0 && : < /dev/x"]);
    devices_spec["process"]["capabilities"] = serde_json::json!({
        "bounding": ["CAP_MKNOD"], "effective": ["CAP_MKNOD"], "permitted": ["CAP_MKNOD"]
    });
    devices_spec["linux"]["resources"] =
        serde_json::json!({ "devices": [{ "allow": false, "access": "rwm" }] });
    let mut request = create_request("devices", &devices_spec, false);
    request.stdio.as_mut().unwrap().stderr = true;
    client.create_container(ctx(), &request).await.unwrap();
    let stream = hybrid_vsock_connect(uds, STDIO_PORT).await.unwrap();
    let mut stderr = attach_stdio(stream, "devices", "", StreamKind::Stderr)
        .await
        .unwrap();
    start(&client, "devices").await;
    let mut err = String::new();
    tokio::time::timeout(Duration::from_secs(60), stderr.read_to_string(&mut err))
        .await
        .expect("stderr did not reach EOF")
        .unwrap();
    assert!(err.contains("Operation not permitted"), "stderr: {err:?}");
    assert_ne!(wait(&client, "devices").await, 0);
    remove(&client, "devices").await;

    // A container over its cgroup v2 memory limit is OOM-killed: exit 137,
    // an OOM event, the kill in its stats.
    // dd touches its whole 64 MiB buffer: twice the limit. (A shell
    // variable filled from /dev/zero never grows: shells drop NUL bytes.)
    let mut oom_spec = spec(&["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    oom_spec["linux"]["resources"] =
        serde_json::json!({ "memory": { "limit": 33554432, "swap": 33554432 } });
    client
        .create_container(ctx(), &create_request("oom", &oom_spec, false))
        .await
        .unwrap();
    start(&client, "oom").await;
    assert_eq!(wait(&client, "oom").await, 137);
    // The OOM event comes before the exit it caused (containerd's order:
    // TaskOOM, then TaskExit).
    let mut order = Vec::new();
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_secs(10), events.recv()).await
    {
        if event.has_oom() && event.oom().container_id == "oom" {
            order.push("oom");
        }
        if event.has_exited() && event.exited().container_id == "oom" {
            order.push("exit");
            break;
        }
    }
    assert_eq!(order, ["oom", "exit"], "events for container oom");
    let mut stats_request = agent::StatsContainerRequest::new();
    stats_request.container_id = "oom".into();
    let stats = client.stats_container(ctx(), &stats_request).await.unwrap();
    assert!(stats.memory.oom_kill_events >= 1, "{stats:?}");
    assert_eq!(stats.memory.usage_limit, 33554432);
    remove(&client, "oom").await;

    // Shutdown powers the guest off; QEMU then exits.
    shutdown(&client).await;
}

#[test]
fn agent_as_guest_pid1_runs_containers_over_hybrid_vsock() {
    let guest = match AgentGuestFixture::locate().and_then(AgentGuest::new) {
        Ok(guest) => guest,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    guest.run(|uds| async move { drive(&uds).await });
}
