//! `CreateContainerRequest.namespace_owners`: which container of this
//! agent owns each namespace a spec joins by `/proc/<pid>/ns/<kind>`.
//!
//! CRI has a workload container join the sandbox (pause) container's ipc
//! and uts namespaces (and pid, when the pod shares one) by the sandbox
//! init's guest pid. The spec alone cannot say whose pid that is:
//! `/proc/1/ns/ipc` has the right form and names the guest's own
//! namespace, where the agent runs. The agent knows the init pid of every
//! container it created, so it resolves each such path to its container
//! and the policy can require the pod's sandbox container.

use serde_json::{json, Map, Value};

/// CRI's annotation naming a container's role ("sandbox" or "container").
pub const CRI_CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// A live container as the resolution sees it.
#[derive(Debug, Clone, Copy)]
pub struct KnownContainer<'a> {
    pub id: &'a str,
    /// Its init process's pid, in the agent's pid namespace.
    pub init_pid: i32,
    /// The `CreateContainerRequest` input it was created with.
    pub create_input: &'a Value,
}

/// The pid a `/proc/<pid>/ns/<name>` path names, as procfs would resolve
/// it: decimal without a leading zero (procfs refuses those), positive.
/// None for any other path (`/proc/self/...`, `/run/netns/x`, `..`).
pub fn proc_ns_pid(path: &str) -> Option<i32> {
    let rest = path.strip_prefix("/proc/")?;
    let (pid, name) = rest.split_once("/ns/")?;
    let plain_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase());
    let decimal = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    if !plain_name || !decimal || pid.starts_with('0') {
        return None;
    }
    pid.parse().ok()
}

/// Whether a container was created as CRI's sandbox (pause) container,
/// by the annotation of the spec it was allowed with.
pub fn is_cri_sandbox(create_input: &Value) -> bool {
    create_input
        .get("oci")
        .and_then(|oci| oci.get("annotations"))
        .and_then(|a| a.get(CRI_CONTAINER_TYPE_ANNOTATION))
        .and_then(Value::as_str)
        == Some("sandbox")
}

/// For each `linux.namespaces[].path` of `oci` of the form
/// `/proc/<pid>/ns/<name>`: `{"container_id", "sandbox"}` of the container
/// whose init is `<pid>`, or null when it is no container's. Other paths
/// are left out (the rules refuse their form).
pub fn namespace_owners<'a>(
    oci: &Value,
    containers: impl Iterator<Item = KnownContainer<'a>> + Clone,
) -> Value {
    let paths = oci
        .get("linux")
        .and_then(|l| l.get("namespaces"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ns| ns.get("path")?.as_str());
    let mut owners = Map::new();
    for path in paths {
        let Some(pid) = proc_ns_pid(path) else {
            continue;
        };
        let owner = containers.clone().find(|c| c.init_pid == pid).map_or(
            Value::Null,
            |c| json!({"container_id": c.id, "sandbox": is_cri_sandbox(c.create_input)}),
        );
        owners.insert(path.to_owned(), owner);
    }
    Value::Object(owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_ns_pid_takes_only_what_procfs_resolves_as_a_pid() {
        assert_eq!(proc_ns_pid("/proc/42/ns/ipc"), Some(42));
        assert_eq!(proc_ns_pid("/proc/1/ns/uts"), Some(1));
        for other in [
            "/proc/042/ns/ipc",
            "/proc/0/ns/ipc",
            "/proc/self/ns/ipc",
            "/proc/42/ns/",
            "/proc/42/ns/../ns/ipc",
            "/proc//ns/ipc",
            "/run/netns/x",
            "/proc/99999999999/ns/ipc",
            "proc/42/ns/ipc",
        ] {
            assert_eq!(proc_ns_pid(other), None, "{other}");
        }
    }

    #[test]
    fn paths_resolve_to_the_container_whose_init_has_the_pid() {
        let pause = json!({"oci": {"annotations": {CRI_CONTAINER_TYPE_ANNOTATION: "sandbox"}}});
        let app = json!({"oci": {"annotations": {CRI_CONTAINER_TYPE_ANNOTATION: "container"}}});
        let known = [
            KnownContainer {
                id: "pause",
                init_pid: 42,
                create_input: &pause,
            },
            KnownContainer {
                id: "app",
                init_pid: 43,
                create_input: &app,
            },
        ];
        let spec = json!({"linux": {"namespaces": [
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/43/ns/uts"},
            {"type": "pid", "path": "/proc/1/ns/pid"},
            {"type": "network", "path": "/run/netns/cni-1"},
            {"type": "mount"}
        ]}});

        let owners = namespace_owners(&spec, known.iter().copied());

        assert_eq!(
            owners,
            json!({
                "/proc/42/ns/ipc": {"container_id": "pause", "sandbox": true},
                "/proc/43/ns/uts": {"container_id": "app", "sandbox": false},
                "/proc/1/ns/pid": null
            })
        );
        assert_eq!(
            namespace_owners(&json!({}), known.iter().copied()),
            json!({})
        );
    }

    #[test]
    fn only_cris_sandbox_annotation_makes_a_sandbox() {
        assert!(!is_cri_sandbox(&json!({"oci": {}})));
        assert!(!is_cri_sandbox(
            &json!({"oci": {"annotations": {CRI_CONTAINER_TYPE_ANNOTATION: "Sandbox"}}})
        ));
    }
}
