//! The OCI spec as the guest must see it. containerd writes a spec for the
//! host: bind mounts name host paths (`/etc/hosts`, `/etc/resolv.conf`,
//! volumes, service-account tokens, the pod's `/dev/shm`) and CRI names the
//! pod's network namespace by a host path. In the guest those paths do not
//! exist, so:
//!
//! - every bind mount's host source is shared into the guest through the
//!   pod's virtio-fs folder (`shared/<container>/mounts/<n>`, bind-mounted
//!   there by the shim, read-only on the host when the spec says `ro`) and
//!   the spec's source becomes the guest path of that share;
//! - a network namespace given by path is dropped: the pod's network *is*
//!   the guest's (the pod's interfaces are moved into the VM), so the
//!   container joins the guest's own network namespace, as all containers
//!   of a Kata pod do. A network namespace without a path (`ctr run`
//!   without `--net-host`) stays: a fresh, empty one, as under runc.
//!
//! Namespaces CRI names as `/proc/<pid>/ns/<kind>` (ipc, uts, pid shared
//! with the pod's sandbox container) need no change: the pid containerd
//! knows for a task is the guest pid the agent reported.

use std::path::PathBuf;

use crate::sandbox::GUEST_SHARED_DIR;

/// Errors adapting a spec for the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestSpecError {
    #[error("spec field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// A host path the guest needs, and where it goes below the pod's shared
/// folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMount {
    pub host_source: PathBuf,
    /// Relative to the pod's shared folder (`<container>/mounts/<n>`).
    pub share_path: String,
    pub read_only: bool,
}

/// Whether a spec mount is a bind mount of a host path.
fn is_bind(mount: &serde_json::Value) -> bool {
    let options = mount
        .get("options")
        .and_then(|o| o.as_array())
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str());
    mount.get("type").and_then(|t| t.as_str()) == Some("bind")
        || options
            .clone()
            .any(|option| option == "bind" || option == "rbind")
}

fn has_option(mount: &serde_json::Value, wanted: &str) -> bool {
    mount
        .get("options")
        .and_then(|o| o.as_array())
        .into_iter()
        .flatten()
        .any(|o| o.as_str() == Some(wanted))
}

/// The spec for the guest and the host paths to share for it.
pub fn for_guest(
    spec: &serde_json::Value,
    container_id: &str,
) -> Result<(serde_json::Value, Vec<SharedMount>), GuestSpecError> {
    let mut guest = spec.clone();
    if let Some(namespaces) = guest
        .pointer_mut("/linux/namespaces")
        .and_then(|n| n.as_array_mut())
    {
        namespaces.retain(|ns| {
            !(ns.get("type").and_then(|t| t.as_str()) == Some("network")
                && ns.get("path").and_then(|p| p.as_str()).is_some())
        });
    }
    let mut shared = Vec::new();
    if let Some(mounts) = guest.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        for (index, mount) in mounts.iter_mut().enumerate() {
            if !is_bind(mount) {
                continue;
            }
            let field = format!("mounts[{index}].source");
            let source = mount
                .get("source")
                .and_then(|s| s.as_str())
                .ok_or_else(|| GuestSpecError::Invalid {
                    field: field.clone(),
                    reason: "a bind mount needs a source".into(),
                })?;
            // An attested secret is the agent's to resolve in the guest:
            // nothing is shared from the host for it.
            if source.starts_with(cloister_protocol::confidential::SECRET_MOUNT_SCHEME) {
                continue;
            }
            if !source.starts_with('/') || source.split('/').any(|part| part == "..") {
                return Err(GuestSpecError::Invalid {
                    field,
                    reason: format!("{source:?} is not an absolute path without '..'"),
                });
            }
            let share_path = format!("{container_id}/mounts/{index}");
            shared.push(SharedMount {
                host_source: PathBuf::from(source),
                share_path: share_path.clone(),
                read_only: has_option(mount, "ro"),
            });
            mount["source"] = format!("{GUEST_SHARED_DIR}/{share_path}").into();
        }
    }
    Ok((guest, shared))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cri_like_spec() -> serde_json::Value {
        json!({
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/etc/hosts", "type": "bind",
                  "source": "/var/lib/containerd/sandboxes/s1/hosts", "options": ["rbind", "rprivate", "rw"] },
                { "destination": "/etc/resolv.conf", "type": "bind",
                  "source": "/var/lib/containerd/sandboxes/s1/resolv.conf", "options": ["rbind", "ro"] },
                { "destination": "/data", "type": "none", "source": "/srv/volume", "options": ["bind"] }
            ],
            "linux": { "namespaces": [
                { "type": "pid" },
                { "type": "ipc", "path": "/proc/42/ns/ipc" },
                { "type": "network", "path": "/var/run/netns/cni-1234" },
                { "type": "mount" }
            ] }
        })
    }

    #[test]
    fn bind_sources_become_shares_and_keep_their_read_only_flag() {
        let (guest, shared) = for_guest(&cri_like_spec(), "c1").unwrap();
        assert_eq!(
            shared,
            vec![
                SharedMount {
                    host_source: "/var/lib/containerd/sandboxes/s1/hosts".into(),
                    share_path: "c1/mounts/1".into(),
                    read_only: false,
                },
                SharedMount {
                    host_source: "/var/lib/containerd/sandboxes/s1/resolv.conf".into(),
                    share_path: "c1/mounts/2".into(),
                    read_only: true,
                },
                SharedMount {
                    host_source: "/srv/volume".into(),
                    share_path: "c1/mounts/3".into(),
                    read_only: false,
                },
            ]
        );
        assert_eq!(guest["mounts"][0]["source"], "proc");
        assert_eq!(
            guest["mounts"][1]["source"],
            format!("{GUEST_SHARED_DIR}/c1/mounts/1")
        );
        assert_eq!(guest["mounts"][2]["options"], json!(["rbind", "ro"]));
    }

    #[test]
    fn network_namespace_by_path_is_dropped_other_namespaces_stay() {
        let (guest, _) = for_guest(&cri_like_spec(), "c1").unwrap();
        let kinds: Vec<&str> = guest["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ns| ns["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["pid", "ipc", "mount"]);
        assert_eq!(guest["linux"]["namespaces"][1]["path"], "/proc/42/ns/ipc");
    }

    #[test]
    fn fresh_network_namespace_without_path_is_kept() {
        let spec = json!({ "linux": { "namespaces": [{ "type": "network" }] } });
        let (guest, shared) = for_guest(&spec, "c1").unwrap();
        assert_eq!(guest, spec);
        assert!(shared.is_empty());
    }

    #[test]
    fn relative_or_dotdot_bind_sources_are_refused_naming_the_field() {
        for source in ["relative/path", "/srv/../etc"] {
            let spec = json!({ "mounts": [
                { "destination": "/x", "type": "bind", "source": source }
            ] });
            let error = for_guest(&spec, "c1").unwrap_err().to_string();
            assert!(
                error.contains("mounts[0].source") && error.contains(source),
                "{error}"
            );
        }
        let spec = json!({ "mounts": [{ "destination": "/x", "type": "bind" }] });
        assert!(for_guest(&spec, "c1")
            .unwrap_err()
            .to_string()
            .contains("mounts[0].source"));
    }

    #[test]
    fn secret_mounts_are_left_for_the_agent_and_share_nothing() {
        let spec = json!({ "mounts": [
            { "destination": "/s", "type": "bind", "source": "cloister-secret://token" }
        ] });
        let (guest, shared) = for_guest(&spec, "c1").unwrap();
        assert!(shared.is_empty());
        assert_eq!(guest["mounts"][0]["source"], "cloister-secret://token");
    }
}
