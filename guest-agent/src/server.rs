//! The `AgentService` ttrpc server: puts each request to the agent policy
//! (PERMISSION_DENIED naming the rule when it says no), validates it, calls
//! the container manager, and maps errors to ttrpc status codes whose
//! message names the bad field or value.

use std::sync::Arc;

use async_trait::async_trait;
use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentService;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error as TtrpcError};

use crate::container::manager::{ContainerError, ContainerManager};
use crate::policy::{AgentPolicy, PolicyDenial, PolicyRequest, SetPolicyError};

/// What the server needs besides the containers.
pub struct AgentServer {
    pub manager: Arc<ContainerManager>,
    /// PID 1 of a guest (false in host test mode).
    pub is_guest_init: bool,
    /// Notified by Shutdown.
    pub shutdown: Arc<tokio::sync::Notify>,
    /// Decides every request before it runs (shared with the stdio
    /// listener; the attestation flow installs init-data's policy here).
    pub policy: Arc<AgentPolicy>,
    /// Set in a confidential guest (`cloister.tee=` on the kernel command
    /// line): containers wait for attestation and get its secrets.
    pub confidential: Option<Arc<crate::attest::ConfidentialGuest>>,
}

fn status(code: Code, message: impl ToString) -> TtrpcError {
    TtrpcError::RpcStatus(ttrpc::get_status(code, message.to_string()))
}

fn policy_status(denial: PolicyDenial) -> TtrpcError {
    tracing::warn!(%denial, "policy denied a request");
    status(Code::PERMISSION_DENIED, denial)
}

fn to_status(err: ContainerError) -> TtrpcError {
    use ContainerError::*;
    let code = match &err {
        InvalidId { .. } | Spec(_) | InvalidSignal(_) | Missing(_) | TtySize { .. } => {
            Code::INVALID_ARGUMENT
        }
        AlreadyExists(_) | ExecExists { .. } => Code::ALREADY_EXISTS,
        NotFound(_) | ExecNotFound { .. } => Code::NOT_FOUND,
        State { .. } | AlreadyExited(_) | NoCgroup { .. } => Code::FAILED_PRECONDITION,
        Cgroup(crate::cgroups::CgroupError::ControllerMissing { .. }) => Code::FAILED_PRECONDITION,
        Stdio(crate::io::StdioError::NoTerminal) => Code::FAILED_PRECONDITION,
        Helper { .. } | Hook(_) => Code::FAILED_PRECONDITION,
        Cgroup(_) | Stdio(_) | Kill { .. } | Io { .. } => Code::INTERNAL,
    };
    tracing::debug!(%err, "request failed");
    status(code, error_chain(&err))
}

/// The error and its sources, "a: b: c".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn network_status(err: crate::network::NetworkError) -> TtrpcError {
    use crate::network::NetworkError::*;
    let code = match &err {
        Invalid { .. } | NoSuchInterface { .. } => Code::INVALID_ARGUMENT,
        Netlink { .. } | Malformed { .. } => Code::INTERNAL,
    };
    status(code, error_chain(&err))
}

impl AgentServer {
    /// The policy's decision on one request.
    fn allow<R: PolicyRequest>(&self, request: &R) -> ttrpc::Result<()> {
        self.policy.check(request).map_err(policy_status)
    }

    /// Sandbox-wide changes (hostname, mounts, network) are only made by
    /// the guest's PID 1, never by a host test agent.
    fn require_guest(&self, rpc: &str) -> ttrpc::Result<()> {
        if self.is_guest_init {
            return Ok(());
        }
        Err(status(
            Code::FAILED_PRECONDITION,
            format!(
                "{rpc} changes the whole machine; refused when the agent is not PID 1 of a guest"
            ),
        ))
    }

    /// In a confidential guest, the outcome of attestation (waited for):
    /// FAILED_PRECONDITION naming the reason when it failed. `None` in an
    /// ordinary guest.
    async fn attested(&self) -> ttrpc::Result<Option<Arc<crate::attest::Attested>>> {
        let Some(guest) = &self.confidential else {
            return Ok(None);
        };
        guest.attested().await.map(Some).map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("attestation failed: {}", error_chain(e.as_ref())),
            )
        })
    }
}

#[async_trait]
impl AgentService for AgentServer {
    async fn setup_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: agent::SetupSandboxRequest,
    ) -> ttrpc::Result<agent::SetupSandboxResponse> {
        self.allow(&request)?;
        self.require_guest("SetupSandbox")?;
        if self.confidential.as_ref().is_some_and(|g| g.has_begun()) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                error_chain(&crate::attest::AttestError::AlreadyBegun),
            ));
        }
        crate::init::setup_sandbox(&request, &self.manager)
            .map_err(|e| status(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        match &self.confidential {
            Some(guest) => guest
                .begin(request.init_data.clone())
                .await
                .map_err(|e| status(Code::FAILED_PRECONDITION, error_chain(&e)))?,
            None if !request.init_data.is_empty() => {
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    "init_data given, but this guest is not confidential (no cloister.tee= on its kernel command line)",
                ))
            }
            None => {}
        }
        Ok(agent::SetupSandboxResponse::new())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        mut request: agent::CreateContainerRequest,
    ) -> ttrpc::Result<agent::CreateContainerResponse> {
        // A container whose init is gone no longer owns its pid, so a
        // namespace path cannot name a process that reused it.
        self.policy.retire_exited_inits(|id| {
            self.manager
                .get(id)
                .map_or(true, |c| c.init.exit().is_some())
        });
        let decided = self.policy.check_create(&request).map_err(policy_status)?;
        let id = request.container_id.clone();
        if let Some(attested) = self.attested().await? {
            request.oci_spec_json = attested
                .resolve_spec(&request.container_id, &request.oci_spec_json)
                .await
                .map_err(|e| {
                    let code = match e {
                        crate::attest::AttestError::Resource { .. }
                        | crate::attest::AttestError::Timeout { .. }
                        | crate::attest::AttestError::Io { .. } => Code::FAILED_PRECONDITION,
                        _ => Code::INVALID_ARGUMENT,
                    };
                    status(code, error_chain(&e))
                })?;
        }
        let pid = self.manager.create(request).await.map_err(to_status)?;
        // What the policy allowed it as: exec and update rules read it;
        // its init pid: later containers' namespace paths resolve to it.
        self.policy.remember_created(&id, decided, pid.as_raw());
        let mut response = agent::CreateContainerResponse::new();
        response.pid = u32::try_from(pid.as_raw()).unwrap_or(0);
        Ok(response)
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::StartContainerRequest,
    ) -> ttrpc::Result<agent::StartContainerResponse> {
        self.allow(&request)?;
        self.manager
            .start(&request.container_id)
            .await
            .map_err(to_status)?;
        Ok(agent::StartContainerResponse::new())
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<agent::RemoveContainerResponse> {
        self.allow(&request)?;
        self.manager
            .remove(&request.container_id, request.force)
            .await
            .map_err(to_status)?;
        self.policy.forget_created(&request.container_id);
        Ok(agent::RemoveContainerResponse::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        mut request: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::ExecProcessResponse> {
        self.allow(&request)?;
        if let Some(attested) = self.attested().await? {
            request.process_json = attested
                .resolve_process(&request.process_json)
                .await
                .map_err(|e| status(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        }
        let pid = self.manager.exec(request).await.map_err(to_status)?;
        let mut response = agent::ExecProcessResponse::new();
        response.pid = u32::try_from(pid.as_raw()).unwrap_or(0);
        Ok(response)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::SignalProcessRequest,
    ) -> ttrpc::Result<agent::SignalProcessResponse> {
        self.allow(&request)?;
        self.manager.signal(&request).map_err(to_status)?;
        Ok(agent::SignalProcessResponse::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        request: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        self.allow(&request)?;
        let info = self
            .manager
            .wait(&request.container_id, &request.exec_id)
            .await
            .map_err(to_status)?;
        let mut response = agent::WaitProcessResponse::new();
        response.exit_status = info.status;
        response.exited_at_ns = info.at_ns;
        Ok(response)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::PauseContainerRequest,
    ) -> ttrpc::Result<agent::PauseResumeResponse> {
        self.allow(&request)?;
        self.manager
            .set_paused(&request.container_id, true)
            .await
            .map_err(to_status)?;
        Ok(agent::PauseResumeResponse::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ResumeContainerRequest,
    ) -> ttrpc::Result<agent::PauseResumeResponse> {
        self.allow(&request)?;
        self.manager
            .set_paused(&request.container_id, false)
            .await
            .map_err(to_status)?;
        Ok(agent::PauseResumeResponse::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<agent::UpdateContainerResponse> {
        self.allow(&request)?;
        self.manager.update(&request).map_err(to_status)?;
        Ok(agent::UpdateContainerResponse::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ListProcessesRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        self.allow(&request)?;
        let mut response = agent::ListProcessesResponse::new();
        response.processes = self
            .manager
            .list_processes(&request.container_id)
            .map_err(to_status)?;
        Ok(response)
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        request: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        self.allow(&request)?;
        self.manager.stats(&request.container_id).map_err(to_status)
    }

    async fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ResizeTtyRequest,
    ) -> ttrpc::Result<agent::ResizeTtyResponse> {
        self.allow(&request)?;
        self.manager.resize(&request).map_err(to_status)?;
        Ok(agent::ResizeTtyResponse::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        request: agent::CloseStdinRequest,
    ) -> ttrpc::Result<agent::CloseStdinResponse> {
        self.allow(&request)?;
        self.manager
            .close_stdin(&request.container_id, &request.exec_id)
            .map_err(to_status)?;
        Ok(agent::CloseStdinResponse::new())
    }

    async fn events(
        &self,
        _ctx: &TtrpcContext,
        request: agent::EventsRequest,
        sender: ttrpc::r#async::ServerStreamSender<agent::Event>,
    ) -> ttrpc::Result<()> {
        self.allow(&request)?;
        let mut events = self.manager.subscribe();
        loop {
            match events.recv().await {
                Ok(event) => sender.send(&event).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Exits stay available through WaitProcess.
                    tracing::warn!(missed = n, "event subscriber lagged");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }

    async fn update_interfaces(
        &self,
        _ctx: &TtrpcContext,
        request: agent::UpdateInterfacesRequest,
    ) -> ttrpc::Result<agent::UpdateInterfacesResponse> {
        self.allow(&request)?;
        self.require_guest("UpdateInterfaces")?;
        crate::network::update_interfaces(&request.interfaces).map_err(network_status)?;
        Ok(agent::UpdateInterfacesResponse::new())
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        request: agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::UpdateRoutesResponse> {
        self.allow(&request)?;
        self.require_guest("UpdateRoutes")?;
        crate::network::update_routes(&request.routes).map_err(network_status)?;
        Ok(agent::UpdateRoutesResponse::new())
    }

    async fn guest_details(
        &self,
        _ctx: &TtrpcContext,
        request: agent::GuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        self.allow(&request)?;
        let mut response = agent::GuestDetailsResponse::new();
        response.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        response.kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        response.online_cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        response.memory_total_bytes = crate::cgroups::flat_keyed(
            &std::fs::read_to_string("/proc/meminfo")
                .unwrap_or_default()
                .replace(':', ""),
            "MemTotal",
        ) * 1024;
        response.is_guest_init = self.is_guest_init;
        Ok(response)
    }

    async fn health_check(
        &self,
        _ctx: &TtrpcContext,
        request: agent::HealthCheckRequest,
    ) -> ttrpc::Result<agent::HealthCheckResponse> {
        self.allow(&request)?;
        let mut response = agent::HealthCheckResponse::new();
        response.serving = true;
        Ok(response)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        request: agent::ShutdownRequest,
    ) -> ttrpc::Result<agent::ShutdownResponse> {
        self.allow(&request)?;
        for id in self.manager.ids() {
            if let Err(e) = self.manager.remove(&id, true).await {
                tracing::warn!(container = %id, error = %e, "remove during shutdown failed");
            }
        }
        self.shutdown.notify_one();
        Ok(agent::ShutdownResponse::new())
    }

    async fn set_policy(
        &self,
        _ctx: &TtrpcContext,
        request: agent::SetPolicyRequest,
    ) -> ttrpc::Result<agent::SetPolicyResponse> {
        match self.policy.set_from_host(&request) {
            Ok(()) => {
                tracing::info!(bytes = request.policy.len(), "policy replaced by the host");
                Ok(agent::SetPolicyResponse::new())
            }
            Err(SetPolicyError::Denied(denial)) => Err(policy_status(denial)),
            Err(e @ SetPolicyError::Compile(_)) => Err(status(Code::INVALID_ARGUMENT, e)),
        }
    }
}
