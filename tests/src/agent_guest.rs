//! The agent as PID 1 of a real guest, driven from the host the way the
//! shim drives it: our kernel under QEMU/TCG, the agent initramfs
//! (`kernel-config/build-agent-initramfs.sh`: the agent as `/init`, a
//! busybox container rootfs at [`GUEST_ROOTFS`]), our vsock device served
//! over vhost-user by `cloister-vmm vhost-user --device vsock`, and any
//! further vhost-user devices a test adds (virtio-fs shares, ...).
//!
//! [`AgentGuest::run`] boots once, hands the hybrid vsock socket to the
//! test's async `drive` function, and afterwards checks that the guest shut
//! down cleanly, printing the console and back-end logs when anything
//! failed.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloister_guest_image::paths;
use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::{attach_stdio, hybrid_vsock_connect};
use tokio::io::AsyncReadExt;

use crate::cloister_vmm::find_cloister_vmm;
use crate::console::{kill_process_group, ConsoleRun, WaitPolicy};
use crate::guest_image::GuestImage;
use crate::qemu::{
    qemu_available, Accel, QemuConfig, QemuMicrovm, VhostUserDevice, VhostUserKind, KERNEL_PANIC,
    PANIC_GRACE, QEMU_BINARY,
};
use crate::vhost_user::VsockBackend;

/// The agent's ttrpc port in the guest.
pub const AGENT_PORT: u32 = 1024;
/// The agent's stdio stream port in the guest.
pub const STDIO_PORT: u32 = 1025;
/// Where build-agent-initramfs.sh puts the container rootfs in the image.
pub const GUEST_ROOTFS: &str = "/rootfs/busybox";
/// Boot under TCG takes seconds; a loaded 2-core CI machine needs more.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(180);
/// How long a container's output may take to reach EOF.
const OUTPUT_DEADLINE: Duration = Duration::from_secs(60);

/// A ttrpc context with a timeout long enough for a loaded TCG guest.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

/// What an agent guest needs on this host; `Err` carries the reason to
/// print when a test skips.
#[derive(Debug, Clone)]
pub struct AgentGuestFixture {
    pub image: GuestImage,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
}

impl AgentGuestFixture {
    pub fn locate() -> Result<Self, String> {
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
        Ok(Self {
            image,
            initramfs,
            vmm,
        })
    }
}

/// A vhost-user back end process, killed on drop.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    name: String,
    log: PathBuf,
}

impl BackendProcess {
    /// Spawns `command` with its stderr in `log`, and waits until it
    /// listens on `socket`.
    pub fn spawn(
        name: &str,
        mut command: Command,
        socket: &Path,
        log: &Path,
    ) -> Result<Self, String> {
        let log_file =
            File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start the {name} back end: {e}"))?;
        let mut backend = Self {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
        };
        let started = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = backend.child.try_wait() {
                return Err(format!(
                    "the {name} back end exited with {status}:\n{}",
                    backend.log_text()
                ));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "the {name} back end did not create {} in 10 s",
                    socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(backend)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A booted guest whose agent is reached on [`Self::uds`].
pub struct AgentGuest {
    dir: tempfile::TempDir,
    fixture: AgentGuestFixture,
    backends: Vec<BackendProcess>,
    qemu: QemuConfig,
}

impl AgentGuest {
    /// Prepares a guest with 512 MiB and our vsock back end running.
    pub fn new(fixture: AgentGuestFixture) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
        let mut qemu =
            QemuConfig::new(Accel::Tcg, &fixture.image.vmlinux, Some(&fixture.initramfs));
        qemu.memory_mib = 512;
        let mut guest = Self {
            dir,
            fixture,
            backends: Vec::new(),
            qemu,
        };
        let backend = VsockBackend::Cloister {
            binary: guest.fixture.vmm.clone(),
        };
        let command = backend.command(&guest.socket_path("vsock"), &guest.uds());
        guest.add_vhost_user(VhostUserKind::Vsock, "vsock", command)?;
        Ok(guest)
    }

    /// The hybrid vsock Unix socket of the guest.
    pub fn uds(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    /// A scratch folder living as long as the guest.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn fixture(&self) -> &AgentGuestFixture {
        &self.fixture
    }

    pub fn qemu_mut(&mut self) -> &mut QemuConfig {
        &mut self.qemu
    }

    /// The vhost-user socket path for the back end called `name`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("vhost-user-{name}.sock"))
    }

    /// Starts `command` (which must listen on [`Self::socket_path`]`(name)`)
    /// and gives its device to the guest.
    pub fn add_vhost_user(
        &mut self,
        kind: VhostUserKind,
        name: &str,
        command: Command,
    ) -> Result<(), String> {
        let socket = self.socket_path(name);
        let log = self.dir.path().join(format!("{name}.log"));
        self.backends
            .push(BackendProcess::spawn(name, command, &socket, &log)?);
        self.qemu.vhost_user.push(VhostUserDevice { kind, socket });
        Ok(())
    }

    /// Boots the guest, runs `drive(uds)` against it, and checks that the
    /// guest then shut down without a panic (the drive function ends with
    /// the agent's Shutdown). Panics, with the console and back-end logs,
    /// when any of that fails.
    pub fn run<F, Fut>(self, drive: F)
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = ()>,
    {
        self.run_capturing(drive);
    }

    /// As [`Self::run`], returning the console transcript and back-end logs
    /// (tests that search what the host saw).
    pub fn run_capturing<F, Fut>(self, drive: F) -> String
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = ()>,
    {
        let vm = QemuMicrovm::spawn(&self.qemu).expect("start QEMU");
        let vm_pid = vm.id();
        let policy = WaitPolicy {
            timeout: AGENT_DEADLINE * 2,
            end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
            idle_limit: None,
        };
        let console = std::thread::spawn(move || vm.wait_until(&policy, |_| {}));
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        let uds = self.uds();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(drive(uds))
        }));
        if outcome.is_err() {
            // The guest waits forever for a host that gave up.
            kill_process_group(vm_pid);
        }
        let run: ConsoleRun = console.join().expect("console thread");
        let mut transcript = run.transcript();
        for backend in &self.backends {
            transcript.push_str(&format!(
                "--- {} back end log ---\n{}",
                backend.name,
                backend.log_text()
            ));
        }
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
            "agent or back end panicked:\n{transcript}"
        );
        transcript
    }
}

/// An OCI spec running `args` as root in the busybox rootfs, with its own
/// pid, ipc, uts and mount namespaces (the guest's network).
pub fn busybox_spec(args: &[&str]) -> serde_json::Value {
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

/// A create request for `spec` on the image's busybox rootfs.
pub fn create_request(
    id: &str,
    spec: &serde_json::Value,
    stdout: bool,
) -> agent::CreateContainerRequest {
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = id.into();
    request.oci_spec_json = serde_json::to_vec(spec).unwrap_or_default();
    let mut root = agent::Rootfs::new();
    root.set_directory(GUEST_ROOTFS.into());
    request.rootfs = Some(root).into();
    let mut stdio = agent::Stdio::new();
    stdio.stdout = stdout;
    request.stdio = Some(stdio).into();
    request
}

/// Connects to the agent, retrying until it answers a health check or
/// [`AGENT_DEADLINE`] passes.
pub async fn connect_agent(uds: &Path) -> Result<AgentServiceClient, String> {
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

/// The container's exit status.
pub async fn wait(client: &AgentServiceClient, id: &str) -> u32 {
    let mut request = agent::WaitProcessRequest::new();
    request.container_id = id.into();
    client
        .wait_process(ctx(), &request)
        .await
        .unwrap_or_else(|e| panic!("wait for {id}: {e}"))
        .exit_status
}

pub async fn start(client: &AgentServiceClient, id: &str) {
    let mut request = agent::StartContainerRequest::new();
    request.container_id = id.into();
    client
        .start_container(ctx(), &request)
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e}"));
}

pub async fn remove(client: &AgentServiceClient, id: &str) {
    let mut request = agent::RemoveContainerRequest::new();
    request.container_id = id.into();
    client
        .remove_container(ctx(), &request)
        .await
        .unwrap_or_else(|e| panic!("remove {id}: {e}"));
}

/// Creates, starts and removes the container `request` describes and
/// returns its stdout and exit status (stdout is forced on).
pub async fn run_to_exit(
    client: &AgentServiceClient,
    uds: &Path,
    mut request: agent::CreateContainerRequest,
) -> (String, u32) {
    let id = request.container_id.clone();
    request.stdio.mut_or_insert_default().stdout = true;
    client
        .create_container(ctx(), &request)
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
    let stream = hybrid_vsock_connect(uds, STDIO_PORT)
        .await
        .unwrap_or_else(|e| panic!("stdio stream of {id}: {e}"));
    let mut stdout = attach_stdio(stream, &id, "", StreamKind::Stdout)
        .await
        .unwrap_or_else(|e| panic!("attach stdout of {id}: {e}"));
    start(client, &id).await;
    let mut out = String::new();
    tokio::time::timeout(OUTPUT_DEADLINE, stdout.read_to_string(&mut out))
        .await
        .unwrap_or_else(|_| panic!("stdout of {id} did not reach EOF"))
        .unwrap_or_else(|e| panic!("stdout of {id}: {e}"));
    let status = wait(client, &id).await;
    remove(client, &id).await;
    (out, status)
}

/// Asks the agent to shut the guest down (QEMU then exits).
pub async fn shutdown(client: &AgentServiceClient) {
    client
        .shutdown(ctx(), &agent::ShutdownRequest::new())
        .await
        .expect("agent shutdown");
}
