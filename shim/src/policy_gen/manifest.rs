//! What a Kubernetes manifest (a Pod, or a workload with a pod template)
//! allows its containers, and what an OCI config.json allows exactly.

use std::collections::BTreeMap;

use serde_json::Value;

use super::data::{
    AllowedContainer, AllowedMount, DeviceCgroupRule, NamespaceRule, SeccompRule, ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES, DEFAULT_ENV_NAMES,
};
use super::PolicyGenError;

/// Allowed containers from one manifest, with warnings for what the
/// manifest leaves open.
#[derive(Debug, Default)]
pub struct Derived {
    pub containers: Vec<AllowedContainer>,
    /// A regular expression for the guest's host name.
    pub hostname: String,
    pub devices: Vec<String>,
    pub privileged: bool,
    pub warnings: Vec<String>,
    /// What the pod's sandbox (pause) container may be, for a Kubernetes
    /// manifest.
    pub pod: Option<PodSettings>,
}

/// The pod-level settings that shape its containers' specs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSettings {
    pub host_pid: bool,
    pub host_ipc: bool,
    pub host_network: bool,
    pub share_process_namespace: bool,
    /// `securityContext.sysctls`.
    pub sysctls: BTreeMap<String, String>,
    /// `securityContext.seccompProfile`.
    pub seccomp: SeccompRule,
}

/// The sysctls containerd 2 adds to every sandbox container not on the
/// host's network (1.x when `enable_unprivileged_ports` /
/// `enable_unprivileged_icmp` are set), unless the pod sets them.
pub const CONTAINERD_SANDBOX_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ip_unprivileged_port_start", "0"),
    ("net.ipv4.ping_group_range", "0 2147483647"),
];

impl PodSettings {
    fn from_pod_spec(spec: &Value) -> PodSettings {
        let flag = |key: &str| spec.get(key).and_then(Value::as_bool) == Some(true);
        let security = spec.get("securityContext");
        let sysctls = security
            .and_then(|s| s.get("sysctls"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let name = entry.get("name")?.as_str()?;
                let value = entry.get("value")?.as_str()?;
                Some((name.to_owned(), value.to_owned()))
            })
            .collect();
        PodSettings {
            host_pid: flag("hostPID"),
            host_ipc: flag("hostIPC"),
            host_network: flag("hostNetwork"),
            share_process_namespace: flag("shareProcessNamespace"),
            sysctls,
            seccomp: seccomp_rule(security),
        }
    }

    /// A workload container's namespaces as CRI and the shim send them:
    /// its own mount namespace (and pid, unless the pod shares one or the
    /// host's), the sandbox container's ipc and uts by path, no network
    /// namespace (the shim drops CRI's: the pod's network is the guest's),
    /// a cgroup namespace or not.
    fn container_namespaces(&self) -> BTreeMap<String, NamespaceRule> {
        let pid = if self.host_pid || self.share_process_namespace {
            NamespaceRule::Join
        } else {
            NamespaceRule::New
        };
        [
            ("mount", NamespaceRule::New),
            ("pid", pid),
            ("ipc", NamespaceRule::Join),
            ("uts", NamespaceRule::Join),
            ("cgroup", NamespaceRule::NewOrAbsent),
        ]
        .into_iter()
        .map(|(kind, rule)| (kind.to_owned(), rule))
        .collect()
    }

    /// The sandbox container's: its own mount, pid, ipc and uts namespaces,
    /// except those the pod takes from the host (the guest), which CRI
    /// leaves out (hostNetwork drops uts too).
    fn sandbox_namespaces(&self) -> BTreeMap<String, NamespaceRule> {
        let mut namespaces = BTreeMap::new();
        namespaces.insert("mount".to_owned(), NamespaceRule::New);
        namespaces.insert("cgroup".to_owned(), NamespaceRule::NewOrAbsent);
        for (kind, from_host) in [
            ("pid", self.host_pid),
            ("ipc", self.host_ipc),
            ("uts", self.host_network),
        ] {
            if !from_host {
                namespaces.insert(kind.to_owned(), NamespaceRule::New);
            }
        }
        namespaces
    }

    /// The sandbox container's sysctls: the pod's and containerd's own.
    fn sandbox_sysctls(&self) -> BTreeMap<String, String> {
        let mut sysctls = self.sysctls.clone();
        if !self.host_network {
            for (name, value) in CONTAINERD_SANDBOX_SYSCTLS {
                sysctls
                    .entry(name.to_owned())
                    .or_insert_with(|| value.to_owned());
            }
        }
        sysctls
    }
}

/// Seccomp actions that refuse nothing.
const PERMISSIVE_SECCOMP_ACTIONS: [&str; 2] = ["SCMP_ACT_ALLOW", "SCMP_ACT_LOG"];

/// Whether an OCI seccomp profile refuses anything (as the rules'
/// `seccomp_refuses_something` decides it).
fn seccomp_refuses_something(profile: &Value) -> bool {
    let refuses = |action: Option<&Value>| {
        let action = action.and_then(Value::as_str).unwrap_or("SCMP_ACT_ALLOW");
        !PERMISSIVE_SECCOMP_ACTIONS.contains(&action)
    };
    profile.is_object()
        && (refuses(profile.get("defaultAction"))
            || profile
                .get("syscalls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|rule| refuses(rule.get("action"))))
}

/// The seccomp rule of a `securityContext` (None or no profile: any).
fn seccomp_rule(security: Option<&Value>) -> SeccompRule {
    match security
        .and_then(|s| s.pointer("/seccompProfile/type"))
        .and_then(Value::as_str)
    {
        Some("RuntimeDefault") => SeccompRule::RuntimeDefault,
        Some("Localhost") => SeccompRule::Localhost,
        _ => SeccompRule::Any,
    }
}

/// `docker.io/library/busybox:latest` for `busybox`, as containerd
/// normalises references (the CRI annotation carries the normalised one).
pub fn normalise_image(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let first = name.split('/').next().unwrap_or_default();
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut full = match (has_registry, name.contains('/')) {
        (true, _) => name.to_owned(),
        (false, true) => format!("docker.io/{name}"),
        (false, false) => format!("docker.io/library/{name}"),
    };
    let last = full.rsplit('/').next().unwrap_or_default();
    if digest.is_none() && !last.contains(':') {
        full.push_str(":latest");
    }
    match digest {
        Some(d) => format!("{full}@{d}"),
        None => full,
    }
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn capability_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

/// The pod spec inside a manifest: a Pod's `spec`, or a workload's
/// `spec.template.spec` (Deployment, Job, …) or `spec.jobTemplate.…`.
fn pod_spec(manifest: &Value) -> Result<&Value, PolicyGenError> {
    let kind = manifest
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let spec = manifest.get("spec");
    let candidates = [
        (kind == "Pod").then_some(spec).flatten(),
        spec.and_then(|s| s.pointer("/template/spec")),
        spec.and_then(|s| s.pointer("/jobTemplate/spec/template/spec")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|s| s.get("containers").is_some())
        .ok_or_else(|| PolicyGenError::NoPodSpec {
            kind: kind.to_owned(),
        })
}

/// Any host name kubelet gives a pod: a DNS label (RFC 1123).
pub const ANY_POD_HOSTNAME: &str = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Any host name a node may have (a pod on the host's network gets it).
pub const ANY_HOSTNAME: &str = "^[A-Za-z0-9]([-A-Za-z0-9.]{0,62}[A-Za-z0-9])?$";

/// The shim's host name for a sandbox whose spec names none: the first 12
/// characters of the sandbox's containerd id.
pub const SANDBOX_ID_HOSTNAME: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,11}$";

/// The label kubelet makes of a pod's name: at most 63 characters, no
/// trailing '-' or '.' after the cut.
fn kubelet_hostname(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_owned();
    }
    let mut cut: String = name.chars().take(63).collect();
    while cut.ends_with(['-', '.']) {
        cut.pop();
    }
    cut
}

/// The guest host name kubelet asks for the pod: its `hostname`, else a
/// Pod's name; a pattern when the manifest leaves it open (a workload's
/// pods get generated names; a host-network pod gets the node's).
fn pod_hostname(manifest: &Value, spec: &Value, warnings: &mut Vec<String>) -> String {
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        warnings.push("hostNetwork: the guest may have any host name (the node's)".to_owned());
        return ANY_HOSTNAME.to_owned();
    }
    let is_pod = manifest.get("kind").and_then(Value::as_str) == Some("Pod");
    let named = spec
        .get("hostname")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())
        .or_else(|| {
            is_pod
                .then(|| manifest.pointer("/metadata/name")?.as_str())
                .flatten()
        });
    let Some(name) = named else {
        return ANY_POD_HOSTNAME.to_owned();
    };
    let label = super::data::regex_escape(&kubelet_hostname(name));
    if spec.get("setHostnameAsFQDN").and_then(Value::as_bool) == Some(true) {
        // hostname.subdomain.namespace.svc.<cluster domain>
        return format!("^{label}(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$");
    }
    format!("^{label}$")
}

/// Containers (and init containers) of a Kubernetes manifest.
pub fn from_kubernetes(manifest: &Value) -> Result<Derived, PolicyGenError> {
    let spec = pod_spec(manifest)?;
    let mut derived = Derived::default();
    derived.hostname = pod_hostname(manifest, spec, &mut derived.warnings);
    let pod = PodSettings::from_pod_spec(spec);
    let all = ["initContainers", "containers"].iter().flat_map(|key| {
        spec.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    });
    for container in all {
        let allowed =
            kubernetes_container(container, spec.get("securityContext"), &pod, &mut derived)?;
        derived.containers.push(allowed);
    }
    if derived.containers.is_empty() {
        return Err(PolicyGenError::NoContainers);
    }
    derived.pod = Some(pod);
    Ok(derived)
}

fn kubernetes_container(
    container: &Value,
    pod_security: Option<&Value>,
    pod: &PodSettings,
    derived: &mut Derived,
) -> Result<AllowedContainer, PolicyGenError> {
    let name = container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let image = container
        .get("image")
        .and_then(Value::as_str)
        .ok_or_else(|| PolicyGenError::Field {
            container: name.clone(),
            field: "image",
        })?;
    let mut images = vec![image.to_owned()];
    let normalised = normalise_image(image);
    if normalised != image {
        images.push(normalised);
    }

    let command = strings(container.get("command"));
    let args = strings(container.get("args"));
    let args = if command.is_empty() {
        derived.warnings.push(format!(
            "container {name:?}: no command in the manifest, so the image's entrypoint \
             (unknown without pulling {image}) is allowed with any arguments; \
             add `command:` to pin it"
        ));
        None
    } else {
        Some(command.into_iter().chain(args).collect())
    };

    let mut env = Vec::new();
    let mut env_extra_names: Vec<String> =
        DEFAULT_ENV_NAMES.iter().map(|s| (*s).to_owned()).collect();
    for var in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(var_name) = var.get("name").and_then(Value::as_str) else {
            continue;
        };
        match var.get("value").and_then(Value::as_str) {
            Some(value) => env.push(format!("{var_name}={value}")),
            // valueFrom (secrets, field refs): the value is not in the
            // manifest; only the name is pinned.
            None => env_extra_names.push(format!("^{}$", super::data::regex_escape(var_name))),
        }
    }
    if container.get("envFrom").is_some() {
        derived.warnings.push(format!(
            "container {name:?}: envFrom variables are not known from the manifest and will be refused"
        ));
    }

    let mounts = container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let path = m.get("mountPath")?.as_str()?;
            let read_only = m.get("readOnly").and_then(Value::as_bool).unwrap_or(false);
            Some(AllowedMount::volume(path, read_only))
        })
        .collect();

    let security = container.get("securityContext");
    let privileged = security
        .and_then(|s| s.get("privileged"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let capabilities = if privileged {
        derived.privileged = true;
        derived.warnings.push(format!(
            "container {name:?} is privileged: the policy allows privileged containers and every capability"
        ));
        ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()
    } else {
        let caps = security.and_then(|s| s.get("capabilities"));
        let drop: Vec<String> = strings(caps.and_then(|c| c.get("drop")))
            .iter()
            .map(|c| capability_name(c))
            .collect();
        let add: Vec<String> = strings(caps.and_then(|c| c.get("add")))
            .iter()
            .map(|c| capability_name(c))
            .collect();
        let mut set: Vec<String> = if drop.iter().any(|c| c == "CAP_ALL") {
            Vec::new()
        } else {
            DEFAULT_CAPABILITIES
                .iter()
                .filter(|c| !drop.iter().any(|d| d == *c))
                .map(|c| (*c).to_owned())
                .collect()
        };
        for cap in add {
            if cap == "CAP_ALL" {
                set = ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
            } else if !set.contains(&cap) {
                set.push(cap);
            }
        }
        set
    };

    // The container's securityContext wins over the pod's.
    let setting = |key: &str| {
        security
            .and_then(|s| s.get(key))
            .or_else(|| pod_security.and_then(|s| s.get(key)))
    };
    let uid = setting("runAsUser")
        .and_then(Value::as_u64)
        .and_then(|u| u32::try_from(u).ok());
    let read_only_root = security
        .and_then(|s| s.get("readOnlyRootFilesystem"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let no_new_privileges = security
        .and_then(|s| s.get("allowPrivilegeEscalation"))
        .and_then(Value::as_bool)
        == Some(false);
    let seccomp = if security.and_then(|s| s.get("seccompProfile")).is_some() {
        seccomp_rule(security)
    } else {
        pod.seccomp
    };
    // containerd: a privileged container may use every device.
    let device_rules = if privileged {
        vec![DeviceCgroupRule {
            allow: true,
            kind: "a".into(),
            major: -1,
            minor: -1,
            access: "rwm".into(),
        }]
    } else {
        Vec::new()
    };

    Ok(AllowedContainer {
        name,
        sandbox: false,
        images,
        args,
        env,
        env_extra_names,
        mounts,
        capabilities,
        uid,
        read_only_root,
        no_new_privileges,
        namespaces: pod.container_namespaces(),
        sysctls: pod.sysctls.clone(),
        device_rules,
        seccomp,
    })
}

/// The command of the Kubernetes pause image.
pub const PAUSE_COMMAND: &str = "/pause";

/// The CRI sandbox (pause) container every pod starts with, running
/// `command`, as the pod's settings make it.
pub fn pause_container(command: &[String], pod: &PodSettings) -> AllowedContainer {
    AllowedContainer {
        name: "pause".into(),
        sandbox: true,
        images: Vec::new(),
        args: Some(command.to_vec()),
        env: Vec::new(),
        env_extra_names: vec!["^PATH$".into()],
        mounts: Vec::new(),
        capabilities: DEFAULT_CAPABILITIES
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
        uid: None,
        read_only_root: false,
        no_new_privileges: false,
        namespaces: pod.sandbox_namespaces(),
        sysctls: pod.sandbox_sysctls(),
        device_rules: Vec::new(),
        seccomp: pod.seccomp,
    }
}

/// Exactly the container an OCI runtime spec describes.
pub fn from_oci(spec: &Value) -> Result<Derived, PolicyGenError> {
    let process = spec.get("process").ok_or(PolicyGenError::Field {
        container: "config.json".into(),
        field: "process",
    })?;
    let annotations = spec.get("annotations");
    let image = ["io.kubernetes.cri.image-name", "io.containerd.image.name"]
        .iter()
        .find_map(|k| annotations?.get(k)?.as_str());
    let sandbox = annotations
        .and_then(|a| a.get("io.kubernetes.cri.container-type"))
        .and_then(Value::as_str)
        == Some("sandbox");
    let hostname = match spec.get("hostname").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => format!("^{}$", super::data::regex_escape(name)),
        _ => SANDBOX_ID_HOSTNAME.to_owned(),
    };
    let mut derived = Derived {
        hostname,
        ..Derived::default()
    };
    if image.is_none() {
        derived.warnings.push(
            "config.json names no image (io.kubernetes.cri.image-name / io.containerd.image.name): any image is allowed".into(),
        );
    }
    let caps = process.get("capabilities");
    let mut capabilities: Vec<String> = Vec::new();
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        for cap in strings(caps.and_then(|c| c.get(set))) {
            if !capabilities.contains(&cap) {
                capabilities.push(cap);
            }
        }
    }
    let mounts = spec
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some(AllowedMount::exact(
                m.get("destination")?.as_str()?,
                m.get("type").and_then(Value::as_str).unwrap_or_default(),
                m.get("source").and_then(Value::as_str).unwrap_or_default(),
                &strings(m.get("options")),
            ))
        })
        .collect();
    let linux = spec.get("linux");
    derived.devices = linux
        .and_then(|l| l.get("devices"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|d| d.get("path")?.as_str().map(str::to_owned))
        .collect();
    let empty = |key: &str| {
        linux
            .and_then(|l| l.get(key))
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
    };
    if empty("maskedPaths") || empty("readonlyPaths") {
        derived.privileged = true;
        derived.warnings.push(
            "config.json masks no paths or makes none read-only: the policy allows privileged containers".into(),
        );
    }
    let namespaces = linux
        .and_then(|l| l.get("namespaces"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ns| {
            let kind = ns.get("type")?.as_str()?;
            let joined = ns
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| !p.is_empty());
            let rule = match (kind, joined) {
                // The shim drops a network namespace given by path.
                ("network", true) => return None,
                ("cgroup", false) => NamespaceRule::NewOrAbsent,
                (_, false) => NamespaceRule::New,
                (_, true) => NamespaceRule::Join,
            };
            Some((kind.to_owned(), rule))
        })
        .collect();
    let sysctls = linux
        .and_then(|l| l.get("sysctl"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_owned())))
        .collect();
    let device_rules = linux
        .and_then(|l| l.pointer("/resources/devices"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(DeviceCgroupRule::from_oci)
        .collect();
    // A profile that refuses something is required when the spec has one;
    // its text is not pinned.
    let seccomp = if linux
        .and_then(|l| l.get("seccomp"))
        .is_some_and(seccomp_refuses_something)
    {
        SeccompRule::Localhost
    } else {
        SeccompRule::Any
    };
    derived.containers.push(AllowedContainer {
        name: "config.json".into(),
        sandbox,
        images: image.map(|i| vec![i.to_owned()]).unwrap_or_default(),
        args: Some(strings(process.get("args"))),
        env: strings(process.get("env")),
        env_extra_names: Vec::new(),
        mounts,
        capabilities,
        uid: process
            .pointer("/user/uid")
            .and_then(Value::as_u64)
            .and_then(|u| u32::try_from(u).ok()),
        read_only_root: spec.pointer("/root/readonly").and_then(Value::as_bool) == Some(true),
        no_new_privileges: process.get("noNewPrivileges").and_then(Value::as_bool) == Some(true),
        namespaces,
        sysctls,
        device_rules,
        seccomp,
    });
    Ok(derived)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_names_are_normalised_like_containerd() {
        assert_eq!(
            normalise_image("busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalise_image("busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(normalise_image("me/app"), "docker.io/me/app:latest");
        assert_eq!(
            normalise_image("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(
            normalise_image("localhost:5000/app"),
            "localhost:5000/app:latest"
        );
        assert_eq!(
            normalise_image("busybox@sha256:ab"),
            "docker.io/library/busybox@sha256:ab"
        );
    }

    #[test]
    fn pod_container_gets_command_env_mounts_and_capabilities() {
        let pod = json!({
            "kind": "Pod",
            "spec": {"containers": [{
                "name": "app",
                "image": "busybox:1.36",
                "command": ["sh", "-c"],
                "args": ["sleep 1"],
                "env": [{"name": "MODE", "value": "prod"},
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg", "readOnly": true}],
                "securityContext": {"capabilities": {"drop": ["NET_RAW"], "add": ["SYS_TIME"]},
                                    "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true}
            }], "securityContext": {"runAsUser": 1000}}
        });

        let derived = from_kubernetes(&pod).unwrap();

        let app = &derived.containers[0];
        assert_eq!(
            app.images,
            ["busybox:1.36", "docker.io/library/busybox:1.36"]
        );
        assert_eq!(app.args.as_deref().unwrap(), ["sh", "-c", "sleep 1"]);
        assert_eq!(app.env, ["MODE=prod"]);
        assert!(app.env_extra_names.contains(&"^TOKEN$".to_owned()));
        assert_eq!(app.mounts, [AllowedMount::volume("/cfg", true)]);
        assert!(app.capabilities.contains(&"CAP_SYS_TIME".to_owned()));
        assert!(!app.capabilities.contains(&"CAP_NET_RAW".to_owned()));
        assert_eq!(app.uid, Some(1000));
        assert!(app.read_only_root && app.no_new_privileges);
        assert!(derived.warnings.is_empty(), "{:?}", derived.warnings);
        assert!(!derived.privileged);
    }

    #[test]
    fn deployment_template_is_read_and_missing_command_warns() {
        let deployment = json!({
            "kind": "Deployment",
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
        });

        let derived = from_kubernetes(&deployment).unwrap();

        assert_eq!(derived.containers[0].args, None);
        assert!(derived.warnings[0].contains("no command"));
    }

    #[test]
    fn drop_all_then_add_keeps_only_the_added() {
        let pod = json!({"kind": "Pod", "spec": {"containers": [{
            "name": "a", "image": "x",
            "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}
        }]}});

        let derived = from_kubernetes(&pod).unwrap();

        assert_eq!(derived.containers[0].capabilities, ["CAP_NET_BIND_SERVICE"]);
    }

    #[test]
    fn hostname_is_the_pods_own_or_a_pattern_for_generated_names() {
        let pod = |spec: Value| json!({"kind": "Pod", "metadata": {"name": "web"}, "spec": spec});
        let containers = json!([{"name": "a", "image": "x"}]);
        let hostname = |m: Value| from_kubernetes(&m).unwrap().hostname;

        assert_eq!(hostname(pod(json!({"containers": containers}))), "^web$");
        assert_eq!(
            hostname(pod(json!({"containers": containers, "hostname": "db.0"}))),
            "^db\\.0$"
        );
        assert_eq!(
            hostname(json!({"kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"template": {"spec": {"containers": containers}}}})),
            ANY_POD_HOSTNAME
        );
        assert_eq!(
            hostname(pod(json!({"containers": containers, "hostNetwork": true}))),
            ANY_HOSTNAME
        );
        assert_eq!(
            kubelet_hostname(&format!("{}-b", "a".repeat(62))),
            "a".repeat(62)
        );
    }

    #[test]
    fn pod_settings_shape_namespaces_sysctls_and_seccomp() {
        let pod = json!({"kind": "Pod", "spec": {
        "hostNetwork": true, "hostPID": true,
        "securityContext": {"sysctls": [{"name": "kernel.shm_rmid_forced", "value": "1"}],
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "a", "image": "x"},
            {"name": "b", "image": "x",
             "securityContext": {"seccompProfile": {"type": "Unconfined"}}}
        ]}});

        let derived = from_kubernetes(&pod).unwrap();
        let settings = derived.pod.unwrap();
        let pause = pause_container(&["/pause".to_owned()], &settings);

        let kinds = |c: &AllowedContainer| c.namespaces.keys().cloned().collect::<Vec<_>>();
        assert_eq!(kinds(&pause), ["cgroup", "ipc", "mount"]);
        assert_eq!(derived.containers[0].namespaces["pid"], NamespaceRule::Join);
        assert_eq!(derived.containers[0].namespaces["ipc"], NamespaceRule::Join);
        // hostNetwork: no containerd sysctls.
        assert_eq!(
            pause.sysctls.into_iter().collect::<Vec<_>>(),
            [("kernel.shm_rmid_forced".to_owned(), "1".to_owned())]
        );
        assert_eq!(pause.seccomp, SeccompRule::RuntimeDefault);
        assert_eq!(derived.containers[0].seccomp, SeccompRule::RuntimeDefault);
        assert_eq!(derived.containers[1].seccomp, SeccompRule::Any);
    }

    #[test]
    fn plain_pod_sandbox_gets_its_own_namespaces_and_containerds_sysctls() {
        let pod = json!({"kind": "Pod", "spec": {"containers": [{"name": "a", "image": "x"}]}});

        let derived = from_kubernetes(&pod).unwrap();
        let pause = pause_container(&["/pause".to_owned()], derived.pod.as_ref().unwrap());

        assert_eq!(pause.namespaces["pid"], NamespaceRule::New);
        assert_eq!(pause.namespaces["uts"], NamespaceRule::New);
        assert_eq!(derived.containers[0].namespaces["pid"], NamespaceRule::New);
        assert!(!derived.containers[0].namespaces.contains_key("network"));
        assert_eq!(pause.sysctls.len(), CONTAINERD_SANDBOX_SYSCTLS.len());
        assert!(derived.containers[0].sysctls.is_empty());
    }

    #[test]
    fn config_json_pins_its_namespaces_sysctls_device_rules_and_seccomp() {
        let spec = json!({
            "process": {"args": ["sh"]},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/7/ns/ipc"},
                               {"type": "network", "path": "/var/run/netns/x"}, {"type": "cgroup"}],
                "sysctl": {"net.ipv4.ip_forward": "1"},
                "resources": {"devices": [{"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}]},
                "seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
                            "syscalls": [{"names": ["reboot"], "action": "SCMP_ACT_ERRNO"}]},
                "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]
            }
        });

        let derived = from_oci(&spec).unwrap();
        let c = &derived.containers[0];

        assert_eq!(
            c.namespaces
                .iter()
                .map(|(k, r)| (k.as_str(), *r))
                .collect::<Vec<_>>(),
            [
                ("cgroup", NamespaceRule::NewOrAbsent),
                ("ipc", NamespaceRule::Join),
                ("pid", NamespaceRule::New)
            ]
        );
        assert_eq!(c.sysctls["net.ipv4.ip_forward"], "1");
        assert_eq!(
            c.device_rules,
            [DeviceCgroupRule {
                allow: true,
                kind: "c".into(),
                major: 10,
                minor: 200,
                access: "rwm".into()
            }]
        );
        assert_eq!(c.seccomp, SeccompRule::Localhost);
        let no_op = json!({"defaultAction": "SCMP_ACT_ALLOW"});
        assert!(!seccomp_refuses_something(&no_op));
    }

    #[test]
    fn manifest_without_pod_spec_is_refused_naming_its_kind() {
        let err = from_kubernetes(&json!({"kind": "Service", "spec": {}})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest of kind \"Service\" has no pod spec"
        );
    }
}
