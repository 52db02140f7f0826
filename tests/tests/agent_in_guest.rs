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

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::console::{kill_process_group, ConsoleRun, WaitPolicy};
use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::qemu::{
    qemu_available, Accel, QemuConfig, QemuMicrovm, VhostUserDevice, VhostUserKind, KERNEL_PANIC,
    PANIC_GRACE, QEMU_BINARY,
};
use cloister_e2e::vhost_user::VsockBackend;
use cloister_guest_image::paths;
use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::{attach_stdio, hybrid_vsock_connect};
use tokio::io::AsyncReadExt;

const AGENT_PORT: u32 = 1024;
const STDIO_PORT: u32 = 1025;
/// Where build-agent-initramfs.sh puts the container rootfs in the image.
const GUEST_ROOTFS: &str = "/rootfs/busybox";
/// Boot under TCG takes seconds; a loaded 2-core CI machine needs more.
const AGENT_DEADLINE: Duration = Duration::from_secs(180);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

struct Fixture {
    image: GuestImage,
    initramfs: PathBuf,
    vmm: PathBuf,
}

fn fixture() -> Result<Fixture, String> {
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

fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.1.0",
        "hostname": "in-guest",
        "process": {
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
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

fn create_request(
    id: &str,
    spec: &serde_json::Value,
    stdout: bool,
) -> agent::CreateContainerRequest {
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = id.into();
    request.oci_spec_json = serde_json::to_vec(spec).unwrap();
    let mut root = agent::Rootfs::new();
    root.set_directory(GUEST_ROOTFS.into());
    request.rootfs = Some(root).into();
    let mut stdio = agent::Stdio::new();
    stdio.stdout = stdout;
    request.stdio = Some(stdio).into();
    request
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

async fn wait(client: &AgentServiceClient, id: &str) -> u32 {
    let mut request = agent::WaitProcessRequest::new();
    request.container_id = id.into();
    client
        .wait_process(ctx(), &request)
        .await
        .unwrap()
        .exit_status
}

async fn start(client: &AgentServiceClient, id: &str) {
    let mut request = agent::StartContainerRequest::new();
    request.container_id = id.into();
    client.start_container(ctx(), &request).await.unwrap();
}

async fn remove(client: &AgentServiceClient, id: &str) {
    let mut request = agent::RemoveContainerRequest::new();
    request.container_id = id.into();
    client.remove_container(ctx(), &request).await.unwrap();
}

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
    client.create_container(ctx(), &request).await.unwrap();
    let stream = hybrid_vsock_connect(uds, STDIO_PORT).await.unwrap();
    let mut stdout = attach_stdio(stream, "hello", "", StreamKind::Stdout)
        .await
        .unwrap();
    start(&client, "hello").await;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_string(&mut out))
        .await
        .expect("stdout did not reach EOF")
        .unwrap();
    assert_eq!(out, format!("hello from {}\n", details.kernel_release));
    assert_eq!(wait(&client, "hello").await, 3);
    remove(&client, "hello").await;

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
    client
        .shutdown(ctx(), &agent::ShutdownRequest::new())
        .await
        .unwrap();
}

#[test]
fn agent_as_guest_pid1_runs_containers_over_hybrid_vsock() {
    let fixture = match fixture() {
        Ok(f) => f,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
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
    let vm = QemuMicrovm::spawn(&qemu).unwrap();
    let vm_pid = vm.id();
    let policy = WaitPolicy {
        timeout: AGENT_DEADLINE * 2,
        end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
        idle_limit: None,
    };
    let console = std::thread::spawn(move || vm.wait_until(&policy, |_| {}));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(drive(&uds))
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
    if let Err(panic) = outcome {
        eprintln!("{transcript}");
        std::panic::resume_unwind(panic);
    }
    assert!(
        !run.timed_out,
        "QEMU did not exit after Shutdown:\n{transcript}"
    );
    assert!(
        run.find(KERNEL_PANIC).is_none(),
        "guest panicked:\n{transcript}"
    );
    assert!(
        !transcript.contains("panicked"),
        "agent or backend panicked:\n{transcript}"
    );
}
