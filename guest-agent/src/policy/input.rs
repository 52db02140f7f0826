//! The policy's `input`: each agent request as a JSON document.
//!
//! The shape is ours, chosen for readable rules, and is a contract with
//! every policy written for cloister (the default one, the ones
//! `cloister policy generate` prints, users' own):
//!
//! - Field names are the proto field names (`container_id`, `exec_id`, …);
//!   every field is present, with its proto default when the host left it
//!   unset (`""`, `0`, `false`, `[]`, `{}`), so rules need no
//!   `object.get`.
//! - OCI documents that travel as JSON bytes are parsed and embedded as
//!   JSON, under the name of what they are: `CreateContainerRequest.oci`
//!   (the whole runtime spec, OCI's own camelCase keys),
//!   `ExecProcessRequest.process`, `UpdateContainerRequest.resources`.
//!   Bytes that are not JSON make the request fail before any rule runs.
//! - `CreateContainerRequest.image` is derived: the image reference from the
//!   spec's CRI annotation `io.kubernetes.cri.image-name`, else containerd's
//!   `io.containerd.image.name`, else `""`. (Both are set by the host, so a
//!   rule on `image` is only as good as the host's honesty; in confidential
//!   pods pin commands and mounts too.)
//! - `CreateContainerRequest.rootfs` is `{"kind": "virtio_fs"|"block"|
//!   "directory"|"none"|"unknown", …the variant's fields}`.
//! - `ExecProcessRequest.container` and `UpdateContainerRequest.container`
//!   are added by the agent, not sent by the host: the
//!   `CreateContainerRequest` input (as above, as the policy decided it)
//!   that created the named container in this agent, or `null` when this
//!   agent created no such container. What an exec or an update may do
//!   depends on what the container was allowed to be (its user, its
//!   environment, its device rules), which the request alone does not say.
//! - `CreateContainerRequest.namespace_owners` is added by the agent, not
//!   sent by the host: for each `oci.linux.namespaces[].path` of the form
//!   `/proc/<pid>/ns/<name>`, `{"container_id", "sandbox"}` of the live
//!   container this agent created whose init process is `<pid>` (`sandbox`:
//!   its spec carried `io.kubernetes.cri.container-type` = `"sandbox"`),
//!   or `null` when `<pid>` is no such container's init (`/proc/1/ns/ipc`
//!   is the guest's own namespace); `{}` when no path has that form. So a
//!   rule can require that a container joins the pod's sandbox container,
//!   which the path's form alone does not say. A container stops being an
//!   owner when its init process has exited (its pid may be reused).
//! - Stdio streams, which are not RPCs, are decided as `ReadStreamRequest`
//!   (the host reads stdout/stderr) and `WriteStreamRequest` (the host
//!   writes stdin), input `{"container_id", "exec_id", "stream"}` with
//!   stream `"stdin"`, `"stdout"` or `"stderr"`.

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use serde_json::{json, Map, Value};

/// CRI's image annotation (kubelet sets it on every container).
pub const CRI_IMAGE_ANNOTATION: &str = "io.kubernetes.cri.image-name";
/// containerd's image annotation (`ctr run` and the CRI plugin set it).
pub const CONTAINERD_IMAGE_ANNOTATION: &str = "io.containerd.image.name";

/// A request field that should hold JSON does not.
#[derive(Debug, thiserror::Error)]
#[error("{field} is not JSON: {source}")]
pub struct InputError {
    pub field: &'static str,
    #[source]
    pub source: serde_json::Error,
}

/// A request the policy decides on: the name of its rule and its input.
pub trait PolicyRequest {
    /// The rule in `package agent_policy` that decides this request, which
    /// is also the proto message name.
    const RULE: &'static str;
    fn policy_input(&self) -> Result<Value, InputError>;

    /// The container whose creation input the agent adds to this request's
    /// input as `container` (see the module documentation); None for
    /// requests whose rules need no more than the request.
    fn created_container(&self) -> Option<&str> {
        None
    }

    /// Whether the agent adds `namespace_owners` (the container owning each
    /// `/proc/<pid>/ns/...` path of `oci.linux.namespaces`) to the input.
    fn joins_namespaces(&self) -> bool {
        false
    }
}

fn parse_json(field: &'static str, bytes: &[u8]) -> Result<Value, InputError> {
    serde_json::from_slice(bytes).map_err(|source| InputError { field, source })
}

fn stdio_json(stdio: Option<&agent::Stdio>) -> Value {
    let d = agent::Stdio::default();
    let s = stdio.unwrap_or(&d);
    json!({
        "stdin": s.stdin,
        "stdout": s.stdout,
        "stderr": s.stderr,
        "terminal": s.terminal,
    })
}

fn rootfs_json(rootfs: Option<&agent::Rootfs>) -> Value {
    use agent::rootfs::Source;
    match rootfs.and_then(|r| r.source.as_ref()) {
        Some(Source::VirtioFs(v)) => json!({"kind": "virtio_fs", "tag": v.tag, "path": v.path}),
        Some(Source::Block(b)) => json!({
            "kind": "block",
            "device": b.device,
            "fstype": b.fstype,
            "options": b.options,
        }),
        Some(Source::Directory(path)) => json!({"kind": "directory", "path": path}),
        None => json!({"kind": "none"}),
        // A variant newer than this agent: the policy sees it as unknown.
        Some(_) => json!({"kind": "unknown"}),
    }
}

/// The image the spec's annotations name, or "".
pub fn image_of_spec(spec: &Value) -> String {
    let annotations = spec.get("annotations");
    [CRI_IMAGE_ANNOTATION, CONTAINERD_IMAGE_ANNOTATION]
        .iter()
        .find_map(|key| annotations?.get(key)?.as_str())
        .unwrap_or_default()
        .to_owned()
}

impl PolicyRequest for agent::CreateContainerRequest {
    const RULE: &'static str = "CreateContainerRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        let oci = parse_json("oci_spec_json", &self.oci_spec_json)?;
        Ok(json!({
            "container_id": self.container_id,
            "image": image_of_spec(&oci),
            "oci": oci,
            "rootfs": rootfs_json(self.rootfs.as_ref()),
            "stdio": stdio_json(self.stdio.as_ref()),
        }))
    }

    fn joins_namespaces(&self) -> bool {
        true
    }
}

impl PolicyRequest for agent::ExecProcessRequest {
    const RULE: &'static str = "ExecProcessRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        Ok(json!({
            "container_id": self.container_id,
            "exec_id": self.exec_id,
            "process": parse_json("process_json", &self.process_json)?,
            "stdio": stdio_json(self.stdio.as_ref()),
        }))
    }

    fn created_container(&self) -> Option<&str> {
        Some(&self.container_id)
    }
}

impl PolicyRequest for agent::UpdateContainerRequest {
    const RULE: &'static str = "UpdateContainerRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        Ok(json!({
            "container_id": self.container_id,
            "resources": parse_json("resources_json", &self.resources_json)?,
        }))
    }

    fn created_container(&self) -> Option<&str> {
        Some(&self.container_id)
    }
}

impl PolicyRequest for agent::SetupSandboxRequest {
    const RULE: &'static str = "SetupSandboxRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        let d = agent::Dns::default();
        let dns = self.dns.as_ref().unwrap_or(&d);
        let mounts: Vec<Value> = self
            .mounts
            .iter()
            .map(|m| {
                json!({
                    "fstype": m.fstype,
                    "source": m.source,
                    "target": m.target,
                    "options": m.options,
                })
            })
            .collect();
        let sysctls: Map<String, Value> = self
            .sysctls
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        Ok(json!({
            "hostname": self.hostname,
            "dns": {
                "nameservers": dns.nameservers,
                "searches": dns.searches,
                "options": dns.options,
            },
            "mounts": mounts,
            "sysctls": sysctls,
        }))
    }
}

impl PolicyRequest for agent::UpdateInterfacesRequest {
    const RULE: &'static str = "UpdateInterfacesRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                json!({
                    "mac_address": i.mac_address,
                    "name": i.name,
                    "mtu": i.mtu,
                    "addresses": i.addresses,
                })
            })
            .collect();
        Ok(json!({ "interfaces": interfaces }))
    }
}

impl PolicyRequest for agent::UpdateRoutesRequest {
    const RULE: &'static str = "UpdateRoutesRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                json!({
                    "destination": r.destination,
                    "gateway": r.gateway,
                    "device": r.device,
                    "source": r.source,
                    "metric": r.metric,
                })
            })
            .collect();
        Ok(json!({ "routes": routes }))
    }
}

impl PolicyRequest for agent::SetPolicyRequest {
    const RULE: &'static str = "SetPolicyRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        Ok(json!({ "policy": self.policy }))
    }
}

impl PolicyRequest for agent::SignalProcessRequest {
    const RULE: &'static str = "SignalProcessRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        Ok(json!({
            "container_id": self.container_id,
            "exec_id": self.exec_id,
            "signal": self.signal,
            "all": self.all,
        }))
    }
}

impl PolicyRequest for agent::RemoveContainerRequest {
    const RULE: &'static str = "RemoveContainerRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        Ok(json!({ "container_id": self.container_id, "force": self.force }))
    }
}

impl PolicyRequest for agent::ResizeTtyRequest {
    const RULE: &'static str = "ResizeTtyRequest";
    fn policy_input(&self) -> Result<Value, InputError> {
        Ok(json!({
            "container_id": self.container_id,
            "exec_id": self.exec_id,
            "rows": self.rows,
            "columns": self.columns,
        }))
    }
}

/// Requests that name a container only.
macro_rules! container_request {
    ($($message:ident),* $(,)?) => {$(
        impl PolicyRequest for agent::$message {
            const RULE: &'static str = stringify!($message);
            fn policy_input(&self) -> Result<Value, InputError> {
                Ok(json!({ "container_id": self.container_id }))
            }
        }
    )*};
}
container_request!(
    StartContainerRequest,
    PauseContainerRequest,
    ResumeContainerRequest,
    ListProcessesRequest,
    StatsContainerRequest,
);

/// Requests that name a process.
macro_rules! process_request {
    ($($message:ident),* $(,)?) => {$(
        impl PolicyRequest for agent::$message {
            const RULE: &'static str = stringify!($message);
            fn policy_input(&self) -> Result<Value, InputError> {
                Ok(json!({ "container_id": self.container_id, "exec_id": self.exec_id }))
            }
        }
    )*};
}
process_request!(WaitProcessRequest, CloseStdinRequest);

/// Requests without fields.
macro_rules! empty_request {
    ($($message:ident),* $(,)?) => {$(
        impl PolicyRequest for agent::$message {
            const RULE: &'static str = stringify!($message);
            fn policy_input(&self) -> Result<Value, InputError> {
                Ok(json!({}))
            }
        }
    )*};
}
empty_request!(
    EventsRequest,
    GuestDetailsRequest,
    HealthCheckRequest,
    ShutdownRequest,
);

/// The opening of a stdio stream (not an RPC): `ReadStreamRequest` when
/// the host would read the process's output, `WriteStreamRequest` when it
/// would write its stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRequest {
    pub container_id: String,
    pub exec_id: String,
    pub kind: StreamKind,
}

impl StreamRequest {
    /// The rule that decides this stream.
    pub fn rule(&self) -> &'static str {
        match self.kind {
            StreamKind::Stdin => "WriteStreamRequest",
            StreamKind::Stdout | StreamKind::Stderr => "ReadStreamRequest",
        }
    }

    pub fn policy_input(&self) -> Value {
        json!({
            "container_id": self.container_id,
            "exec_id": self.exec_id,
            "stream": self.kind.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_container_input_embeds_the_spec_and_derives_the_image() {
        let spec = json!({
            "process": {"args": ["sh", "-c", "true"]},
            "annotations": {
                "io.containerd.image.name": "docker.io/library/ctr:1",
                "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36",
            }
        });
        let mut request = agent::CreateContainerRequest::new();
        request.container_id = "c1".into();
        request.oci_spec_json = serde_json::to_vec(&spec).unwrap();
        let mut rootfs = agent::Rootfs::new();
        let mut share = agent::VirtioFsRootfs::new();
        share.tag = "cloister".into();
        share.path = "c1/rootfs".into();
        rootfs.set_virtio_fs(share);
        request.rootfs = Some(rootfs).into();

        let input = request.policy_input().unwrap();

        assert_eq!(
            input,
            json!({
                "container_id": "c1",
                "image": "docker.io/library/busybox:1.36",
                "oci": spec,
                "rootfs": {"kind": "virtio_fs", "tag": "cloister", "path": "c1/rootfs"},
                "stdio": {"stdin": false, "stdout": false, "stderr": false, "terminal": false},
            })
        );
    }

    #[test]
    fn image_falls_back_to_containerd_annotation_then_empty() {
        let ctr = json!({"annotations": {"io.containerd.image.name": "docker.io/x/y:2"}});
        assert_eq!(image_of_spec(&ctr), "docker.io/x/y:2");
        assert_eq!(image_of_spec(&json!({})), "");
        assert_eq!(image_of_spec(&json!({"annotations": {"a": 1}})), "");
    }

    #[test]
    fn create_container_with_bad_spec_bytes_names_the_field() {
        let mut request = agent::CreateContainerRequest::new();
        request.oci_spec_json = b"{not json".to_vec();

        let err = request.policy_input().unwrap_err();

        assert_eq!(err.field, "oci_spec_json");
        assert!(err.to_string().starts_with("oci_spec_json is not JSON"));
    }

    #[test]
    fn exec_input_embeds_the_process() {
        let mut request = agent::ExecProcessRequest::new();
        request.container_id = "c1".into();
        request.exec_id = "e1".into();
        request.process_json = br#"{"args":["ls","/"],"terminal":true}"#.to_vec();
        let mut stdio = agent::Stdio::new();
        stdio.stdout = true;
        stdio.terminal = true;
        request.stdio = Some(stdio).into();

        let input = request.policy_input().unwrap();

        assert_eq!(input["process"]["args"], json!(["ls", "/"]));
        assert_eq!(input["exec_id"], "e1");
        assert_eq!(input["stdio"]["terminal"], true);
        assert_eq!(input["stdio"]["stdin"], false);
    }

    #[test]
    fn setup_sandbox_input_lists_mounts_and_defaults_missing_dns() {
        let mut request = agent::SetupSandboxRequest::new();
        request.hostname = "pod".into();
        let mut mount = agent::GuestMount::new();
        mount.fstype = "virtiofs".into();
        mount.source = "cloister".into();
        mount.target = "/run/cloister/shared".into();
        request.mounts.push(mount);
        request
            .sysctls
            .insert("net.ipv4.ip_forward".into(), "1".into());

        let input = request.policy_input().unwrap();

        assert_eq!(
            input,
            json!({
                "hostname": "pod",
                "dns": {"nameservers": [], "searches": [], "options": []},
                "mounts": [{"fstype": "virtiofs", "source": "cloister",
                            "target": "/run/cloister/shared", "options": []}],
                "sysctls": {"net.ipv4.ip_forward": "1"},
            })
        );
    }

    #[test]
    fn simple_requests_carry_their_ids_and_rule_names() {
        let mut signal = agent::SignalProcessRequest::new();
        signal.container_id = "c".into();
        signal.signal = 9;
        assert_eq!(
            signal.policy_input().unwrap(),
            json!({"container_id": "c", "exec_id": "", "signal": 9, "all": false})
        );
        assert_eq!(
            <agent::SignalProcessRequest as PolicyRequest>::RULE,
            "SignalProcessRequest"
        );
        let mut start = agent::StartContainerRequest::new();
        start.container_id = "c".into();
        assert_eq!(start.policy_input().unwrap(), json!({"container_id": "c"}));
        assert_eq!(
            <agent::StartContainerRequest as PolicyRequest>::RULE,
            "StartContainerRequest"
        );
        assert_eq!(
            agent::ShutdownRequest::new().policy_input().unwrap(),
            json!({})
        );
    }

    #[test]
    fn stdio_streams_map_to_read_and_write_rules() {
        let out = StreamRequest {
            container_id: "c".into(),
            exec_id: "".into(),
            kind: StreamKind::Stderr,
        };
        assert_eq!(out.rule(), "ReadStreamRequest");
        assert_eq!(
            out.policy_input(),
            json!({"container_id": "c", "exec_id": "", "stream": "stderr"})
        );
        let stdin = StreamRequest {
            kind: StreamKind::Stdin,
            ..out
        };
        assert_eq!(stdin.rule(), "WriteStreamRequest");
    }
}
