//! The audit trail: one JSON line per task API call, per agent request and
//! per runtime security event, appended to a file shared by the node's pod
//! shims and repeated in the shim's log.
//!
//! | kind | one record per | operation |
//! |---|---|---|
//! | `task` | task API call containerd made (written when the call returns, so a `Wait` appears when its process exited) | the method: `Create`, `Start`, `Exec`, `Kill`, `Wait`, `Delete`, … |
//! | `agent` | request the shim made to the guest agent | the RPC: `CreateContainer`, `ExecProcess`, … (`UpdateNetwork` stands for UpdateInterfaces + UpdateRoutes; `OpenStdio` for a stdio stream) |
//! | `security` | event | `exec`, `inspection-finding`, `vm-exited`, `agent-lost`, `guest-panic`, `policy-denied`, `attestation-failed` |
//!
//! Decision: `allowed`; `denied` when the answer was PERMISSION_DENIED
//! (`[inspection]` refuse mode, or the agent's policy — its message, which
//! names the rule, is the record's `reason` verbatim); `failed` otherwise.
//! See [`record::Caller`] for what `caller` can and cannot say.
//!
//! Where records go (`[audit]` in the runtime config): `path`, by default
//! `/var/log/cloister/audit.jsonl` — persistent like other runtimes' logs
//! under `/var/log`, not `/run` (a tmpfs, gone at reboot, when an audit
//! trail is most wanted). The config is known only when the pod's first
//! container is created (the RuntimeClass may name the file), so records
//! of calls before that are held in memory and written first, in order.
//! `enabled = false` keeps records in the shim's log only. Security
//! records are also published to containerd as events (topic
//! `/cloister/security`, the record's JSON in a
//! `google.protobuf.StringValue`), for whoever watches containerd's event
//! stream.
//!
//! For the confidential-pod code: [`AuditLog::attestation_failed`] (or
//! [`AuditEvent::AttestationFailed`]) records a failed attestation.
//!
//! The shim binary's `delete` subcommand, which containerd runs after each
//! task's shim is done (and after a shim died), leaves a `task` record
//! `ShimDelete` in the file the environment's config names (`delete` does
//! not get the RuntimeClass's options). Not recorded: the agent health
//! checks while connecting, and the `start` subcommand (a short process
//! that finds or spawns the serving shim).

pub mod agent;
pub mod filter;
pub mod record;
pub mod time;
pub mod writer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub use record::{AuditRecord, Caller, CallerVia, Decision, RecordKind};
use writer::AuditWriter;

use crate::inspect::Finding;

/// Where records wait before the runtime config says where they go; past
/// this many (a shim that never gets a Create), the oldest are dropped.
const PENDING_LIMIT: usize = 4096;
/// How much of a guest's panic message a record keeps.
const GUEST_PANIC_LINES: usize = 40;

/// `[audit]` in the runtime config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Off: records go to the shim's log only.
    pub enabled: bool,
    /// The JSON-lines file every pod shim appends to.
    pub path: PathBuf,
}

/// The default audit file.
pub const DEFAULT_AUDIT_PATH: &str = "/var/log/cloister/audit.jsonl";

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from(DEFAULT_AUDIT_PATH),
        }
    }
}

/// A runtime security event, recorded with kind `security`.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditEvent {
    /// A process exec'd into a running container (recorded when the agent
    /// was asked to start it).
    ExecIntoContainer {
        container: String,
        exec_id: String,
        args: Vec<String>,
        terminal: bool,
        decision: Decision,
        reason: String,
    },
    /// A least-privilege finding in a container's spec at create
    /// (`refused`: `[inspection]` refused the container for it).
    InspectionFinding {
        container: String,
        finding: Finding,
        refused: bool,
    },
    /// The pod's VM process exited while the pod was running.
    VmExited { exit: String },
    /// The agent connection ended while the pod was running.
    AgentLost { reason: String },
    /// The guest kernel panicked: the lines of the console log from the
    /// first `Kernel panic`.
    GuestPanic { console: Vec<String> },
    /// The agent's policy refused a request; `reason` is the agent's
    /// message verbatim (it names the rule).
    PolicyDenied {
        container: String,
        exec_id: String,
        request: String,
        reason: String,
    },
    /// Attestation of a confidential pod failed (evidence refused, key
    /// release denied, verifier unreachable). `details` is free-form JSON.
    AttestationFailed {
        reason: String,
        details: serde_json::Value,
    },
}

/// The parts of a record an event fills in.
struct EventParts {
    operation: &'static str,
    container: String,
    exec_id: String,
    decision: Decision,
    reason: String,
    details: serde_json::Value,
}

impl AuditEvent {
    fn into_parts(self) -> EventParts {
        let parts = |operation, decision, reason, details| EventParts {
            operation,
            container: String::new(),
            exec_id: String::new(),
            decision,
            reason,
            details,
        };
        match self {
            AuditEvent::ExecIntoContainer {
                container,
                exec_id,
                args,
                terminal,
                decision,
                reason,
            } => EventParts {
                container,
                exec_id,
                ..parts(
                    "exec",
                    decision,
                    reason,
                    serde_json::json!({ "args": args, "terminal": terminal }),
                )
            },
            AuditEvent::InspectionFinding {
                container,
                finding,
                refused,
            } => EventParts {
                container,
                ..parts(
                    "inspection-finding",
                    if refused {
                        Decision::Denied
                    } else {
                        Decision::Allowed
                    },
                    finding.to_string(),
                    serde_json::to_value(&finding).unwrap_or_default(),
                )
            },
            AuditEvent::VmExited { exit } => parts(
                "vm-exited",
                Decision::Failed,
                format!("the pod's VM exited unexpectedly: {exit}"),
                serde_json::Value::Null,
            ),
            AuditEvent::AgentLost { reason } => parts(
                "agent-lost",
                Decision::Failed,
                reason,
                serde_json::Value::Null,
            ),
            AuditEvent::GuestPanic { console } => parts(
                "guest-panic",
                Decision::Failed,
                console.first().cloned().unwrap_or_default(),
                serde_json::json!({ "console": console }),
            ),
            AuditEvent::PolicyDenied {
                container,
                exec_id,
                request,
                reason,
            } => EventParts {
                container,
                exec_id,
                ..parts(
                    "policy-denied",
                    Decision::Denied,
                    reason,
                    serde_json::json!({ "request": request }),
                )
            },
            AuditEvent::AttestationFailed { reason, details } => {
                parts("attestation-failed", Decision::Failed, reason, details)
            }
        }
    }
}

/// Where records go now.
enum Sink {
    /// The config is not known yet.
    Pending(Vec<AuditRecord>),
    File(AuditWriter),
    /// `[audit] enabled = false`: the shim's log only.
    LogOnly,
}

struct Inner {
    /// The containerd namespace the shim was started for.
    namespace: String,
    shim_pid: u32,
    shim_uid: u32,
    /// Held while a record gets its `seq` and is written, so the file's
    /// order is the order of `seq`.
    sink: Mutex<(u64, Sink)>,
    /// Where security records are also published as containerd events.
    events: std::sync::OnceLock<crate::events::EventSender>,
}

/// The shim's audit trail: cheap to clone, shared by the task service,
/// the agent client wrapper and the sandbox watcher.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

/// What a task API or agent record is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub pod: String,
    pub container: String,
    pub exec_id: String,
}

impl AuditLog {
    /// An audit log for a shim serving `namespace`; records are held until
    /// [`AuditLog::configure`].
    pub fn new(namespace: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                shim_pid: std::process::id(),
                shim_uid: nix::unistd::geteuid().as_raw(),
                sink: Mutex::new((0, Sink::Pending(Vec::new()))),
                events: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Sets where records go, writing those held so far. Only the first
    /// call counts: one shim serves one pod, whose config is read once.
    pub fn configure(&self, section: &AuditSection) {
        let mut guard = self.lock();
        let (_, sink) = &mut *guard;
        let Sink::Pending(held) = sink else {
            return;
        };
        let held = std::mem::take(held);
        *sink = if section.enabled {
            Sink::File(AuditWriter::new(&section.path))
        } else {
            Sink::LogOnly
        };
        if let Sink::File(writer) = sink {
            for record in &held {
                writer.append(&record.to_line());
            }
        }
    }

    /// Publishes every later security record to containerd too (topic
    /// `/cloister/security`); the first sender set stays.
    pub fn publish_security_events(&self, events: crate::events::EventSender) {
        let _ = self.inner.events.set(events);
    }

    /// Names the pod in the records still held that were made before the
    /// shim knew it (containerd's first Connect): one shim serves one pod.
    pub fn set_pod_of_held(&self, pod: &str) {
        if let Sink::Pending(held) = &mut self.lock().1 {
            for record in held.iter_mut().filter(|r| r.pod.is_empty()) {
                record.pod = pod.to_owned();
            }
        }
    }

    /// Whether [`AuditLog::configure`] was called.
    pub fn is_configured(&self) -> bool {
        !matches!(self.lock().1, Sink::Pending(_))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Sink)> {
        // A panic while writing a line leaves nothing half-done in memory
        // that later records depend on.
        self.inner
            .sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The caller of a task API call: what containerd's metadata claims.
    pub fn containerd_caller(&self, namespace: Option<&str>) -> Caller {
        Caller {
            via: CallerVia::Containerd,
            namespace: namespace
                .filter(|n| !n.is_empty())
                .unwrap_or(&self.inner.namespace)
                .to_owned(),
            shim_pid: self.inner.shim_pid,
            shim_uid: self.inner.shim_uid,
        }
    }

    /// The caller of what the shim does on its own.
    pub fn shim_caller(&self) -> Caller {
        Caller {
            via: CallerVia::Shim,
            ..self.containerd_caller(None)
        }
    }

    /// Writes one record (its `seq` is set here) to the shim's log and the
    /// file.
    pub fn write(&self, mut record: AuditRecord) {
        let mut guard = self.lock();
        let (seq, sink) = &mut *guard;
        *seq += 1;
        record.seq = *seq;
        let is_security = record.kind == RecordKind::Security;
        let line = record.to_line();
        let line = line.trim_end();
        match record.decision {
            Decision::Allowed if record.kind != RecordKind::Security => {
                tracing::info!(target: "cloister::audit", "audit {line}")
            }
            _ => tracing::warn!(target: "cloister::audit", "audit {line}"),
        }
        match sink {
            Sink::Pending(held) => {
                if held.len() >= PENDING_LIMIT {
                    held.remove(0);
                }
                held.push(record);
            }
            Sink::File(writer) => writer.append(&record.to_line()),
            Sink::LogOnly => {}
        }
        if is_security {
            if let Some(events) = self.inner.events.get() {
                // Sent under the lock: events keep the records' order.
                events.send(crate::events::TaskEvent::Security {
                    record_json: line.to_owned(),
                });
            }
        }
    }

    /// A task API call's record.
    pub fn task(
        &self,
        namespace: Option<&str>,
        subject: Subject,
        operation: &str,
        outcome: Result<(), (Decision, String)>,
        details: serde_json::Value,
    ) {
        let caller = self.containerd_caller(namespace);
        self.write(record(
            RecordKind::Task,
            caller,
            subject,
            operation,
            outcome,
            details,
        ));
    }

    /// An agent request's record.
    pub fn agent_request(
        &self,
        subject: Subject,
        operation: &str,
        outcome: Result<(), (Decision, String)>,
        details: serde_json::Value,
    ) {
        let caller = self.shim_caller();
        self.write(record(
            RecordKind::Agent,
            caller,
            subject,
            operation,
            outcome,
            details,
        ));
    }

    /// A security event of pod `pod`.
    pub fn security(&self, pod: &str, event: AuditEvent) {
        let parts = event.into_parts();
        self.write(AuditRecord {
            time: time::format_rfc3339_millis(SystemTime::now()),
            seq: 0,
            kind: RecordKind::Security,
            pod: pod.to_owned(),
            container: parts.container,
            exec_id: parts.exec_id,
            operation: parts.operation.to_owned(),
            caller: self.shim_caller(),
            decision: parts.decision,
            reason: parts.reason,
            details: parts.details,
        });
    }

    /// Records a `guest-panic` event when the guest console log at `path`
    /// shows a kernel panic; says whether it did.
    pub fn guest_panic_in(&self, pod: &str, console_log: &std::path::Path) -> bool {
        let console = match std::fs::read(console_log) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => return false,
        };
        match guest_panic_lines(&console, GUEST_PANIC_LINES) {
            Some(lines) => {
                self.security(pod, AuditEvent::GuestPanic { console: lines });
                true
            }
            None => false,
        }
    }

    /// For the confidential-pod code: attestation of `pod` failed.
    pub fn attestation_failed(&self, pod: &str, reason: &str, details: serde_json::Value) {
        self.security(
            pod,
            AuditEvent::AttestationFailed {
                reason: reason.to_owned(),
                details,
            },
        );
    }
}

fn record(
    kind: RecordKind,
    caller: Caller,
    subject: Subject,
    operation: &str,
    outcome: Result<(), (Decision, String)>,
    details: serde_json::Value,
) -> AuditRecord {
    let (decision, reason) = match outcome {
        Ok(()) => (Decision::Allowed, String::new()),
        Err(refusal) => refusal,
    };
    AuditRecord {
        time: time::format_rfc3339_millis(SystemTime::now()),
        seq: 0,
        kind,
        pod: subject.pod,
        container: subject.container,
        exec_id: subject.exec_id,
        operation: operation.to_owned(),
        caller,
        decision,
        reason,
        details,
    }
}

/// The lines of a guest console log from the first kernel panic on (at
/// most `max`), if the guest panicked.
pub fn guest_panic_lines(console: &str, max: usize) -> Option<Vec<String>> {
    let start = console.find("Kernel panic")?;
    // From the start of the line that holds it (it follows a timestamp).
    let line_start = console[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    Some(
        console[line_start..]
            .lines()
            .take(max)
            .map(|l| l.trim_end().to_owned())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &std::path::Path) -> Vec<AuditRecord> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn subject(container: &str) -> Subject {
        Subject {
            pod: "pod".into(),
            container: container.into(),
            exec_id: String::new(),
        }
    }

    #[test]
    fn records_before_configure_are_written_first_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::new("k8s.io");
        let unknown_pod = Subject {
            pod: String::new(),
            ..subject("a")
        };
        log.task(
            None,
            unknown_pod,
            "Connect",
            Ok(()),
            serde_json::Value::Null,
        );
        log.set_pod_of_held("pod");
        assert!(!path.exists());
        log.configure(&AuditSection {
            enabled: true,
            path: path.clone(),
        });
        log.task(
            Some("other"),
            subject("a"),
            "Create",
            Err((Decision::Denied, "no".into())),
            serde_json::json!({"bundle": "/b"}),
        );
        // A second configure does not move the trail.
        log.configure(&AuditSection {
            enabled: true,
            path: dir.path().join("elsewhere.jsonl"),
        });
        log.agent_request(
            subject("a"),
            "StartContainer",
            Ok(()),
            serde_json::Value::Null,
        );
        let records = read(&path);
        let ops: Vec<(&str, u64)> = records
            .iter()
            .map(|r| (r.operation.as_str(), r.seq))
            .collect();
        assert_eq!(ops, [("Connect", 1), ("Create", 2), ("StartContainer", 3)]);
        assert_eq!(records[0].pod, "pod");
        assert_eq!(records[0].caller.namespace, "k8s.io");
        assert_eq!(records[0].caller.via, CallerVia::Containerd);
        assert_eq!(records[0].caller.shim_pid, std::process::id());
        assert_eq!(records[1].caller.namespace, "other");
        assert_eq!(
            (records[1].decision, records[1].reason.as_str()),
            (Decision::Denied, "no")
        );
        assert_eq!(records[2].kind, RecordKind::Agent);
        assert_eq!(records[2].caller.via, CallerVia::Shim);
        assert!(!dir.path().join("elsewhere.jsonl").exists());
    }

    #[test]
    fn disabled_audit_writes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::new("default");
        log.task(None, subject("a"), "State", Ok(()), serde_json::Value::Null);
        log.configure(&AuditSection {
            enabled: false,
            path: path.clone(),
        });
        log.task(None, subject("a"), "State", Ok(()), serde_json::Value::Null);
        assert!(log.is_configured());
        assert!(!path.exists());
    }

    #[test]
    fn security_events_carry_their_operation_decision_and_details() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::new("default");
        log.configure(&AuditSection {
            enabled: true,
            path: path.clone(),
        });
        log.security(
            "pod",
            AuditEvent::ExecIntoContainer {
                container: "c".into(),
                exec_id: "e".into(),
                args: vec!["sh".into(), "-c".into(), "id".into()],
                terminal: true,
                decision: Decision::Allowed,
                reason: String::new(),
            },
        );
        log.security(
            "pod",
            AuditEvent::PolicyDenied {
                container: "c".into(),
                exec_id: "e".into(),
                request: "ExecProcess".into(),
                reason: "policy: ExecProcessRequest denied by rule exec_allowed".into(),
            },
        );
        log.security(
            "pod",
            AuditEvent::VmExited {
                exit: "signal 9".into(),
            },
        );
        log.security(
            "pod",
            AuditEvent::GuestPanic {
                console: vec!["Kernel panic - not syncing: VFS".into()],
            },
        );
        log.attestation_failed("pod", "evidence refused", serde_json::json!({"tee": "snp"}));
        let records = read(&path);
        let summary: Vec<(&str, Decision)> = records
            .iter()
            .map(|r| (r.operation.as_str(), r.decision))
            .collect();
        assert_eq!(
            summary,
            [
                ("exec", Decision::Allowed),
                ("policy-denied", Decision::Denied),
                ("vm-exited", Decision::Failed),
                ("guest-panic", Decision::Failed),
                ("attestation-failed", Decision::Failed),
            ]
        );
        assert!(records.iter().all(|r| r.kind == RecordKind::Security));
        assert_eq!(records[0].details["args"][2], "id");
        assert_eq!(records[0].exec_id, "e");
        assert_eq!(
            records[1].reason,
            "policy: ExecProcessRequest denied by rule exec_allowed"
        );
        assert!(records[2].reason.contains("signal 9"));
        assert_eq!(records[4].details["tee"], "snp");
    }

    #[test]
    fn a_kernel_panic_is_found_in_the_console_from_its_line() {
        let console = "[    0.1] booting\n[    2.5] Kernel panic - not syncing: Attempted to kill init!\n[    2.5] CPU: 0 PID: 1\n[    2.5] Call Trace:\n";
        let lines = guest_panic_lines(console, 2).unwrap();
        assert_eq!(
            lines,
            [
                "[    2.5] Kernel panic - not syncing: Attempted to kill init!",
                "[    2.5] CPU: 0 PID: 1"
            ]
        );
        assert!(guest_panic_lines("[ 0.1] booting\nreboot: Power down\n", 5).is_none());
    }
}
