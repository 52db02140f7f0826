//! The pod's hypervisor: one `Hypervisor` trait, two backends.
//!
//! - [`CloisterVmm`] (default): `cloister-vmm --config vm.json`, devices
//!   in-process; its vsock device serves hybrid vsock on `vsock.sock`.
//! - [`Qemu`]: `qemu-system-x86_64 -M microvm` with guest memory in a
//!   shared memfd, and our vsock and virtio-fs devices served over
//!   vhost-user by `cloister-vmm vhost-user --device vsock|fs` children; the
//!   vsock backend exposes the same hybrid vsock socket. The agent and the
//!   shared folder are reached the same way in both.
//!
//! Every process runs as a child of the shim with its own log file in the
//! sandbox folder, is watched by a task that records its exit (so VM death
//! is noticed at once), and is stopped with SIGTERM, then SIGKILL after a
//! grace period.
//!
//! Here: the trait, supervised children and the sandbox folder's VM
//! files; `cloister` (the default backend and its vm.json), `qemu` (the
//! QEMU backend), `jail` (what the host prepares for jailed processes).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use cloister_guest_image::cmdline::{self, RebootMethod};
use serde::Serialize;
use tokio::sync::watch;

use crate::confidential::launch::{QuoteService, SnpVcpu, TeeLaunch, TeeLaunchKind};
use crate::config::{HypervisorKind, PodVm, QemuAccel, RuntimeConfig, VmmSection};
use crate::jail_ids::{JailIdLease, JailIdRange, JAIL_ID_LEASES};
use crate::vmm_jail::{
    cgroup_dirs, create_cgroups, create_owned_folder, make_shared_mount, remove_cgroups,
    CGROUP_ROOT,
};

/// The virtio-fs tag of the pod's shared folder (`VmPaths::shared_dir`),
/// which the agent mounts before any container starts.
pub const SHARED_FS_TAG: &str = "cloister";

/// The guest's vsock context id. Hybrid vsock is local to one VM's device,
/// so every VM may use the first free CID.
pub const GUEST_CID: u32 = 3;

/// Errors starting or stopping a hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("spawn {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// The error may be the join's: the child writes its cgroups before
    /// exec, and a refusal there (EBUSY on a v2 folder with children)
    /// reaches the parent as the spawn's.
    #[error("spawn {program} in cgroups {cgroups}: {source}")]
    SpawnInCgroups {
        program: PathBuf,
        cgroups: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `log_tail`: the end of its log, which goes with the sandbox folder.
    #[error("{name} exited during startup ({status}); its log {log} ends: {log_tail:?}")]
    EarlyExit {
        name: String,
        status: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("{what} did not appear within {waited:?}: {path}")]
    SocketTimeout {
        what: &'static str,
        path: PathBuf,
        waited: Duration,
    },
    #[error("cannot prepare the VMM's jail: {0}")]
    Jail(#[from] crate::vmm_jail::VmmJailError),
    #[error("cannot prepare the VMM's jail: {0}")]
    JailIds(#[from] crate::jail_ids::JailIdError),
    #[error(transparent)]
    QemuTee(#[from] QemuTeeError),
}

/// How a supervised child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Code(i32),
    Signal(i32),
    /// Waiting for it failed (it is gone either way).
    Lost,
}

impl std::fmt::Display for ChildExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildExit::Code(c) => write!(f, "exit code {c}"),
            ChildExit::Signal(s) => write!(f, "signal {s}"),
            ChildExit::Lost => f.write_str("exit status lost"),
        }
    }
}

/// A child process, its log, and a watch on its exit.
#[derive(Debug)]
pub struct SupervisedChild {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    exit: watch::Receiver<Option<ChildExit>>,
}

impl SupervisedChild {
    /// Spawns `program args` with stdout and stderr into `log`; the fds in
    /// `inherit` stay open in the child (the shim's own copies stay
    /// close-on-exec, so no other child gets them).
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        inherit: &[i32],
    ) -> Result<Self, HypervisorError> {
        Self::spawn_in_cgroups(name, program, args, log, inherit, &[])
    }

    /// [`Self::spawn`], the child moved into each of `cgroups` (folders
    /// that exist) before it executes anything, so all it allocates is
    /// charged there.
    pub fn spawn_in_cgroups(
        name: &str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        inherit: &[i32],
        cgroups: &[PathBuf],
    ) -> Result<Self, HypervisorError> {
        let file_error = |source| HypervisorError::File {
            path: log.to_path_buf(),
            source,
        };
        // Checked and made C strings here: between fork and exec nothing
        // may allocate, and a failure there could not name the folder.
        let mut procs_files = Vec::with_capacity(cgroups.len());
        for cgroup in cgroups {
            let procs = cgroup.join("cgroup.procs");
            std::fs::metadata(&procs).map_err(|source| HypervisorError::File {
                path: procs.clone(),
                source,
            })?;
            let c_path =
                std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).map_err(|_| {
                    HypervisorError::File {
                        path: procs.clone(),
                        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                    }
                })?;
            procs_files.push(c_path);
        }
        let out = std::fs::File::create(log).map_err(file_error)?;
        let err = out.try_clone().map_err(file_error)?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // If the shim dies, the VM must not outlive it unwatched.
            .kill_on_drop(false);
        // SAFETY: prctl with integer arguments between fork and exec
        // touches no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writer (v1 and v2 alike). open, write and
                // close are async-signal-safe; the paths were built before
                // the fork.
                for procs in &procs_files {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
                Ok(())
            });
        }
        crate::network::tap::inherit_in_child(command.as_std_mut(), inherit);
        let mut child = command.spawn().map_err(|source| {
            let program = program.to_path_buf();
            if cgroups.is_empty() {
                HypervisorError::Spawn { program, source }
            } else {
                let cgroups = cgroups
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                HypervisorError::SpawnInCgroups {
                    program,
                    cgroups,
                    source,
                }
            }
        })?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => ChildExit::Code(code),
                        (None, Some(signal)) => ChildExit::Signal(signal),
                        _ => ChildExit::Lost,
                    }
                }
                Err(_) => ChildExit::Lost,
            };
            tx.send_replace(Some(exit));
        });
        Ok(Self {
            name: name.to_owned(),
            pid,
            log: log.to_path_buf(),
            exit: rx,
        })
    }

    /// The exit, if it happened.
    pub fn exited(&self) -> Option<ChildExit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> ChildExit {
        let mut rx = self.exit.clone();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.unwrap_or(ChildExit::Lost),
            Err(_) => ChildExit::Lost,
        };
        exit
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) -> ChildExit {
        if let Some(exit) = self.exited() {
            return exit;
        }
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(name = %self.name, pid = self.pid, "no exit after {grace:?}, killing");
                self.signal(libc::SIGKILL);
                self.wait().await
            }
        }
    }

    fn signal(&self, signal: i32) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        // Only while the watcher has not seen the exit: the pid is still
        // ours (not reaped, so not reused).
        if self.exited().is_none() && pid > 0 {
            // SAFETY: kill(2) with a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

/// The files of one VM inside the sandbox folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    /// The sockets the VMM processes create: the one folder of the host a
    /// jailed VMM may write in (its uid owns it).
    pub fn sockets_dir(&self) -> PathBuf {
        self.dir.join("sockets")
    }
    /// The jailed VMM's root; an empty folder on the host.
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("jail")
    }
    /// Hybrid vsock socket: where the shim reaches the agent.
    pub fn vsock_uds(&self) -> PathBuf {
        self.sockets_dir().join("vsock.sock")
    }
    pub fn vm_config(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Exported to the guest over virtio-fs; rootfs mounts go below it.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }
    pub fn vhost_user_vsock(&self) -> PathBuf {
        self.sockets_dir().join("vhost-vsock.sock")
    }
    pub fn vhost_user_vsock_log(&self) -> PathBuf {
        self.dir.join("vhost-user-vsock.log")
    }
    pub fn vhost_user_fs(&self) -> PathBuf {
        self.sockets_dir().join("vhost-fs.sock")
    }
    pub fn vhost_user_fs_log(&self) -> PathBuf {
        self.dir.join("vhost-user-fs.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// The VM's host processes (`crate::vm_processes`), for `shim delete`.
    pub fn vm_processes(&self) -> PathBuf {
        self.dir.join("vm.pids")
    }
}

/// Notes `child` in the sandbox's record of VM processes; a process the
/// record misses would only lack the `shim delete` backstop, so a failure
/// is logged, not fatal.
fn record_vm_process(paths: &VmPaths, child: &SupervisedChild) {
    if let Err(e) = crate::vm_processes::record(&paths.vm_processes(), child.pid) {
        tracing::warn!(name = %child.name, pid = child.pid, "cannot record the VM process: {e}");
    }
}

/// A running (or stopped) microVM, whichever hypervisor runs it.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Spawns the VM; returns once it is running (the guest still boots).
    async fn start(&mut self) -> Result<(), HypervisorError>;
    /// The hybrid vsock socket of the VM's vsock device.
    fn vsock_uds(&self) -> PathBuf;
    /// Resolves when the VM is gone (any of its processes ended).
    async fn wait_exit(&self) -> ChildExit;
    /// Stops every process of the VM: SIGTERM, SIGKILL after `grace`.
    async fn stop(&self, grace: Duration);
    /// Host pids of the VM's processes (for Pids and cgroup placement).
    fn pids(&self) -> Vec<u32>;
    /// The uid/gid the VM's jailed processes run as, once started (none
    /// without a jail): whoever serves them a socket lets only that in.
    fn jail_ids(&self) -> Option<(u32, u32)> {
        None
    }
}

mod cloister;
mod jail;
mod qemu;

pub use cloister::*;
pub use jail::*;
pub use qemu::*;

fn join_cmdline(base: String, extra: &str) -> String {
    if extra.trim().is_empty() {
        base
    } else {
        format!("{base} {}", extra.trim())
    }
}

/// The tap fds the VMM process must inherit.
fn nic_fds(vm: &PodVm) -> Vec<i32> {
    vm.nics.iter().map(|nic| nic.tap_fd).collect()
}

/// How much of a failed process's log goes into the error.
const LOG_TAIL_BYTES: usize = 600;

/// The last `max` bytes of a log file (whole lines where possible).
pub fn log_tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    match tail.find('\n') {
        Some(newline) if newline + 1 < tail.len() => tail[newline + 1..].to_owned(),
        _ => tail.to_owned(),
    }
}

/// How long a freshly spawned process may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

async fn wait_for_socket(
    child: &SupervisedChild,
    path: &Path,
    what: &'static str,
) -> Result<(), HypervisorError> {
    let started = tokio::time::Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(exit) = child.exited() {
            return Err(HypervisorError::EarlyExit {
                name: child.name.clone(),
                status: exit.to_string(),
                log: child.log.clone(),
                log_tail: log_tail(&child.log, LOG_TAIL_BYTES),
            });
        }
        if started.elapsed() >= SOCKET_WAIT {
            return Err(HypervisorError::SocketTimeout {
                what,
                path: path.to_path_buf(),
                waited: SOCKET_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first of several exits.
async fn futures_select_all<F>(futures: impl IntoIterator<Item = F>) -> ChildExit
where
    F: std::future::Future<Output = ChildExit> + Unpin,
{
    let mut futures: Vec<F> = futures.into_iter().collect();
    std::future::poll_fn(move |cx| {
        for future in futures.iter_mut() {
            if let std::task::Poll::Ready(exit) = std::pin::Pin::new(future).poll(cx) {
                return std::task::Poll::Ready(exit);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The backend the pod's config names; with `tee` (an SNP/TDX pod) it
/// launches the confidential VM. QEMU without the TEE's object is refused
/// here, before anything starts, naming the QEMU version needed.
pub fn hypervisor_for(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: VmPaths,
    tee: Option<&TeeLaunch>,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    Ok(match (vm.hypervisor, tee) {
        (HypervisorKind::Cloister, tee) => Box::new(CloisterVmm::new(config, vm, paths, tee)),
        (HypervisorKind::Qemu, None) => Box::new(Qemu::new(config, vm, paths)),
        (HypervisorKind::Qemu, Some(tee)) => Box::new(Qemu::new_confidential(
            config,
            vm,
            paths,
            &QemuTee::from_launch(tee)?,
        )?),
    })
}

#[cfg(test)]
mod tests;
