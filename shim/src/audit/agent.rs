//! Every request the shim makes to a pod's agent, recorded: a wrapper
//! around any [`AgentClient`] that writes one `agent` record per request
//! with its outcome, and a `policy-denied` security record when the agent
//! answered PERMISSION_DENIED (its message, naming the rule, verbatim).

use std::sync::Arc;

use async_trait::async_trait;
use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::{AuditEvent, AuditLog, Decision, Subject};
use crate::agent_client::{AgentClient, AgentError};

/// An agent client whose requests are audited.
pub struct AuditedAgent {
    inner: Arc<dyn AgentClient>,
    log: AuditLog,
    pod: String,
}

/// Wraps `inner` so each request of pod `pod` is recorded in `log`.
pub fn audited_agent(
    inner: Arc<dyn AgentClient>,
    log: &AuditLog,
    pod: &str,
) -> Arc<dyn AgentClient> {
    Arc::new(AuditedAgent {
        inner,
        log: log.clone(),
        pod: pod.to_owned(),
    })
}

/// The reason of a failed request: a denial's message exactly as the agent
/// sent it, anything else as the error reads.
pub fn refusal(error: &AgentError) -> (Decision, String) {
    match error {
        AgentError::Rpc {
            code: Some(code),
            message,
            ..
        } if *code == ttrpc::Code::PERMISSION_DENIED => (Decision::Denied, message.clone()),
        other => (Decision::Failed, other.to_string()),
    }
}

impl AuditedAgent {
    fn note<T>(
        &self,
        operation: &str,
        container: &str,
        exec_id: &str,
        result: &Result<T, AgentError>,
        details: serde_json::Value,
    ) {
        let subject = Subject {
            pod: self.pod.clone(),
            container: container.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(e) => Err(refusal(e)),
        };
        let denial = match &outcome {
            Err((Decision::Denied, reason)) => Some(reason.clone()),
            _ => None,
        };
        self.log.agent_request(subject, operation, outcome, details);
        if let Some(reason) = denial {
            self.log.security(
                &self.pod,
                AuditEvent::PolicyDenied {
                    container: container.to_owned(),
                    exec_id: exec_id.to_owned(),
                    request: operation.to_owned(),
                    reason,
                },
            );
        }
    }
}

fn none() -> serde_json::Value {
    serde_json::Value::Null
}

#[async_trait]
impl AgentClient for AuditedAgent {
    async fn setup_sandbox(&self, req: agent::SetupSandboxRequest) -> Result<(), AgentError> {
        let details = serde_json::json!({ "hostname": req.hostname, "mounts": req.mounts.len() });
        let result = self.inner.setup_sandbox(req).await;
        self.note("SetupSandbox", "", "", &result, details);
        result
    }

    async fn update_network(
        &self,
        interfaces: agent::UpdateInterfacesRequest,
        routes: agent::UpdateRoutesRequest,
    ) -> Result<(), AgentError> {
        let details = serde_json::json!({
            "interfaces": interfaces.interfaces.len(),
            "routes": routes.routes.len(),
        });
        let result = self.inner.update_network(interfaces, routes).await;
        self.note("UpdateNetwork", "", "", &result, details);
        result
    }

    async fn create_container(
        &self,
        req: agent::CreateContainerRequest,
    ) -> Result<u32, AgentError> {
        let container = req.container_id.clone();
        let result = self.inner.create_container(req).await;
        let details = match &result {
            Ok(pid) => serde_json::json!({ "pid": pid }),
            Err(_) => none(),
        };
        self.note("CreateContainer", &container, "", &result, details);
        result
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let result = self.inner.start_container(container_id).await;
        self.note("StartContainer", container_id, "", &result, none());
        result
    }

    async fn remove_container(&self, container_id: &str, force: bool) -> Result<(), AgentError> {
        let result = self.inner.remove_container(container_id, force).await;
        let details = serde_json::json!({ "force": force });
        self.note("RemoveContainer", container_id, "", &result, details);
        result
    }

    async fn exec_process(&self, req: agent::ExecProcessRequest) -> Result<u32, AgentError> {
        let (container, exec_id) = (req.container_id.clone(), req.exec_id.clone());
        let result = self.inner.exec_process(req).await;
        let details = match &result {
            Ok(pid) => serde_json::json!({ "pid": pid }),
            Err(_) => none(),
        };
        self.note("ExecProcess", &container, &exec_id, &result, details);
        result
    }

    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let result = self
            .inner
            .signal_process(container_id, exec_id, signal, all)
            .await;
        let details = serde_json::json!({ "signal": signal, "all": all });
        self.note("SignalProcess", container_id, exec_id, &result, details);
        result
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let result = self.inner.pause_container(container_id).await;
        self.note("PauseContainer", container_id, "", &result, none());
        result
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let result = self.inner.resume_container(container_id).await;
        self.note("ResumeContainer", container_id, "", &result, none());
        result
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let details = serde_json::from_slice::<serde_json::Value>(&resources_json)
            .map(|resources| serde_json::json!({ "resources": resources }))
            .unwrap_or_default();
        let result = self
            .inner
            .update_container(container_id, resources_json)
            .await;
        self.note("UpdateContainer", container_id, "", &result, details);
        result
    }

    async fn list_processes(
        &self,
        container_id: &str,
    ) -> Result<Vec<agent::ProcessInfo>, AgentError> {
        let result = self.inner.list_processes(container_id).await;
        self.note("ListProcesses", container_id, "", &result, none());
        result
    }

    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsContainerResponse, AgentError> {
        let result = self.inner.stats_container(container_id).await;
        self.note("StatsContainer", container_id, "", &result, none());
        result
    }

    async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let result = self
            .inner
            .resize_tty(container_id, exec_id, rows, columns)
            .await;
        let details = serde_json::json!({ "rows": rows, "columns": columns });
        self.note("ResizeTty", container_id, exec_id, &result, details);
        result
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let result = self.inner.close_stdin(container_id, exec_id).await;
        self.note("CloseStdin", container_id, exec_id, &result, none());
        result
    }

    async fn events(&self) -> Result<mpsc::UnboundedReceiver<agent::Event>, AgentError> {
        let result = self.inner.events().await;
        self.note("Events", "", "", &result, none());
        result
    }

    async fn shutdown(&self) -> Result<(), AgentError> {
        let result = self.inner.shutdown().await;
        self.note("Shutdown", "", "", &result, none());
        result
    }

    async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, AgentError> {
        let result = self.inner.open_stdio(container_id, exec_id, kind).await;
        let details = serde_json::json!({ "stream": kind.to_string() });
        self.note("OpenStdio", container_id, exec_id, &result, details);
        result
    }
}
