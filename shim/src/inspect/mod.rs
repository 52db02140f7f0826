//! Least-privilege inspection of a container's OCI runtime spec (the
//! `config.json` containerd writes): which parts of the spec ask for more
//! privilege than a normal container needs.
//!
//! [`inspect_spec`] is a pure function over the spec as JSON, tolerant of
//! anything a file may hold: a field of the wrong type becomes a
//! `malformed-spec` finding naming it, never a panic. The shim runs it at
//! create and, per `[inspection]` in the config, warns or refuses
//! ([`decide`]); `cloister inspect SPEC.json` prints the same report.
//!
//! | id | severity | rule |
//! |---|---|---|
//! | `privileged` | high | CAP_SYS_ADMIN in a capability set, or every device allowed with no masked paths (what CRI gives a privileged container) |
//! | `added-capabilities` | high if one of the dangerous ones, else medium | capabilities beyond containerd's default set |
//! | `host-namespace` | high | pid/ipc/uts/network/mount missing from `linux.namespaces`, or joined through `/proc/1/ns/` |
//! | `host-path-mount` | high (sensitive source, writable), medium (writable), low (read-only) | bind mounts from the host outside containerd's and kubelet's per-pod state |
//! | `writable-rootfs` | low | `root.readonly` not true |
//! | `runs-as-root` | medium | `process.user.uid` 0 or absent |
//! | `no-seccomp` | medium | `linux.seccomp` absent, or allowing every syscall |
//! | `no-new-privileges-off` | low | `process.noNewPrivileges` not true |
//! | `no-memory-limit` | low | no `linux.resources.memory.limit` and no CRI pod memory |
//! | `no-cpu-limit` | low | no `linux.resources.cpu.quota` and no CRI pod CPU quota |
//! | `malformed-spec` | high | a field of the wrong type |
//!
//! "Host" here is whatever the container runs beside: in cloister that is
//! the pod's microVM and its agent, not the node, so these findings measure
//! how far a container may reach *inside* its VM — still what a reviewer of
//! the spec wants to know.

mod capabilities;
pub use capabilities::DEFAULT_CAPABILITIES;
mod decide;
mod hardening;
mod load;
mod mounts;
mod namespaces;
mod spec_reader;

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use decide::{decide, Decision};
pub use load::{load_spec, spec_annotations, InspectError};
use spec_reader::SpecReader;

/// How bad a finding is: `high` findings fail `cloister inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
        })
    }
}

/// What a finding is about; its string form is stable (config and JSON use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingId {
    Privileged,
    AddedCapabilities,
    HostNamespace,
    HostPathMount,
    WritableRootfs,
    RunsAsRoot,
    NoSeccomp,
    NoNewPrivilegesOff,
    NoMemoryLimit,
    NoCpuLimit,
    MalformedSpec,
}

impl FindingId {
    /// Every id, in report order.
    pub const ALL: [FindingId; 11] = [
        FindingId::Privileged,
        FindingId::AddedCapabilities,
        FindingId::HostNamespace,
        FindingId::HostPathMount,
        FindingId::WritableRootfs,
        FindingId::RunsAsRoot,
        FindingId::NoSeccomp,
        FindingId::NoNewPrivilegesOff,
        FindingId::NoMemoryLimit,
        FindingId::NoCpuLimit,
        FindingId::MalformedSpec,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingId::Privileged => "privileged",
            FindingId::AddedCapabilities => "added-capabilities",
            FindingId::HostNamespace => "host-namespace",
            FindingId::HostPathMount => "host-path-mount",
            FindingId::WritableRootfs => "writable-rootfs",
            FindingId::RunsAsRoot => "runs-as-root",
            FindingId::NoSeccomp => "no-seccomp",
            FindingId::NoNewPrivilegesOff => "no-new-privileges-off",
            FindingId::NoMemoryLimit => "no-memory-limit",
            FindingId::NoCpuLimit => "no-cpu-limit",
            FindingId::MalformedSpec => "malformed-spec",
        }
    }

    /// The id a string names, if any.
    pub fn parse(name: &str) -> Option<FindingId> {
        FindingId::ALL.into_iter().find(|id| id.as_str() == name)
    }
}

/// Config lists name findings by id; an unknown id is an error naming it
/// and the known ones.
impl<'de> Deserialize<'de> for FindingId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        FindingId::parse(&name).ok_or_else(|| {
            let known: Vec<&str> = FindingId::ALL.iter().map(|id| id.as_str()).collect();
            serde::de::Error::custom(format!(
                "unknown finding id {name:?} (one of {})",
                known.join(", ")
            ))
        })
    }
}

impl fmt::Display for FindingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One way the spec exceeds the baseline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub id: FindingId,
    pub severity: Severity,
    /// The spec field concerned, dotted (`process.capabilities.bounding`).
    pub field: String,
    /// What that field holds (or `absent`), as shown to the user.
    pub value: String,
    /// One line saying how to bring the spec back to the baseline.
    pub fix: &'static str,
}

impl Finding {
    fn new(
        id: FindingId,
        severity: Severity,
        field: impl Into<String>,
        value: impl Into<String>,
        fix: &'static str,
    ) -> Self {
        Self {
            id,
            severity,
            field: field.into(),
            value: value.into(),
            fix,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {} — fix: {}",
            self.severity, self.id, self.field, self.value, self.fix
        )
    }
}

/// Everything [`inspect_spec`] found, most severe first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InspectionReport {
    pub findings: Vec<Finding>,
}

impl InspectionReport {
    pub fn has(&self, id: FindingId) -> bool {
        self.findings.iter().any(|f| f.id == id)
    }

    pub fn high_count(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::High)
            .count()
    }
}

impl fmt::Display for InspectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// Inspects an OCI runtime spec; `annotations` are the container's (CRI's
/// pod-level resource annotations count as limits).
pub fn inspect_spec(
    spec: &serde_json::Value,
    annotations: &HashMap<String, String>,
) -> InspectionReport {
    let reader = SpecReader::new(spec);
    let mut findings = Vec::new();
    if !spec.is_object() {
        findings.push(Finding::new(
            FindingId::MalformedSpec,
            Severity::High,
            "(spec)",
            spec_reader::type_name(spec),
            "give the OCI runtime spec: a JSON object",
        ));
        return InspectionReport { findings };
    }
    findings.extend(capabilities::inspect(&reader));
    findings.extend(namespaces::inspect(&reader));
    findings.extend(mounts::inspect(&reader));
    findings.extend(hardening::inspect(&reader, annotations));
    findings.extend(reader.into_malformed());
    // Stable order: severity, then the table's order, then the field.
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| rank(a.id).cmp(&rank(b.id)))
            .then_with(|| a.field.cmp(&b.field))
            .then_with(|| a.value.cmp(&b.value))
    });
    InspectionReport { findings }
}

fn rank(id: FindingId) -> usize {
    FindingId::ALL
        .iter()
        .position(|x| *x == id)
        .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests;
