//! The shim's own pieces against a real guest: the `Qemu` hypervisor
//! backend (QEMU/TCG `-M microvm`, our vsock device served by
//! `cloister-vmm vhost-user`), `AgentEndpoint::HybridVsock` with retry
//! until the agent answers, the ttrpc `AgentClient`, and `ProcessIo`
//! copying a container's output into FIFOs — with the agent initramfs
//! (agent as PID 1, busybox rootfs at `/rootfs/busybox`) and without the
//! pod's shared folder, which needs a virtio-fs device the VMM does not
//! have yet.
//!
//! Skips, printing why, without QEMU, the built kernel, the agent
//! initramfs or the `cloister-vmm` binary.

mod guest_support;

use std::time::Duration;

use cloister_protocol::agent;
use cloister_shim::agent_client::{AgentClient, AgentEndpoint};
use cloister_shim::container::StdioPaths;
use cloister_shim::io::{requested_streams, ProcessIo};
use cloister_shim::vmm_client::{ChildExit, Hypervisor, Qemu, VmPaths};
use guest_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_backend_boots_the_agent_and_a_container_writes_to_fifos() {
    let config = match guest_config() {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let vm = guest_vm();
    let paths = VmPaths {
        dir: dir.path().to_path_buf(),
    };
    let mut qemu = Qemu::new(&config, &vm, paths.clone());
    qemu.start().await.unwrap();
    let pids = qemu.pids();
    assert_eq!(pids.len(), 2, "QEMU and the vsock back end");

    let started = std::time::Instant::now();
    let agent = AgentEndpoint::HybridVsock {
        uds: qemu.vsock_uds(),
    }
    .connect_until(AGENT_DEADLINE)
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nconsole:\n{}",
            std::fs::read_to_string(paths.console_log()).unwrap_or_default()
        )
    });
    println!(
        "agent answered {:.1?} after QEMU started",
        started.elapsed()
    );
    let mut events = agent.events().await.unwrap();

    let fifos = tempfile::tempdir().unwrap();
    let stdio = StdioPaths {
        stdin: String::new(),
        stdout: fifo(fifos.path(), "stdout"),
        stderr: fifo(fifos.path(), "stderr"),
        terminal: false,
    };
    let stdout = read_fifo(stdio.stdout.clone());
    let stderr = read_fifo(stdio.stderr.clone());
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = "hello".into();
    request.oci_spec_json = serde_json::to_vec(&spec(&[
        "sh",
        "-c",
        "echo hello from $(uname -r); echo to stderr >&2; exit 3",
    ]))
    .unwrap();
    let mut rootfs = agent::Rootfs::new();
    rootfs.set_directory(GUEST_ROOTFS.into());
    request.rootfs = Some(rootfs).into();
    request.stdio = Some(requested_streams(&stdio)).into();
    agent.create_container(request).await.unwrap();
    let mut io = ProcessIo::attach(&agent, "hello", "", &stdio)
        .await
        .unwrap();
    agent.start_container("hello").await.unwrap();

    let exit = loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("no exit event within 60 s")
            .expect("event stream ended");
        if event.has_exited() {
            break event.exited().clone();
        }
    };
    assert_eq!((exit.container_id.as_str(), exit.exit_status), ("hello", 3));
    assert!(io.wait_output(Duration::from_secs(30)).await);
    let out = stdout.await.unwrap();
    let host = nix::sys::utsname::uname().unwrap();
    let host_release = host.release().to_string_lossy().into_owned();
    assert!(out.starts_with("hello from "), "{out:?}");
    assert!(
        !out.contains(&host_release),
        "ran on the host's kernel: {out:?}"
    );
    assert_eq!(stderr.await.unwrap(), "to stderr\n");
    agent.remove_container("hello", false).await.unwrap();

    // Agent shutdown powers the guest off; QEMU (-no-reboot) then exits.
    agent.shutdown().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), qemu.wait_exit())
        .await
        .expect("VM still running 60 s after agent shutdown");
    println!("VM ended: {exit}");
    qemu.stop(Duration::from_secs(5)).await;
    for pid in pids {
        assert!(process_gone(pid), "process {pid} still running");
    }
    assert_ne!(exit, ChildExit::Lost);
}
