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
///
/// A stdio stream has no status code: the agent refuses it with a message
/// (`AttachReply::Refused`). Its policy's refusals read
/// `<Request> denied …` (`ReadStreamRequest denied by policy rule …`), and
/// those count as denials.
pub fn refusal(error: &AgentError) -> (Decision, String) {
    match error {
        AgentError::Rpc {
            code: Some(code),
            message,
            ..
        } if *code == ttrpc::Code::PERMISSION_DENIED => (Decision::Denied, message.clone()),
        AgentError::Stdio { reason, .. } => match reason.strip_prefix(STDIO_REFUSED) {
            Some(message) if is_policy_denial(message) => (Decision::Denied, message.to_owned()),
            _ => (Decision::Failed, error.to_string()),
        },
        other => (Decision::Failed, other.to_string()),
    }
}

/// How [`crate::agent_client::attach_stdio`] words a refused stream.
const STDIO_REFUSED: &str = "refused: ";

/// `<Something>Request denied…`: the agent policy's wording of a denial.
fn is_policy_denial(message: &str) -> bool {
    message
        .split_once(' ')
        .is_some_and(|(request, rest)| request.ends_with("Request") && rest.starts_with("denied"))
}

/// Records one agent request made without the wrapper (the launcher's
/// requests on the concrete client before it is wrapped, e.g. SetPolicy):
/// the same `agent` record, and `policy-denied` on a denial.
pub fn record_agent_request<T>(
    log: &AuditLog,
    pod: &str,
    operation: &str,
    result: &Result<T, AgentError>,
) {
    let subject = Subject {
        pod: pod.to_owned(),
        ..Subject::default()
    };
    record(log, subject, operation, result, serde_json::Value::Null);
}

/// The `agent` record of one request, and `policy-denied` on a denial.
fn record<T>(
    log: &AuditLog,
    subject: Subject,
    operation: &str,
    result: &Result<T, AgentError>,
    details: serde_json::Value,
) {
    let outcome = match result {
        Ok(_) => Ok(()),
        Err(e) => Err(refusal(e)),
    };
    let denial = match &outcome {
        Err((Decision::Denied, reason)) => Some(reason.clone()),
        _ => None,
    };
    let (pod, container, exec_id) = (
        subject.pod.clone(),
        subject.container.clone(),
        subject.exec_id.clone(),
    );
    log.agent_request(subject, operation, outcome, details);
    if let Some(reason) = denial {
        log.security(
            &pod,
            AuditEvent::PolicyDenied {
                container,
                exec_id,
                request: operation.to_owned(),
                reason,
            },
        );
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
        record(&self.log, subject, operation, result, details);
    }
}

/// How the agent words a refusal because attestation failed.
const ATTESTATION_FAILED: &str = "attestation failed: ";

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
        // A confidential guest refuses every container while its
        // attestation failed, with the reason after this marker.
        if let Err(e) = &result {
            let text = e.to_string();
            if let Some((_, reason)) = text.split_once(ATTESTATION_FAILED) {
                self.log.attestation_failed(
                    &self.pod,
                    reason,
                    serde_json::json!({ "container": container }),
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_denials_keep_the_agents_message_and_other_errors_fail() {
        let denied = AgentError::Rpc {
            method: "ExecProcess",
            code: Some(ttrpc::Code::PERMISSION_DENIED),
            message:
                "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest"
                    .into(),
        };
        assert_eq!(
            refusal(&denied),
            (
                Decision::Denied,
                "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest"
                    .into()
            )
        );
        let stream = |reason: &str| AgentError::Stdio {
            container_id: "c".into(),
            exec_id: String::new(),
            kind: StreamKind::Stdout,
            reason: reason.into(),
        };
        let (decision, reason) = refusal(&stream(
            "refused: ReadStreamRequest denied by policy rule data.agent_policy.ReadStreamRequest",
        ));
        assert_eq!(decision, Decision::Denied);
        assert!(reason.starts_with("ReadStreamRequest denied"), "{reason}");
        let (decision, reason) = refusal(&stream("refused: no such process"));
        assert_eq!(decision, Decision::Failed);
        assert!(reason.contains("no such process"), "{reason}");
        let lost = AgentError::Rpc {
            method: "StartContainer",
            code: None,
            message: "channel closed".into(),
        };
        assert_eq!(refusal(&lost).0, Decision::Failed);
        let not_found = AgentError::Rpc {
            method: "StartContainer",
            code: Some(ttrpc::Code::NOT_FOUND),
            message: "container c not found".into(),
        };
        assert_eq!(refusal(&not_found).0, Decision::Failed);
    }

    #[test]
    fn a_request_outside_the_wrapper_is_recorded_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::new("default");
        log.configure(&crate::audit::AuditSection {
            enabled: true,
            path: path.clone(),
        });
        let denied: Result<(), AgentError> = Err(AgentError::Rpc {
            method: "SetPolicy",
            code: Some(ttrpc::Code::PERMISSION_DENIED),
            message:
                "SetPolicyRequest denied: the policy was installed from init-data and is locked"
                    .into(),
        });
        record_agent_request(&log, "pod", "SetPolicy", &denied);
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<crate::audit::AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[0].operation.as_str(), records[0].decision),
            ("SetPolicy", Decision::Denied)
        );
        assert_eq!(records[1].operation, "policy-denied");
        assert!(records[1].reason.ends_with("is locked"));
    }
}
