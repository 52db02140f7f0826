//! containerd's task API for the containers of one pod.
//!
//! Each call is checked against the container state machine
//! (`container.rs`), forwarded to the pod's agent, recorded, and turned into
//! a task event. Exits come from the agent's event stream; a VM that dies or
//! an agent connection that ends turns every live process into an exit
//! (137 when the VM is gone, 255 when the shim cannot tell), so Wait always
//! returns.
//!
//! Audit: every task API call leaves exactly one record, written in one
//! place ([`TaskService::audited`], which every `Task` method ends in) when
//! the call returns; agent requests are recorded by the audited agent
//! client the launcher hands the pod, security events where they happen
//! (see [`crate::audit`]). The pod's `[inspection]` and `[audit]` are read
//! before its VM is launched, so a refused sandbox never boots one.
//!
//! Locking: one async mutex over the container table, held across the
//! agent call of a state change (create, start, pause, resume, delete), so
//! an exit that races a Start is recorded after the Start and containerd
//! sees TaskStart before TaskExit. Wait, Kill and the exit handler's output
//! drain never wait under the lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cloister_protocol::agent;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::types::task::Status as TaskStatus;
use tokio::sync::Mutex;

use crate::agent_client::AgentError;
use crate::audit::{AuditEvent, AuditLog, AuditSection, Decision as AuditDecision, Subject};
use crate::config::{config_path_from_options, InspectionSection, RuntimeConfig};
use crate::container::{
    Container, ContainerError, ContainerKind, Exit, ExitReason, Status, StdioPaths,
};
use crate::events::{time_from_ns, timestamp, EventSender, TaskEvent};
use crate::io::{requested_streams, ProcessIo, StdioError};
use crate::sandbox::{
    bundle_annotations, pod_membership, spec_root, PodSandbox, SandboxError, SandboxLauncher,
};

/// How long an exit waits for the process's output to reach the FIFOs.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long CloseIO waits for stdin already written to reach the agent.
const STDIN_CLOSE_LIMIT: Duration = Duration::from_secs(5);
/// After the agent connection ends, how long to wait for the VM's exit
/// before calling the processes' fate unknown.
const VM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// Errors of the task service, each answered with a ttrpc status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("{0} is not supported by cloister")]
    Unsupported(&'static str),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("pod sandbox is not running in this shim (container {0})")]
    NoSandbox(String),
}

impl ServiceError {
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            ServiceError::Container(e) => match e {
                ContainerError::ContainerNotFound(_)
                | ContainerError::ProcessNotFound { .. }
                | ContainerError::AlreadyFinished(_) => Code::NOT_FOUND,
                ContainerError::ContainerExists(_) | ContainerError::ProcessExists { .. } => {
                    Code::ALREADY_EXISTS
                }
                ContainerError::WrongState { .. } => Code::FAILED_PRECONDITION,
            },
            ServiceError::Agent(e) => e.code().unwrap_or(Code::UNAVAILABLE),
            ServiceError::Sandbox(SandboxError::Config(_) | SandboxError::NetworkSpec(_)) => {
                Code::INVALID_ARGUMENT
            }
            ServiceError::Sandbox(SandboxError::HostNetwork) => Code::FAILED_PRECONDITION,
            // A confidential pod's config refusing a host share is a
            // refusal, like inspection's; bad init-data is the caller's input.
            ServiceError::Sandbox(SandboxError::Confidential(
                crate::confidential::ConfidentialError::ShareRefused { .. },
            )) => Code::PERMISSION_DENIED,
            ServiceError::Sandbox(SandboxError::Confidential(
                crate::confidential::ConfidentialError::Read { .. },
            )) => Code::INTERNAL,
            ServiceError::Sandbox(SandboxError::Confidential(_)) => Code::INVALID_ARGUMENT,
            // The host cannot launch this TEE (QEMU without the object).
            ServiceError::Sandbox(SandboxError::Hypervisor(
                crate::vmm_client::HypervisorError::QemuTee(_),
            )) => Code::FAILED_PRECONDITION,
            ServiceError::Sandbox(SandboxError::ForeignSandbox { .. })
            | ServiceError::NoSandbox(_) => Code::FAILED_PRECONDITION,
            ServiceError::Sandbox(_) | ServiceError::Stdio(_) => Code::INTERNAL,
            ServiceError::Bundle { .. } | ServiceError::InvalidArgument(_) => {
                Code::INVALID_ARGUMENT
            }
            ServiceError::Unsupported(_) => Code::UNIMPLEMENTED,
            ServiceError::PermissionDenied(_) => Code::PERMISSION_DENIED,
        }
    }

    pub fn to_ttrpc(&self) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(self.code(), self.to_string()))
    }
}

/// One container and what the shim keeps beside its record.
struct Entry {
    container: Container,
    /// Copy tasks per process ("" = init), until the process exits.
    io: HashMap<String, ProcessIo>,
    /// OCI `process` JSON of execs added but not started.
    exec_specs: HashMap<String, Vec<u8>>,
}

struct State {
    launcher: Arc<dyn SandboxLauncher>,
    events: EventSender,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Entry>>,
    sandbox: Mutex<Option<Arc<PodSandbox>>>,
    audit: AuditLog,
    /// The pod this shim serves, once its sandbox container is created
    /// (kept after the sandbox is gone, for the records of later calls).
    pod: std::sync::Mutex<String>,
}

/// The task service of one shim (one pod).
#[derive(Clone)]
pub struct TaskService {
    state: Arc<State>,
}

fn spec_of(bundle: &Path) -> Result<serde_json::Value, ServiceError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| ServiceError::Bundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&text).map_err(|e| ServiceError::Bundle {
        path,
        reason: e.to_string(),
    })
}

fn status_of(status: Status) -> TaskStatus {
    match status {
        Status::Created => TaskStatus::CREATED,
        Status::Running => TaskStatus::RUNNING,
        Status::Paused => TaskStatus::PAUSED,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::Container(ContainerError::ContainerNotFound(id.to_owned()))
}

impl TaskService {
    /// A service whose audit records wait for the pod's config (see
    /// [`TaskService::with_audit`]).
    pub fn new(
        launcher: Arc<dyn SandboxLauncher>,
        events: EventSender,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self::with_audit(launcher, events, exit, AuditLog::new(""))
    }

    /// A service recording to `audit`, which it points at the file the
    /// pod's `[audit]` names when the pod's config is read.
    pub fn with_audit(
        launcher: Arc<dyn SandboxLauncher>,
        events: EventSender,
        exit: Arc<ExitSignal>,
        audit: AuditLog,
    ) -> Self {
        audit.publish_security_events(events.clone());
        Self {
            state: Arc::new(State {
                launcher,
                events,
                exit,
                containers: Mutex::new(HashMap::new()),
                sandbox: Mutex::new(None),
                audit,
                pod: std::sync::Mutex::new(String::new()),
            }),
        }
    }

    /// The audit trail this service writes.
    pub fn audit(&self) -> &AuditLog {
        &self.state.audit
    }

    fn pod_id(&self) -> String {
        self.state
            .pod
            .lock()
            .map(|pod| pod.clone())
            .unwrap_or_default()
    }

    async fn sandbox(&self, container_id: &str) -> Result<Arc<PodSandbox>, ServiceError> {
        self.state
            .sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| ServiceError::NoSandbox(container_id.to_owned()))
    }

    pub async fn create(
        &self,
        req: &api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse, ServiceError> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(ServiceError::Unsupported("restoring from a checkpoint"));
        }
        let mut containers = self.state.containers.lock().await;
        if containers.contains_key(&req.id) {
            return Err(ContainerError::ContainerExists(req.id.clone()).into());
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = spec_of(&bundle)?;
        let membership = pod_membership(&req.id, &bundle_annotations(&spec))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let sandbox = match membership.kind {
            ContainerKind::Sandbox => {
                if let Ok(mut pod) = self.state.pod.lock() {
                    pod.clone_from(&membership.sandbox_id);
                }
                self.state.audit.set_pod_of_held(&membership.sandbox_id);
                self.start_sandbox(&req.id, &spec, req).await?
            }
            ContainerKind::Workload => {
                let sandbox = self.sandbox(&req.id).await?;
                if sandbox.id != membership.sandbox_id {
                    return Err(SandboxError::ForeignSandbox {
                        container_id: req.id.clone(),
                        sandbox_id: membership.sandbox_id,
                    }
                    .into());
                }
                self.check_least_privilege(&sandbox.inspection, &sandbox.id, &req.id, &spec)?;
                sandbox
            }
        };
        let created = self
            .create_in_guest(&sandbox, req, &bundle, &spec, &stdio)
            .await;
        let (pid, io) = match created {
            Ok(done) => done,
            Err(e) => {
                if membership.kind == ContainerKind::Sandbox {
                    self.stop_sandbox().await;
                }
                return Err(e);
            }
        };
        let mut container = Container::new(&req.id, bundle, membership.kind, stdio.clone());
        container.set_pid("", pid)?;
        let mut entry = Entry {
            container,
            io: HashMap::new(),
            exec_specs: HashMap::new(),
        };
        entry.io.insert(String::new(), io);
        containers.insert(req.id.clone(), entry);
        self.state.events.send(TaskEvent::Create {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            stdio,
            pid,
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_sandbox(
        &self,
        id: &str,
        spec: &serde_json::Value,
        req: &api::CreateTaskRequest,
    ) -> Result<Arc<PodSandbox>, ServiceError> {
        let mut slot = self.state.sandbox.lock().await;
        if let Some(existing) = slot.as_ref() {
            return Err(ServiceError::InvalidArgument(format!(
                "container {id} would start a second pod sandbox in the shim of {}",
                existing.id
            )));
        }
        let config = match self.pod_config(req) {
            Ok(config) => config,
            Err(e) => {
                // The trail still goes somewhere: the default file.
                self.state.audit.configure(&AuditSection::default());
                return Err(e);
            }
        };
        self.state.audit.configure(&config.audit);
        // Before the VM: a refused pod never boots one.
        self.check_least_privilege(&config.inspection, id, id, spec)?;
        let sandbox = self
            .state
            .launcher
            .launch(id, spec, &config, &self.state.audit)
            .await?;
        let sandbox = Arc::new(sandbox);
        // Subscribed before any container exists: no exit can be missed.
        let events = sandbox.agent.events().await;
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                if let Err(cleanup) = sandbox.shut_down().await {
                    tracing::warn!("{cleanup}");
                }
                return Err(e.into());
            }
        };
        *slot = Some(sandbox.clone());
        tokio::spawn(self.clone().watch_sandbox(sandbox.clone(), events));
        Ok(sandbox)
    }

    /// The runtime config of the pod whose sandbox container `req` creates.
    fn pod_config(&self, req: &api::CreateTaskRequest) -> Result<RuntimeConfig, ServiceError> {
        let config_path = match req.options.as_ref() {
            Some(any) if any.type_url.contains("runtimeoptions") => {
                config_path_from_options(&any.value).map_err(SandboxError::from)?
            }
            _ => None,
        };
        Ok(self.state.launcher.load_config(config_path.as_deref())?)
    }

    async fn create_in_guest(
        &self,
        sandbox: &PodSandbox,
        req: &api::CreateTaskRequest,
        bundle: &Path,
        spec: &serde_json::Value,
        stdio: &StdioPaths,
    ) -> Result<(u32, ProcessIo), ServiceError> {
        let launcher = &self.state.launcher;
        let (guest_spec, shared_mounts) =
            crate::guest_spec::for_guest(spec, &req.id).map_err(|e| ServiceError::Bundle {
                path: bundle.to_path_buf(),
                reason: e.to_string(),
            })?;
        let rootfs = launcher
            .share_rootfs(sandbox, &req.id, &req.rootfs, &spec_root(bundle, spec))
            .await?;
        if let Err(e) = launcher.share_mounts(sandbox, &req.id, &shared_mounts) {
            self.unshare(sandbox, &req.id);
            return Err(e.into());
        }
        let mut request = agent::CreateContainerRequest::new();
        request.container_id = req.id.clone();
        request.oci_spec_json =
            serde_json::to_vec(&guest_spec).map_err(|e| ServiceError::Bundle {
                path: bundle.to_path_buf(),
                reason: e.to_string(),
            })?;
        request.rootfs = Some(rootfs).into();
        request.stdio = Some(requested_streams(stdio)).into();
        let pid = match sandbox.agent.create_container(request).await {
            Ok(pid) => pid,
            Err(e) => {
                self.unshare(sandbox, &req.id);
                return Err(e.into());
            }
        };
        match ProcessIo::attach(sandbox.agent.as_ref(), &req.id, "", stdio).await {
            Ok(io) => Ok((pid, io)),
            Err(e) => {
                if let Err(remove) = sandbox.agent.remove_container(&req.id, true).await {
                    tracing::warn!("{remove}");
                }
                self.unshare(sandbox, &req.id);
                Err(e.into())
            }
        }
    }

    fn unshare(&self, sandbox: &PodSandbox, container_id: &str) {
        if let Err(e) = self.state.launcher.unshare_rootfs(sandbox, container_id) {
            tracing::warn!("{e}");
        }
    }

    pub async fn start(&self, req: &api::StartRequest) -> Result<api::StartResponse, ServiceError> {
        let sandbox = self.sandbox(&req.id).await?;
        let mut containers = self.state.containers.lock().await;
        let entry = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        entry.container.check_start(&req.exec_id)?;
        let pid = if req.exec_id.is_empty() {
            sandbox.agent.start_container(&req.id).await?;
            entry.container.init.pid
        } else {
            let process_json = entry.exec_specs.remove(&req.exec_id).unwrap_or_default();
            let stdio = entry.container.process(&req.exec_id)?.stdio.clone();
            let mut request = agent::ExecProcessRequest::new();
            request.container_id = req.id.clone();
            request.exec_id = req.exec_id.clone();
            let args = exec_args(&process_json);
            request.process_json = process_json;
            request.stdio = Some(requested_streams(&stdio)).into();
            let result = sandbox.agent.exec_process(request).await;
            let (decision, reason) = match &result {
                Ok(_) => (AuditDecision::Allowed, String::new()),
                Err(e) => crate::audit::agent::refusal(e),
            };
            self.state.audit.security(
                &sandbox.id,
                AuditEvent::ExecIntoContainer {
                    container: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    args,
                    terminal: stdio.terminal,
                    decision,
                    reason,
                },
            );
            let pid = result?;
            let io =
                ProcessIo::attach(sandbox.agent.as_ref(), &req.id, &req.exec_id, &stdio).await?;
            entry.io.insert(req.exec_id.clone(), io);
            pid
        };
        entry.container.mark_started(&req.exec_id, pid)?;
        self.state.events.send(if req.exec_id.is_empty() {
            TaskEvent::Start {
                container_id: req.id.clone(),
                pid,
            }
        } else {
            TaskEvent::ExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
            }
        });
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    pub async fn exec(&self, req: &api::ExecProcessRequest) -> Result<(), ServiceError> {
        let mut containers = self.state.containers.lock().await;
        let entry = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        let process_json = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| {
                ServiceError::InvalidArgument(format!("exec {} has no process spec", req.exec_id))
            })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        entry.container.add_exec(&req.exec_id, stdio)?;
        entry.exec_specs.insert(req.exec_id.clone(), process_json);
        self.state.events.send(TaskEvent::ExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(())
    }

    pub async fn kill(&self, req: &api::KillRequest) -> Result<(), ServiceError> {
        {
            let containers = self.state.containers.lock().await;
            let entry = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            entry.container.check_kill(&req.exec_id)?;
        }
        let sandbox = self.sandbox(&req.id).await?;
        sandbox
            .agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(())
    }

    pub async fn wait(&self, req: &api::WaitRequest) -> Result<api::WaitResponse, ServiceError> {
        let mut exit = {
            let containers = self.state.containers.lock().await;
            let entry = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            entry.container.process(&req.exec_id)?.subscribe_exit()
        };
        let exit = match exit.wait_for(Option::is_some).await {
            Ok(exit) => *exit,
            // The record was dropped (deleted) while waiting.
            Err(_) => None,
        };
        let exit = exit.unwrap_or(Exit {
            status: ExitReason::Unknown.exit_status(),
            at: SystemTime::now(),
        });
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    pub async fn state(&self, req: &api::StateRequest) -> Result<api::StateResponse, ServiceError> {
        let containers = self.state.containers.lock().await;
        let entry = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let process = entry.container.process(&req.exec_id)?;
        let status = entry.container.process_status(&req.exec_id)?;
        let exit = process.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: entry.container.bundle.display().to_string(),
            pid: process.pid,
            status: status_of(status).into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    pub async fn pause(&self, id: &str) -> Result<(), ServiceError> {
        let sandbox = self.sandbox(id).await?;
        let mut containers = self.state.containers.lock().await;
        let entry = containers.get_mut(id).ok_or_else(|| not_found(id))?;
        entry.container.check_pause()?;
        sandbox.agent.pause_container(id).await?;
        entry.container.mark_paused()?;
        self.state.events.send(TaskEvent::Paused {
            container_id: id.to_owned(),
        });
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<(), ServiceError> {
        let sandbox = self.sandbox(id).await?;
        let mut containers = self.state.containers.lock().await;
        let entry = containers.get_mut(id).ok_or_else(|| not_found(id))?;
        entry.container.check_resume()?;
        sandbox.agent.resume_container(id).await?;
        entry.container.mark_resumed()?;
        self.state.events.send(TaskEvent::Resumed {
            container_id: id.to_owned(),
        });
        Ok(())
    }

    pub async fn delete(
        &self,
        req: &api::DeleteRequest,
    ) -> Result<api::DeleteResponse, ServiceError> {
        let mut containers = self.state.containers.lock().await;
        let entry = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))?;
        entry.container.check_delete(&req.exec_id)?;
        if !req.exec_id.is_empty() {
            let process = entry.container.remove_exec(&req.exec_id)?;
            entry.io.remove(&req.exec_id);
            let exit = process.exit();
            return Ok(delete_response(process.pid, exit));
        }
        let never_started = entry.container.status() == Status::Created;
        let sandbox = self.state.sandbox.lock().await.clone();
        if let Some(sandbox) = &sandbox {
            // A VM that is gone has taken the container with it.
            if let Err(e) = sandbox.agent.remove_container(&req.id, never_started).await {
                if !sandbox.is_gone() {
                    return Err(e.into());
                }
                tracing::warn!(container = %req.id, "guest gone, nothing to remove: {e}");
            }
            self.unshare(sandbox, &req.id);
        }
        let Some(mut entry) = containers.remove(&req.id) else {
            return Err(not_found(&req.id));
        };
        drop(containers);
        for (_, mut io) in entry.io.drain() {
            io.shutdown();
        }
        let pid = entry.container.init.pid;
        let exit = entry.container.init.exit();
        self.state.events.send(TaskEvent::Delete {
            container_id: req.id.clone(),
            exec_id: String::new(),
            pid,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.at),
        });
        if entry.container.kind == ContainerKind::Sandbox {
            self.stop_sandbox().await;
            // Containers still in the pod went down with its VM.
            self.fail_all(ExitReason::SandboxGone).await;
        }
        Ok(delete_response(pid, exit))
    }

    /// Shuts the pod's VM down and forgets it.
    async fn stop_sandbox(&self) {
        let sandbox = self.state.sandbox.lock().await.take();
        if let Some(sandbox) = sandbox {
            if let Err(e) = sandbox.shut_down().await {
                tracing::warn!(sandbox = %sandbox.id, "{e}");
            }
        }
    }

    pub async fn pids(&self, id: &str) -> Result<api::PidsResponse, ServiceError> {
        let sandbox = self.sandbox(id).await?;
        if !self.state.containers.lock().await.contains_key(id) {
            return Err(not_found(id));
        }
        let processes = sandbox.agent.list_processes(id).await?;
        Ok(api::PidsResponse {
            processes: processes
                .into_iter()
                .map(|p| api::ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub async fn stats(&self, id: &str) -> Result<api::StatsResponse, ServiceError> {
        let sandbox = self.sandbox(id).await?;
        if !self.state.containers.lock().await.contains_key(id) {
            return Err(not_found(id));
        }
        let stats = sandbox.agent.stats_container(id).await?;
        let metrics: Box<dyn MessageDyn> = Box::new(crate::stats::to_cgroup_v2_metrics(&stats));
        let any = containerd_shim::util::convert_to_any(metrics)
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    pub async fn update(&self, req: &api::UpdateTaskRequest) -> Result<(), ServiceError> {
        let sandbox = self.sandbox(&req.id).await?;
        if !self.state.containers.lock().await.contains_key(&req.id) {
            return Err(not_found(&req.id));
        }
        // containerd sends the OCI LinuxResources as JSON in the Any.
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| {
                ServiceError::InvalidArgument(format!("update of {} has no resources", req.id))
            })?;
        sandbox.agent.update_container(&req.id, resources).await?;
        Ok(())
    }

    pub async fn resize_pty(&self, req: &api::ResizePtyRequest) -> Result<(), ServiceError> {
        let sandbox = self.sandbox(&req.id).await?;
        {
            let containers = self.state.containers.lock().await;
            let entry = containers.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            entry.container.process(&req.exec_id)?;
        }
        sandbox
            .agent
            .resize_tty(&req.id, &req.exec_id, req.height, req.width)
            .await?;
        Ok(())
    }

    /// CloseIO: stdin ends with a half-close of its stream, after what the
    /// client wrote reached the agent — the stream's own EOF, in order with
    /// the data. (The agent's CloseStdin RPC would cut its copy short and
    /// lose bytes still in flight; it is for streams never attached.)
    pub async fn close_io(&self, req: &api::CloseIORequest) -> Result<(), ServiceError> {
        if !req.stdin {
            return Ok(());
        }
        let stdin = {
            let mut containers = self.state.containers.lock().await;
            let entry = containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id))?;
            entry.container.process(&req.exec_id)?;
            entry
                .io
                .get_mut(&req.exec_id)
                .and_then(ProcessIo::take_stdin)
        };
        if let Some(stdin) = stdin {
            stdin.close(STDIN_CLOSE_LIMIT).await;
        }
        Ok(())
    }

    pub async fn connect(&self, id: &str) -> api::ConnectResponse {
        let task_pid = self
            .state
            .containers
            .lock()
            .await
            .get(id)
            .map(|e| e.container.init.pid)
            .unwrap_or(0);
        api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }
    }

    /// containerd's Shutdown: ignored while containers remain, as runc's
    /// shim does; otherwise the VM is stopped and the shim exits.
    pub async fn shutdown(&self) {
        if self.prepare_exit().await {
            self.state.exit.signal();
        }
    }

    /// Shutdown up to the exit itself: whether the shim is to exit (no
    /// container left). Records still held for want of a config go to the
    /// file of the config containerd's environment names (or the default).
    async fn prepare_exit(&self) -> bool {
        if !self.state.containers.lock().await.is_empty() {
            return false;
        }
        self.stop_sandbox().await;
        if !self.state.audit.is_configured() {
            let section = match self.state.launcher.load_config(None) {
                Ok(config) => config.audit,
                Err(e) => {
                    tracing::warn!("runtime config for the audit trail: {e}");
                    AuditSection::default()
                }
            };
            self.state.audit.configure(&section);
        }
        true
    }

    /// Follows the agent's events and the VM's life until either ends.
    async fn watch_sandbox(
        self,
        sandbox: Arc<PodSandbox>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<agent::Event>,
    ) {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle_agent_event(event).await,
                    None => break,
                },
                exit = sandbox.vm_exit() => {
                    tracing::warn!(sandbox = %sandbox.id, "VM gone: {exit}");
                    if self.is_current(&sandbox).await {
                        self.audit_vm_death(&sandbox, &exit.to_string());
                    }
                    sandbox.mark_gone();
                    self.fail_all(ExitReason::SandboxGone).await;
                    return;
                }
            }
        }
        if !self.is_current(&sandbox).await {
            // Deleted: the stream ended because we shut the agent down.
            return;
        }
        sandbox.mark_gone();
        self.state.audit.security(
            &sandbox.id,
            AuditEvent::AgentLost {
                reason: "the agent connection ended while the pod was running".into(),
            },
        );
        let reason = match tokio::time::timeout(VM_EXIT_GRACE, sandbox.vm_exit()).await {
            Ok(exit) => {
                self.audit_vm_death(&sandbox, &exit.to_string());
                ExitReason::SandboxGone
            }
            Err(_) => ExitReason::Unknown,
        };
        tracing::warn!(sandbox = %sandbox.id, "agent connection ended; processes exit with {}", reason.exit_status());
        self.fail_all(reason).await;
    }

    /// The VM exited under a running pod: a crash record, and a
    /// guest-panic record when its console shows one.
    fn audit_vm_death(&self, sandbox: &PodSandbox, exit: &str) {
        self.state.audit.security(
            &sandbox.id,
            AuditEvent::VmExited {
                exit: exit.to_owned(),
            },
        );
        self.state
            .audit
            .guest_panic_in(&sandbox.id, &sandbox.dir.vm_paths().console_log());
    }

    async fn is_current(&self, sandbox: &Arc<PodSandbox>) -> bool {
        self.state
            .sandbox
            .lock()
            .await
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, sandbox))
    }

    async fn handle_agent_event(&self, event: agent::Event) {
        if event.has_oom() {
            self.state.events.send(TaskEvent::Oom {
                container_id: event.oom().container_id.clone(),
            });
            return;
        }
        if event.has_exited() {
            let exited = event.exited();
            let exit = Exit {
                status: ExitReason::Reported(exited.exit_status).exit_status(),
                at: time_from_ns(exited.exited_at_ns),
            };
            self.record_exit(&exited.container_id, &exited.exec_id, exit)
                .await;
        }
    }

    /// Drains the process's output, then records the exit and publishes
    /// TaskExit.
    async fn record_exit(&self, container_id: &str, exec_id: &str, exit: Exit) {
        let io = {
            let mut containers = self.state.containers.lock().await;
            let Some(entry) = containers.get_mut(container_id) else {
                tracing::warn!(container_id, exec_id, "exit of an unknown process");
                return;
            };
            entry.io.remove(exec_id)
        };
        if let Some(mut io) = io {
            io.wait_output(OUTPUT_DRAIN_LIMIT).await;
            io.shutdown();
        }
        let mut containers = self.state.containers.lock().await;
        let Some(entry) = containers.get_mut(container_id) else {
            return;
        };
        let pid = match entry.container.process(exec_id) {
            Ok(process) => process.pid,
            Err(e) => {
                tracing::warn!("{e}");
                return;
            }
        };
        if let Ok(true) = entry.container.record_exit(exec_id, exit) {
            self.state.events.send(TaskEvent::Exit {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
                exit_status: exit.status,
                exited_at: exit.at,
            });
        }
    }

    /// Every live process of the pod exits with `reason`.
    async fn fail_all(&self, reason: ExitReason) {
        let live: Vec<(String, String)> = {
            let containers = self.state.containers.lock().await;
            let mut live = Vec::new();
            for (id, entry) in containers.iter() {
                for exec_id in entry.container.live_process_ids() {
                    live.push((id.clone(), exec_id));
                }
            }
            live
        };
        let exit = Exit {
            status: reason.exit_status(),
            at: SystemTime::now(),
        };
        for (container_id, exec_id) in live {
            self.record_exit(&container_id, &exec_id, exit).await;
        }
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> api::DeleteResponse {
    api::DeleteResponse {
        pid,
        exit_status: exit.map(|e| e.status).unwrap_or(0),
        exited_at: Some(timestamp(
            exit.map(|e| e.at).unwrap_or_else(SystemTime::now),
        ))
        .into(),
        ..Default::default()
    }
}

type TtrpcResult<T> = ttrpc::Result<T>;
type Ctx = containerd_shim_protos::ttrpc::r#async::TtrpcContext;

/// The ttrpc metadata key containerd puts its namespace in
/// (containerd's `namespaces.TTRPCHeader`).
const NAMESPACE_METADATA: &str = "containerd-namespace-ttrpc";

/// What the audit record of one task API call says about the request.
struct TaskCall<'a> {
    operation: &'static str,
    container: &'a str,
    exec_id: &'a str,
    details: serde_json::Value,
}

impl<'a> TaskCall<'a> {
    fn new(operation: &'static str, container: &'a str, exec_id: &'a str) -> Self {
        Self {
            operation,
            container,
            exec_id,
            details: serde_json::Value::Null,
        }
    }

    fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// `b`'s fields added to `a` (both objects), or whichever is not null.
fn merge_details(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    match (a, b) {
        (serde_json::Value::Object(mut a), serde_json::Value::Object(b)) => {
            a.extend(b);
            serde_json::Value::Object(a)
        }
        (serde_json::Value::Null, b) => b,
        (a, _) => a,
    }
}

/// The `args` of an OCI process spec (JSON), empty if it has none.
fn exec_args(process_json: &[u8]) -> Vec<String> {
    serde_json::from_slice::<serde_json::Value>(process_json)
        .ok()
        .and_then(|process| {
            process.get("args").and_then(|a| a.as_array()).map(|args| {
                args.iter()
                    .map(|a| a.as_str().unwrap_or_default().to_owned())
                    .collect()
            })
        })
        .unwrap_or_default()
}

impl TaskService {
    /// Every task API call ends here: one audit record with its outcome
    /// (`answer_details` adds what the answer says, e.g. a pid), then the
    /// ttrpc answer.
    fn audited<T>(
        &self,
        ctx: &Ctx,
        call: TaskCall<'_>,
        result: Result<T, ServiceError>,
        answer_details: impl FnOnce(&T) -> serde_json::Value,
    ) -> TtrpcResult<T> {
        let namespace = ctx
            .metadata
            .get(NAMESPACE_METADATA)
            .and_then(|values| values.first())
            .map(String::as_str);
        let subject = Subject {
            pod: self.pod_id(),
            container: call.container.to_owned(),
            exec_id: call.exec_id.to_owned(),
        };
        let (outcome, details) = match &result {
            Ok(answer) => (Ok(()), merge_details(call.details, answer_details(answer))),
            Err(e) => (
                Err((AuditDecision::of_code(e.code()), e.to_string())),
                call.details,
            ),
        };
        self.state
            .audit
            .task(namespace, subject, call.operation, outcome, details);
        result.map_err(|e| {
            tracing::info!(method = call.operation, "{e}");
            e.to_ttrpc()
        })
    }
}

fn no_details<T>(_: &T) -> serde_json::Value {
    serde_json::Value::Null
}

#[async_trait::async_trait]
impl containerd_shim_protos::shim_async::Task for TaskService {
    async fn state(&self, ctx: &Ctx, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let call = TaskCall::new("State", &req.id, &req.exec_id);
        let result = TaskService::state(self, &req).await;
        self.audited(ctx, call, result, |r| {
            let status = r.status.enum_value().map(|s| format!("{s:?}"));
            serde_json::json!({ "status": status.unwrap_or_default() })
        })
    }

    async fn create(
        &self,
        ctx: &Ctx,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let call = TaskCall::new("Create", &req.id, "").details(serde_json::json!({
            "bundle": req.bundle,
            "terminal": req.terminal,
        }));
        let result = TaskService::create(self, &req).await;
        self.audited(ctx, call, result, |r| serde_json::json!({ "pid": r.pid }))
    }

    async fn start(&self, ctx: &Ctx, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let call = TaskCall::new("Start", &req.id, &req.exec_id);
        let result = TaskService::start(self, &req).await;
        self.audited(ctx, call, result, |r| serde_json::json!({ "pid": r.pid }))
    }

    async fn delete(&self, ctx: &Ctx, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let call = TaskCall::new("Delete", &req.id, &req.exec_id);
        let result = TaskService::delete(self, &req).await;
        self.audited(
            ctx,
            call,
            result,
            |r| serde_json::json!({ "pid": r.pid, "exit_status": r.exit_status }),
        )
    }

    async fn pids(&self, ctx: &Ctx, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let call = TaskCall::new("Pids", &req.id, "");
        let result = TaskService::pids(self, &req.id).await;
        self.audited(
            ctx,
            call,
            result,
            |r| serde_json::json!({ "processes": r.processes.len() }),
        )
    }

    async fn pause(&self, ctx: &Ctx, req: api::PauseRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("Pause", &req.id, "");
        let result = TaskService::pause(self, &req.id)
            .await
            .map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn resume(&self, ctx: &Ctx, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("Resume", &req.id, "");
        let result = TaskService::resume(self, &req.id)
            .await
            .map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn checkpoint(&self, ctx: &Ctx, req: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("Checkpoint", &req.id, "");
        let result = Err(ServiceError::Unsupported(
            "checkpoint (the container's state lives in the pod's microVM)",
        ));
        self.audited(ctx, call, result, no_details)
    }

    async fn kill(&self, ctx: &Ctx, req: api::KillRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("Kill", &req.id, &req.exec_id)
            .details(serde_json::json!({ "signal": req.signal, "all": req.all }));
        let result = TaskService::kill(self, &req).await.map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn exec(&self, ctx: &Ctx, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let args = req
            .spec
            .as_ref()
            .map(|any| exec_args(&any.value))
            .unwrap_or_default();
        let call = TaskCall::new("Exec", &req.id, &req.exec_id)
            .details(serde_json::json!({ "args": args, "terminal": req.terminal }));
        let result = TaskService::exec(self, &req).await.map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn resize_pty(&self, ctx: &Ctx, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("ResizePty", &req.id, &req.exec_id)
            .details(serde_json::json!({ "width": req.width, "height": req.height }));
        let result = TaskService::resize_pty(self, &req)
            .await
            .map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn close_io(&self, ctx: &Ctx, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("CloseIO", &req.id, &req.exec_id)
            .details(serde_json::json!({ "stdin": req.stdin }));
        let result = TaskService::close_io(self, &req)
            .await
            .map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn update(&self, ctx: &Ctx, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("Update", &req.id, "");
        let result = TaskService::update(self, &req).await.map(|_| Empty::new());
        self.audited(ctx, call, result, no_details)
    }

    async fn wait(&self, ctx: &Ctx, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let call = TaskCall::new("Wait", &req.id, &req.exec_id);
        let result = TaskService::wait(self, &req).await;
        self.audited(
            ctx,
            call,
            result,
            |r| serde_json::json!({ "exit_status": r.exit_status }),
        )
    }

    async fn stats(&self, ctx: &Ctx, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let call = TaskCall::new("Stats", &req.id, "");
        let result = TaskService::stats(self, &req.id).await;
        self.audited(ctx, call, result, no_details)
    }

    async fn connect(
        &self,
        ctx: &Ctx,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let call = TaskCall::new("Connect", &req.id, "");
        let result = Ok(TaskService::connect(self, &req.id).await);
        self.audited(
            ctx,
            call,
            result,
            |r| serde_json::json!({ "task_pid": r.task_pid }),
        )
    }

    async fn shutdown(&self, ctx: &Ctx, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        let call = TaskCall::new("Shutdown", &req.id, "");
        let exiting = self.prepare_exit().await;
        let answer = self.audited(
            ctx,
            call,
            Ok(Empty::new()),
            |_| serde_json::json!({ "exiting": exiting }),
        );
        // After the record: the process may end as soon as exit is signalled.
        if exiting {
            self.state.exit.signal();
        }
        answer
    }
}

impl TaskService {
    /// The pod's `[inspection]` applied to a container's spec: each finding
    /// becomes a security audit record and a log line; the create fails
    /// listing the findings the config refuses.
    fn check_least_privilege(
        &self,
        inspection: &InspectionSection,
        pod: &str,
        container_id: &str,
        spec: &serde_json::Value,
    ) -> Result<(), ServiceError> {
        use crate::inspect::{decide, inspect_spec, spec_annotations, Decision};
        let report = inspect_spec(spec, &spec_annotations(spec));
        let list = |findings: &[crate::inspect::Finding]| {
            findings
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let (findings, refused) = match decide(&report, inspection) {
            Decision::Allow => return Ok(()),
            Decision::Warn(findings) => (findings, Vec::new()),
            Decision::Refuse(refused) => (report.findings.clone(), refused),
        };
        for finding in &findings {
            let is_refused = refused.contains(finding);
            tracing::warn!(
                container = container_id,
                "spec exceeds least privilege{}: {finding}",
                if is_refused { " (refused)" } else { "" }
            );
            self.state.audit.security(
                pod,
                AuditEvent::InspectionFinding {
                    container: container_id.to_owned(),
                    finding: finding.clone(),
                    refused: is_refused,
                },
            );
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(ServiceError::PermissionDenied(format!(
            "container {container_id} refused by [inspection] (mode = \"refuse\"): {}",
            list(&refused)
        )))
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
