//! `host-path-mount`: bind mounts of host files into the container, other
//! than the per-pod files containerd and the kubelet make for it (hosts,
//! hostname, resolv.conf, shm, termination log, emptyDir/secret/configMap
//! volumes), which live under their per-pod state directories.

use std::path::{Component, Path};

use super::spec_reader::SpecReader;
use super::{Finding, FindingId, Severity};

/// Per-sandbox and per-pod state: containerd's plugin directories
/// (`io.containerd.grpc.v1.cri/sandboxes/<id>/…`,
/// `io.containerd.runtime.v2.task/…`) and the kubelet's pod directories.
/// Not the state roots themselves: `/run/containerd/containerd.sock` is a
/// host path, and a dangerous one.
const POD_STATE_PREFIXES: [&str; 4] = [
    "/run/containerd/io.containerd.",
    "/var/run/containerd/io.containerd.",
    "/var/lib/containerd/io.containerd.",
    "/var/lib/kubelet/pods/",
];

/// Sources that hand the container the node (or its runtimes) when writable.
const SENSITIVE_SOURCES: [&str; 14] = [
    "/",
    "/etc",
    "/root",
    "/boot",
    "/dev",
    "/proc",
    "/sys",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/run",
    "/run",
    "/run/containerd",
    "/var/run/containerd",
    "/var/lib/docker",
];

pub(super) fn inspect(spec: &SpecReader<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let Some(mounts) = spec.array("mounts") else {
        return findings;
    };
    for (i, mount) in mounts.iter().enumerate() {
        let path = format!("mounts[{i}]");
        let options = spec.element_strings(&path, mount, "options");
        let is_bind = spec.element_str(&path, mount, "type") == Some("bind")
            || options.iter().any(|o| *o == "bind" || *o == "rbind");
        if !is_bind {
            continue;
        }
        let Some(source) = spec.element_str(&path, mount, "source") else {
            continue;
        };
        if is_pod_state(source) {
            continue;
        }
        let destination = spec.element_str(&path, mount, "destination").unwrap_or("?");
        let read_only = options.contains(&"ro");
        let severity = if read_only {
            Severity::Low
        } else if is_sensitive(source) {
            Severity::High
        } else {
            Severity::Medium
        };
        findings.push(Finding::new(
            FindingId::HostPathMount,
            severity,
            format!("{path}.source"),
            format!(
                "{source} -> {destination} ({})",
                if read_only { "ro" } else { "rw" }
            ),
            "use a volume (emptyDir, configMap, PVC) instead of hostPath; if it must stay, mount it readOnly",
        ));
    }
    findings
}

/// Under a per-pod state directory, with no `..` to climb out of it.
fn is_pod_state(source: &str) -> bool {
    let climbs = Path::new(source)
        .components()
        .any(|c| matches!(c, Component::ParentDir));
    !climbs && POD_STATE_PREFIXES.iter().any(|p| source.starts_with(p))
}

/// One of the sensitive sources, a socket anywhere, or anything with `..`.
fn is_sensitive(source: &str) -> bool {
    let trimmed = match source.trim_end_matches('/') {
        "" => "/",
        t => t,
    };
    SENSITIVE_SOURCES.contains(&trimmed)
        || trimmed.ends_with(".sock")
        || Path::new(source)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::inspect;
    use super::*;

    fn host_mounts(mounts: serde_json::Value) -> Vec<(Severity, String)> {
        inspect(json!({ "mounts": mounts }))
            .findings
            .into_iter()
            .filter(|f| f.id == FindingId::HostPathMount)
            .map(|f| (f.severity, f.value))
            .collect()
    }

    #[test]
    fn containerd_and_kubelet_pod_files_and_kernel_mounts_are_not_host_paths() {
        let sandbox = "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/0123abcd";
        let found = host_mounts(json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind",
             "source": "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/0123abcd/shm",
             "options": ["rbind", "rw"]},
            {"destination": "/etc/hostname", "type": "bind", "source": format!("{sandbox}/hostname"),
             "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": format!("{sandbox}/resolv.conf"),
             "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/hosts", "type": "bind",
             "source": "/var/lib/kubelet/pods/5a0c/etc-hosts", "options": ["rbind", "rw"]}]));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn host_root_writable_is_high_and_read_only_is_low() {
        let found = host_mounts(json!([
            {"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind", "ro"]},
            {"destination": "/cache", "type": "bind", "source": "/srv/cache", "options": ["rbind"]}]));
        assert_eq!(
            found,
            [
                (Severity::High, "/ -> /host (rw)".to_string()),
                (Severity::Medium, "/srv/cache -> /cache (rw)".to_string()),
                (Severity::Low, "/srv/data -> /data (ro)".to_string()),
            ]
        );
    }

    #[test]
    fn runtime_socket_and_climbing_out_of_pod_state_are_host_paths() {
        let found = host_mounts(json!([
            {"destination": "/run/containerd.sock", "type": "bind",
             "source": "/run/containerd/containerd.sock", "options": ["rbind"]},
            {"destination": "/x", "type": "bind",
             "source": "/var/lib/kubelet/pods/../../../etc", "options": ["rbind"]}]));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|(s, _)| *s == Severity::High), "{found:?}");
    }
}
