//! Every container of the pod, as the agent sees them: their state, their
//! processes, cgroups and stdio endpoints. The RPC server calls in here.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloister_protocol::agent;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};

use super::device_rules;
use super::hooks::{self, HookError, HookSet};
use super::plan::{ExecPlan, HelperPlan, NamespaceKind};
use super::resources;
use super::seccomp::SeccompPlan;
use super::spec::{self, SpecError};
use super::state::{ContainerState, Operation, TransitionError};
use super::sync::{check_len, decode, encode, FromHelper, ToHelper};
use crate::cgroups::{Cgroup, CgroupError};
use crate::device_filter::DeviceRule;
use crate::io::{create_stdio, ProcessStdio, StdioError};
use crate::process::{spawn_helper, ExitInfo, Reaper};

/// Errors of container operations; the server maps each to a ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{field} {value:?}: {reason}")]
    InvalidId {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("container_id {0:?} already exists")]
    AlreadyExists(String),
    #[error("exec_id {exec_id:?} already exists in container {container_id:?}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
    #[error("container_id {0:?} not found")]
    NotFound(String),
    #[error("exec_id {exec_id:?} not found in container {container_id:?}")]
    ExecNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("container {id:?}: {source}")]
    State {
        id: String,
        #[source]
        source: TransitionError,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    #[error("signal {0} is not a valid signal number (1..=64)")]
    InvalidSignal(u32),
    #[error("signal {signal} to pid {pid}: {source}")]
    Kill {
        signal: i32,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("process {0} has already exited")]
    AlreadyExited(String),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("container {id:?} has no cgroup ({what} needs cgroup v2)")]
    NoCgroup { id: String, what: &'static str },
    #[error("start container {id:?}: {message}")]
    Helper { id: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error("tty size rows={rows} columns={columns} is out of range (0..=65535)")]
    TtySize { rows: u32, columns: u32 },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// Checks a container or exec id: what containerd accepts, and safe as a
/// path component.
pub fn check_id(field: &'static str, id: &str, allow_empty: bool) -> Result<(), ContainerError> {
    let bad = |reason| ContainerError::InvalidId {
        field,
        value: id.chars().take(80).collect(),
        reason,
    };
    if id.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(bad("must not be empty"))
        };
    }
    if id.len() > 128 {
        return Err(bad("longer than 128 bytes"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || id.starts_with('.')
    {
        return Err(bad(
            "only letters, digits, '-', '_' and '.' (not first) are allowed",
        ));
    }
    Ok(())
}

/// One process of a container (its init or an exec).
pub struct ProcessHandle {
    pub exec_id: String,
    pub pid: Pid,
    pub stdio: ProcessStdio,
    exit: watch::Receiver<Option<ExitInfo>>,
}

impl ProcessHandle {
    pub fn exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The watcher task is gone; the value it left is final.
                if let Some(info) = *rx.borrow() {
                    return info;
                }
                return ExitInfo {
                    status: 255,
                    at_ns: 0,
                };
            }
        }
    }
}

/// One container.
pub struct Container {
    pub id: String,
    state: Mutex<ContainerState>,
    pub init: Arc<ProcessHandle>,
    execs: Mutex<HashMap<String, Arc<ProcessHandle>>>,
    cgroup: Option<Cgroup>,
    /// Allow rules for the spec's `linux.devices` nodes, kept when an
    /// update replaces the device rules.
    device_nodes: Vec<DeviceRule>,
    namespaces: Vec<NamespaceKind>,
    seccomp: Option<SeccompPlan>,
    rootfs: PathBuf,
    hooks: HookSet,
    /// The helper's sync socket until Start.
    start_channel: tokio::sync::Mutex<Option<UnixStream>>,
    /// `oom_kill` count of memory.events already reported as OOM events.
    oom_kills_reported: std::sync::atomic::AtomicU64,
}

impl Container {
    /// Sends an OOM event if the cgroup counted kills not reported yet.
    /// Called by the periodic watcher and before each exit event, so an
    /// OOM kill is reported before the exit it caused (as runc's shim
    /// orders TaskOOM and TaskExit).
    fn report_new_oom_kills(&self, events: &broadcast::Sender<agent::Event>) {
        let Some(cgroup) = &self.cgroup else {
            return;
        };
        let kills = cgroup.oom_kills();
        let before = self
            .oom_kills_reported
            .fetch_max(kills, std::sync::atomic::Ordering::AcqRel);
        if kills > before {
            let mut oom = agent::OomKilled::new();
            oom.container_id = self.id.clone();
            let mut event = agent::Event::new();
            event.set_oom(oom);
            let _ = events.send(event);
        }
    }

    pub fn state(&self) -> ContainerState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn transition(&self, op: Operation) -> Result<ContainerState, ContainerError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = state.apply(op).map_err(|source| ContainerError::State {
            id: self.id.clone(),
            source,
        })?;
        *state = next;
        Ok(next)
    }

    fn check(&self, op: Operation) -> Result<(), ContainerError> {
        self.state()
            .apply(op)
            .map(drop)
            .map_err(|source| ContainerError::State {
                id: self.id.clone(),
                source,
            })
    }

    /// The init process or exec `exec_id`.
    pub fn process(&self, exec_id: &str) -> Result<Arc<ProcessHandle>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn pids(&self) -> Vec<i32> {
        match &self.cgroup {
            Some(cgroup) => cgroup.pids(),
            None if self.init.exit().is_none() => vec![self.init.pid.as_raw()],
            None => Vec::new(),
        }
    }
}

/// Settings the manager needs from the agent's command line.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The cgroup v2 hierarchy, if any.
    pub cgroup_root: Option<PathBuf>,
    /// Where the agent mounts what it owns (block rootfs): `/run/cloister`.
    pub run_dir: PathBuf,
}

/// All containers of the pod.
pub struct ContainerManager {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<HashSet<String>>,
    reaper: Arc<Reaper>,
    events: broadcast::Sender<agent::Event>,
    config: ManagerConfig,
    /// virtio-fs tag → guest mount point (from SetupSandbox).
    shares: Mutex<HashMap<String, PathBuf>>,
    /// Exit receivers registered before the exit watcher starts.
    pending_exits: Mutex<HashMap<i32, tokio::sync::oneshot::Receiver<ExitInfo>>>,
}

const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

async fn read_frame(stream: &mut UnixStream) -> Result<Option<FromHelper>, std::io::Error> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; check_len(len)?];
    stream.read_exact(&mut body).await?;
    decode(&body).map(Some)
}

async fn read_frame_timeout(
    stream: &mut UnixStream,
    id: &str,
) -> Result<Option<FromHelper>, ContainerError> {
    match tokio::time::timeout(HELPER_TIMEOUT, read_frame(stream)).await {
        Ok(r) => r.map_err(io_error(format!("container {id:?} helper sync"))),
        Err(_) => Err(ContainerError::Helper {
            id: id.to_owned(),
            message: "helper did not answer within 30 s".into(),
        }),
    }
}

/// Receives the pty master the helper sends after `FromHelper::Console`.
/// The helper's next answer. A pty master it sends first
/// (`FromHelper::Console`) is installed as the process's terminal.
async fn read_answer(
    stream: &mut UnixStream,
    id: &str,
    stdio: &ProcessStdio,
) -> Result<Option<FromHelper>, ContainerError> {
    let answer = read_frame_timeout(stream, id).await?;
    if answer != Some(FromHelper::Console) {
        return Ok(answer);
    }
    let master = recv_console(stream)
        .await
        .map_err(io_error("receive terminal"))?;
    stdio.set_terminal(master)?;
    read_frame_timeout(stream, id).await
}

async fn recv_console(stream: &UnixStream) -> std::io::Result<OwnedFd> {
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;
    loop {
        stream.readable().await?;
        let received = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = nix::sys::socket::recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                    if let Some(&fd) = fds.first() {
                        // SAFETY: the kernel just installed `fd` for us.
                        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
            }
            Ok(None)
        });
        match received {
            Ok(Some(fd)) => return Ok(fd),
            Ok(None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "console message without a file descriptor",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn helper_socketpair() -> Result<(UnixStream, OwnedFd), ContainerError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(io_error("socketpair"))?;
    ours.set_nonblocking(true).map_err(io_error("socketpair"))?;
    let ours = UnixStream::from_std(ours).map_err(io_error("socketpair"))?;
    Ok((ours, theirs.into()))
}

impl ContainerManager {
    pub fn new(config: ManagerConfig, reaper: Arc<Reaper>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(ContainerManager {
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            reaper,
            events,
            config,
            shares: Mutex::new(HashMap::new()),
            pending_exits: Mutex::new(HashMap::new()),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<agent::Event> {
        self.events.subscribe()
    }

    /// Records where a virtio-fs share is mounted.
    pub fn add_share(&self, tag: &str, mount_point: PathBuf) {
        self.shares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag.to_owned(), mount_point);
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        check_id("container_id", id, false)?;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_owned()))
    }

    pub fn ids(&self) -> Vec<String> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn rootfs_path(
        &self,
        request: &agent::CreateContainerRequest,
    ) -> Result<PathBuf, ContainerError> {
        use agent::rootfs::Source;
        let rootfs = request
            .rootfs
            .as_ref()
            .ok_or(ContainerError::Missing("rootfs"))?;
        match &rootfs.source {
            Some(Source::Directory(dir)) => Ok(spec::check_rootfs_directory(dir)?),
            Some(Source::VirtioFs(share)) => {
                let base = self
                    .shares
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&share.tag)
                    .cloned()
                    .ok_or_else(|| SpecError::Invalid {
                        field: "rootfs.virtio_fs.tag".into(),
                        reason: format!("share {:?} is not mounted (SetupSandbox)", share.tag),
                    })?;
                let relative = format!("/{}", share.path.trim_start_matches('/'));
                let path = super::rootfs_path::resolve_in_rootfs(
                    &base,
                    &relative,
                    "rootfs.virtio_fs.path",
                )
                .map_err(SpecError::from)?;
                Ok(spec::check_rootfs_directory(&path.to_string_lossy())?)
            }
            Some(Source::Block(block)) => self.mount_block_rootfs(&request.container_id, block),
            _ => Err(ContainerError::Missing("rootfs.source")),
        }
    }

    /// Mounts a block device rootfs at `<run dir>/rootfs/<id>`.
    fn mount_block_rootfs(
        &self,
        id: &str,
        block: &agent::BlockRootfs,
    ) -> Result<PathBuf, ContainerError> {
        use std::os::unix::fs::FileTypeExt;
        let invalid = |field: &str, reason: String| {
            ContainerError::Spec(SpecError::Invalid {
                field: format!("rootfs.block.{field}"),
                reason,
            })
        };
        super::rootfs_path::check_spec_path("rootfs.block.device", &block.device)
            .map_err(SpecError::from)?;
        let meta = std::fs::metadata(&block.device)
            .map_err(|e| invalid("device", format!("{:?}: {e}", block.device)))?;
        if !meta.file_type().is_block_device() {
            return Err(invalid(
                "device",
                format!("{:?} is not a block device", block.device),
            ));
        }
        if block.fstype.is_empty() || !block.fstype.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid(
                "fstype",
                format!("{:?} is not a file system type", block.fstype),
            ));
        }
        let mut flags = nix::mount::MsFlags::empty();
        let mut data = Vec::new();
        for option in &block.options {
            match super::names::mount_option(option) {
                Some(super::names::MountOption::Set(f)) => {
                    flags |= nix::mount::MsFlags::from_bits_truncate(f)
                }
                Some(super::names::MountOption::Clear(f)) => {
                    flags &= !nix::mount::MsFlags::from_bits_truncate(f)
                }
                Some(_) => {
                    return Err(invalid(
                        "options",
                        format!("{option:?} is not valid for a rootfs"),
                    ))
                }
                None => data.push(option.as_str()),
            }
        }
        let target = self.config.run_dir.join("rootfs").join(id);
        std::fs::create_dir_all(&target)
            .map_err(io_error(format!("create {}", target.display())))?;
        let data = data.join(",");
        nix::mount::mount(
            Some(block.device.as_str()),
            &target,
            Some(block.fstype.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| ContainerError::Io {
            what: format!(
                "mount rootfs.block.device {:?} ({}) on {}",
                block.device,
                block.fstype,
                target.display()
            ),
            source: e.into(),
        })?;
        Ok(target)
    }

    /// Unmounts a rootfs this agent mounted (block devices), if any.
    fn release_rootfs(&self, id: &str, rootfs: &std::path::Path) {
        let ours = self.config.run_dir.join("rootfs").join(id);
        if rootfs != ours || !ours.exists() {
            return;
        }
        if let Err(e) = nix::mount::umount2(&ours, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(container = %id, error = %e, "unmount rootfs failed");
        }
        let _ = std::fs::remove_dir(&ours);
    }

    /// CreateContainer: everything up to the point where the init process
    /// waits for StartContainer.
    pub async fn create(
        self: &Arc<Self>,
        request: agent::CreateContainerRequest,
    ) -> Result<Pid, ContainerError> {
        let id = request.container_id.clone();
        check_id("container_id", &id, false)?;
        {
            let containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
            let mut creating = self.creating.lock().unwrap_or_else(|e| e.into_inner());
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(ContainerError::AlreadyExists(id));
            }
        }
        let result = self.create_reserved(&request).await;
        if result.is_err() {
            self.release_rootfs(&id, &self.config.run_dir.join("rootfs").join(&id));
        }
        self.creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let container = result?;
        let pid = container.init.pid;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, container);
        Ok(pid)
    }

    async fn create_reserved(
        self: &Arc<Self>,
        request: &agent::CreateContainerRequest,
    ) -> Result<Arc<Container>, ContainerError> {
        let id = &request.container_id;
        let rootfs = self.rootfs_path(request)?;
        let oci = spec::parse_spec(&request.oci_spec_json)?;
        let mut plan = spec::plan_container(&oci, &rootfs)?;
        let hook_set = hooks::plan_hooks(oci.hooks().as_ref())?;
        let stdio_request = request.stdio.clone().unwrap_or_default();
        plan.process.terminal = stdio_request.terminal;
        let linux = oci.linux().as_ref().ok_or(SpecError::Missing("linux"))?;
        let listed_device_rules = linux
            .resources()
            .as_ref()
            .and_then(|r| r.devices().as_ref())
            .is_some_and(|d| !d.is_empty());
        let writes = match linux.resources() {
            Some(r) => resources::validate(r)?,
            None => Vec::new(),
        };
        let device_rules = device_rules::for_container(linux)?;
        let device_nodes = device_rules::node_rules(linux);
        let cgroup = match &self.config.cgroup_root {
            Some(root) => Some(Cgroup::create(root, id, &writes)?),
            None if writes.is_empty() && !listed_device_rules => None,
            None => {
                return Err(ContainerError::NoCgroup {
                    id: id.clone(),
                    what: "linux.resources",
                })
            }
        };
        if let Some(cgroup) = &cgroup {
            // Before the init helper is cloned into the cgroup, so no
            // process of the container ever runs unfiltered.
            if let Err(e) = cgroup.set_device_rules(&device_rules) {
                let _ = cgroup.remove();
                return Err(e.into());
            }
        }
        let mut result = self
            .spawn_init(id, plan, &stdio_request, cgroup.as_ref())
            .await;
        if let Ok((pid, ..)) = &result {
            let state = hooks::state_json(id, "creating", Some(*pid), &bundle_of(&rootfs));
            if let Err(e) = hooks::run_hooks(
                "createRuntime",
                &hook_set.create_runtime,
                &state,
                &self.reaper,
            )
            .await
            {
                let pid = *pid;
                let _ = kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = self.take_exit(pid).await;
                result = Err(e.into());
            }
        }
        match result {
            Ok((pid, stdio, channel, namespaces, seccomp)) => {
                let (exit_tx, exit_rx) = watch::channel(None);
                let init = Arc::new(ProcessHandle {
                    exec_id: String::new(),
                    pid,
                    stdio,
                    exit: exit_rx,
                });
                let container = Arc::new(Container {
                    id: id.clone(),
                    state: Mutex::new(ContainerState::Created),
                    init,
                    execs: Mutex::new(HashMap::new()),
                    cgroup,
                    device_nodes,
                    namespaces,
                    seccomp,
                    rootfs,
                    hooks: hook_set,
                    start_channel: tokio::sync::Mutex::new(Some(channel)),
                    oom_kills_reported: std::sync::atomic::AtomicU64::new(0),
                });
                self.watch_exit(&container, pid, String::new(), exit_tx);
                self.watch_oom(&container);
                Ok(container)
            }
            Err(e) => {
                if let Some(cgroup) = cgroup {
                    let _ = cgroup.kill_all();
                    let _ = cgroup.remove();
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn spawn_init(
        &self,
        id: &str,
        plan: super::plan::CreatePlan,
        stdio_request: &agent::Stdio,
        cgroup: Option<&Cgroup>,
    ) -> Result<
        (
            Pid,
            ProcessStdio,
            UnixStream,
            Vec<NamespaceKind>,
            Option<SeccompPlan>,
        ),
        ContainerError,
    > {
        let (mut channel, helper_end) = helper_socketpair()?;
        let (fds, stdio) = create_stdio(stdio_request, helper_end)?;
        let flags = plan
            .new_namespaces
            .iter()
            .fold(0u64, |f, k| f | k.clone_flag());
        let mut namespaces = plan.new_namespaces.clone();
        namespaces.extend(plan.join_namespaces.iter().map(|(k, _)| *k));
        let seccomp = plan.process.seccomp.clone();
        let cgroup_dir = cgroup.map(Cgroup::open_dir).transpose()?;
        let pid = spawn_helper(flags, cgroup_dir.as_ref().map(|d| d.as_raw_fd()), fds)
            .map_err(io_error(format!("clone container {id:?} init")))?;
        let exit = self.reaper.register(pid);
        let frame = encode(&ToHelper::Plan(Box::new(HelperPlan::Create(plan))))
            .map_err(io_error("encode plan"))?;
        let outcome = async {
            channel
                .write_all(&frame)
                .await
                .map_err(io_error("send plan to helper"))?;
            let answer = read_answer(&mut channel, id, &stdio).await?;
            match answer {
                Some(FromHelper::Ready { root }) => {
                    tracing::debug!(container = %id, ?root, "container set up");
                    Ok(())
                }
                Some(FromHelper::Error { message }) => Err(ContainerError::Helper {
                    id: id.to_owned(),
                    message,
                }),
                other => Err(ContainerError::Helper {
                    id: id.to_owned(),
                    message: format!("unexpected answer {other:?}"),
                }),
            }
        }
        .await;
        if let Err(e) = outcome {
            let _ = kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = exit.await;
            return Err(e);
        }
        // The exit watcher re-registers; hand it the receiver instead.
        self.pending_exit(pid, exit);
        Ok((pid, stdio, channel, namespaces, seccomp))
    }

    fn pending_exit(&self, pid: Pid, exit: tokio::sync::oneshot::Receiver<ExitInfo>) {
        self.pending_exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid.as_raw(), exit);
    }

    fn take_exit(&self, pid: Pid) -> tokio::sync::oneshot::Receiver<ExitInfo> {
        let pending = self
            .pending_exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid.as_raw());
        match pending {
            Some(rx) => rx,
            None => self.reaper.register(pid),
        }
    }

    fn watch_exit(
        self: &Arc<Self>,
        container: &Arc<Container>,
        pid: Pid,
        exec_id: String,
        tx: watch::Sender<Option<ExitInfo>>,
    ) {
        let exit = self.take_exit(pid);
        let container = container.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let info = exit.await.unwrap_or(ExitInfo {
                status: 255,
                at_ns: 0,
            });
            if exec_id.is_empty() {
                let mut state = container.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(next) = state.apply(Operation::InitExited) {
                    *state = next;
                }
            }
            let _ = tx.send(Some(info));
            container.report_new_oom_kills(&events);
            let mut exited = agent::ProcessExited::new();
            exited.container_id = container.id.clone();
            exited.exec_id = exec_id;
            exited.pid = u32::try_from(pid.as_raw()).unwrap_or(0);
            exited.exit_status = info.status;
            exited.exited_at_ns = info.at_ns;
            let mut event = agent::Event::new();
            event.set_exited(exited);
            let _ = events.send(event);
        });
    }

    fn watch_oom(self: &Arc<Self>, container: &Arc<Container>) {
        let Some(cgroup) = &container.cgroup else {
            return;
        };
        if !cgroup.path().join("memory.events").exists() {
            return;
        }
        let weak = Arc::downgrade(container);
        let events = self.events.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(container) = weak.upgrade() else {
                    return;
                };
                container.report_new_oom_kills(&events);
                if container.state() == ContainerState::Stopped {
                    return;
                }
            }
        });
    }

    /// StartContainer: lets the init process exec.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        container.check(Operation::Start)?;
        let mut guard = container.start_channel.lock().await;
        let Some(mut channel) = guard.take() else {
            return Err(ContainerError::State {
                id: id.to_owned(),
                source: TransitionError {
                    operation: "start".into(),
                    state: container.state(),
                },
            });
        };
        let frame = encode(&ToHelper::Start).map_err(io_error("encode start"))?;
        channel
            .write_all(&frame)
            .await
            .map_err(io_error("send start to helper"))?;
        match read_frame_timeout(&mut channel, id).await? {
            None => {}
            Some(FromHelper::Error { message }) => {
                return Err(ContainerError::Helper {
                    id: id.to_owned(),
                    message,
                });
            }
            Some(other) => {
                return Err(ContainerError::Helper {
                    id: id.to_owned(),
                    message: format!("unexpected answer {other:?}"),
                })
            }
        }
        // The process may already have run and exited (Stopped): keep that.
        {
            let mut state = container.state.lock().unwrap_or_else(|e| e.into_inner());
            if *state == ContainerState::Created {
                *state = ContainerState::Running;
            }
        }
        let state = hooks::state_json(
            id,
            "running",
            Some(container.init.pid),
            &bundle_of(&container.rootfs),
        );
        // The runtime spec: a failing poststart hook is logged, not fatal.
        if let Err(e) = hooks::run_hooks(
            "poststart",
            &container.hooks.poststart,
            &state,
            &self.reaper,
        )
        .await
        {
            tracing::warn!(container = %id, error = %e, "poststart hook failed");
        }
        Ok(())
    }

    /// ExecProcess: one more process inside a running container.
    pub async fn exec(
        self: &Arc<Self>,
        request: agent::ExecProcessRequest,
    ) -> Result<Pid, ContainerError> {
        let container = self.get(&request.container_id)?;
        check_id("exec_id", &request.exec_id, false)?;
        container.check(Operation::Exec)?;
        if container
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&request.exec_id)
        {
            return Err(ContainerError::ExecExists {
                container_id: request.container_id.clone(),
                exec_id: request.exec_id.clone(),
            });
        }
        let process = spec::parse_process(&request.process_json)?;
        let mut process_plan = spec::plan_process(&process, &container.rootfs, "process_json")?;
        let stdio_request = request.stdio.clone().unwrap_or_default();
        process_plan.terminal = stdio_request.terminal;
        process_plan.seccomp = container.seccomp.clone();
        let plan = HelperPlan::Exec(ExecPlan {
            init_pid: container.init.pid.as_raw(),
            namespaces: container.namespaces.clone(),
            process: process_plan,
        });
        let (mut channel, helper_end) = helper_socketpair()?;
        let (fds, stdio) = create_stdio(&stdio_request, helper_end)?;
        let cgroup_dir = container
            .cgroup
            .as_ref()
            .map(Cgroup::open_dir)
            .transpose()?;
        let helper = spawn_helper(0, cgroup_dir.as_ref().map(|d| d.as_raw_fd()), fds)
            .map_err(io_error(format!("clone exec {:?} helper", request.exec_id)))?;
        let helper_exit = self.reaper.register(helper);
        let frame = encode(&ToHelper::Plan(Box::new(plan))).map_err(io_error("encode plan"))?;
        let id = &request.container_id;
        let pid = async {
            channel
                .write_all(&frame)
                .await
                .map_err(io_error("send plan to helper"))?;
            let pid = match read_frame_timeout(&mut channel, id).await? {
                Some(FromHelper::Forked { pid }) => Pid::from_raw(pid),
                Some(FromHelper::Error { message }) => {
                    return Err(ContainerError::Helper {
                        id: id.clone(),
                        message,
                    })
                }
                other => {
                    return Err(ContainerError::Helper {
                        id: id.clone(),
                        message: format!("unexpected answer {other:?}"),
                    })
                }
            };
            let exit = self.reaper.register(pid);
            let answer = read_answer(&mut channel, id, &stdio).await?;
            match answer {
                None => {
                    self.pending_exit(pid, exit);
                    Ok(pid)
                }
                Some(FromHelper::Error { message }) => {
                    let _ = exit.await;
                    Err(ContainerError::Helper {
                        id: id.clone(),
                        message,
                    })
                }
                Some(other) => Err(ContainerError::Helper {
                    id: id.clone(),
                    message: format!("unexpected answer {other:?}"),
                }),
            }
        }
        .await;
        let _ = helper_exit.await;
        let pid = pid?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let handle = Arc::new(ProcessHandle {
            exec_id: request.exec_id.clone(),
            pid,
            stdio,
            exit: exit_rx,
        });
        container
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request.exec_id.clone(), handle);
        self.watch_exit(&container, pid, request.exec_id, exit_tx);
        Ok(pid)
    }

    /// SignalProcess.
    pub fn signal(&self, request: &agent::SignalProcessRequest) -> Result<(), ContainerError> {
        let container = self.get(&request.container_id)?;
        check_id("exec_id", &request.exec_id, true)?;
        if request.signal == 0 || request.signal > 64 {
            return Err(ContainerError::InvalidSignal(request.signal));
        }
        let signal = i32::try_from(request.signal)
            .map_err(|_| ContainerError::InvalidSignal(request.signal))?;
        let process = container.process(&request.exec_id)?;
        let targets = if request.all {
            container.pids()
        } else {
            Vec::new()
        };
        if targets.is_empty() {
            if process.exit().is_some() {
                return Err(ContainerError::AlreadyExited(format!(
                    "{}/{}",
                    request.container_id, request.exec_id
                )));
            }
            return send_signal(process.pid.as_raw(), signal);
        }
        for pid in targets {
            send_signal(pid, signal)?;
        }
        Ok(())
    }

    /// WaitProcess.
    pub async fn wait(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitInfo, ContainerError> {
        let container = self.get(container_id)?;
        check_id("exec_id", exec_id, true)?;
        let process = container.process(exec_id)?;
        Ok(process.wait().await)
    }

    /// PauseContainer / ResumeContainer.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let op = if paused {
            Operation::Pause
        } else {
            Operation::Resume
        };
        container.check(op)?;
        let cgroup = container
            .cgroup
            .as_ref()
            .ok_or_else(|| ContainerError::NoCgroup {
                id: id.to_owned(),
                what: if paused { "pause" } else { "resume" },
            })?;
        cgroup.set_frozen(paused).await?;
        container.transition(op)?;
        Ok(())
    }

    /// UpdateContainer.
    pub fn update(&self, request: &agent::UpdateContainerRequest) -> Result<(), ContainerError> {
        let container = self.get(&request.container_id)?;
        let parsed: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&request.resources_json).map_err(|e| {
                serde_json::from_slice::<serde_json::Value>(&request.resources_json)
                    .ok()
                    .and_then(|v| {
                        device_rules::explain_malformed("linux.resources.devices", v.get("devices"))
                    })
                    .unwrap_or_else(|| SpecError::Invalid {
                        field: "resources_json".into(),
                        reason: e.to_string(),
                    })
            })?;
        let writes = resources::validate(&parsed)?;
        let new_device_rules = device_rules::for_update(&parsed, &container.device_nodes)?;
        let cgroup = container
            .cgroup
            .as_ref()
            .ok_or_else(|| ContainerError::NoCgroup {
                id: request.container_id.clone(),
                what: "update",
            })?;
        cgroup.update(&writes)?;
        if let Some(rules) = new_device_rules {
            cgroup.set_device_rules(&rules)?;
        }
        Ok(())
    }

    /// ListProcesses.
    pub fn list_processes(&self, id: &str) -> Result<Vec<agent::ProcessInfo>, ContainerError> {
        let container = self.get(id)?;
        let execs: HashMap<i32, String> = container
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| (p.pid.as_raw(), p.exec_id.clone()))
            .collect();
        Ok(container
            .pids()
            .into_iter()
            .map(|pid| {
                let mut info = agent::ProcessInfo::new();
                info.pid = u32::try_from(pid).unwrap_or(0);
                info.exec_id = execs.get(&pid).cloned().unwrap_or_default();
                info
            })
            .collect())
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse, ContainerError> {
        let container = self.get(id)?;
        let mut response = match &container.cgroup {
            Some(cgroup) => cgroup.stats(),
            None => {
                return Err(ContainerError::NoCgroup {
                    id: id.to_owned(),
                    what: "stats",
                })
            }
        };
        if container.init.exit().is_none() {
            let dev = std::fs::read_to_string(format!("/proc/{}/net/dev", container.init.pid))
                .unwrap_or_default();
            response.network = parse_net_dev(&dev);
        }
        Ok(response)
    }

    /// ResizeTty.
    pub fn resize(&self, request: &agent::ResizeTtyRequest) -> Result<(), ContainerError> {
        let container = self.get(&request.container_id)?;
        check_id("exec_id", &request.exec_id, true)?;
        let (Ok(rows), Ok(columns)) = (u16::try_from(request.rows), u16::try_from(request.columns))
        else {
            return Err(ContainerError::TtySize {
                rows: request.rows,
                columns: request.columns,
            });
        };
        // 0 is the kernel's "unknown" (what a client without a terminal,
        // e.g. `ctr run -t` under a pipe, sends); runc accepts it too.
        container
            .process(&request.exec_id)?
            .stdio
            .resize(rows, columns)?;
        Ok(())
    }

    /// CloseStdin.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let container = self.get(container_id)?;
        check_id("exec_id", exec_id, true)?;
        container.process(exec_id)?.stdio.close_stdin();
        Ok(())
    }

    /// RemoveContainer: kills what is left (when forced), waits for the
    /// init process, removes the cgroup.
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        container.check(Operation::Remove { force })?;
        if container.init.exit().is_none() {
            match &container.cgroup {
                Some(cgroup) => cgroup.kill_all()?,
                None => {
                    let _ = kill(container.init.pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
            if tokio::time::timeout(Duration::from_secs(10), container.init.wait())
                .await
                .is_err()
            {
                return Err(ContainerError::Helper {
                    id: id.to_owned(),
                    message: "init process did not exit within 10 s of SIGKILL".into(),
                });
            }
        }
        if let Some(cgroup) = &container.cgroup {
            // Processes outside the pid namespace's reach (none with a pid
            // namespace) would keep the cgroup busy.
            if !cgroup.pids().is_empty() {
                cgroup.kill_all()?;
            }
            cgroup.remove()?;
        }
        container.transition(Operation::Remove { force })?;
        self.release_rootfs(id, &container.rootfs);
        let state = hooks::state_json(id, "stopped", None, &bundle_of(&container.rootfs));
        if let Err(e) =
            hooks::run_hooks("poststop", &container.hooks.poststop, &state, &self.reaper).await
        {
            tracing::warn!(container = %id, error = %e, "poststop hook failed");
        }
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }
}

/// The bundle path hooks see: the rootfs's parent directory.
fn bundle_of(rootfs: &std::path::Path) -> String {
    rootfs.parent().unwrap_or(rootfs).display().to_string()
}

fn send_signal(pid: i32, signal: i32) -> Result<(), ContainerError> {
    // SAFETY: kill(2) with a pid and a signal number checked to be 1..=64.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        return Err(ContainerError::Kill {
            signal,
            pid,
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// Parses /proc/PID/net/dev into per-interface counters (without `lo`).
pub fn parse_net_dev(text: &str) -> Vec<agent::NetworkStats> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = counters
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect();
            if v.len() < 16 {
                return None;
            }
            let mut s = agent::NetworkStats::new();
            s.name = name.to_owned();
            s.rx_bytes = v[0];
            s.rx_packets = v[1];
            s.rx_errors = v[2];
            s.rx_dropped = v[3];
            s.tx_bytes = v[8];
            s.tx_packets = v[9];
            s.tx_errors = v[10];
            s.tx_dropped = v[11];
            Some(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_path_characters_return_error_naming_field() {
        let err = check_id("container_id", "../etc", false).unwrap_err();
        assert!(err.to_string().starts_with("container_id"), "{err}");
        assert!(check_id("container_id", "", false).is_err());
        assert!(check_id("exec_id", "", true).is_ok());
        assert!(check_id("container_id", &"a".repeat(129), false).is_err());
        assert!(check_id("container_id", "abc-1_2.3", false).is_ok());
    }

    #[test]
    fn net_dev_parses_counters() {
        let text = "Inter-|   Receive\n face |bytes\n    lo: 1 2 0 0 0 0 0 0 1 2 0 0 0 0 0 0\n  eth0: 100 2 0 0 0 0 0 0 300 4 0 1 0 0 0 0\n";
        let stats = parse_net_dev(text);
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].name, "eth0");
        assert_eq!(
            (stats[0].rx_bytes, stats[0].tx_bytes, stats[0].tx_dropped),
            (100, 300, 1)
        );
    }
}
