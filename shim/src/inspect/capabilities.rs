//! `privileged` and `added-capabilities`: the process's capabilities against
//! the set containerd (and runc) give a container by default.

use std::collections::BTreeSet;

use super::spec_reader::SpecReader;
use super::{Finding, FindingId, Severity};

/// containerd's `oci.WithDefaultUnixSpec` / runc's default capabilities.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Capabilities that let a process escape or take over its sandbox (load
/// modules, raw I/O, trace others, reconfigure the network, read any file…).
const DANGEROUS_CAPABILITIES: [&str; 14] = [
    "CAP_SYS_ADMIN",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE",
    "CAP_SYS_BOOT",
    "CAP_SYS_TIME",
    "CAP_NET_ADMIN",
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_DAC_READ_SEARCH",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_SYSLOG",
];

const SETS: [&str; 5] = [
    "bounding",
    "effective",
    "permitted",
    "inheritable",
    "ambient",
];

/// `CAP_` prefixed and upper case, as the OCI spec writes them; runtimes
/// accept `sys_admin` too, so do we.
fn normalize(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

pub(super) fn inspect(spec: &SpecReader<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut all = BTreeSet::new();
    let mut sys_admin_in = None;
    for set in SETS {
        let field = format!("process.capabilities.{set}");
        for name in spec.strings(&field) {
            let cap = normalize(name);
            if cap == "CAP_SYS_ADMIN" && sys_admin_in.is_none() {
                sys_admin_in = Some(field.clone());
            }
            all.insert(cap);
        }
    }
    if let Some(field) = sys_admin_in {
        findings.push(Finding::new(
            FindingId::Privileged,
            Severity::High,
            field,
            "CAP_SYS_ADMIN",
            "drop CAP_SYS_ADMIN (securityContext.privileged: false, no capabilities.add SYS_ADMIN)",
        ));
    }
    if let Some(finding) = all_devices_unmasked(spec) {
        findings.push(finding);
    }
    let added: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|cap| !DEFAULT_CAPABILITIES.contains(cap))
        .collect();
    if !added.is_empty() {
        let dangerous = added.iter().any(|cap| DANGEROUS_CAPABILITIES.contains(cap));
        findings.push(Finding::new(
            FindingId::AddedCapabilities,
            if dangerous {
                Severity::High
            } else {
                Severity::Medium
            },
            "process.capabilities",
            added.join(", "),
            "add only the capabilities the program needs (securityContext.capabilities.add), or drop ALL and add back",
        ));
    }
    findings
}

/// The other half of CRI's privileged mode: every device allowed and
/// nothing masked in /proc and /sys. Either alone is not privileged
/// (`--device` rules and `procMount: Unmasked` exist for good reasons).
fn all_devices_unmasked(spec: &SpecReader<'_>) -> Option<Finding> {
    let devices = spec.array("linux.resources.devices")?;
    let allows_all = devices.iter().enumerate().any(|(i, rule)| {
        let path = format!("linux.resources.devices[{i}]");
        let allow = spec.element_bool(&path, rule, "allow").unwrap_or(false);
        let any_type = matches!(spec.element_str(&path, rule, "type"), None | Some("a"));
        let any_number = spec.element(&path, rule, "major").is_none()
            && spec.element(&path, rule, "minor").is_none();
        allow && any_type && any_number
    });
    let masked = spec.strings("linux.maskedPaths");
    if allows_all && masked.is_empty() {
        Some(Finding::new(
            FindingId::Privileged,
            Severity::High,
            "linux.resources.devices",
            "all devices allowed and linux.maskedPaths empty",
            "run unprivileged; pass single devices with --device or a device plugin",
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::inspect;
    use super::*;

    #[test]
    fn default_capabilities_give_no_finding() {
        let report = inspect(json!({"process": {"capabilities": {
            "bounding": DEFAULT_CAPABILITIES, "effective": DEFAULT_CAPABILITIES,
            "permitted": DEFAULT_CAPABILITIES}}}));
        assert!(!report.has(FindingId::Privileged), "{report}");
        assert!(!report.has(FindingId::AddedCapabilities), "{report}");
    }

    #[test]
    fn sys_admin_is_privileged_and_added_high() {
        let report = inspect(json!({"process": {"capabilities": {
            "bounding": ["CAP_CHOWN", "CAP_SYS_ADMIN"]}}}));
        let privileged = report
            .findings
            .iter()
            .find(|f| f.id == FindingId::Privileged)
            .unwrap();
        assert_eq!(privileged.field, "process.capabilities.bounding");
        assert_eq!(privileged.value, "CAP_SYS_ADMIN");
        let added = report
            .findings
            .iter()
            .find(|f| f.id == FindingId::AddedCapabilities)
            .unwrap();
        assert_eq!(
            (added.severity, added.value.as_str()),
            (Severity::High, "CAP_SYS_ADMIN")
        );
    }

    #[test]
    fn harmless_added_capability_is_medium_and_names_it() {
        let report = inspect(json!({"process": {"capabilities": {
            "ambient": ["cap_ipc_lock"]}}}));
        assert!(!report.has(FindingId::Privileged));
        let added = report
            .findings
            .iter()
            .find(|f| f.id == FindingId::AddedCapabilities)
            .unwrap();
        assert_eq!(
            (added.severity, added.value.as_str()),
            (Severity::Medium, "CAP_IPC_LOCK")
        );
    }

    #[test]
    fn net_admin_is_high_without_being_privileged() {
        let report =
            inspect(json!({"process": {"capabilities": {"effective": ["CAP_NET_ADMIN"]}}}));
        assert!(!report.has(FindingId::Privileged));
        assert_eq!(report.findings[0].severity, Severity::High);
    }

    #[test]
    fn all_devices_with_nothing_masked_is_privileged() {
        let devices = json!([{"allow": false, "access": "rwm"}, {"allow": true, "access": "rwm"}]);
        let report =
            inspect(json!({"linux": {"resources": {"devices": devices}, "maskedPaths": []}}));
        let privileged = report
            .findings
            .iter()
            .find(|f| f.id == FindingId::Privileged)
            .unwrap();
        assert_eq!(privileged.field, "linux.resources.devices");
        // Masked paths present: a device rule alone is not privileged.
        let report = inspect(json!({"linux": {"resources": {"devices": devices},
            "maskedPaths": ["/proc/kcore"]}}));
        assert!(!report.has(FindingId::Privileged), "{report}");
        // One device only, nothing masked: not privileged either.
        let report = inspect(json!({"linux": {"resources": {"devices": [
            {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}]}}}));
        assert!(!report.has(FindingId::Privileged), "{report}");
    }
}
