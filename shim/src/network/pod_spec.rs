//! Which network a pod asks for, read from the sandbox container's OCI
//! spec (`config.json`, as the shim already parses it).
//!
//! `linux.namespaces` decides: a `network` entry with a `path` joins a
//! namespace someone made (CRI + CNI: `/var/run/netns/cni-…`), the one to
//! plumb; a `network` entry without a path asks for a fresh, empty
//! namespace (`ctr run` without `--net-host`: nothing to plumb); no
//! `network` entry at all means the host's network, which a VM cannot
//! share (the shim refuses it unless configured otherwise).

use std::path::PathBuf;

use serde_json::Value;

/// Errors reading the network namespace from a spec.
#[derive(Debug, thiserror::Error)]
pub enum PodSpecError {
    #[error("spec linux.namespaces is not an array: {value}")]
    NamespacesNotArray { value: String },
    #[error("spec linux.namespaces[{index}]: {reason}: {value}")]
    BadEntry {
        index: usize,
        reason: &'static str,
        value: String,
    },
}

/// The network a pod asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetworkNamespace {
    /// The host's network namespace (no `network` namespace entry).
    Host,
    /// A new, empty namespace: no interfaces to give the guest.
    Fresh,
    /// The namespace at this path (CNI's), to plumb into the guest.
    Path(PathBuf),
}

/// Reads the pod's network namespace from `spec`.
pub fn network_namespace(spec: &Value) -> Result<PodNetworkNamespace, PodSpecError> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else {
        return Ok(PodNetworkNamespace::Host);
    };
    let entries = namespaces
        .as_array()
        .ok_or_else(|| PodSpecError::NamespacesNotArray {
            value: namespaces.to_string(),
        })?;
    let mut found = None;
    for (index, entry) in entries.iter().enumerate() {
        let bad = |reason| PodSpecError::BadEntry {
            index,
            reason,
            value: entry.to_string(),
        };
        let kind = entry
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no type"))?;
        if kind != "network" {
            continue;
        }
        if found.is_some() {
            return Err(bad("a second network namespace"));
        }
        found = Some(match entry.get("path") {
            None | Some(Value::Null) => PodNetworkNamespace::Fresh,
            Some(Value::String(path)) if path.is_empty() => PodNetworkNamespace::Fresh,
            Some(Value::String(path)) if path.starts_with('/') => {
                PodNetworkNamespace::Path(PathBuf::from(path))
            }
            Some(Value::String(_)) => return Err(bad("path is not absolute")),
            Some(_) => return Err(bad("path is not a string")),
        });
    }
    Ok(found.unwrap_or(PodNetworkNamespace::Host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(namespaces: Value) -> Value {
        json!({ "ociVersion": "1.1.0", "linux": { "namespaces": namespaces } })
    }

    #[test]
    fn cri_sandbox_with_cni_namespace_path_is_plumbed() {
        let spec = spec(json!([
            { "type": "pid" },
            { "type": "network", "path": "/var/run/netns/cni-1234" },
            { "type": "ipc" }
        ]));
        assert_eq!(
            network_namespace(&spec).unwrap(),
            PodNetworkNamespace::Path("/var/run/netns/cni-1234".into())
        );
    }

    #[test]
    fn network_entry_without_path_is_a_fresh_namespace() {
        let spec = spec(json!([{ "type": "network" }, { "type": "mount" }]));
        assert_eq!(
            network_namespace(&spec).unwrap(),
            PodNetworkNamespace::Fresh
        );
    }

    #[test]
    fn no_network_entry_or_no_namespaces_is_host_network() {
        let without = spec(json!([{ "type": "pid" }]));
        assert_eq!(
            network_namespace(&without).unwrap(),
            PodNetworkNamespace::Host
        );
        assert_eq!(
            network_namespace(&json!({ "ociVersion": "1.1.0" })).unwrap(),
            PodNetworkNamespace::Host
        );
    }

    #[test]
    fn relative_path_is_rejected_naming_the_entry() {
        let spec = spec(json!([{ "type": "pid" }, { "type": "network", "path": "netns/x" }]));
        let err = network_namespace(&spec).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("namespaces[1]"), "{message}");
        assert!(message.contains("netns/x"), "{message}");
    }

    #[test]
    fn malformed_namespaces_are_rejected_not_taken_for_host() {
        let err = network_namespace(&spec(json!({ "type": "network" }))).unwrap_err();
        assert!(matches!(err, PodSpecError::NamespacesNotArray { .. }));
        let err = network_namespace(&spec(json!([{ "path": "/x" }]))).unwrap_err();
        assert!(err.to_string().contains("no type"), "{err}");
        let twice = spec(json!([{ "type": "network" }, { "type": "network", "path": "/a" }]));
        assert!(network_namespace(&twice).is_err());
    }
}
