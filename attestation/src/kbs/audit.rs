//! The KBS audit trail: one JSON line per decision (who, what, allowed or
//! denied, why), appended to a file or written to stdout.

use serde::Serialize;
use std::io::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One decision.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord<'a> {
    /// Unix time in seconds.
    pub ts: u64,
    /// Client address.
    pub peer: String,
    /// Session id (empty before one exists).
    pub session: &'a str,
    /// `auth`, `attest` or `resource`.
    pub action: &'a str,
    /// TEE type.
    pub tee: &'a str,
    /// Resource path or other target.
    pub target: &'a str,
    /// `allow` or `deny`.
    pub decision: &'a str,
    /// Why.
    pub reason: &'a str,
}

/// Where audit lines go.
pub struct AuditLog {
    sink: Mutex<Box<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Appends to `path`.
    pub fn to_file(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            sink: Mutex::new(Box::new(file)),
        })
    }

    /// Writes to stdout.
    pub fn to_stdout() -> Self {
        Self {
            sink: Mutex::new(Box::new(std::io::stdout())),
        }
    }

    /// Records one decision. A failing audit sink is reported through
    /// tracing; the decision itself stands.
    pub fn record(&self, mut record: AuditRecord<'_>) {
        record.ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let line = match serde_json::to_string(&record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("audit record not serialisable: {e}");
                return;
            }
        };
        let mut sink = match self.sink.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = writeln!(sink, "{line}").and_then(|_| sink.flush()) {
            tracing::error!("audit log write failed: {e}");
        }
    }
}
