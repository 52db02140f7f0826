//! `host-namespace`: a namespace the container shares with whatever it runs
//! beside. A type missing from `linux.namespaces` means "stay in the
//! runtime's own"; a path joins an existing one. CRI joins the pod's
//! network namespace (`/var/run/netns/cni-…`) and the sandbox's others
//! (`/proc/<pause pid>/ns/…`): those are the pod's, not the host's. PID 1's
//! namespaces are the host's.

use super::spec_reader::SpecReader;
use super::{Finding, FindingId, Severity};

/// Namespaces a container must have of its own (user and cgroup namespaces
/// are optional hardening, not a baseline).
const REQUIRED: [(&str, &str); 5] = [
    ("pid", "hostPID: false (or drop the shared PID namespace)"),
    ("ipc", "hostIPC: false"),
    ("uts", "give the container its own UTS namespace"),
    ("network", "hostNetwork: false"),
    ("mount", "give the container its own mount namespace"),
];

pub(super) fn inspect(spec: &SpecReader<'_>) -> Vec<Finding> {
    let entries = spec.array("linux.namespaces").unwrap_or_default();
    let mut present: Vec<(&str, Option<&str>)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let path = format!("linux.namespaces[{i}]");
        if let Some(kind) = spec.element_str(&path, entry, "type") {
            present.push((kind, spec.element_str(&path, entry, "path")));
        }
    }
    let mut findings = Vec::new();
    for (kind, fix) in REQUIRED {
        let value = match present.iter().find(|(k, _)| *k == kind) {
            None => format!("{kind} (absent: the host's)"),
            Some((_, Some(path))) if joins_host(path) => format!("{kind} joined at {path}"),
            Some(_) => continue,
        };
        findings.push(Finding::new(
            FindingId::HostNamespace,
            Severity::High,
            "linux.namespaces",
            value,
            fix,
        ));
    }
    findings
}

/// `/proc/1/ns/<type>` (or `/proc/self`'s, which is the runtime's) is the host's.
fn joins_host(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/proc/") else {
        return false;
    };
    matches!(rest.split('/').next(), Some("1" | "self" | "thread-self"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::inspect;
    use super::*;

    fn host_namespaces(namespaces: serde_json::Value) -> Vec<String> {
        inspect(json!({"linux": {"namespaces": namespaces}}))
            .findings
            .into_iter()
            .filter(|f| f.id == FindingId::HostNamespace)
            .map(|f| f.value)
            .collect()
    }

    #[test]
    fn all_own_namespaces_give_no_finding() {
        let found = host_namespaces(json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
            {"type": "mount"}, {"type": "network"}]));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn cri_pod_namespace_paths_are_not_the_host() {
        let found = host_namespaces(json!([
            {"type": "pid"}, {"type": "mount"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "network", "path": "/var/run/netns/cni-1b2c3d4e-0000-1111-2222-333344445555"}]));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn missing_pid_and_network_are_host_namespaces() {
        let found = host_namespaces(json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]));
        assert_eq!(
            found,
            ["network (absent: the host's)", "pid (absent: the host's)"]
        );
    }

    #[test]
    fn joining_pid_one_is_the_host() {
        let found = host_namespaces(json!([{"type": "pid", "path": "/proc/1/ns/pid"},
            {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]));
        assert_eq!(found, ["pid joined at /proc/1/ns/pid"]);
    }
}
