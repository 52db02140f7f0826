//! `cloister policy generate`: an agent policy derived from a pod's
//! manifest, after Kata's genpolicy. The printed Rego is the fixed rules of
//! `rules.rego` followed by a `policy_data` document that lists what the
//! pod may do, request by request:
//!
//! - CreateContainer: what the pod's containers may be: images, commands,
//!   environment, mounts, capabilities, user, devices, privileged or not
//!   (and never OCI hooks, which would run as root in the guest); and
//!   - linux.namespaces exactly as CRI and the shim make them for the pod
//!     ([`data::NamespaceRule`] per kind): a workload container its own
//!     mount and pid namespaces, the sandbox container's ipc and uts by
//!     `/proc/<pid>/ns/<kind>` (pid too under shareProcessNamespace or
//!     hostPID); the sandbox container its own mount, pid, ipc, uts but
//!     for those hostPID, hostIPC, hostNetwork (uts) leave to the guest; a
//!     cgroup namespace or none; never a network (the shim drops CRI's),
//!     user or time namespace. A joined path's `<pid>` must be the init
//!     of the pod's sandbox container (CRI's `container-type` "sandbox"):
//!     the spec cannot say whose pid it is (`/proc/1/ns/ipc` has the right
//!     form and is the guest's own namespace), so the agent resolves it
//!     among the containers it created and adds the answer to the input
//!     as `namespace_owners`; a path naming no container's init or a
//!     workload container's is refused. This holds for config.json
//!     entries that join a namespace too;
//!   - linux.sysctl: the pod's securityContext.sysctls with their values
//!     (the sandbox container also containerd's own two,
//!     [`manifest::CONTAINERD_SANDBOX_SYSCTLS`]);
//!   - linux.resources.devices: [`data::default_device_rules`] (deny-all,
//!     and allow rules granting only what the agent gives every container),
//!     allow-all for a privileged container; the update rule then keeps
//!     them as created;
//!   - linux.seccomp: a profile that refuses by default for RuntimeDefault,
//!     one that refuses something for Localhost, anything for Unconfined or
//!     unset ([`data::SeccompRule`]; the syscall list is not checked).
//! - SetupSandbox: what the shim sends for the pod and nothing more: the
//!   host name kubelet gives it (the Pod's `hostname` or name; any DNS
//!   label for a workload's generated pod names), only the shared-folder
//!   mount, no DNS settings, no guest-wide sysctls.
//! - ExecProcess: only the listed commands (`--exec`), only in a container
//!   the agent created under one of the policy's entries, with the
//!   environment, capabilities and noNewPrivileges that entry allows the
//!   container itself (so no `LD_PRELOAD=` it does not name), as the
//!   container's own user (uid, gid, groups among its own) unless
//!   `--exec-user` grants another.
//! - UpdateContainer: only for a container the agent created under one of
//!   the entries, and only resource limits (memory, cpu, pids, hugepages,
//!   the cgroup limit files of [`data::UPDATABLE_CGROUP_FILES`]); its
//!   device rules only resent unchanged. The request carries nothing but
//!   linux.resources, so no other part of a spec can change.
//! - The streams: whether the host may read stdio or write stdin.
//! - SetPolicy: refused, so once installed the policy is final.
//!
//! Start, signal, wait, stats, pause, remove, tty resizes, interface and
//! route updates stay allowed: they change no container's make-up (the
//! network requests carry what the host's CNI decided, which a manifest
//! does not say).
//!
//! Unlike genpolicy we do not pull images: a container whose manifest has
//! no `command` keeps its image's entrypoint with any arguments, and the
//! image's own environment variables must be named (`--allow-env`). Both
//! produce warnings.

pub mod data;
pub mod manifest;
#[cfg(test)]
mod rules_tests;

use base64::Engine as _;
use serde_json::Value;

use data::{
    default_device_rules, default_mounts, AllowedSandbox, AllowedUpdate, ExecUser, PolicyData,
};

/// The fixed rules every generated policy starts with.
pub const RULES: &str = include_str!("rules.rego");

/// Errors generating a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyGenError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is neither YAML nor JSON: {reason}")]
    Parse { path: String, reason: String },
    #[error("manifest of kind {kind:?} has no pod spec")]
    NoPodSpec { kind: String },
    #[error("the pod spec lists no containers")]
    NoContainers,
    #[error("container {container:?} has no {field}")]
    Field {
        container: String,
        field: &'static str,
    },
    #[error("nothing to generate from: give a pod manifest or an OCI config.json")]
    NoInput,
    #[error("exec user {value:?} is not UID or UID:GID (numbers)")]
    ExecUser { value: String },
    #[error("cannot encode policy data: {0}")]
    Encode(serde_json::Error),
}

/// What the policy allows besides the manifests themselves.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Exact argument vectors `exec` may run (none: exec is refused).
    pub exec_commands: Vec<Vec<String>>,
    /// Users an exec may run as in any container, besides the container's
    /// own.
    pub exec_users: Vec<ExecUser>,
    /// Extra environment variable names accepted: regular expressions
    /// the whole name must match (anchored here, so `PRE` admits `PRE`,
    /// never `LD_PRELOAD`).
    pub allow_env: Vec<String>,
    pub allow_stdio_read: bool,
    pub allow_stdin: bool,
    /// The process.args of the CRI sandbox container (containerd's
    /// `sandbox_image`, not the manifest's choice).
    pub pause_command: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            exec_commands: Vec::new(),
            exec_users: Vec::new(),
            allow_env: Vec::new(),
            allow_stdio_read: true,
            allow_stdin: true,
            pause_command: vec![manifest::PAUSE_COMMAND.to_owned()],
        }
    }
}

/// The inputs to one generation.
#[derive(Debug, Default)]
pub struct Sources {
    /// Kubernetes manifests (each a Pod or a workload with a pod template).
    pub kubernetes: Vec<Value>,
    /// OCI runtime specs (config.json), each allowed exactly.
    pub oci: Vec<Value>,
}

/// A generated policy and what the manifests left open.
#[derive(Debug)]
pub struct Generated {
    pub rego: String,
    pub warnings: Vec<String>,
}

impl Generated {
    /// The value of the `io.cloister.policy` annotation.
    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.rego)
    }
}

/// Reads a manifest file, YAML or JSON.
pub fn load_manifest(path: &std::path::Path) -> Result<Value, PolicyGenError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyGenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|e| PolicyGenError::Parse {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Derives the policy.
pub fn generate(sources: &Sources, options: &GenerateOptions) -> Result<Generated, PolicyGenError> {
    if sources.kubernetes.is_empty() && sources.oci.is_empty() {
        return Err(PolicyGenError::NoInput);
    }
    let mut derived = Vec::new();
    for m in &sources.kubernetes {
        derived.push(manifest::from_kubernetes(m)?);
    }
    for spec in &sources.oci {
        derived.push(manifest::from_oci(spec)?);
    }
    let mut hostnames: Vec<String> = derived.iter().map(|d| d.hostname.clone()).collect();
    hostnames.sort();
    hostnames.dedup();
    let mut data = PolicyData {
        containers: Vec::new(),
        default_mounts: default_mounts(),
        sandbox: AllowedSandbox::as_the_shim_sends(hostnames),
        update: AllowedUpdate::default(),
        exec_commands: options.exec_commands.clone(),
        exec_users: options.exec_users.clone(),
        devices: Vec::new(),
        default_device_rules: default_device_rules(),
        allow_privileged: false,
        allow_stdio_read: options.allow_stdio_read,
        allow_stdin: options.allow_stdin,
    };
    // One sandbox container per distinct pod make-up.
    for pod in derived.iter().filter_map(|d| d.pod.as_ref()) {
        let pause = manifest::pause_container(&options.pause_command, pod);
        if !data.containers.contains(&pause) {
            data.containers.push(pause);
        }
    }
    let mut warnings = Vec::new();
    for d in derived {
        data.allow_privileged |= d.privileged;
        data.devices.extend(d.devices);
        warnings.extend(d.warnings);
        data.containers.extend(d.containers);
    }
    for container in &mut data.containers {
        container
            .env_extra_names
            .extend(options.allow_env.iter().map(|p| format!("^(?:{p})$")));
    }
    data.devices.sort();
    data.devices.dedup();
    let document = serde_json::to_string_pretty(&data).map_err(PolicyGenError::Encode)?;
    // JSON is a Rego object literal.
    let rego = format!("{RULES}\npolicy_data := {document}\n");
    Ok(Generated { rego, warnings })
}

/// Splits an `--exec` value: a JSON array (`["sh","-c","ls /"]`) as is,
/// anything else on whitespace.
pub fn parse_exec_command(text: &str) -> Vec<String> {
    if let Ok(args) = serde_json::from_str::<Vec<String>>(text) {
        return args;
    }
    text.split_whitespace().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn generated_policy_holds_rules_and_data() {
        let sources = Sources {
            kubernetes: vec![json!({"kind": "Pod", "spec": {"containers": [
                {"name": "a", "image": "busybox", "command": ["sleep", "9"]}
            ]}})],
            oci: Vec::new(),
        };
        let options = GenerateOptions {
            exec_commands: vec![parse_exec_command("ls /")],
            ..GenerateOptions::default()
        };

        let generated = generate(&sources, &options).unwrap();

        assert!(generated.rego.starts_with(RULES));
        let data_text = generated.rego.split("policy_data := ").nth(1).unwrap();
        let data: Value = serde_json::from_str(data_text).unwrap();
        assert_eq!(data["containers"][0]["name"], "pause");
        assert_eq!(data["containers"][1]["args"], json!(["sleep", "9"]));
        assert_eq!(data["exec_commands"], json!([["ls", "/"]]));
        assert_eq!(data["exec_users"], json!([]));
        assert_eq!(
            data["sandbox"]["hostnames"],
            json!(["^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"])
        );
        assert_eq!(
            data["sandbox"]["mounts"][0]["target"],
            "/run/cloister/shared"
        );
        assert_eq!(data["update"]["resources"][0], "memory");
        assert_eq!(data["allow_privileged"], false);
        assert_eq!(
            data["default_device_rules"][0],
            json!({"allow": false, "type": "a", "major": -1, "minor": -1, "access": "rwm"})
        );
        assert_eq!(data["containers"][0]["namespaces"]["pid"], "new");
        assert_eq!(data["containers"][1]["namespaces"]["ipc"], "join");
        assert_eq!(data["containers"][1]["seccomp"], "any");
    }

    #[test]
    fn exec_commands_parse_as_json_or_words() {
        assert_eq!(
            parse_exec_command(r#"["sh","-c","echo a b"]"#),
            ["sh", "-c", "echo a b"]
        );
        assert_eq!(
            parse_exec_command("cat /etc/hostname"),
            ["cat", "/etc/hostname"]
        );
    }

    #[test]
    fn no_sources_is_an_error() {
        let err = generate(&Sources::default(), &GenerateOptions::default()).unwrap_err();
        assert!(matches!(err, PolicyGenError::NoInput));
    }
}
