//! The process's own hardening: read-only root, non-root user, seccomp,
//! no_new_privs, and resource limits.

use std::collections::HashMap;

use crate::config::{CRI_CPU_QUOTA, CRI_MEMORY};

use super::spec_reader::SpecReader;
use super::{Finding, FindingId, Severity};

pub(super) fn inspect(
    spec: &SpecReader<'_>,
    annotations: &HashMap<String, String>,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    if spec.bool("root.readonly") != Some(true) {
        findings.push(Finding::new(
            FindingId::WritableRootfs,
            Severity::Low,
            "root.readonly",
            shown_bool(spec.get("root.readonly").is_some()),
            "securityContext.readOnlyRootFilesystem: true, with volumes where the program writes",
        ));
    }
    match spec.i64("process.user.uid") {
        Some(uid) if uid != 0 => {}
        uid => findings.push(Finding::new(
            FindingId::RunsAsRoot,
            Severity::Medium,
            "process.user.uid",
            if uid.is_some() { "0" } else { "absent (root)" },
            "securityContext.runAsNonRoot: true with a runAsUser other than 0 (or USER in the image)",
        )),
    }
    if let Some(value) = seccomp_gap(spec) {
        findings.push(Finding::new(
            FindingId::NoSeccomp,
            Severity::Medium,
            "linux.seccomp",
            value,
            "securityContext.seccompProfile.type: RuntimeDefault",
        ));
    }
    if spec.bool("process.noNewPrivileges") != Some(true) {
        findings.push(Finding::new(
            FindingId::NoNewPrivilegesOff,
            Severity::Low,
            "process.noNewPrivileges",
            shown_bool(spec.get("process.noNewPrivileges").is_some()),
            "securityContext.allowPrivilegeEscalation: false",
        ));
    }
    // A CRI pod-level limit bounds the container too (and sizes the VM).
    let memory_limited = spec
        .i64("linux.resources.memory.limit")
        .is_some_and(|l| l > 0)
        || positive_annotation(annotations, CRI_MEMORY);
    if !memory_limited {
        findings.push(Finding::new(
            FindingId::NoMemoryLimit,
            Severity::Low,
            "linux.resources.memory.limit",
            "absent",
            "set resources.limits.memory",
        ));
    }
    let cpu_limited = spec.i64("linux.resources.cpu.quota").is_some_and(|q| q > 0)
        || positive_annotation(annotations, CRI_CPU_QUOTA);
    if !cpu_limited {
        findings.push(Finding::new(
            FindingId::NoCpuLimit,
            Severity::Low,
            "linux.resources.cpu.quota",
            "absent",
            "set resources.limits.cpu",
        ));
    }
    findings
}

/// How a boolean that is not `true` shows: present (false or malformed) or absent.
fn shown_bool(present: bool) -> &'static str {
    if present {
        "false"
    } else {
        "absent"
    }
}

/// Absent, or a profile that allows every syscall (unconfined). A
/// `linux.seccomp` of the wrong type is reported as malformed instead.
fn seccomp_gap(spec: &SpecReader<'_>) -> Option<String> {
    if spec.get("linux.seccomp").is_none() {
        return Some("absent".into());
    }
    spec.object("linux.seccomp")?;
    let default_action = spec.str("linux.seccomp.defaultAction");
    let rules = spec.array("linux.seccomp.syscalls").map_or(0, <[_]>::len);
    (default_action == Some("SCMP_ACT_ALLOW") && rules == 0)
        .then(|| "defaultAction SCMP_ACT_ALLOW with no syscall rules".into())
}

fn positive_annotation(annotations: &HashMap<String, String>, key: &str) -> bool {
    annotations
        .get(key)
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v > 0)
}
