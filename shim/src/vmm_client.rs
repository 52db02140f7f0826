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

/// `vsock` section of `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmVsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// One `fs` entry of `vm.json`: a host folder shared under a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmFsConfig {
    pub tag: String,
    pub shared_dir: PathBuf,
}

/// One `net` entry of `vm.json`: a tap inherited as an fd, and the guest's
/// MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmNetConfig {
    pub fd: i32,
    pub mac: String,
}

/// What `cloister-vmm --config` reads: the fields of the VMM's `VmConfig`
/// plus the vsock device, the virtio-fs shares and the NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmJson {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub serial: String,
    /// virtio-rng: the agent's and containers' entropy.
    pub rng: bool,
    pub vsock: VmVsockConfig,
    pub fs: Vec<VmFsConfig>,
    pub net: Vec<VmNetConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jail: Option<VmJailConfig>,
    /// SEV-SNP / TDX launch (the VMM's `tee::config::TeeConfig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee: Option<VmTeeConfig>,
}

/// `tee` section of `vm.json`. HOST_DATA and MRCONFIGID are written as
/// the bytes themselves (`host_data`, `mr_config_id`: the VMM binds them
/// unchanged), not as `init_data_digest`, so what the launch binds is
/// exactly [`crate::confidential::PodConfidential::snp_host_data`] /
/// `tdx_mr_config_id`, all zero for a pod without init-data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum VmTeeConfig {
    Snp {
        policy: String,
        host_data: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        vcpu_type: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cpu_signature: Option<String>,
    },
    Tdx {
        #[serde(skip_serializing_if = "Option::is_none")]
        attributes: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        xfam: Option<String>,
        mr_config_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        quote_service: Option<String>,
    },
}

impl VmTeeConfig {
    pub fn from_launch(launch: &TeeLaunch) -> Self {
        match &launch.kind {
            TeeLaunchKind::Snp {
                policy,
                vcpu,
                host_data,
            } => VmTeeConfig::Snp {
                policy: format!("{policy:#x}"),
                host_data: hex::encode(host_data),
                vcpu_type: match vcpu {
                    Some(SnpVcpu::Type(name)) => Some(name.clone()),
                    _ => None,
                },
                cpu_signature: match vcpu {
                    Some(SnpVcpu::Signature(signature)) => Some(format!("{signature:#x}")),
                    _ => None,
                },
            },
            TeeLaunchKind::Tdx {
                attributes,
                xfam,
                quote_service,
                mr_config_id,
            } => VmTeeConfig::Tdx {
                attributes: attributes.map(|a| format!("{a:#x}")),
                xfam: xfam.map(|x| format!("{x:#x}")),
                mr_config_id: hex::encode(mr_config_id),
                quote_service: quote_service.as_ref().map(QuoteService::to_string),
            },
        }
    }
}

/// `jail` section of `vm.json` (the VMM's `JailConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmJailConfig {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<PathBuf>,
}

impl VmJailConfig {
    /// The same as `cloister-vmm` flags (the vhost-user servers').
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--jail-root".into(),
            self.root.clone().into(),
            "--jail-uid".into(),
            self.uid.to_string().into(),
            "--jail-gid".into(),
            self.gid.to_string().into(),
        ];
        for cgroup in &self.cgroups {
            args.push("--jail-cgroup".into());
            args.push(cgroup.clone().into());
        }
        args
    }
}

/// A pod's jail as prepared on the host: what the VMM processes get, and
/// the cgroups the shim created for them (removed when they are gone).
#[derive(Debug, Default)]
pub struct PreparedJail {
    pub jail: Option<VmJailConfig>,
    pub created_cgroups: Vec<PathBuf>,
    /// The pod's own uid/gid, held until the VMM processes are gone.
    pub ids: Option<JailIdLease>,
}

/// Prepares the sockets folder and, with `[vmm] jail` (the default), the
/// jail: a uid/gid of the pod's own (leased in `leases`), the shared
/// folder as a shared mount, the pod's cgroups.
pub fn prepare_jail(
    vmm: &VmmSection,
    vm: &PodVm,
    paths: &VmPaths,
    leases: &Path,
) -> Result<PreparedJail, HypervisorError> {
    let sockets = paths.sockets_dir();
    if !vmm.jail {
        tracing::warn!(
            "[vmm] jail = false: cloister-vmm runs WITHOUT its jail and seccomp, as root with every capability; for development only"
        );
        std::fs::create_dir_all(&sockets).map_err(|source| HypervisorError::File {
            path: sockets,
            source,
        })?;
        return Ok(PreparedJail::default());
    }
    let range = JailIdRange {
        first_uid: vmm.jail_uid,
        first_gid: vmm.jail_gid,
        count: vmm.jail_id_count,
    };
    // The sandbox folder's `pod` file holds `namespace/id`.
    let pod = std::fs::read_to_string(paths.dir.join("pod"))
        .map(|pod| pod.trim().to_owned())
        .unwrap_or_else(|_| paths.dir.display().to_string());
    let ids = range.lease(leases, &pod)?;
    create_owned_folder(&sockets, ids.uid, ids.gid)?;
    if vm.shared_fs {
        make_shared_mount(&paths.shared_dir())?;
    }
    let cgroups = match vm.cgroups_path.as_deref().filter(|p| !p.is_empty()) {
        Some(path) => cgroup_dirs(Path::new(CGROUP_ROOT), path)?,
        None => Vec::new(),
    };
    let created_cgroups = create_cgroups(&cgroups)?;
    Ok(PreparedJail {
        jail: Some(VmJailConfig {
            root: paths.jail_root(),
            uid: ids.uid,
            gid: ids.gid,
            cgroups,
        }),
        created_cgroups,
        ids: Some(ids),
    })
}

fn join_cmdline(base: String, extra: &str) -> String {
    if extra.trim().is_empty() {
        base
    } else {
        format!("{base} {}", extra.trim())
    }
}

/// The VM config for `cloister-vmm`; an SNP/TDX pod (`tee`) boots the
/// bzImage and gets the `tee` section, with the same devices (the VMM
/// offers them to a confidential guest behind VIRTIO_F_ACCESS_PLATFORM).
/// `cloister measure` measures exactly this.
pub fn cloister_vm_json(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    tee: Option<&TeeLaunch>,
) -> VmJson {
    // cloister-vmm adds the nested-KVM parameters itself when it picks the
    // nested-pvm CPU template, and resets through the i8042.
    let base = cmdline::guest_cmdline(RebootMethod::Keyboard, false);
    VmJson {
        kernel: tee.map_or_else(|| config.guest.kernel.clone(), |t| t.kernel.clone()),
        initrd: Some(config.guest.initramfs.clone()),
        cmdline: join_cmdline(base, &vm.kernel_params),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        serial: format!("file:{}", paths.console_log().display()),
        rng: true,
        vsock: VmVsockConfig {
            guest_cid: GUEST_CID,
            uds_path: paths.vsock_uds(),
        },
        fs: if vm.shared_fs {
            vec![VmFsConfig {
                tag: SHARED_FS_TAG.into(),
                shared_dir: paths.shared_dir(),
            }]
        } else {
            Vec::new()
        },
        net: vm
            .nics
            .iter()
            .map(|nic| VmNetConfig {
                fd: nic.tap_fd,
                mac: nic.mac.clone(),
            })
            .collect(),
        jail: None,
        tee: tee.map(VmTeeConfig::from_launch),
    }
}

/// Writes `vm.json` (the launcher's and `cloister measure`'s one writer).
pub fn write_vm_json(json: &VmJson, path: &Path) -> Result<(), HypervisorError> {
    let text = serde_json::to_vec_pretty(json).map_err(|e| HypervisorError::File {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(|source| HypervisorError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The tap fds the VMM process must inherit.
fn nic_fds(vm: &PodVm) -> Vec<i32> {
    vm.nics.iter().map(|nic| nic.tap_fd).collect()
}

/// The default backend.
pub struct CloisterVmm {
    binary: PathBuf,
    vm_json: VmJson,
    inherited_fds: Vec<i32>,
    paths: VmPaths,
    vmm: VmmSection,
    vm: PodVm,
    jail: PreparedJail,
    child: Option<SupervisedChild>,
}

impl CloisterVmm {
    pub fn new(
        config: &RuntimeConfig,
        vm: &PodVm,
        paths: VmPaths,
        tee: Option<&TeeLaunch>,
    ) -> Self {
        Self {
            binary: config.vmm.path.clone(),
            vm_json: cloister_vm_json(config, vm, &paths, tee),
            inherited_fds: nic_fds(vm),
            paths,
            vmm: config.vmm.clone(),
            vm: vm.clone(),
            jail: PreparedJail::default(),
            child: None,
        }
    }

    pub fn args(&self) -> Vec<OsString> {
        vec!["--config".into(), self.paths.vm_config().into()]
    }
}

#[async_trait]
impl Hypervisor for CloisterVmm {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        self.jail = prepare_jail(&self.vmm, &self.vm, &self.paths, Path::new(JAIL_ID_LEASES))?;
        self.vm_json.jail = self.jail.jail.clone();
        write_vm_json(&self.vm_json, &self.paths.vm_config())?;
        let child = SupervisedChild::spawn(
            "cloister-vmm",
            &self.binary,
            &self.args(),
            &self.paths.vmm_log(),
            &self.inherited_fds,
        )?;
        // The vsock socket appears once the VMM built its devices; a VMM
        // that refuses its config exits first.
        let ready = wait_for_socket(&child, &self.paths.vsock_uds(), "vsock socket").await;
        record_vm_process(&self.paths, &child);
        self.child = Some(child);
        ready
    }

    fn vsock_uds(&self) -> PathBuf {
        self.paths.vsock_uds()
    }

    async fn wait_exit(&self) -> ChildExit {
        match &self.child {
            Some(child) => child.wait().await,
            None => ChildExit::Lost,
        }
    }

    async fn stop(&self, grace: Duration) {
        if let Some(child) = &self.child {
            let exit = child.stop(grace).await;
            tracing::info!(pid = child.pid, "cloister-vmm stopped: {exit}");
        }
        remove_cgroups(&self.jail.created_cgroups);
    }

    fn pids(&self) -> Vec<u32> {
        self.child.iter().map(|c| c.pid).collect()
    }

    fn jail_ids(&self) -> Option<(u32, u32)> {
        self.jail.jail.as_ref().map(|jail| (jail.uid, jail.gid))
    }
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

/// The `cloister-vmm vhost-user` command serving our vsock device to QEMU.
pub fn vhost_user_vsock_args(paths: &VmPaths) -> Vec<OsString> {
    vec![
        "vhost-user".into(),
        "--device".into(),
        "vsock".into(),
        "--guest-cid".into(),
        GUEST_CID.to_string().into(),
        "--uds".into(),
        paths.vsock_uds().into(),
        "--socket".into(),
        paths.vhost_user_vsock().into(),
    ]
}

/// The `cloister-vmm vhost-user` command serving the pod's shared folder.
pub fn vhost_user_fs_args(paths: &VmPaths) -> Vec<OsString> {
    vec![
        "vhost-user".into(),
        "--device".into(),
        "fs".into(),
        "--tag".into(),
        SHARED_FS_TAG.into(),
        "--shared-dir".into(),
        paths.shared_dir().into(),
        "--socket".into(),
        paths.vhost_user_fs().into(),
    ]
}

/// Whether QEMU should use KVM: asked for, or `auto` and `/dev/kvm` opens.
pub fn qemu_uses_kvm(accel: QemuAccel) -> bool {
    match accel {
        QemuAccel::Kvm => true,
        QemuAccel::Tcg => false,
        // On nested, paravirtualized KVM (kvm_pvm) a guest kernel runs
        // emulated instruction by instruction and stalls; TCG boots.
        QemuAccel::Auto => {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
                && !cmdline::host_is_nested_pvm()
        }
    }
}

/// QEMU's arguments for the pod's microVM.
pub fn qemu_args(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    kvm: bool,
    nested_pvm: bool,
) -> Vec<OsString> {
    let (accel, cpu) = match (kvm, nested_pvm) {
        (false, _) => ("tcg", "qemu64"),
        // `-cpu host` fails on nested KVM.
        (true, true) => ("kvm", cmdline::NESTED_KVM_QEMU_CPU),
        (true, false) => ("kvm", "host"),
    };
    let base = cmdline::guest_cmdline(RebootMethod::TripleFault, kvm && nested_pvm);
    let memory = format!(
        "memory-backend-memfd,id=mem,size={}M,share=on",
        vm.memory_mib
    );
    let mut args: Vec<String> = vec![
        "-M".into(),
        // Shared memfd memory: the vhost-user backend maps guest memory.
        "microvm,acpi=off,memory-backend=mem".into(),
        "-object".into(),
        memory,
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
    ];
    args.extend(boot_args(config, vm, paths, &config.guest.kernel, base));
    args.extend(device_args(vm, paths, VirtioBus::Mmio));
    args.into_iter().map(OsString::from).collect()
}

/// A confidential pod on the `qemu` backend: SEV-SNP or TDX with OVMF,
/// as Kata users know it. The firmware measures the kernel, initramfs
/// and command line through its kernel-hashes table (SNP) or its own
/// event log (TDX), so the guest is launched from OVMF on `q35` rather
/// than directly on `microvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuTee {
    Snp {
        /// Guest policy (bit 17 must be set).
        policy: u64,
        /// HOST_DATA: the init-data digest fitted to 32 bytes.
        host_data: [u8; 32],
        /// OVMF built with `AmdSevX64.dsc` (has the SNP kernel-hashes
        /// section), e.g. `/usr/share/ovmf/OVMF.amdsev.fd`.
        ovmf: PathBuf,
        /// The bzImage OVMF boots (and hashes).
        kernel: PathBuf,
        /// QEMU `-cpu` model (it is measured in the VMSAs); `None`: host.
        cpu: Option<String>,
    },
    Tdx {
        /// MRCONFIGID: the init-data digest fitted to 48 bytes.
        mr_config_id: [u8; 48],
        /// TDVF, e.g. `/usr/share/ovmf/OVMF.inteltdx.fd`.
        ovmf: PathBuf,
        kernel: PathBuf,
        /// TD ATTRIBUTES; `None`: QEMU's default.
        attributes: Option<u64>,
        /// Intel QGS for the guest's quote requests.
        quote_service: Option<QuoteService>,
    },
}

/// The QEMU that first has the object: `sev-snp-guest` in 9.1,
/// `tdx-guest` in 10.1.
pub const QEMU_SNP_OBJECT: (&str, &str) = ("sev-snp-guest", "9.1");
pub const QEMU_TDX_OBJECT: (&str, &str) = ("tdx-guest", "10.1");
/// The C-bit position and the physical address bits it costs on every
/// SNP part so far (Milan, Genoa, Turin).
const SNP_CBITPOS: u32 = 51;
const SNP_REDUCED_PHYS_BITS: u32 = 1;

/// Why QEMU cannot launch the confidential pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuTeeError {
    #[error("{qemu} has no `{object}` object (its `-object help` does not list it): QEMU {version} or newer is needed{found}")]
    ObjectMissing {
        qemu: String,
        object: &'static str,
        version: &'static str,
        found: String,
    },
    #[error("cannot run {qemu} -object help: {reason}")]
    Probe { qemu: String, reason: String },
    #[error("tee policy {0:#x}: reserved bit 17 must be set")]
    Policy(u64),
    #[error("confidential.{key} = {value}: {reason}")]
    Unsupported {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl QemuTee {
    /// The QEMU view of a pod's SNP/TDX launch.
    pub fn from_launch(launch: &TeeLaunch) -> Result<Self, QemuTeeError> {
        Ok(match &launch.kind {
            TeeLaunchKind::Snp {
                policy,
                vcpu,
                host_data,
            } => QemuTee::Snp {
                policy: *policy,
                host_data: *host_data,
                ovmf: launch.firmware.clone(),
                kernel: launch.kernel.clone(),
                cpu: match vcpu {
                    None => None,
                    Some(SnpVcpu::Type(name)) => Some(name.clone()),
                    Some(SnpVcpu::Signature(signature)) => {
                        return Err(QemuTeeError::Unsupported {
                            key: "cpu_signature",
                            value: format!("{signature:#x}"),
                            reason: "QEMU takes a CPU model: set confidential.vcpu_type instead",
                        })
                    }
                },
            },
            TeeLaunchKind::Tdx {
                attributes,
                xfam,
                quote_service,
                mr_config_id,
            } => {
                if let Some(xfam) = xfam {
                    return Err(QemuTeeError::Unsupported {
                        key: "tdx_xfam",
                        value: format!("{xfam:#x}"),
                        reason: "QEMU derives XFAM from its -cpu features: unset it for the qemu backend",
                    });
                }
                QemuTee::Tdx {
                    mr_config_id: *mr_config_id,
                    ovmf: launch.firmware.clone(),
                    kernel: launch.kernel.clone(),
                    attributes: *attributes,
                    quote_service: quote_service.clone(),
                }
            }
        })
    }

    fn object(&self) -> (&'static str, &'static str) {
        match self {
            QemuTee::Snp { .. } => QEMU_SNP_OBJECT,
            QemuTee::Tdx { .. } => QEMU_TDX_OBJECT,
        }
    }
}

/// Checks QEMU's `-object help` output (and `--version` for the message)
/// for the object `tee` needs.
pub fn qemu_supports_tee(
    qemu: &Path,
    object_help: &str,
    version: &str,
    tee: &QemuTee,
) -> Result<(), QemuTeeError> {
    let (object, needed) = tee.object();
    if object_help.lines().any(|l| l.trim() == object) {
        return Ok(());
    }
    let found = version
        .lines()
        .next()
        .map(|l| format!(" (found: {})", l.trim()))
        .unwrap_or_default();
    Err(QemuTeeError::ObjectMissing {
        qemu: qemu.display().to_string(),
        object,
        version: needed,
        found,
    })
}

/// Runs `qemu -object help` and `qemu --version` and checks them.
pub fn probe_qemu_tee(qemu: &Path, tee: &QemuTee) -> Result<(), QemuTeeError> {
    let run = |arg: &[&str]| -> Result<String, QemuTeeError> {
        let out = std::process::Command::new(qemu)
            .args(arg)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| QemuTeeError::Probe {
                qemu: qemu.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let help = run(&["-object", "help"])?;
    let version = run(&["--version"])?;
    qemu_supports_tee(qemu, &help, &version, tee)
}

/// What QEMU's `-m` … `-append` say in every pod: size, no defaults, the
/// console to a file, the guest kernel, initramfs and command line.
fn boot_args(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    kernel: &Path,
    base: String,
) -> Vec<String> {
    vec![
        "-m".into(),
        format!("{}M", vm.memory_mib),
        "-smp".into(),
        vm.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", paths.console_log().display()),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        config.guest.initramfs.display().to_string(),
        "-append".into(),
        join_cmdline(base, &vm.kernel_params),
    ]
}

/// How the pod's virtio devices sit in QEMU: on virtio-mmio (`microvm`),
/// or on PCI with `iommu_platform=on`, which a confidential guest needs
/// so its drivers bounce I/O through shared memory.
#[derive(Debug, Clone, Copy)]
enum VirtioBus {
    Mmio,
    PciBehindIommu,
}

impl VirtioBus {
    /// The QEMU device name for `kind` on this bus, with its options.
    fn device(self, kind: &str, options: &str) -> String {
        match self {
            VirtioBus::Mmio => format!("{kind}-device{options}"),
            VirtioBus::PciBehindIommu => format!("{kind}-pci{options},iommu_platform=on"),
        }
    }
}

/// The pod's devices: our vhost-user vsock (the CID comes from the back
/// end, vhost-user GET_CONFIG), rng, the vhost-user fs share when there is
/// one, and a virtio-net per tap.
fn device_args(vm: &PodVm, paths: &VmPaths, bus: VirtioBus) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-chardev".into(),
        format!(
            "socket,id=vsock0,path={}",
            paths.vhost_user_vsock().display()
        ),
        "-device".into(),
        bus.device("vhost-user-vsock", ",chardev=vsock0"),
        "-device".into(),
        bus.device("virtio-rng", ""),
    ];
    if vm.shared_fs {
        args.extend([
            "-chardev".into(),
            format!("socket,id=fs0,path={}", paths.vhost_user_fs().display()),
            "-device".into(),
            bus.device(
                "vhost-user-fs",
                &format!(",chardev=fs0,tag={SHARED_FS_TAG}"),
            ),
        ]);
    }
    for (index, nic) in vm.nics.iter().enumerate() {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net{index},fd={}", nic.tap_fd),
            "-device".into(),
            bus.device("virtio-net", &format!(",netdev=net{index},mac={}", nic.mac)),
        ]);
    }
    args
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// QEMU's arguments for a confidential pod: KVM only, `q35` with the
/// confidential-guest object, guest RAM in a shared memfd (private pages
/// come from guest_memfd, which QEMU adds itself), OVMF as firmware, and
/// the devices as virtio-pci with `iommu_platform=on` so the guest
/// driver bounces I/O through shared memory.
pub fn qemu_confidential_args(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    tee: &QemuTee,
) -> Result<Vec<OsString>, QemuTeeError> {
    let base = cmdline::guest_cmdline(RebootMethod::TripleFault, false);
    let (machine, object, ovmf, kernel, cpu) = match tee {
        QemuTee::Snp {
            policy,
            host_data,
            ovmf,
            kernel,
            cpu,
        } => {
            if policy & (1 << 17) == 0 {
                return Err(QemuTeeError::Policy(*policy));
            }
            (
                "q35,confidential-guest-support=sev0,memory-backend=ram0",
                format!(
                    "sev-snp-guest,id=sev0,policy={policy:#x},cbitpos={SNP_CBITPOS},reduced-phys-bits={SNP_REDUCED_PHYS_BITS},host-data={},kernel-hashes=on",
                    base64(host_data)
                ),
                ovmf,
                kernel,
                cpu.as_deref().unwrap_or("host"),
            )
        }
        QemuTee::Tdx {
            mr_config_id,
            ovmf,
            kernel,
            attributes,
            quote_service,
        } => {
            let mut object = format!("tdx-guest,id=tdx0,mrconfigid={}", base64(mr_config_id));
            if let Some(attributes) = attributes {
                object.push_str(&format!(",attributes={attributes:#x}"));
            }
            match quote_service {
                Some(QuoteService::Unix(socket)) => object.push_str(&format!(
                    ",quote-generation-socket.type=unix,quote-generation-socket.path={}",
                    socket.display()
                )),
                Some(QuoteService::Vsock { cid, port }) => object.push_str(&format!(
                    ",quote-generation-socket.type=vsock,quote-generation-socket.cid={cid},quote-generation-socket.port={port}"
                )),
                None => {}
            }
            (
                "q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0",
                object,
                ovmf,
                kernel,
                "host",
            )
        }
    };
    let mut args: Vec<String> = vec![
        "-machine".into(),
        machine.into(),
        "-object".into(),
        object,
        "-object".into(),
        format!(
            "memory-backend-memfd,id=ram0,size={}M,share=on",
            vm.memory_mib
        ),
        "-bios".into(),
        ovmf.display().to_string(),
        "-accel".into(),
        "kvm".into(),
        "-cpu".into(),
        cpu.into(),
    ];
    args.extend(boot_args(config, vm, paths, kernel, base));
    args.extend(device_args(vm, paths, VirtioBus::PciBehindIommu));
    Ok(args.into_iter().map(OsString::from).collect())
}

/// What confines QEMU where `[vmm] jail` confines cloister-vmm (QEMU
/// cannot take our jail: it opens its devices, files and sockets as root
/// and then drops): the pod's own uid/gid once it is set up (no
/// capabilities left, and none to be had again), and QEMU's own seccomp
/// sandbox refusing obsolete calls, fork/exec and scheduler/resource
/// changes. Its cgroups are joined before exec. The uid switch is
/// `-run-with user=` where QEMU has it (9.1 on, which deprecated
/// `-runas`; TDX needs 10.1), `-runas` before.
pub fn qemu_confinement_args(jail: &VmJailConfig, has_run_with: bool) -> Vec<OsString> {
    let ids = format!("{}:{}", jail.uid, jail.gid);
    let (option, value) = if has_run_with {
        ("-run-with", format!("user={ids}"))
    } else {
        ("-runas", ids)
    };
    vec![
        option.into(),
        value.into(),
        "-sandbox".into(),
        "on,obsolete=deny,spawn=deny,resourcecontrol=deny".into(),
    ]
}

/// Whether `qemu` takes `-run-with` (its `-help` lists it). A QEMU that
/// cannot even print its help is taken for an old one: starting it fails
/// with its own message.
pub fn qemu_has_run_with(qemu: &Path) -> bool {
    std::process::Command::new(qemu)
        .arg("-help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line.starts_with("-run-with "))
        })
}

/// QEMU with our vhost-user vsock and fs backends.
pub struct Qemu {
    qemu: PathBuf,
    vmm: PathBuf,
    args: Vec<OsString>,
    paths: VmPaths,
    shared_fs: bool,
    inherited_fds: Vec<i32>,
    vmm_section: VmmSection,
    vm: PodVm,
    jail: PreparedJail,
    backends: Vec<SupervisedChild>,
    qemu_child: Option<SupervisedChild>,
}

impl Qemu {
    pub fn new(config: &RuntimeConfig, vm: &PodVm, paths: VmPaths) -> Self {
        let kvm = qemu_uses_kvm(config.qemu.accel);
        let args = qemu_args(config, vm, &paths, kvm, cmdline::host_is_nested_pvm());
        Self {
            qemu: config.qemu.path.clone(),
            vmm: config.vmm.path.clone(),
            args,
            paths,
            shared_fs: vm.shared_fs,
            inherited_fds: nic_fds(vm),
            vmm_section: config.vmm.clone(),
            vm: vm.clone(),
            jail: PreparedJail::default(),
            backends: Vec::new(),
            qemu_child: None,
        }
    }

    /// QEMU for a confidential pod: refused at once when this QEMU lacks
    /// the `sev-snp-guest` / `tdx-guest` object, before anything starts.
    pub fn new_confidential(
        config: &RuntimeConfig,
        vm: &PodVm,
        paths: VmPaths,
        tee: &QemuTee,
    ) -> Result<Self, QemuTeeError> {
        probe_qemu_tee(&config.qemu.path, tee)?;
        let args = qemu_confidential_args(config, vm, &paths, tee)?;
        Ok(Self {
            args,
            ..Self::new(config, vm, paths)
        })
    }

    pub fn args(&self) -> &[OsString] {
        &self.args
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        self.jail = prepare_jail(
            &self.vmm_section,
            &self.vm,
            &self.paths,
            Path::new(JAIL_ID_LEASES),
        )?;
        let jail_args = self
            .jail
            .jail
            .as_ref()
            .map(VmJailConfig::args)
            .unwrap_or_default();
        let mut backends = vec![(
            "cloister-vmm vhost-user vsock",
            vhost_user_vsock_args(&self.paths),
            self.paths.vhost_user_vsock_log(),
            self.paths.vhost_user_vsock(),
            "vhost-user vsock socket",
        )];
        if self.shared_fs {
            backends.push((
                "cloister-vmm vhost-user fs",
                vhost_user_fs_args(&self.paths),
                self.paths.vhost_user_fs_log(),
                self.paths.vhost_user_fs(),
                "vhost-user fs socket",
            ));
        }
        for (name, mut args, log, socket, what) in backends {
            args.extend(jail_args.iter().cloned());
            let backend = SupervisedChild::spawn(name, &self.vmm, &args, &log, &[])?;
            // QEMU connects to the backends' sockets at start: they must exist.
            let ready = wait_for_socket(&backend, &socket, what).await;
            record_vm_process(&self.paths, &backend);
            self.backends.push(backend);
            ready?;
        }
        let mut args = self.args.clone();
        let mut cgroups: &[PathBuf] = &[];
        if let Some(jail) = &self.jail.jail {
            args.extend(qemu_confinement_args(jail, qemu_has_run_with(&self.qemu)));
            cgroups = &jail.cgroups;
        }
        let qemu = SupervisedChild::spawn_in_cgroups(
            "qemu",
            &self.qemu,
            &args,
            &self.paths.qemu_log(),
            &self.inherited_fds,
            cgroups,
        )?;
        record_vm_process(&self.paths, &qemu);
        self.qemu_child = Some(qemu);
        Ok(())
    }

    fn vsock_uds(&self) -> PathBuf {
        self.paths.vsock_uds()
    }

    /// Any process of the VM ending ends the VM.
    async fn wait_exit(&self) -> ChildExit {
        let children: Vec<&SupervisedChild> =
            self.qemu_child.iter().chain(self.backends.iter()).collect();
        if children.is_empty() {
            return ChildExit::Lost;
        }
        let waits = children.into_iter().map(|c| Box::pin(c.wait()));
        futures_select_all(waits).await
    }

    async fn stop(&self, grace: Duration) {
        // QEMU first: the backends serve its memory until then.
        for child in self.qemu_child.iter().chain(self.backends.iter()) {
            let exit = child.stop(grace).await;
            tracing::info!(name = %child.name, pid = child.pid, "stopped: {exit}");
        }
        remove_cgroups(&self.jail.created_cgroups);
    }

    fn pids(&self) -> Vec<u32> {
        self.qemu_child
            .iter()
            .chain(self.backends.iter())
            .map(|c| c.pid)
            .collect()
    }

    fn jail_ids(&self) -> Option<(u32, u32)> {
        self.jail.jail.as_ref().map(|jail| (jail.uid, jail.gid))
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
mod tests {
    use super::*;
    use crate::config::VmNic;

    fn pod_vm() -> PodVm {
        PodVm {
            hypervisor: HypervisorKind::Cloister,
            vcpus: 2,
            memory_mib: 512,
            kernel_params: "agent.log=debug".into(),
            shared_fs: true,
            nics: Vec::new(),
            cgroups_path: None,
        }
    }

    fn paths() -> VmPaths {
        VmPaths {
            dir: PathBuf::from("/run/cloister/default/pod1"),
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn cloister_vm_json_has_vmm_fields_and_vsock() {
        let json = serde_json::to_value(cloister_vm_json(
            &RuntimeConfig::default(),
            &pod_vm(),
            &paths(),
            None,
        ))
        .unwrap();
        assert_eq!(json["kernel"], "/usr/share/cloister/vmlinux");
        assert_eq!(json["initrd"], "/usr/share/cloister/initramfs.cpio");
        assert_eq!(json["vcpus"], 2);
        assert_eq!(json["memory_mib"], 512);
        assert_eq!(
            json["serial"],
            "file:/run/cloister/default/pod1/console.log"
        );
        assert_eq!(json["vsock"]["guest_cid"], 3);
        assert_eq!(
            json["vsock"]["uds_path"],
            "/run/cloister/default/pod1/sockets/vsock.sock"
        );
        let cmdline = json["cmdline"].as_str().unwrap();
        assert!(cmdline.starts_with("console=ttyS0"), "{cmdline}");
        assert!(cmdline.contains("reboot=k"), "{cmdline}");
        assert!(cmdline.ends_with(" agent.log=debug"), "{cmdline}");
        assert_eq!(json["fs"][0]["tag"], "cloister");
        assert_eq!(
            json["fs"][0]["shared_dir"],
            "/run/cloister/default/pod1/shared"
        );
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(json["rng"], true);
        assert_eq!(keys.len(), 10, "{keys:?}");
        assert_eq!(json["net"], serde_json::json!([]));
    }

    /// The contract with `cloister-vmm --config`: its own parser and
    /// validation accept what we write, the pod's shared folder included.
    #[test]
    fn cloister_vmm_accepts_our_vm_json_with_a_jail_and_its_flags() {
        let jail = VmJailConfig {
            root: "/run/cloister/default/pod1/jail".into(),
            uid: 64000,
            gid: 64000,
            cgroups: vec!["/sys/fs/cgroup/memory/default/pod1".into()],
        };
        let mut vm_json = cloister_vm_json(&RuntimeConfig::default(), &pod_vm(), &paths(), None);
        vm_json.jail = Some(jail.clone());
        let text = serde_json::to_string(&vm_json).unwrap();
        let config =
            cloister_vmm::config::VmConfig::from_json(&text, Path::new("vm.json")).unwrap();
        config.validate().unwrap();
        let parsed = config.jail.unwrap();
        assert_eq!(parsed.root, jail.root);
        assert_eq!((parsed.uid, parsed.gid), (64000, 64000));
        assert_eq!(parsed.cgroups, jail.cgroups);
        assert_eq!(
            strings(&jail.args()).join(" "),
            "--jail-root /run/cloister/default/pod1/jail --jail-uid 64000 --jail-gid 64000 --jail-cgroup /sys/fs/cgroup/memory/default/pod1"
        );
    }

    #[test]
    fn qemu_is_confined_with_the_uid_option_its_version_has() {
        let jail = VmJailConfig {
            root: "/run/cloister/default/pod1/jail".into(),
            uid: 64007,
            gid: 64007,
            cgroups: Vec::new(),
        };
        let joined = |args: Vec<OsString>| {
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let sandbox = "-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny";
        assert_eq!(
            joined(qemu_confinement_args(&jail, false)),
            format!("-runas 64007:64007 {sandbox}")
        );
        assert_eq!(
            joined(qemu_confinement_args(&jail, true)),
            format!("-run-with user=64007:64007 {sandbox}")
        );

        // Told apart by the help text, as QEMU 7.2 and 10.1 print it.
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, help: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\nprintf '%s\\n' {help}\n")).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            path
        };
        let old = fake("qemu-7.2", "'-runas user     change to user id user'");
        let new = fake(
            "qemu-10.1",
            "'-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]'",
        );
        assert!(!qemu_has_run_with(&old));
        // Retried: a child another test thread forks while the script is
        // still open for writing makes its exec fail (ETXTBSY) for a moment.
        let answers = || {
            (0..50).any(|_| {
                qemu_has_run_with(&new) || (std::thread::sleep(Duration::from_millis(20)), false).1
            })
        };
        assert!(answers());
        assert!(!qemu_has_run_with(&dir.path().join("no-such-qemu")));
    }

    #[test]
    fn prepared_jail_has_an_owned_sockets_folder_and_a_shared_mount_undone_at_removal() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP: preparing a jail needs root (chown, mount)");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let dir = crate::sandbox::SandboxDir::new(state.path(), "default", "jail-test");
        dir.create().unwrap();
        let paths = dir.vm_paths();

        let leases = state.path().join("jail-ids");

        let prepared = prepare_jail(&VmmSection::default(), &pod_vm(), &paths, &leases).unwrap();

        use std::os::unix::fs::MetadataExt;
        let sockets = std::fs::metadata(paths.sockets_dir()).unwrap();
        let jail = prepared.jail.unwrap();
        let first = crate::config::DEFAULT_JAIL_ID;
        assert!(
            (first..first + crate::config::DEFAULT_JAIL_ID_COUNT).contains(&jail.uid),
            "{}",
            jail.uid
        );
        assert_eq!(
            jail.gid, jail.uid,
            "the default ranges start at the same id"
        );
        assert_eq!((sockets.uid(), sockets.gid()), (jail.uid, jail.gid));
        assert_eq!(sockets.mode() & 0o777, 0o700);
        let lease = std::fs::read_to_string(leases.join(jail.uid.to_string())).unwrap();
        assert_eq!(
            lease.trim_end(),
            "default/jail-test",
            "the lease names the pod"
        );
        // A second pod prepared meanwhile runs as another uid.
        let other = crate::sandbox::SandboxDir::new(state.path(), "default", "jail-test-2");
        other.create().unwrap();
        let second = prepare_jail(
            &VmmSection::default(),
            &pod_vm(),
            &other.vm_paths(),
            &leases,
        )
        .unwrap();
        assert_ne!(second.jail.unwrap().uid, jail.uid);
        other.remove().unwrap();
        assert_eq!(jail.root, paths.jail_root());
        assert!(jail.cgroups.is_empty());
        let mounts = crate::sandbox::mounts_below(&dir.path);
        assert_eq!(mounts, [paths.shared_dir()]);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let shared_line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(paths.shared_dir().to_str().unwrap()))
            .unwrap();
        assert!(shared_line.contains(" shared:"), "{shared_line}");
        // Idempotent, and the sandbox's removal undoes it.
        make_shared_mount(&paths.shared_dir()).unwrap();
        dir.remove().unwrap();
        assert!(!dir.path.exists());
        assert!(crate::sandbox::mounts_below(state.path()).is_empty());
    }

    #[test]
    fn cloister_vmm_accepts_our_vm_json() {
        let json = serde_json::to_value(cloister_vm_json(
            &RuntimeConfig::default(),
            &pod_vm(),
            &paths(),
            None,
        ))
        .unwrap();
        let config =
            cloister_vmm::config::VmConfig::from_json(&json.to_string(), Path::new("vm.json"))
                .unwrap();
        config.validate().unwrap();
        assert_eq!(config.vsock.unwrap().guest_cid, u64::from(GUEST_CID));
        assert_eq!(config.memory_mib, 512);
        assert!(config.rng);
        assert_eq!(config.fs.len(), 1);
        assert_eq!(config.fs[0].tag, SHARED_FS_TAG);
    }

    #[test]
    fn pod_nics_become_vm_json_entries_and_qemu_tap_netdevs() {
        let vm = PodVm {
            nics: vec![
                VmNic {
                    tap_fd: 7,
                    mac: "0a:58:0a:00:00:05".into(),
                },
                VmNic {
                    tap_fd: 9,
                    mac: "0a:58:0a:00:01:05".into(),
                },
            ],
            ..pod_vm()
        };
        let json = serde_json::to_value(cloister_vm_json(
            &RuntimeConfig::default(),
            &vm,
            &paths(),
            None,
        ))
        .unwrap();
        assert_eq!(
            json["net"],
            serde_json::json!([
                { "fd": 7, "mac": "0a:58:0a:00:00:05" },
                { "fd": 9, "mac": "0a:58:0a:00:01:05" }
            ])
        );
        // cloister-vmm's own parser takes the entries.
        let config =
            cloister_vmm::config::VmConfig::from_json(&json.to_string(), Path::new("vm.json"))
                .unwrap();
        assert_eq!(config.net.len(), 2);
        assert_eq!(config.net[1].fd, Some(9));
        let args = strings(&qemu_args(
            &RuntimeConfig::default(),
            &vm,
            &paths(),
            false,
            false,
        ))
        .join(" ");
        assert!(
            args.contains("-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=0a:58:0a:00:00:05"),
            "{args}"
        );
        assert!(args.contains("-netdev tap,id=net1,fd=9"), "{args}");
        assert_eq!(nic_fds(&vm), [7, 9]);
    }

    #[test]
    fn vm_without_shared_folder_has_no_fs_device() {
        let vm = PodVm {
            shared_fs: false,
            ..pod_vm()
        };
        let json = cloister_vm_json(&RuntimeConfig::default(), &vm, &paths(), None);
        assert!(json.fs.is_empty());
        let args = strings(&qemu_args(
            &RuntimeConfig::default(),
            &vm,
            &paths(),
            false,
            false,
        ));
        assert!(!args.join(" ").contains("vhost-user-fs"), "{args:?}");
    }

    #[test]
    fn cloister_vmm_is_started_with_the_config_file() {
        let vmm = CloisterVmm::new(&RuntimeConfig::default(), &pod_vm(), paths(), None);
        assert_eq!(
            strings(&vmm.args()),
            ["--config", "/run/cloister/default/pod1/vm.json"]
        );
    }

    #[test]
    fn qemu_command_line_on_tcg() {
        let args = strings(&qemu_args(
            &RuntimeConfig::default(),
            &pod_vm(),
            &paths(),
            false,
            true,
        ));
        let joined = args.join(" ");
        assert!(
            joined.starts_with(
                "-M microvm,acpi=off,memory-backend=mem -object memory-backend-memfd,id=mem,size=512M,share=on -accel tcg -cpu qemu64 -m 512M -smp 2"
            ),
            "{joined}"
        );
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.contains("reboot=t"), "{append}");
        // Nested-KVM parameters only when KVM is used.
        assert!(!append.contains("clearcpuid"), "{append}");
        assert!(append.ends_with("agent.log=debug"));
        assert!(joined.contains(
            "-chardev socket,id=vsock0,path=/run/cloister/default/pod1/sockets/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock0 "
        ), "{joined}");
        assert!(joined.contains(
            "-chardev socket,id=fs0,path=/run/cloister/default/pod1/sockets/vhost-fs.sock -device vhost-user-fs-device,chardev=fs0,tag=cloister"
        ), "{joined}");
        assert!(joined.contains("-serial file:/run/cloister/default/pod1/console.log"));
        assert!(joined.contains(
            "-kernel /usr/share/cloister/vmlinux -initrd /usr/share/cloister/initramfs.cpio"
        ));
    }

    #[test]
    fn qemu_command_line_on_kvm_picks_cpu_for_host() {
        let config = RuntimeConfig::default();
        let nested = strings(&qemu_args(&config, &pod_vm(), &paths(), true, true));
        let cpu = &nested[nested.iter().position(|a| a == "-cpu").unwrap() + 1];
        assert_eq!(cpu, cmdline::NESTED_KVM_QEMU_CPU);
        let append = &nested[nested.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.contains("clearcpuid="), "{append}");
        let bare = strings(&qemu_args(&config, &pod_vm(), &paths(), true, false));
        assert!(bare.join(" ").contains("-accel kvm -cpu host"));
    }

    /// Every `-device NAME,key=value` we generate names a device and
    /// properties this host's QEMU knows (`-device NAME,help`).
    #[test]
    fn qemu_knows_every_device_property_we_pass() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.exists() {
            eprintln!(
                "SKIP: {} missing (Debian package qemu-system-x86)",
                qemu.display()
            );
            return;
        }
        let args = strings(&qemu_args(
            &RuntimeConfig::default(),
            &pod_vm(),
            &paths(),
            false,
            false,
        ));
        let devices: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| &w[1])
            .collect();
        assert!(devices.len() >= 3, "{devices:?}");
        for device in devices {
            let mut parts = device.split(',');
            let name = parts.next().unwrap();
            let help = std::process::Command::new(qemu)
                .args(["-M", "microvm", "-device", &format!("{name},help")])
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&help.stdout);
            assert!(help.contains(&format!("{name} options:")), "{name}: {help}");
            for property in parts {
                let key = property.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("  {key}=")),
                    "{name} has no property {key}: {help}"
                );
            }
        }
    }

    /// The q35 devices of a confidential pod exist in the installed QEMU
    /// with every property we pass (the TEE objects themselves need a
    /// newer QEMU: `old_qemu_is_refused_naming_the_version_needed`).
    #[test]
    fn qemu_knows_every_confidential_device_property_we_pass() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.exists() {
            eprintln!(
                "SKIP: {} missing (Debian package qemu-system-x86)",
                qemu.display()
            );
            return;
        }
        let mut vm = pod_vm();
        vm.nics.push(crate::config::VmNic {
            tap_fd: 3,
            mac: "02:00:00:00:00:01".into(),
        });
        let tee = QemuTee::Snp {
            policy: 0x30000,
            host_data: [0; 32],
            ovmf: "/o".into(),
            kernel: "/k/bzImage".into(),
            cpu: None,
        };
        let args = strings(
            &qemu_confidential_args(&RuntimeConfig::default(), &vm, &paths(), &tee).unwrap(),
        );
        let devices = arg_after(&args, "-device");
        assert_eq!(devices.len(), 4, "{devices:?}");
        for device in devices {
            let mut parts = device.split(',');
            let name = parts.next().unwrap();
            let help = std::process::Command::new(qemu)
                .args(["-M", "q35", "-device", &format!("{name},help")])
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&help.stdout);
            assert!(help.contains(&format!("{name} options:")), "{name}: {help}");
            for property in parts {
                let key = property.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("  {key}=")),
                    "{name} has no property {key}"
                );
            }
        }
    }

    #[test]
    fn vhost_user_fs_backend_command() {
        assert_eq!(
            strings(&vhost_user_fs_args(&paths())).join(" "),
            "vhost-user --device fs --tag cloister --shared-dir /run/cloister/default/pod1/shared --socket /run/cloister/default/pod1/sockets/vhost-fs.sock"
        );
    }

    #[test]
    fn vhost_user_backend_command() {
        assert_eq!(
            strings(&vhost_user_vsock_args(&paths())).join(" "),
            "vhost-user --device vsock --guest-cid 3 --uds /run/cloister/default/pod1/sockets/vsock.sock --socket /run/cloister/default/pod1/sockets/vhost-vsock.sock"
        );
    }

    fn arg_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// A pod's SNP/TDX launch as the runtime config and init-data make it.
    fn tee_launch(config_toml: &str, init_data: Option<&str>) -> (RuntimeConfig, TeeLaunch) {
        let config = RuntimeConfig::from_toml(config_toml, Path::new("c.toml")).unwrap();
        let annotations: std::collections::HashMap<String, String> = init_data
            .map(|doc| {
                use base64::Engine;
                (
                    cloister_protocol::annotations::INIT_DATA.to_owned(),
                    base64::engine::general_purpose::STANDARD.encode(doc),
                )
            })
            .into_iter()
            .collect();
        let plan = crate::sandbox::PodVmPlan::for_pod(&config, &annotations).unwrap();
        (config, plan.tee.unwrap())
    }

    const INIT_DATA_DOC: &str =
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = 'url = \"http://kbs\"'\n";

    /// The vm.json `tee` section as `cloister-vmm` itself parses and
    /// validates it.
    fn vmm_tee_spec(json: &VmJson) -> cloister_vmm::tee::config::TeeSpec {
        let text = serde_json::to_string(json).unwrap();
        let parsed =
            cloister_vmm::config::VmConfig::from_json(&text, Path::new("vm.json")).unwrap();
        parsed.validate().unwrap();
        parsed.tee.unwrap().validate().unwrap()
    }

    #[test]
    fn snp_pod_vm_json_binds_host_data_to_the_init_data_digest_and_boots_the_bzimage() {
        use cloister_vmm::tee::config::TeeSpec;
        let toml = "[guest]\nkernel = \"/cache/kernel/current/vmlinux\"\n[confidential]\ntee = \"snp\"\nvcpu_type = \"EPYC-Milan\"\n";
        let (config, launch) = tee_launch(toml, Some(INIT_DATA_DOC));
        let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
        assert_eq!(json.kernel, PathBuf::from("/cache/kernel/current/bzImage"));
        assert!(json.vsock.guest_cid == GUEST_CID && json.rng && json.fs.len() == 1);
        let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA_DOC.as_bytes())
            .unwrap()
            .digest();
        assert_eq!(digest.len(), 48);
        match vmm_tee_spec(&json) {
            TeeSpec::Snp {
                policy,
                host_data,
                cpu_signature,
                vmsa_features,
            } => {
                assert_eq!(policy.bits(), 0x30000);
                assert_eq!(host_data[..], digest[..32]);
                assert_eq!(cpu_signature, Some(0x00A0_0F11));
                assert_eq!(vmsa_features, 0);
            }
            other => panic!("{other:?}"),
        }
        let value = serde_json::to_value(&json).unwrap();
        assert_eq!(
            value["tee"],
            serde_json::json!({"type": "snp", "policy": "0x30000", "host_data": hex::encode(&digest[..32]), "vcpu_type": "EPYC-Milan"})
        );
        // Without init-data: HOST_DATA is zero, as the agent then expects.
        let (config, launch) = tee_launch(toml, None);
        let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
        assert!(
            matches!(vmm_tee_spec(&json), TeeSpec::Snp { host_data, .. } if host_data == [0; 32])
        );
    }

    #[test]
    fn tdx_pod_vm_json_binds_mr_config_id_and_the_quote_service() {
        use cloister_vmm::tee::config::TeeSpec;
        let toml = "[confidential]\ntee = \"tdx\"\nkernel = \"/k/bzImage-tdx\"\nquote_service = \"vsock:2:4050\"\ntdx_attributes = 0x10000000\ntdx_xfam = 0x2e7\n";
        let (config, launch) = tee_launch(toml, Some(INIT_DATA_DOC));
        let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
        assert_eq!(json.kernel, PathBuf::from("/k/bzImage-tdx"));
        let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA_DOC.as_bytes())
            .unwrap()
            .digest();
        match vmm_tee_spec(&json) {
            TeeSpec::Tdx {
                attributes,
                xfam,
                mr_config_id,
                quote_service,
            } => {
                assert_eq!((attributes, xfam), (0x1000_0000, 0x2e7));
                assert_eq!(mr_config_id[..], digest[..]);
                assert_eq!(
                    quote_service,
                    Some(cloister_vmm::tee::tdx::quote::QuoteServiceAddr::Vsock {
                        cid: 2,
                        port: 4050
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        let (config, launch) = tee_launch("[confidential]\ntee = \"tdx\"\n", None);
        let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
        assert!(
            matches!(vmm_tee_spec(&json), TeeSpec::Tdx { mr_config_id, .. } if mr_config_id == [0; 48])
        );
    }

    /// The sample TEE keeps an ordinary VM: the vmlinux, no `tee` section,
    /// its parameters on the command line.
    #[test]
    fn sample_pod_has_no_tee_section() {
        let config =
            RuntimeConfig::from_toml("[confidential]\ntee = \"sample\"\n", Path::new("c.toml"))
                .unwrap();
        let plan = crate::sandbox::PodVmPlan::for_pod(&config, &Default::default()).unwrap();
        assert!(plan.tee.is_none());
        let json = cloister_vm_json(&config, &plan.vm, &paths(), plan.tee.as_ref());
        assert_eq!(json.kernel, PathBuf::from("/usr/share/cloister/vmlinux"));
        assert!(
            json.cmdline.ends_with("cloister.tee=sample"),
            "{}",
            json.cmdline
        );
        assert!(serde_json::to_value(&json).unwrap().get("tee").is_none());
    }

    #[test]
    fn qemu_tee_is_built_from_the_confidential_section() {
        let (_, launch) = tee_launch(
            "[confidential]\ntee = \"snp\"\nsnp_policy = 0x70000\nvcpu_type = \"EPYC-Genoa\"\nfirmware = \"/fw/OVMF.fd\"\n",
            None,
        );
        assert_eq!(
            QemuTee::from_launch(&launch).unwrap(),
            QemuTee::Snp {
                policy: 0x70000,
                host_data: [0; 32],
                ovmf: "/fw/OVMF.fd".into(),
                kernel: "/usr/share/cloister/bzImage".into(),
                cpu: Some("EPYC-Genoa".into()),
            }
        );
        let (_, launch) = tee_launch(
            "[confidential]\ntee = \"tdx\"\ntdx_attributes = 0x10000000\nquote_service = \"unix:/run/qgs.sock\"\n",
            None,
        );
        assert_eq!(
            QemuTee::from_launch(&launch).unwrap(),
            QemuTee::Tdx {
                mr_config_id: [0; 48],
                ovmf: "/usr/share/ovmf/OVMF.inteltdx.fd".into(),
                kernel: "/usr/share/cloister/bzImage".into(),
                attributes: Some(0x1000_0000),
                quote_service: Some(QuoteService::Unix("/run/qgs.sock".into())),
            }
        );
        let (_, launch) = tee_launch(
            "[confidential]\ntee = \"snp\"\ncpu_signature = 0xa00f11\n",
            None,
        );
        let err = QemuTee::from_launch(&launch).unwrap_err().to_string();
        assert!(
            err.starts_with("confidential.cpu_signature = 0xa00f11: QEMU takes a CPU model"),
            "{err}"
        );
        let (_, launch) = tee_launch("[confidential]\ntee = \"tdx\"\ntdx_xfam = 0xe7\n", None);
        let err = QemuTee::from_launch(&launch).unwrap_err().to_string();
        assert!(err.starts_with("confidential.tdx_xfam = 0xe7"), "{err}");
    }

    #[test]
    fn qemu_snp_args_carry_policy_host_data_and_kernel_hashes() {
        let tee = QemuTee::Snp {
            policy: 0x30000,
            host_data: [0xAB; 32],
            ovmf: "/usr/share/ovmf/OVMF.amdsev.fd".into(),
            kernel: "/k/bzImage".into(),
            cpu: Some("EPYC-Milan".into()),
        };
        let args = strings(
            &qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee).unwrap(),
        );
        assert_eq!(
            arg_after(&args, "-machine"),
            ["q35,confidential-guest-support=sev0,memory-backend=ram0"]
        );
        let objects = arg_after(&args, "-object");
        assert_eq!(
            objects[0],
            "sev-snp-guest,id=sev0,policy=0x30000,cbitpos=51,reduced-phys-bits=1,host-data=q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=,kernel-hashes=on"
        );
        assert!(
            objects[1].starts_with("memory-backend-memfd,id=ram0,"),
            "{objects:?}"
        );
        assert_eq!(
            arg_after(&args, "-bios"),
            ["/usr/share/ovmf/OVMF.amdsev.fd"]
        );
        assert_eq!(arg_after(&args, "-accel"), ["kvm"]);
        assert_eq!(arg_after(&args, "-cpu"), ["EPYC-Milan"]);
        assert!(arg_after(&args, "-device")
            .iter()
            .all(|d| d.ends_with("iommu_platform=on")));
        assert_eq!(arg_after(&args, "-kernel"), ["/k/bzImage"]);
    }

    #[test]
    fn qemu_snp_refuses_a_policy_without_bit_17() {
        let tee = QemuTee::Snp {
            policy: 0x10000,
            host_data: [0; 32],
            ovmf: "/o".into(),
            kernel: "/k/bzImage".into(),
            cpu: None,
        };
        let err = qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee)
            .unwrap_err()
            .to_string();
        assert!(err.contains("0x10000"), "{err}");
    }

    #[test]
    fn qemu_tdx_args_carry_mrconfigid_and_the_quote_socket() {
        let mut tee = QemuTee::Tdx {
            mr_config_id: [0; 48],
            ovmf: "/usr/share/ovmf/OVMF.inteltdx.fd".into(),
            kernel: "/k/bzImage".into(),
            attributes: None,
            quote_service: Some(QuoteService::Unix("/run/tdx-qgs/qgs.socket".into())),
        };
        let args = strings(
            &qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee).unwrap(),
        );
        assert_eq!(
            arg_after(&args, "-machine"),
            ["q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0"]
        );
        assert_eq!(
            arg_after(&args, "-object")[0],
            format!(
                "tdx-guest,id=tdx0,mrconfigid={},quote-generation-socket.type=unix,quote-generation-socket.path=/run/tdx-qgs/qgs.socket",
                "A".repeat(64)
            )
        );
        assert_eq!(arg_after(&args, "-kernel"), ["/k/bzImage"]);
        if let QemuTee::Tdx {
            attributes,
            quote_service,
            ..
        } = &mut tee
        {
            *attributes = Some(0x1000_0000);
            *quote_service = Some(QuoteService::Vsock { cid: 2, port: 4050 });
        }
        let args = strings(
            &qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee).unwrap(),
        );
        assert!(arg_after(&args, "-object")[0].ends_with(
            ",attributes=0x10000000,quote-generation-socket.type=vsock,quote-generation-socket.cid=2,quote-generation-socket.port=4050"
        ), "{args:?}");
    }

    #[test]
    fn old_qemu_is_refused_naming_the_version_needed() {
        let snp = QemuTee::Snp {
            policy: 0x30000,
            host_data: [0; 32],
            ovmf: "/o".into(),
            kernel: "/k/bzImage".into(),
            cpu: None,
        };
        let help_72 =
            "List of user creatable objects:\n  authz-list\n  sev-guest\n  tls-creds-x509\n";
        let err = qemu_supports_tee(
            Path::new("/usr/bin/qemu-system-x86_64"),
            help_72,
            "QEMU emulator version 7.2.22\n",
            &snp,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no `sev-snp-guest` object"), "{err}");
        assert!(err.contains("QEMU 9.1 or newer"), "{err}");
        assert!(err.contains("found: QEMU emulator version 7.2.22"), "{err}");
        let help_91 = format!("{help_72}  sev-snp-guest\n");
        qemu_supports_tee(Path::new("q"), &help_91, "", &snp).unwrap();
    }

    /// The QEMU installed here (Debian's 7.2) must be refused clearly.
    #[test]
    fn installed_qemu_is_probed() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.exists() {
            eprintln!("SKIP: {} missing (Debian qemu-system-x86)", qemu.display());
            return;
        }
        let tdx = QemuTee::Tdx {
            mr_config_id: [0; 48],
            ovmf: "/o".into(),
            kernel: "/k/bzImage".into(),
            attributes: None,
            quote_service: None,
        };
        match probe_qemu_tee(qemu, &tdx) {
            Ok(()) => eprintln!("this QEMU has tdx-guest"),
            Err(e) => {
                assert!(e.to_string().contains("QEMU 10.1 or newer"), "{e}");
                let mut config = RuntimeConfig::default();
                config.qemu.path = qemu.to_path_buf();
                let refused = Qemu::new_confidential(&config, &pod_vm(), paths(), &tdx);
                assert_eq!(refused.err(), Some(e));
            }
        }
    }

    #[test]
    fn accel_choice() {
        assert!(qemu_uses_kvm(QemuAccel::Kvm));
        assert!(!qemu_uses_kvm(QemuAccel::Tcg));
    }

    #[test]
    fn log_tail_keeps_whole_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "first line\nsecond line\nthird\n").unwrap();
        assert_eq!(log_tail(&log, 100), "first line\nsecond line\nthird");
        assert_eq!(log_tail(&log, 12), "third");
        assert_eq!(log_tail(&dir.path().join("none"), 10), "");
    }

    #[tokio::test]
    async fn supervised_child_logs_and_reports_exit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("child.log");
        let child = SupervisedChild::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "echo out; echo err >&2; exit 7".into()],
            &log,
            &[],
        )
        .unwrap();
        assert_eq!(child.wait().await, ChildExit::Code(7));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
    }

    #[tokio::test]
    async fn a_child_that_cannot_join_its_cgroup_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // A "cgroup" whose cgroup.procs cannot be opened for writing.
        let cgroup = dir.path().join("pod");
        std::fs::create_dir_all(cgroup.join("cgroup.procs")).unwrap();
        let missing = dir.path().join("gone");

        let refused = SupervisedChild::spawn_in_cgroups(
            "true",
            Path::new("/bin/true"),
            &[],
            &dir.path().join("log"),
            &[],
            std::slice::from_ref(&cgroup),
        );
        let absent = SupervisedChild::spawn_in_cgroups(
            "true",
            Path::new("/bin/true"),
            &[],
            &dir.path().join("log"),
            &[],
            std::slice::from_ref(&missing),
        );

        let Err(err) = refused else {
            panic!("the join should fail")
        };
        let err = err.to_string();
        assert!(
            err.starts_with(&format!("spawn /bin/true in cgroups {}:", cgroup.display())),
            "{err}"
        );
        let Err(err) = absent else {
            panic!("there is no such cgroup")
        };
        let err = err.to_string();
        assert!(
            err.contains(&missing.join("cgroup.procs").display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stop_kills_a_child_that_ignores_sigterm_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let child = SupervisedChild::spawn(
            "stubborn",
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "trap '' TERM; echo ready; while :; do sleep 0.05; done".into(),
            ],
            &dir.path().join("log"),
            &[],
        )
        .unwrap();
        // SIGTERM before the trap is set would end it at once.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(dir.path().join("log")).is_ok_and(|l| l.contains("ready")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell never set its trap"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = std::time::Instant::now();
        let exit = child.stop(Duration::from_millis(300)).await;
        assert_eq!(exit, ChildExit::Signal(libc::SIGKILL));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let polite = SupervisedChild::spawn(
            "polite",
            Path::new("/bin/sleep"),
            &["100".into()],
            &dir.path().join("log2"),
            &[],
        )
        .unwrap();
        assert_eq!(
            polite.stop(Duration::from_secs(5)).await,
            ChildExit::Signal(libc::SIGTERM)
        );
    }

    #[tokio::test]
    async fn vmm_that_exits_at_start_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::default();
        // A "VMM" that refuses its config at once.
        let vmm_script = dir.path().join("vmm.sh");
        std::fs::write(
            &vmm_script,
            "#!/bin/sh\necho 'config: unknown field vsock' >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &vmm_script,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        config.vmm.path = vmm_script;
        config.vmm.jail = false;
        let mut vmm = CloisterVmm::new(
            &config,
            &pod_vm(),
            VmPaths {
                dir: dir.path().to_path_buf(),
            },
            None,
        );
        let err = vmm.start().await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("exited during startup") && text.contains("vmm.log"),
            "{text}"
        );
        assert!(text.contains("unknown field vsock"), "{text}");
        assert!(dir.path().join("vm.json").exists());
        assert_eq!(vmm.wait_exit().await, ChildExit::Code(2));
    }
}
