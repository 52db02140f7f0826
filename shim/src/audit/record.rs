//! One audit record: a JSON object on one line.
//!
//! ```json
//! {"time":"2026-11-24T04:30:00.123Z","seq":7,"kind":"task","pod":"web","container":"web",
//!  "operation":"Kill","caller":{"via":"containerd","namespace":"k8s.io","shim_pid":4711,"shim_uid":0},
//!  "decision":"allowed","reason":"","details":{"all":false,"signal":9}}
//! ```
//!
//! `seq` counts the records of one shim process from 1, so a gap shows a
//! record that could not be written. `exec_id` and `details` are left out
//! when there are none.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which of the three streams a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// A task API call containerd made to the shim.
    Task,
    /// A request the shim made to the pod's guest agent.
    Agent,
    /// A runtime security event (exec, privileged spec, crash, panic,
    /// policy denial, attestation failure).
    Security,
}

impl RecordKind {
    pub const ALL: [RecordKind; 3] = [RecordKind::Task, RecordKind::Agent, RecordKind::Security];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Task => "task",
            RecordKind::Agent => "agent",
            RecordKind::Security => "security",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of the request or event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Done as asked (for an event: noted, nothing refused).
    Allowed,
    /// Refused on purpose: ttrpc PERMISSION_DENIED from the shim
    /// (`[inspection]` refuse mode) or from the agent's policy.
    Denied,
    /// Not done for any other reason (bad request, wrong state, agent or
    /// VM unreachable, a crash).
    Failed,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Allowed, Decision::Denied, Decision::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Failed => "failed",
        }
    }

    /// The decision a ttrpc answer code stands for.
    pub fn of_code(code: ttrpc::Code) -> Self {
        match code {
            ttrpc::Code::OK => Decision::Allowed,
            ttrpc::Code::PERMISSION_DENIED => Decision::Denied,
            _ => Decision::Failed,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who asked, as far as the shim can know.
///
/// The task API is a Unix socket the shim library creates for containerd
/// (under `/run/containerd/s/`, root's): on a normal node every caller is a
/// root process, in practice containerd. The shim cannot
/// see *which* user or kubelet request made containerd call (that is in
/// containerd's and the API server's logs), nor the peer's credentials
/// (containerd-shim's server does not expose them). What it records:
/// `via` (`containerd` for task API calls, `shim` for what the shim did on
/// its own: agent requests, events it observed), the containerd namespace
/// the call claims in its ttrpc metadata (`containerd-namespace-ttrpc`;
/// else the namespace the shim was started for), and the shim's own pid
/// and uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub via: CallerVia,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub shim_pid: u32,
    pub shim_uid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerVia {
    Containerd,
    Shim,
}

/// One line of the audit file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Position among this shim process's records, from 1.
    #[serde(default)]
    pub seq: u64,
    pub kind: RecordKind,
    /// The pod (its sandbox container's id); empty before the shim knows it.
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub container: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exec_id: String,
    /// Task API method (`Create`), agent RPC (`CreateContainer`) or
    /// security event (`exec`, `inspection-finding`, `vm-exited`,
    /// `agent-lost`, `guest-panic`, `policy-denied`, `attestation-failed`);
    /// `ShimDelete` for the shim binary's `delete` subcommand.
    pub operation: String,
    pub caller: Caller,
    pub decision: Decision,
    /// Why it was denied or failed (the error as returned, an agent
    /// denial's message verbatim); for events, what happened.
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl AuditRecord {
    /// The record as one line, newline included. Serialising these types
    /// cannot fail (string keys, no maps with other keys); should it ever,
    /// the line says so instead of losing the record silently.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"time":{:?},"seq":{},"kind":"security","operation":"audit-encoding-failed","reason":{:?}}}"#,
                self.time,
                self.seq,
                e.to_string()
            )
        });
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            time: "2026-11-24T04:30:00.123Z".into(),
            seq: 7,
            kind: RecordKind::Task,
            pod: "web".into(),
            container: "web".into(),
            exec_id: String::new(),
            operation: "Kill".into(),
            caller: Caller {
                via: CallerVia::Containerd,
                namespace: "k8s.io".into(),
                shim_pid: 4711,
                shim_uid: 0,
            },
            decision: Decision::Allowed,
            reason: String::new(),
            details: serde_json::json!({"signal": 9, "all": false}),
        }
    }

    #[test]
    fn a_record_is_one_line_with_the_documented_fields() {
        let line = record().to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(
            line,
            concat!(
                r#"{"time":"2026-11-24T04:30:00.123Z","seq":7,"kind":"task","pod":"web","container":"web","#,
                r#""operation":"Kill","caller":{"via":"containerd","namespace":"k8s.io","shim_pid":4711,"shim_uid":0},"#,
                r#""decision":"allowed","reason":"","details":{"all":false,"signal":9}}"#,
                "\n"
            )
        );
        let back: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, record());
    }

    #[test]
    fn newlines_in_a_reason_stay_escaped_on_the_line() {
        let mut r = record();
        r.reason = "policy: rule\nexec_denied".into();
        r.exec_id = "e1".into();
        r.details = serde_json::Value::Null;
        let line = r.to_line();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains(r#""exec_id":"e1""#));
        assert!(!line.contains("details"));
    }

    #[test]
    fn ttrpc_codes_map_to_decisions() {
        assert_eq!(Decision::of_code(ttrpc::Code::OK), Decision::Allowed);
        assert_eq!(
            Decision::of_code(ttrpc::Code::PERMISSION_DENIED),
            Decision::Denied
        );
        assert_eq!(Decision::of_code(ttrpc::Code::NOT_FOUND), Decision::Failed);
    }
}
