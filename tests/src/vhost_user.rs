//! A guest talking to a vsock device served over vhost-user: QEMU/TCG
//! `-M microvm` with shared guest memory and `vhost-user-vsock-device`,
//! the back end being `cloister-vmm vhost-user --device vsock` (ours) or
//! rust-vmm's `vhost-device-vsock` (the peer), and the vsock probe
//! (`kernel-config/vsock-probe`) as `/init`.
//!
//! [`run_vsock_probe`] boots once and drives every probe mode from the host
//! in order: guest→host echo with round-trip latency, N concurrent
//! host-initiated connections, bulk transfer both ways with checksums.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cloister_guest_image::paths;
use cloister_vsock_probe::{ProbeConfig, DONE_MARKER, FAIL_PREFIX, START_MARKER};

use crate::cloister_vmm::CloisterVmmConfig;
use crate::console::{kill_process_group, ConsoleProcess, ConsoleRun, WaitPolicy};
use crate::hybrid_vsock::{
    accept_guest, bulk_session, concurrent_echo, echo_session, listen_host_port, BulkReport,
    HybridVsockError, Latency,
};
use crate::qemu::{
    Accel, QemuConfig, QemuMicrovm, VhostUserDevice, VhostUserKind, KERNEL_PANIC, PANIC_GRACE,
};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// Host port the probe's echo mode connects to.
pub const ECHO_PORT: u32 = 5000;
/// Guest port the probe's accept mode listens on.
pub const LISTEN_PORT: u32 = 1234;
/// Host port the probe's bulk mode connects to.
pub const BULK_PORT: u32 = 5001;
/// Names the peer binary explicitly.
pub const VHOST_DEVICE_VSOCK_ENV: &str = "VHOST_DEVICE_VSOCK";
/// The peer's binary name.
pub const VHOST_DEVICE_VSOCK_BINARY: &str = "vhost-device-vsock";
/// The probe initramfs, built by
/// `kernel-config/build-initramfs.sh --package cloister-vsock-probe`.
pub const PROBE_INITRAMFS: &str = "vsock-probe.cpio";

/// Errors running the probe guest.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserRunError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{backend} did not create {socket} within {waited:?}")]
    NoSocket {
        backend: String,
        socket: PathBuf,
        waited: Duration,
    },
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        source: HybridVsockError,
    },
    #[error("cannot create a temporary folder: {0}")]
    TempDir(std::io::Error),
}

/// Which vhost-user vsock back end serves the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockBackend {
    /// `cloister-vmm vhost-user --device vsock`.
    Cloister { binary: PathBuf },
    /// rust-vmm's `vhost-device-vsock`.
    Peer { binary: PathBuf },
}

impl VsockBackend {
    pub fn name(&self) -> &'static str {
        match self {
            VsockBackend::Cloister { .. } => "cloister-vmm",
            VsockBackend::Peer { .. } => "vhost-device-vsock",
        }
    }

    pub fn binary(&self) -> &Path {
        match self {
            VsockBackend::Cloister { binary } | VsockBackend::Peer { binary } => binary,
        }
    }

    /// The command serving one device on `socket`, with the hybrid vsock
    /// Unix socket at `uds`.
    pub fn command(&self, socket: &Path, uds: &Path) -> Command {
        let mut command = Command::new(self.binary());
        match self {
            VsockBackend::Cloister { .. } => {
                command
                    .args(["vhost-user", "--device", "vsock", "--guest-cid"])
                    .arg(GUEST_CID.to_string())
                    .arg("--uds")
                    .arg(uds)
                    .arg("--socket")
                    .arg(socket);
            }
            VsockBackend::Peer { .. } => {
                command
                    .arg("--guest-cid")
                    .arg(GUEST_CID.to_string())
                    .arg("--uds-path")
                    .arg(uds)
                    .arg("--socket")
                    .arg(socket);
            }
        }
        command
    }
}

/// `$VHOST_DEVICE_VSOCK`, else `<cache>/tools/bin/vhost-device-vsock`
/// (where `scripts/install-peer-tool.sh vhost-device-vsock` puts it), else the one on
/// `PATH`; `None` when none runs.
pub fn find_vhost_device_vsock() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os(VHOST_DEVICE_VSOCK_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        Some(
            paths::cache_dir()
                .join("tools")
                .join("bin")
                .join(VHOST_DEVICE_VSOCK_BINARY),
        ),
        Some(PathBuf::from(VHOST_DEVICE_VSOCK_BINARY)),
    ];
    candidates.into_iter().flatten().find(|binary| {
        Command::new(binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The probe initramfs: `$CLOISTER_VSOCK_PROBE_INITRAMFS`, else
/// `<cache>/initramfs/vsock-probe.cpio`.
pub fn probe_initramfs() -> PathBuf {
    std::env::var_os("CLOISTER_VSOCK_PROBE_INITRAMFS")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || paths::cache_dir().join("initramfs").join(PROBE_INITRAMFS),
            PathBuf::from,
        )
}

/// A running back end; killed when dropped.
struct BackendProcess {
    child: Child,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts `command` (named `name` in messages) and waits until it
    /// listens on `socket`.
    fn spawn(
        name: &str,
        mut command: Command,
        socket: &Path,
        log: &Path,
    ) -> Result<Self, VhostUserRunError> {
        let binary = PathBuf::from(command.get_program());
        let spawn_error = |source| VhostUserRunError::Spawn {
            binary: binary.clone(),
            source,
        };
        let stderr = File::create(log).map_err(spawn_error)?;
        let child = command
            // Plain log lines for failure messages.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(spawn_error)?;
        let process = Self {
            child,
            log: log.to_path_buf(),
        };
        let started = Instant::now();
        let wait = Duration::from_secs(10);
        while !socket.exists() {
            if started.elapsed() > wait {
                return Err(VhostUserRunError::NoSocket {
                    backend: format!("{name} ({})", process.log_text()),
                    socket: socket.to_path_buf(),
                    waited: wait,
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(process)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `wait` for the back end to exit (it does when QEMU
    /// disconnects); kills it otherwise. Returns whether it exited by
    /// itself, successfully.
    fn finish(mut self, wait: Duration) -> (bool, String) {
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return (status.success(), self.log_text()),
                Ok(None) if started.elapsed() < wait => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return (false, self.log_text());
                }
            }
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What to run in the probe guest.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// Echo round trips timed (small messages).
    pub echo_rounds: usize,
    pub echo_message_len: usize,
    /// Bytes pushed through the echo after the round trips.
    pub echo_block_len: usize,
    /// After the echo the guest resets its vsock driver (unbind, bind) and
    /// echoes again: the device must come back (see
    /// [`ProbeConfig::rebind`]).
    pub rebind: bool,
    /// Host-initiated connections open at once.
    pub connections: u32,
    pub bytes_per_connection: usize,
    /// MiB each way in bulk mode.
    pub bulk_mib: u32,
    /// The guest's write size in bulk mode (see
    /// [`ProbeConfig::write_chunk`]).
    pub write_chunk: u32,
    /// For the whole run.
    pub timeout: Duration,
}

impl ProbePlan {
    /// The figures: 1000 round trips, 32 connections, 256 MiB.
    pub fn new(vmlinux: &Path, initramfs: &Path) -> Self {
        Self {
            vmlinux: vmlinux.to_path_buf(),
            initramfs: initramfs.to_path_buf(),
            echo_rounds: 1000,
            echo_message_len: 64,
            echo_block_len: 1 << 20,
            rebind: false,
            connections: 32,
            bytes_per_connection: 64 * 1024,
            bulk_mib: 256,
            write_chunk: cloister_vsock_probe::BULK_CHUNK as u32,
            timeout: Duration::from_secs(600),
        }
    }

    fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            echo_port: Some(ECHO_PORT),
            rebind: self.rebind,
            listen: Some((LISTEN_PORT, self.connections)),
            bulk: Some((BULK_PORT, self.bulk_mib)),
            write_chunk: Some(self.write_chunk),
            ..ProbeConfig::default()
        }
    }
}

/// What the host measured, and how the run ended.
#[derive(Debug)]
pub struct ProbeReport {
    pub backend: String,
    /// Every host step's outcome; the first error ends the run.
    pub outcome: Result<ProbeFigures, VhostUserRunError>,
    pub console: ConsoleRun,
    /// The back end exited by itself, successfully, after QEMU did.
    pub backend_exited_cleanly: bool,
    pub backend_log: String,
}

/// Figures from a run where every host step passed.
#[derive(Debug, Clone)]
pub struct ProbeFigures {
    pub latency: Latency,
    pub concurrent_bytes: u64,
    pub concurrent_time: Duration,
    pub bulk: BulkReport,
}

impl ProbeReport {
    /// The guest printed its done marker and no failure.
    pub fn guest_passed(&self) -> bool {
        self.console.find(DONE_MARKER).is_some() && self.console.find(FAIL_PREFIX).is_none()
    }

    /// Console and back-end log, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "{}--- {} log ---\n{}",
            self.console.transcript(),
            self.backend,
            self.backend_log
        )
    }
}

/// Boots the probe guest against `backend` and drives every mode from the
/// host (see the module docs).
pub fn run_vsock_probe(
    backend: &VsockBackend,
    plan: &ProbePlan,
) -> Result<ProbeReport, VhostUserRunError> {
    let dir = tempfile::tempdir().map_err(VhostUserRunError::TempDir)?;
    let socket = dir.path().join("vhost-user.sock");
    let uds = dir.path().join("vsock.sock");
    let listeners = HostListeners::bind(&uds)?;
    let process = BackendProcess::spawn(
        backend.name(),
        backend.command(&socket, &uds),
        &socket,
        &dir.path().join("backend.log"),
    )?;

    let mut qemu = QemuConfig::new(Accel::Tcg, &plan.vmlinux, Some(&plan.initramfs));
    qemu.cmdline.push(' ');
    qemu.cmdline.push_str(&plan.probe_config().to_cmdline());
    qemu.vhost_user.push(VhostUserDevice {
        kind: VhostUserKind::Vsock,
        socket: socket.clone(),
    });
    let vm = QemuMicrovm::spawn(&qemu).map_err(|e| VhostUserRunError::Spawn {
        binary: qemu.binary.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let (outcome, console) = drive_vm(vm, plan, &uds, &listeners);
    let (backend_exited_cleanly, backend_log) = process.finish(Duration::from_secs(5));
    Ok(ProbeReport {
        backend: backend.name().to_string(),
        outcome,
        console,
        backend_exited_cleanly,
        backend_log,
    })
}

/// Boots the probe guest in `cloister-vmm` itself, with its vsock device on
/// virtio-mmio (`--vsock`), and drives every mode the same way. Needs a host
/// whose KVM runs guest user mode (not nested `kvm_pvm`).
pub fn run_vsock_probe_in_cloister_vmm(
    binary: &Path,
    plan: &ProbePlan,
) -> Result<ProbeReport, VhostUserRunError> {
    let dir = tempfile::tempdir().map_err(VhostUserRunError::TempDir)?;
    let uds = dir.path().join("vsock.sock");
    let listeners = HostListeners::bind(&uds)?;
    let mut config = CloisterVmmConfig::new(binary, &plan.vmlinux, Some(&plan.initramfs));
    config.cmdline.push(' ');
    config.cmdline.push_str(&plan.probe_config().to_cmdline());
    let mut command = config.command();
    command
        .arg("--vsock")
        .arg(format!("guest_cid={GUEST_CID},uds_path={}", uds.display()));
    let vm = ConsoleProcess::spawn(command).map_err(|e| VhostUserRunError::Spawn {
        binary: binary.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let (outcome, console) = drive_vm(vm, plan, &uds, &listeners);
    Ok(ProbeReport {
        backend: "cloister-vmm (virtio-mmio)".to_string(),
        outcome,
        console,
        backend_exited_cleanly: true,
        backend_log: String::new(),
    })
}

/// The host ports the probe connects to, bound before the guest starts.
struct HostListeners {
    echo: UnixListener,
    bulk: UnixListener,
}

impl HostListeners {
    fn bind(uds: &Path) -> Result<Self, VhostUserRunError> {
        let step = |step: &'static str| move |source| VhostUserRunError::Step { step, source };
        Ok(Self {
            echo: listen_host_port(uds, ECHO_PORT).map_err(step("listen for echo"))?,
            bulk: listen_host_port(uds, BULK_PORT).map_err(step("listen for bulk"))?,
        })
    }
}

/// Collects `vm`'s console on a thread while the host drives the probe;
/// kills the VM if the host gives up, so the console wait ends.
fn drive_vm(
    vm: ConsoleProcess,
    plan: &ProbePlan,
    uds: &Path,
    listeners: &HostListeners,
) -> (Result<ProbeFigures, VhostUserRunError>, ConsoleRun) {
    let vm_pid = vm.id();
    let policy = WaitPolicy {
        timeout: plan.timeout,
        end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
        idle_limit: None,
    };
    let console = thread::spawn(move || vm.wait_until(&policy, |_| {}));
    let outcome = drive_probe(plan, uds, &listeners.echo, &listeners.bulk);
    if outcome.is_err() && !console.is_finished() {
        // The guest may wait forever for a host that gave up.
        kill_process_group(vm_pid);
    }
    let console = console.join().unwrap_or_else(|_| ConsoleRun {
        status: None,
        timed_out: false,
        went_idle: false,
        elapsed: Duration::ZERO,
        console: Vec::new(),
        stderr: "console thread panicked".to_string(),
        peak_rss_kib: None,
    });
    (outcome, console)
}

/// The host's half of every probe mode, in the probe's order.
fn drive_probe(
    plan: &ProbePlan,
    uds: &Path,
    echo_listener: &UnixListener,
    bulk_listener: &UnixListener,
) -> Result<ProbeFigures, VhostUserRunError> {
    let step = |step: &'static str| move |source| VhostUserRunError::Step { step, source };
    // Boot under TCG takes seconds; a loaded CI machine may take longer.
    let boot_wait = plan.timeout / 2;
    let mut echo = accept_guest(echo_listener, boot_wait).map_err(step("guest→host echo"))?;
    let latency = echo_session(
        &mut echo,
        plan.echo_rounds,
        plan.echo_message_len,
        plan.echo_block_len,
    )
    .map_err(step("guest→host echo"))?;
    drop(echo);
    if plan.rebind {
        let mut again = accept_guest(echo_listener, Duration::from_secs(60))
            .map_err(step("guest→host echo after the driver reset"))?;
        echo_session(&mut again, 10, plan.echo_message_len, 64 * 1024)
            .map_err(step("guest→host echo after the driver reset"))?;
    }
    let started = Instant::now();
    let concurrent_bytes = concurrent_echo(
        uds,
        LISTEN_PORT,
        plan.connections,
        plan.bytes_per_connection,
        Duration::from_secs(60),
    )
    .map_err(step("concurrent host→guest echo"))?;
    let concurrent_time = started.elapsed();
    let bulk = accept_guest(bulk_listener, Duration::from_secs(60)).map_err(step("bulk"))?;
    let bulk = bulk_session(bulk, plan.bulk_mib).map_err(step("bulk"))?;
    Ok(ProbeFigures {
        latency,
        concurrent_bytes,
        concurrent_time,
        bulk,
    })
}

/// Whether `report`'s console shows the probe ran at all (for messages).
pub fn probe_started(report: &ProbeReport) -> bool {
    report.console.find(START_MARKER).is_some()
}

/// The rng and block devices of `cloister-vmm` served over vhost-user to one
/// QEMU/TCG guest, which reads entropy, checksums the disk and writes to it
/// (the probe's rng and block modes).
pub struct DeviceProbe {
    /// Holds the disk image and the sockets.
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
}

/// How a [`DeviceProbe`] run ended.
#[derive(Debug)]
pub struct DeviceProbeReport {
    pub console: ConsoleRun,
    /// Per back end: its name, whether it exited 0 after QEMU did, its log.
    pub backends: Vec<(String, bool, String)>,
}

impl DeviceProbeReport {
    /// Console and back-end logs, for failure messages.
    pub fn transcript(&self) -> String {
        let mut out = self.console.transcript();
        for (name, _, log) in &self.backends {
            out.push_str(&format!("--- {name} log ---\n{log}"));
        }
        out
    }
}

impl DeviceProbe {
    /// A temporary folder with a `disk_mib` MiB disk image of pattern data
    /// (`seed`).
    pub fn new(disk_mib: u32, seed: u64) -> Result<Self, VhostUserRunError> {
        let dir = tempfile::tempdir().map_err(VhostUserRunError::TempDir)?;
        let disk = dir.path().join("disk.img");
        let mut data = vec![0u8; (disk_mib as usize) << 20];
        cloister_vsock_probe::Pattern::new(seed).fill(&mut data);
        std::fs::write(&disk, &data).map_err(VhostUserRunError::TempDir)?;
        Ok(Self { dir, disk })
    }

    /// Boots the probe with `binary` serving rng and block (`disk`), the
    /// guest reading `rng_bytes` bytes, the whole disk, and writing
    /// `write_kib` KiB.
    pub fn run(
        &self,
        binary: &Path,
        vmlinux: &Path,
        initramfs: &Path,
        rng_bytes: u32,
        write_kib: u32,
        timeout: Duration,
    ) -> Result<DeviceProbeReport, VhostUserRunError> {
        let disk_mib = std::fs::metadata(&self.disk)
            .map_err(VhostUserRunError::TempDir)?
            .len()
            >> 20;
        let rng_socket = self.dir.path().join("rng.sock");
        let block_socket = self.dir.path().join("block.sock");
        let mut rng = Command::new(binary);
        rng.args(["vhost-user", "--device", "rng", "--socket"])
            .arg(&rng_socket);
        let mut block = Command::new(binary);
        block
            .args(["vhost-user", "--device", "block", "--path"])
            .arg(&self.disk)
            .arg("--socket")
            .arg(&block_socket);
        let processes = [
            (
                "rng",
                BackendProcess::spawn("rng", rng, &rng_socket, &self.dir.path().join("rng.log"))?,
            ),
            (
                "block",
                BackendProcess::spawn(
                    "block",
                    block,
                    &block_socket,
                    &self.dir.path().join("block.log"),
                )?,
            ),
        ];
        let probe = ProbeConfig {
            rng_bytes: Some(rng_bytes),
            block: Some((u32::try_from(disk_mib).unwrap_or(u32::MAX), write_kib)),
            ..ProbeConfig::default()
        };
        let mut qemu = QemuConfig::new(Accel::Tcg, vmlinux, Some(initramfs));
        qemu.cmdline.push(' ');
        qemu.cmdline.push_str(&probe.to_cmdline());
        qemu.vhost_user.push(VhostUserDevice {
            kind: VhostUserKind::Rng,
            socket: rng_socket,
        });
        qemu.vhost_user.push(VhostUserDevice {
            kind: VhostUserKind::Block,
            socket: block_socket,
        });
        let vm = QemuMicrovm::spawn(&qemu).map_err(|e| VhostUserRunError::Spawn {
            binary: qemu.binary.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let console = vm.wait_until(
            &WaitPolicy {
                timeout,
                end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
                idle_limit: None,
            },
            |_| {},
        );
        let backends = processes
            .into_iter()
            .map(|(name, process)| {
                let (clean, log) = process.finish(Duration::from_secs(5));
                (name.to_string(), clean, log)
            })
            .collect();
        Ok(DeviceProbeReport { console, backends })
    }
}
