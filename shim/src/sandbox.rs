//! Pod sandboxes: which shim a container belongs to, the sandbox folder,
//! and the pod's VM with its agent connection.
//!
//! Grouping: under CRI every container of a pod carries the pod's id in
//! `io.kubernetes.cri.sandbox-id`; the pod's first (sandbox, "pause")
//! container starts the VM, later containers go to the same shim — the
//! socket address is derived from the grouping id, so containerd 1.6, which
//! runs `start` per container, is handed the running pod shim's address.
//! Without CRI annotations (`ctr run`) a container is a pod of its own.
//!
//! Sandbox folder (`<state_dir>/<namespace>/<sandbox id>/`): the VM's
//! config, logs and sockets (see `vmm_client::VmPaths`) and `shared/`, the
//! directory the virtio-fs device exports to the guest, where each
//! container's rootfs is mounted as `shared/<container id>/rootfs`.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloister_protocol::agent;
use containerd_shim_protos::api::Mount;

use crate::agent_client::{AgentClient, AgentEndpoint, AgentError};
use crate::config::{ConfigError, ConfigSource, RuntimeConfig};
use crate::config::{InspectionSection, VmNic};
use crate::container::ContainerKind;
use crate::guest_spec::SharedMount;
use crate::network::{
    network_namespace, setup_pod_network, teardown_pod_network, PodNetwork, PodNetworkError,
    PodNetworkNamespace, PodSpecError,
};
use crate::safe_path::{open_beneath, Leaf, MountTarget};
use crate::vmm_client::{
    hypervisor_for, log_tail, ChildExit, Hypervisor, HypervisorError, VmPaths,
};

/// CRI's annotations naming a container's role and pod.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub use crate::vmm_client::SHARED_FS_TAG;
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/cloister/shared";
/// How much of the guest console a VM that died while booting shows.
const GUEST_CONSOLE_TAIL: usize = 600;
/// How long the VMM gets after SIGTERM before SIGKILL.
pub const VMM_STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors setting up or tearing down a pod sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Confidential(#[from] crate::confidential::ConfidentialError),
    #[error(transparent)]
    KbsForward(#[from] crate::confidential::kbs_forward::KbsForwardError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    PodPolicy(#[from] crate::pod_policy::PodPolicyError),
    #[error("sandbox folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pod uses the host's network namespace, which a VM cannot join; set network.allow_host_network = true in the runtime config to run it without a network"
    )]
    HostNetwork,
    #[error(transparent)]
    NetworkSpec(#[from] PodSpecError),
    #[error(transparent)]
    Network(#[from] PodNetworkError),
    #[error("mount rootfs of {container_id} at {target}: {reason}")]
    Rootfs {
        container_id: String,
        target: PathBuf,
        reason: String,
    },
    #[error(
        "container {container_id} names pod sandbox {sandbox_id}, which this shim does not run"
    )]
    ForeignSandbox {
        container_id: String,
        sandbox_id: String,
    },
    #[error("annotation {key} is missing on container {container_id} of type {container_type}")]
    MissingSandboxId {
        container_id: String,
        container_type: String,
        key: &'static str,
    },
}

/// The pod a container belongs to, from its OCI annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMembership {
    pub kind: ContainerKind,
    /// The pod's id: the sandbox container's id.
    pub sandbox_id: String,
}

/// Classifies a container by CRI's annotations.
pub fn pod_membership(
    container_id: &str,
    annotations: &HashMap<String, String>,
) -> Result<PodMembership, SandboxError> {
    match annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) {
        Some("container") => match annotations.get(CRI_SANDBOX_ID) {
            Some(sandbox) if !sandbox.is_empty() => Ok(PodMembership {
                kind: ContainerKind::Workload,
                sandbox_id: sandbox.clone(),
            }),
            _ => Err(SandboxError::MissingSandboxId {
                container_id: container_id.to_owned(),
                container_type: "container".into(),
                key: CRI_SANDBOX_ID,
            }),
        },
        // "sandbox", or no CRI at all (`ctr run`): a pod of its own.
        _ => Ok(PodMembership {
            kind: ContainerKind::Sandbox,
            sandbox_id: container_id.to_owned(),
        }),
    }
}

/// The id the shim socket address is derived from: the pod's.
pub fn shim_grouping(container_id: &str, annotations: &HashMap<String, String>) -> String {
    match pod_membership(container_id, annotations) {
        Ok(membership) => membership.sandbox_id,
        Err(_) => container_id.to_owned(),
    }
}

/// Annotations of the OCI spec in a bundle (empty if none).
pub fn bundle_annotations(spec: &serde_json::Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(|a| a.as_object())
        .map(|object| {
            object
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The folder of one pod sandbox.
///
/// Named by a hash of namespace and pod id, as containerd names shim
/// sockets: the VM's Unix sockets live in it, and with a 64-character CRI
/// pod id and a namespace in the path, `vsock.sock` plus the `_<port>`
/// suffix of guest-initiated connections would not fit `sun_path` (108
/// bytes). The file `pod` inside names the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDir {
    pub path: PathBuf,
    /// `<namespace>/<pod id>`, written to `pod`.
    pub pod: String,
}

/// Hex characters of the folder name (96 bits of SHA-256).
const FOLDER_NAME_HEX: usize = 24;

impl SandboxDir {
    pub fn new(state_dir: &Path, namespace: &str, sandbox_id: &str) -> Self {
        use sha2::Digest;
        let pod = format!("{namespace}/{sandbox_id}");
        let digest = sha2::Sha256::digest(pod.as_bytes());
        let name: String = digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .chars()
            .take(FOLDER_NAME_HEX)
            .collect();
        Self {
            path: state_dir.join(name),
            pod,
        }
    }

    /// Creates the folder (private to root) and `shared/`.
    pub fn create(&self) -> Result<(), SandboxError> {
        use std::os::unix::fs::DirBuilderExt;
        let folder_error = |source| SandboxError::Folder {
            path: self.path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(folder_error)?;
        std::fs::write(self.path.join("pod"), format!("{}\n", self.pod)).map_err(folder_error)?;
        std::fs::create_dir_all(self.shared_dir()).map_err(folder_error)
    }

    pub fn vm_paths(&self) -> VmPaths {
        VmPaths {
            dir: self.path.clone(),
        }
    }

    /// Exported to the guest over virtio-fs.
    pub fn shared_dir(&self) -> PathBuf {
        self.vm_paths().shared_dir()
    }

    /// Host mount point of a container's rootfs.
    pub fn rootfs_target(&self, container_id: &str) -> PathBuf {
        self.shared_dir().join(container_id).join("rootfs")
    }

    /// Removes the folder. Mounts below it must be gone: removal refuses to
    /// cross into a mounted file system instead of deleting its contents.
    pub fn remove(&self) -> Result<(), SandboxError> {
        // A jailed VMM's shared folder is a bind onto itself: undone first
        // (refused while container mounts remain below it).
        crate::vmm_jail::remove_shared_mount(&self.shared_dir()).map_err(|e| {
            SandboxError::Folder {
                path: self.path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        match remove_tree_without_crossing_mounts(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxError::Folder {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// Mount points at or below `path`, from `/proc/self/mountinfo`, read as
/// bytes: the guest can give a folder holding a mount a name that is not
/// UTF-8, and that must neither hide the mount nor the others.
pub fn mounts_below(path: &Path) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(field))))
        .filter(|mount_point| mount_point.starts_with(path))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// `rm -r` that refuses to start while anything is mounted below `path`
/// (a bind-mounted rootfs would otherwise be deleted through the mount),
/// and never crosses into another file system while walking.
fn remove_tree_without_crossing_mounts(path: &Path) -> std::io::Result<()> {
    // Refused before anything is deleted; the walk checks again, entry by
    // entry, for a mount that appears meanwhile.
    if let Some(mount) = mounts_below(path).first() {
        return Err(std::io::Error::other(format!(
            "{} is a mount point",
            mount.display()
        )));
    }
    crate::safe_teardown::remove_tree(path).map_err(|e| match e {
        crate::safe_teardown::TeardownError::Io {
            source: nix::errno::Errno::ENOENT,
            ..
        } => std::io::Error::from(std::io::ErrorKind::NotFound),
        other => std::io::Error::other(other.to_string()),
    })
}

/// The spec's `root.path`, relative to the bundle unless absolute
/// (`ctr run --rootfs DIR` writes DIR itself); `rootfs` when absent.
pub fn spec_root(bundle: &Path, spec: &serde_json::Value) -> PathBuf {
    let root = spec
        .get("root")
        .and_then(|r| r.get("path"))
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("rootfs");
    bundle.join(root)
}

/// Mounts a container's rootfs at `target`: containerd's mounts (overlay
/// from the snapshotter), or a bind of `root_dir` (the spec's root) when
/// containerd passed none (`ctr run --rootfs`). `target` lies below the
/// pod's `shared/` folder, which the guest writes: it is opened without
/// following symlinks (see [`crate::safe_path`]) and mounted through its fd.
pub async fn mount_rootfs(
    container_id: &str,
    mounts: &[Mount],
    root_dir: &Path,
    shared: &Path,
    target: &Path,
) -> Result<(), SandboxError> {
    let fail = |reason: String| SandboxError::Rootfs {
        container_id: container_id.to_owned(),
        target: target.to_path_buf(),
        reason,
    };
    let relative = target
        .strip_prefix(shared)
        .map_err(|_| fail(format!("not below {}", shared.display())))?;
    let opened =
        open_beneath(shared, relative, Leaf::Directory).map_err(|e| fail(e.to_string()))?;
    let bind;
    let mounts = if mounts.is_empty() {
        bind = [Mount {
            type_: "bind".into(),
            source: root_dir.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        }];
        &bind[..]
    } else {
        mounts
    };
    for mount in mounts {
        let (first, later) = split_later_steps(mount);
        containerd_shim::asynchronous::util::mount_rootfs(&first, opened.proc_path())
            .await
            .map_err(|e| fail(e.to_string()))?;
        later.apply(&opened).map_err(fail)?;
    }
    Ok(())
}

/// What containerd's mount helper does to the target path after mounting
/// (a propagation change, a read-only remount of a bind). Those need the
/// mount's root, which the pre-mount fd is not (it reaches the covered
/// folder): they are done here on the target opened again.
#[derive(Debug, PartialEq, Eq)]
struct LaterSteps {
    propagation: nix::mount::MsFlags,
    bind_read_only: bool,
}

impl Default for LaterSteps {
    fn default() -> Self {
        Self {
            propagation: nix::mount::MsFlags::empty(),
            bind_read_only: false,
        }
    }
}

fn split_later_steps(mount: &Mount) -> (Mount, LaterSteps) {
    use nix::mount::MsFlags;
    let mut later = LaterSteps::default();
    let is_bind = mount.options.iter().any(|o| o == "bind" || o == "rbind");
    let mut read_only = false;
    let mut first = mount.clone();
    first.options = mount
        .options
        .iter()
        .filter(|option| {
            let propagation = match option.as_str() {
                "shared" => MsFlags::MS_SHARED,
                "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
                "private" => MsFlags::MS_PRIVATE,
                "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                "slave" => MsFlags::MS_SLAVE,
                "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
                "unbindable" => MsFlags::MS_UNBINDABLE,
                "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
                "ro" if is_bind => {
                    read_only = true;
                    return false;
                }
                "rw" if is_bind => {
                    read_only = false;
                    return false;
                }
                _ => return true,
            };
            later.propagation |= propagation;
            false
        })
        .cloned()
        .collect();
    later.bind_read_only = read_only;
    (first, later)
}

impl LaterSteps {
    fn apply(&self, target: &MountTarget) -> Result<(), String> {
        use nix::mount::{mount, MsFlags};
        if self.propagation.is_empty() && !self.bind_read_only {
            return Ok(());
        }
        let top = target.reopen().map_err(|e| e.to_string())?;
        let on = crate::safe_path::fd_path(top.as_raw_fd());
        let none: Option<&str> = None;
        if !self.propagation.is_empty() {
            mount(none, &on, none, self.propagation, none)
                .map_err(|e| format!("change mount propagation: {e}"))?;
        }
        if self.bind_read_only {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(none, &on, none, flags, none).map_err(|e| format!("remount read-only: {e}"))?;
        }
        Ok(())
    }
}

/// Bind-mounts the host path `source` (file or folder) at `target` below
/// the pod's `shared/` folder (opened without following symlinks, see
/// [`crate::safe_path`]), read-only when asked (a bind mount ignores
/// `MS_RDONLY` until remounted).
pub fn bind_share(
    source: &Path,
    shared: &Path,
    target: &Path,
    read_only: bool,
) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let meta = std::fs::metadata(source).map_err(|e| e.to_string())?;
    let relative = target
        .strip_prefix(shared)
        .map_err(|_| format!("{} is not below {}", target.display(), shared.display()))?;
    let leaf = if meta.is_dir() {
        Leaf::Directory
    } else {
        Leaf::File
    };
    let opened = open_beneath(shared, relative, leaf).map_err(|e| e.to_string())?;
    let none: Option<&str> = None;
    mount(
        Some(source),
        &opened.proc_path(),
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("bind mount: {e}"))?;
    if read_only {
        let later = LaterSteps {
            bind_read_only: true,
            ..Default::default()
        };
        if let Err(e) = later.apply(&opened) {
            // The bind is the topmost mount at the name: undone through the
            // same no-symlink lookup.
            if let Ok(top) = opened.reopen() {
                let on = crate::safe_path::fd_path(top.as_raw_fd());
                let _ = nix::mount::umount2(&on, nix::mount::MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount below the sandbox folder, deepest first (after
/// its VM has stopped); failures are logged, the folder's removal then
/// names what is left.
pub fn unmount_everything_below(dir: &SandboxDir) {
    let mut mounts = mounts_below(&dir.path);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in mounts {
        if let Err(e) = unmount_rootfs(&dir.path, &mount) {
            tracing::warn!(mount = %mount.display(), "{e}");
        }
    }
}

/// Unmounts everything stacked at `target`, a path below the shim's own
/// folder `root` (lazily: the guest may still hold files). The path is
/// walked without following symlinks: the guest can rename folders in its
/// share between the shim reading mountinfo and unmounting
/// ([`crate::safe_teardown`]).
pub fn unmount_rootfs(
    root: &Path,
    target: &Path,
) -> Result<(), crate::safe_teardown::TeardownError> {
    let relative =
        target
            .strip_prefix(root)
            .map_err(|_| crate::safe_teardown::TeardownError::NotBeneath {
                path: target.to_path_buf(),
                root: root.to_path_buf(),
            })?;
    crate::safe_teardown::unmount_beneath(root, relative)
}

/// The rootfs the agent gets for a container whose rootfs is in the share.
pub fn shared_rootfs(container_id: &str) -> agent::Rootfs {
    let mut rootfs = agent::Rootfs::new();
    let mut share = agent::VirtioFsRootfs::new();
    share.tag = SHARED_FS_TAG.into();
    share.path = format!("{container_id}/rootfs");
    rootfs.set_virtio_fs(share);
    rootfs
}

/// The guest's host name: the spec's (CRI sets the pod's), else the first
/// 12 characters of the sandbox id, as Docker names a container's host —
/// a VM has no host name of its own to inherit, as a runc container does.
pub fn guest_hostname(spec: &serde_json::Value, sandbox_id: &str) -> String {
    match spec.get("hostname").and_then(|h| h.as_str()) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => sandbox_id.chars().take(12).collect(),
    }
}

/// The SetupSandbox request: the shared folder mounted in the guest.
pub fn setup_request(hostname: &str) -> agent::SetupSandboxRequest {
    let mut request = agent::SetupSandboxRequest::new();
    request.hostname = hostname.into();
    let mut share = agent::GuestMount::new();
    share.fstype = "virtiofs".into();
    share.source = SHARED_FS_TAG.into();
    share.target = GUEST_SHARED_DIR.into();
    request.mounts.push(share);
    request
}

/// What a guest's console says about its death: the kernel's panic line
/// when it panicked (a call trace follows it), else the console's end.
fn console_summary(console_log: &Path) -> String {
    let console = std::fs::read(console_log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    match crate::audit::guest_panic_lines(&console, 1) {
        Some(lines) => lines.join("\n"),
        None => log_tail(console_log, GUEST_CONSOLE_TAIL),
    }
}

/// A running pod: its agent, and the VM it runs in.
pub struct PodSandbox {
    pub id: String,
    pub agent: Arc<dyn AgentClient>,
    pub dir: SandboxDir,
    hypervisor: Option<Box<dyn Hypervisor>>,
    /// The pod's network namespace whose taps and redirects we made.
    netns: Option<PathBuf>,
    /// How each container's spec is checked against least privilege.
    pub inspection: InspectionSection,
    /// Set once the VM or the agent connection is gone.
    gone: std::sync::atomic::AtomicBool,
    /// Confidential pods: their settings, and the KBS forwarder living as
    /// long as the pod.
    pub confidential: Option<crate::confidential::PodConfidential>,
    kbs_forwarder: Option<crate::confidential::kbs_forward::KbsForwarder>,
}

impl PodSandbox {
    pub fn new(
        id: &str,
        agent: Arc<dyn AgentClient>,
        dir: SandboxDir,
        hypervisor: Option<Box<dyn Hypervisor>>,
    ) -> Self {
        Self {
            id: id.to_owned(),
            agent,
            dir,
            hypervisor,
            netns: None,
            inspection: InspectionSection::default(),
            gone: std::sync::atomic::AtomicBool::new(false),
            confidential: None,
            kbs_forwarder: None,
        }
    }

    /// Records that this pod is confidential (host shares are then checked
    /// against its `allow_host_shares`).
    pub fn with_confidential(
        mut self,
        confidential: Option<crate::confidential::PodConfidential>,
        kbs_forwarder: Option<crate::confidential::kbs_forward::KbsForwarder>,
    ) -> Self {
        self.confidential = confidential;
        self.kbs_forwarder = kbs_forwarder;
        self
    }

    /// Records the network namespace plumbed for this pod, to undo on
    /// shutdown.
    pub fn with_network(mut self, netns: Option<PathBuf>) -> Self {
        self.netns = netns;
        self
    }

    /// Records the runtime config's `[inspection]` for this pod.
    pub fn with_inspection(mut self, inspection: InspectionSection) -> Self {
        self.inspection = inspection;
        self
    }

    /// Records that the guest can no longer be reached.
    pub fn mark_gone(&self) {
        self.gone.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the VM died or the agent connection ended.
    pub fn is_gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves when the VM is gone; never, for a sandbox without one.
    pub async fn vm_exit(&self) -> ChildExit {
        match &self.hypervisor {
            Some(h) => h.wait_exit().await,
            None => std::future::pending().await,
        }
    }

    /// Host pids of the VM's processes.
    pub fn vm_pids(&self) -> Vec<u32> {
        self.hypervisor
            .as_ref()
            .map(|h| h.pids())
            .unwrap_or_default()
    }

    /// Agent shutdown, then the VMM stopped (SIGKILL after the grace
    /// period), then the pod's taps and redirects removed, then the folder.
    pub async fn shut_down(&self) -> Result<(), SandboxError> {
        if let Err(e) = self.agent.shutdown().await {
            tracing::warn!(sandbox = %self.id, "agent shutdown: {e}");
        }
        if let Some(hypervisor) = &self.hypervisor {
            hypervisor.stop(VMM_STOP_GRACE).await;
        }
        if let Some(netns) = &self.netns {
            unplumb_network(netns).await;
        }
        // Containers are unshared as they go, but the guest may have moved
        // a folder holding a mount where their unshare no longer looked.
        unmount_everything_below(&self.dir);
        self.dir.remove()
    }
}

/// The pod's network, set up in the namespace CNI made before the VM
/// starts: `None` for a fresh, empty namespace (`ctr run`) and for a
/// host-network pod the config allows.
pub async fn plumb_network(
    config: &RuntimeConfig,
    spec: &serde_json::Value,
) -> Result<Option<PodNetwork>, SandboxError> {
    match network_namespace(spec)? {
        PodNetworkNamespace::Fresh => Ok(None),
        PodNetworkNamespace::Host if config.network.allow_host_network => Ok(None),
        PodNetworkNamespace::Host => Err(SandboxError::HostNetwork),
        PodNetworkNamespace::Path(path) => Ok(Some(setup_pod_network(&path).await?)),
    }
}

/// Removes the pod's taps and redirects (logged, not failed: the sandbox
/// goes on being cleaned up).
pub async fn unplumb_network(netns: &Path) {
    match teardown_pod_network(netns).await {
        Ok(report) => tracing::info!(netns = %netns.display(), "pod network removed: {report:?}"),
        Err(e) => tracing::warn!(netns = %netns.display(), "pod network teardown: {e}"),
    }
}

/// What the service needs to bring up a pod (real VM, or a fake in tests).
#[async_trait]
pub trait SandboxLauncher: Send + Sync {
    /// The pod's runtime config: the file the runtime option `ConfigPath`
    /// names, else `CLOISTER_CONFIG`, else the default. Read before the VM
    /// starts, so what it refuses (`[inspection]`) never boots one.
    fn load_config(
        &self,
        options_config_path: Option<&str>,
    ) -> Result<RuntimeConfig, SandboxError> {
        let env = std::env::var(crate::config::CONFIG_ENV).ok();
        let source = ConfigSource::resolve(options_config_path, env.as_deref());
        Ok(RuntimeConfig::load(&source)?)
    }

    /// Starts the pod's VM and agent; every agent request goes through
    /// `audit`.
    async fn launch(
        &self,
        sandbox_id: &str,
        spec: &serde_json::Value,
        config: &RuntimeConfig,
        audit: &crate::audit::AuditLog,
    ) -> Result<PodSandbox, SandboxError>;

    /// Makes a container's rootfs visible in the guest: containerd's
    /// `mounts`, or `root_dir` when there are none. Returns the rootfs the
    /// agent is to use.
    async fn share_rootfs(
        &self,
        sandbox: &PodSandbox,
        container_id: &str,
        mounts: &[Mount],
        root_dir: &Path,
    ) -> Result<agent::Rootfs, SandboxError>;

    /// Makes the host paths of a container's bind mounts visible in the
    /// guest (see [`crate::guest_spec`]).
    fn share_mounts(
        &self,
        sandbox: &PodSandbox,
        container_id: &str,
        mounts: &[SharedMount],
    ) -> Result<(), SandboxError>;

    /// Undoes [`SandboxLauncher::share_rootfs`] and
    /// [`SandboxLauncher::share_mounts`].
    fn unshare_rootfs(&self, sandbox: &PodSandbox, container_id: &str) -> Result<(), SandboxError>;
}

/// What a pod's VM is made of before its network and folder exist: its
/// size and kernel parameters, its confidential settings, and for an
/// SNP/TDX pod the launch (bzImage, policy, init-data binding). The
/// launcher and `cloister measure` both start here, so the reference
/// value is computed from the VM the shim would launch.
#[derive(Debug, Clone)]
pub struct PodVmPlan {
    pub vm: crate::config::PodVm,
    pub confidential: Option<crate::confidential::PodConfidential>,
    pub tee: Option<crate::confidential::launch::TeeLaunch>,
}

impl PodVmPlan {
    pub fn for_pod(
        config: &RuntimeConfig,
        pod_annotations: &HashMap<String, String>,
    ) -> Result<Self, SandboxError> {
        let mut vm = config.pod_vm(pod_annotations)?;
        let confidential =
            crate::confidential::PodConfidential::resolve(&config.confidential, pod_annotations)?;
        let mut tee = None;
        if let Some(confidential) = &confidential {
            if !vm.kernel_params.is_empty() {
                vm.kernel_params.push(' ');
            }
            vm.kernel_params.push_str(&confidential.kernel_params());
            vm.shared_fs = confidential.shares_anything();
            tee = config
                .confidential
                .tee_settings(&config.guest.kernel)?
                .map(|settings| settings.launch(confidential));
        }
        Ok(Self {
            vm,
            confidential,
            tee,
        })
    }
}

/// Starts the pod's microVM and connects to its agent.
pub struct VmLauncher {
    pub namespace: String,
    pub state_dir: PathBuf,
}

#[async_trait]
impl SandboxLauncher for VmLauncher {
    async fn launch(
        &self,
        sandbox_id: &str,
        spec: &serde_json::Value,
        config: &RuntimeConfig,
        audit: &crate::audit::AuditLog,
    ) -> Result<PodSandbox, SandboxError> {
        let PodVmPlan {
            mut vm,
            confidential,
            tee,
        } = PodVmPlan::for_pod(config, &bundle_annotations(spec))?;
        // A jailed VMM joins the pod's cgroup.
        vm.cgroups_path = spec
            .pointer("/linux/cgroupsPath")
            .and_then(|p| p.as_str())
            .map(str::to_owned);
        let network = plumb_network(config, spec).await?;
        let netns = network.as_ref().map(|n| n.netns.clone());
        if let Some(network) = &network {
            vm.nics = network
                .endpoints
                .iter()
                .map(|e| VmNic {
                    tap_fd: e.tap.fd.as_raw_fd(),
                    mac: e.guest_mac(),
                })
                .collect();
        }
        let dir = SandboxDir::new(&self.state_dir, &self.namespace, sandbox_id);
        if let Err(e) = dir.create() {
            if let Some(netns) = &netns {
                unplumb_network(netns).await;
            }
            return Err(e);
        }
        let mut hypervisor = match hypervisor_for(config, &vm, dir.vm_paths(), tee.as_ref()) {
            Ok(hypervisor) => hypervisor,
            Err(e) => {
                if let Some(netns) = &netns {
                    unplumb_network(netns).await;
                }
                if let Err(cleanup) = dir.remove() {
                    tracing::warn!("{cleanup}");
                }
                return Err(e.into());
            }
        };
        let mut kbs_forwarder = None;
        let connected = async {
            hypervisor.start().await?;
            let uds = hypervisor.vsock_uds();
            // Listening before the guest boots far enough to dial it.
            if let Some((port, kbs)) = confidential.as_ref().and_then(|c| c.kbs_forward.clone()) {
                let path = PathBuf::from(format!("{}_{port}", uds.display()));
                // A jailed VMM connects as the pod's own uid.
                let owner = hypervisor.jail_ids();
                kbs_forwarder = Some(crate::confidential::kbs_forward::KbsForwarder::spawn(
                    &path, kbs, None, owner,
                )?);
            }
            let endpoint = AgentEndpoint::HybridVsock { uds };
            let timeout = Duration::from_secs(config.agent.connect_timeout_secs);
            // A guest that dies while booting (a kernel panic) ends the
            // wait at once, its console's last lines in the error.
            let agent = tokio::select! {
                agent = endpoint.connect_until(timeout) => agent?,
                exit = hypervisor.wait_exit() => {
                    let log = dir.vm_paths().console_log();
                    return Err(HypervisorError::EarlyExit {
                        name: "the pod's VM".into(),
                        status: exit.to_string(),
                        log_tail: console_summary(&log),
                        log,
                    }
                    .into());
                }
            };
            let annotations = bundle_annotations(spec);
            if let Some(policy) = crate::pod_policy::policy_from_annotations(&annotations)? {
                // On the concrete client: the policy is installed before
                // the audited wrapper exists, so it is recorded by hand.
                let result = agent.set_policy(policy).await;
                crate::audit::agent::record_agent_request(audit, sandbox_id, "SetPolicy", &result);
                result?;
            }
            let agent = crate::audit::agent::audited_agent(Arc::new(agent), audit, sandbox_id);
            let mut setup = setup_request(&guest_hostname(spec, sandbox_id));
            if let Some(confidential) = &confidential {
                if !confidential.shares_anything() {
                    setup.mounts.clear();
                }
                confidential.add_to_setup(&mut setup);
            }
            agent.setup_sandbox(setup).await?;
            if let Some(network) = &network {
                agent
                    .update_network(
                        network.update_interfaces_request(),
                        network.update_routes_request(),
                    )
                    .await?;
            }
            Ok::<_, SandboxError>(agent)
        }
        .await;
        // The VMM holds its own copies of the tap fds now.
        drop(network);
        match connected {
            Ok(agent) => Ok(PodSandbox::new(sandbox_id, agent, dir, Some(hypervisor))
                .with_network(netns)
                .with_inspection(config.inspection.clone())
                .with_confidential(confidential, kbs_forwarder)),
            Err(e) => {
                // Nothing of a failed start stays behind.
                hypervisor.stop(VMM_STOP_GRACE).await;
                audit.guest_panic_in(sandbox_id, &dir.vm_paths().console_log());
                if let Some(netns) = &netns {
                    unplumb_network(netns).await;
                }
                if let Err(cleanup) = dir.remove() {
                    tracing::warn!("{cleanup}");
                }
                Err(e)
            }
        }
    }

    async fn share_rootfs(
        &self,
        sandbox: &PodSandbox,
        container_id: &str,
        mounts: &[Mount],
        root_dir: &Path,
    ) -> Result<agent::Rootfs, SandboxError> {
        if let Some(confidential) = &sandbox.confidential {
            confidential.check_share(crate::confidential::HostShare::Rootfs, root_dir)?;
        }
        let target = sandbox.dir.rootfs_target(container_id);
        let shared = sandbox.dir.shared_dir();
        mount_rootfs(container_id, mounts, root_dir, &shared, &target).await?;
        Ok(shared_rootfs(container_id))
    }

    fn share_mounts(
        &self,
        sandbox: &PodSandbox,
        container_id: &str,
        mounts: &[SharedMount],
    ) -> Result<(), SandboxError> {
        if let Some(confidential) = &sandbox.confidential {
            for mount in mounts {
                confidential
                    .check_share(crate::confidential::HostShare::Bind, &mount.host_source)?;
            }
        }
        for mount in mounts {
            let shared = sandbox.dir.shared_dir();
            let target = shared.join(&mount.share_path);
            bind_share(&mount.host_source, &shared, &target, mount.read_only).map_err(
                |reason| SandboxError::Rootfs {
                    container_id: container_id.to_owned(),
                    target: target.clone(),
                    reason: format!("share {}: {reason}", mount.host_source.display()),
                },
            )?;
        }
        Ok(())
    }

    fn unshare_rootfs(&self, sandbox: &PodSandbox, container_id: &str) -> Result<(), SandboxError> {
        let container_dir = sandbox.dir.shared_dir().join(container_id);
        // Deepest first: the rootfs and every shared bind mount below.
        let mut mounted = mounts_below(&container_dir);
        mounted.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
        for target in mounted {
            unmount_rootfs(&sandbox.dir.path, &target).map_err(|e| SandboxError::Rootfs {
                container_id: container_id.to_owned(),
                target: target.clone(),
                reason: format!("unmount: {e}"),
            })?;
        }
        match remove_tree_without_crossing_mounts(&container_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxError::Folder {
                path: container_dir,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_sandbox_container_starts_its_own_pod() {
        let a = annotations(&[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "pod1")]);
        let m = pod_membership("pod1", &a).unwrap();
        assert_eq!(m.kind, ContainerKind::Sandbox);
        assert_eq!(m.sandbox_id, "pod1");
        assert_eq!(shim_grouping("pod1", &a), "pod1");
    }

    #[test]
    fn cri_workload_container_joins_the_pods_shim() {
        let a = annotations(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "pod1")]);
        let m = pod_membership("app", &a).unwrap();
        assert_eq!(
            m,
            PodMembership {
                kind: ContainerKind::Workload,
                sandbox_id: "pod1".into()
            }
        );
        assert_eq!(shim_grouping("app", &a), "pod1");
    }

    #[test]
    fn container_without_cri_annotations_is_a_pod_of_its_own() {
        let m = pod_membership("ctr-run", &HashMap::new()).unwrap();
        assert_eq!(m.kind, ContainerKind::Sandbox);
        assert_eq!(shim_grouping("ctr-run", &HashMap::new()), "ctr-run");
    }

    #[test]
    fn workload_without_sandbox_id_is_refused_by_name() {
        let a = annotations(&[(CRI_CONTAINER_TYPE, "container")]);
        let err = pod_membership("app", &a).unwrap_err();
        assert!(err.to_string().contains(CRI_SANDBOX_ID), "{err}");
        assert_eq!(shim_grouping("app", &a), "app");
    }

    #[tokio::test]
    async fn host_network_pod_is_refused_unless_allowed_and_fresh_netns_needs_nothing() {
        let host = serde_json::json!({ "linux": { "namespaces": [{ "type": "pid" }] } });
        let error = plumb_network(&RuntimeConfig::default(), &host)
            .await
            .unwrap_err();
        assert!(matches!(error, SandboxError::HostNetwork));
        assert!(error.to_string().contains("allow_host_network"), "{error}");
        let mut allowing = RuntimeConfig::default();
        allowing.network.allow_host_network = true;
        assert!(plumb_network(&allowing, &host).await.unwrap().is_none());
        let fresh = serde_json::json!({ "linux": { "namespaces": [{ "type": "network" }] } });
        assert!(plumb_network(&RuntimeConfig::default(), &fresh)
            .await
            .unwrap()
            .is_none());
        let missing = serde_json::json!({ "linux": { "namespaces": [
            { "type": "network", "path": "/nonexistent/netns" }
        ] } });
        let error = plumb_network(&RuntimeConfig::default(), &missing)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/netns"), "{error}");
    }

    #[test]
    fn guest_hostname_is_the_specs_or_the_short_sandbox_id() {
        let id = "4005c68af63f131b0ff49734e096ad22";
        assert_eq!(
            guest_hostname(&serde_json::json!({ "hostname": "web-0" }), id),
            "web-0"
        );
        assert_eq!(guest_hostname(&serde_json::json!({}), id), "4005c68af63f");
        assert_eq!(
            guest_hostname(&serde_json::json!({ "hostname": "" }), "ab"),
            "ab"
        );
    }

    #[test]
    fn spec_root_is_relative_to_the_bundle_unless_absolute() {
        let bundle = Path::new("/run/b");
        let rel = serde_json::json!({"root": {"path": "rootfs"}});
        assert_eq!(spec_root(bundle, &rel), Path::new("/run/b/rootfs"));
        let abs = serde_json::json!({"root": {"path": "/srv/rootfs"}});
        assert_eq!(spec_root(bundle, &abs), Path::new("/srv/rootfs"));
        assert_eq!(
            spec_root(bundle, &serde_json::json!({})),
            Path::new("/run/b/rootfs")
        );
    }

    #[test]
    fn annotations_are_read_from_the_spec() {
        let spec = serde_json::json!({"annotations": {"a": "1", "n": 2}});
        assert_eq!(bundle_annotations(&spec), annotations(&[("a", "1")]));
        assert!(bundle_annotations(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn sandbox_dir_layout_create_and_remove() {
        let state = tempfile::tempdir().unwrap();
        let dir = SandboxDir::new(state.path(), "k8s.io", "pod1");
        assert_eq!(dir.path.parent(), Some(state.path()));
        dir.create().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path.join("pod")).unwrap(),
            "k8s.io/pod1\n"
        );
        assert_eq!(dir.rootfs_target("c1"), dir.path.join("shared/c1/rootfs"));
        std::fs::create_dir_all(dir.rootfs_target("c1")).unwrap();
        std::fs::write(dir.path.join("vmm.log"), "x").unwrap();
        let neighbour = SandboxDir::new(state.path(), "k8s.io", "pod2");
        neighbour.create().unwrap();
        dir.remove().unwrap();
        assert!(!dir.path.exists());
        assert!(neighbour.path.exists());
        neighbour.remove().unwrap();
        assert_eq!(state.path().read_dir().unwrap().count(), 0);
        // Removing twice is fine.
        dir.remove().unwrap();
    }

    #[test]
    fn vm_sockets_fit_sun_path_for_cri_ids_and_long_namespaces() {
        let cri_id = "f".repeat(64);
        let namespace = "n".repeat(200);
        let dir = SandboxDir::new(Path::new(crate::lifecycle::STATE_DIR), &namespace, &cri_id);
        let paths = dir.vm_paths();
        for socket in [
            paths.vsock_uds(),
            paths.vhost_user_vsock(),
            paths.vhost_user_fs(),
        ] {
            let len = socket.as_os_str().len();
            assert!(
                len <= cloister_vmm::config::MAX_VSOCK_UDS_PATH_BYTES,
                "{} is {len} bytes",
                socket.display()
            );
        }
        // Same pod, same folder (delete after a crash finds it); another
        // namespace, another folder.
        assert_eq!(
            dir,
            SandboxDir::new(Path::new(crate::lifecycle::STATE_DIR), &namespace, &cri_id)
        );
        assert_ne!(
            dir.path,
            SandboxDir::new(Path::new(crate::lifecycle::STATE_DIR), "k8s.io", &cri_id).path
        );
    }

    #[test]
    fn shared_rootfs_and_setup_request_agree_on_the_tag() {
        let rootfs = shared_rootfs("c1");
        assert_eq!(rootfs.virtio_fs().tag, SHARED_FS_TAG);
        assert_eq!(rootfs.virtio_fs().path, "c1/rootfs");
        let setup = setup_request("pod-host");
        assert_eq!(setup.hostname, "pod-host");
        assert_eq!(setup.mounts[0].source, SHARED_FS_TAG);
        assert_eq!(setup.mounts[0].fstype, "virtiofs");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(b"/a\\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(b"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(b"/end\\"), b"/end\\");
        assert_eq!(unescape_mountinfo(b"/x\\377y"), b"/x\xffy");
        assert!(mounts_below(Path::new("/proc")).contains(&PathBuf::from("/proc")));
    }

    #[tokio::test]
    async fn rootfs_bind_mount_round_trip_and_removal_refuses_mounts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting a rootfs needs root");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let bundle = state.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
        std::fs::write(bundle.join("rootfs/etc/hostname"), "box\n").unwrap();
        let dir = SandboxDir::new(state.path(), "default", "pod");
        dir.create().unwrap();
        let target = dir.rootfs_target("c1");
        // Unmounts even when an assertion fails, so no mount outlives the test.
        struct Unmount(PathBuf, PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = unmount_rootfs(&self.0, &self.1);
            }
        }
        let _guard = Unmount(dir.path.clone(), target.clone());
        mount_rootfs(
            "c1",
            &[],
            &bundle.join("rootfs"),
            &dir.shared_dir(),
            &target,
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("etc/hostname")).unwrap(),
            "box\n"
        );
        // A leftover mount must not be deleted through.
        let err = dir.remove().unwrap_err();
        assert!(err.to_string().contains("mount point"), "{err}");
        assert!(bundle.join("rootfs/etc/hostname").exists());
        unmount_rootfs(&dir.path, &target).unwrap();
        dir.remove().unwrap();
        assert!(bundle.join("rootfs/etc/hostname").exists());
    }

    #[test]
    fn bind_options_leave_read_only_and_propagation_for_later() {
        let mount = Mount {
            type_: "bind".into(),
            source: "/snap/1".into(),
            options: vec!["rbind".into(), "ro".into(), "rprivate".into()],
            ..Default::default()
        };
        let (first, later) = split_later_steps(&mount);
        assert_eq!(first.options, vec!["rbind".to_string()]);
        assert!(later.bind_read_only);
        assert_eq!(
            later.propagation,
            nix::mount::MsFlags::MS_PRIVATE | nix::mount::MsFlags::MS_REC
        );
        // Overlay options are passed through untouched.
        let overlay = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec!["ro".into(), "lowerdir=/a:/b".into()],
            ..Default::default()
        };
        let (first, later) = split_later_steps(&overlay);
        assert_eq!(first.options, overlay.options);
        assert_eq!(later, LaterSteps::default());
    }

    #[tokio::test]
    async fn rootfs_and_shares_refuse_a_symlink_planted_by_the_guest() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting a rootfs needs root");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let rootfs = state.path().join("image");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(rootfs.join("marker"), "m").unwrap();
        let dir = SandboxDir::new(state.path(), "default", "pod");
        dir.create().unwrap();
        let shared = dir.shared_dir();
        std::fs::create_dir(shared.join("c1")).unwrap();
        std::os::unix::fs::symlink(outside.path(), shared.join("c1/rootfs")).unwrap();
        let target = dir.rootfs_target("c1");
        let err = mount_rootfs("c1", &[], &rootfs, &shared, &target)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("component 'rootfs' is a symlink"),
            "{err}"
        );
        std::fs::create_dir(shared.join("c2")).unwrap();
        std::os::unix::fs::symlink(outside.path(), shared.join("c2/mounts")).unwrap();
        let err = bind_share(&rootfs, &shared, &shared.join("c2/mounts/0"), true).unwrap_err();
        assert!(err.contains("component 'mounts' is a symlink"), "{err}");
        assert!(!outside.path().join("marker").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(mounts_below(outside.path()).is_empty());
        assert!(mounts_below(&shared).is_empty());
        dir.remove().unwrap();
    }

    #[test]
    fn a_read_only_share_is_bound_and_remounted_through_the_fd() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: bind mounts need root");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let source = state.path().join("volume");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("data"), "d").unwrap();
        let dir = SandboxDir::new(state.path(), "default", "pod");
        dir.create().unwrap();
        let shared = dir.shared_dir();
        let target = shared.join("c1/mounts/0");
        bind_share(&source, &shared, &target, true).unwrap();
        let listed = mounts_below(&shared) == vec![target.clone()];
        let read = std::fs::read_to_string(target.join("data")).ok();
        let write = std::fs::write(target.join("new"), "x");
        unmount_rootfs(&dir.path, &target).unwrap();
        assert!(listed);
        assert_eq!(read.as_deref(), Some("d"));
        assert!(write.is_err(), "the share must be read-only");
        assert!(!source.join("new").exists());
        dir.remove().unwrap();
    }

    #[tokio::test]
    async fn an_overlay_rootfs_is_mounted_through_the_fd() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting an overlay needs root");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let layer = |name: &str| {
            let path = state.path().join(name);
            std::fs::create_dir_all(&path).unwrap();
            path
        };
        let (lower, upper, work) = (layer("lower"), layer("upper"), layer("work"));
        std::fs::write(lower.join("marker"), "image\n").unwrap();
        let overlay = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir={}", lower.display()),
                format!("upperdir={}", upper.display()),
                format!("workdir={}", work.display()),
            ],
            ..Default::default()
        };
        let dir = SandboxDir::new(state.path(), "default", "pod");
        dir.create().unwrap();
        let target = dir.rootfs_target("c1");
        let mounted = mount_rootfs("c1", &[overlay], &lower, &dir.shared_dir(), &target).await;
        let read = std::fs::read_to_string(target.join("marker")).ok();
        let listed = mounts_below(&dir.shared_dir());
        unmount_rootfs(&dir.path, &target).unwrap();
        mounted.unwrap();
        assert_eq!(read.as_deref(), Some("image\n"));
        assert_eq!(listed, vec![target]);
        dir.remove().unwrap();
    }
}
