//! `policy_data`: what a generated policy allows, as the document the
//! fixed rules (`rules.rego`) read.

use std::collections::BTreeMap;

use serde::Serialize;

use super::PolicyGenError;
use crate::sandbox::GUEST_SHARED_DIR;

/// containerd's default capability set (what a container gets unless the
/// manifest adds or drops some): the baseline inspection measures against.
pub use crate::inspect::DEFAULT_CAPABILITIES;

/// Every capability Linux 6.x knows (a privileged container has them all).
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Variables a runtime or Kubernetes adds to every container, by name.
pub const DEFAULT_ENV_NAMES: [&str; 3] = [
    "^(PATH|HOSTNAME|HOME|TERM)$",
    "^KUBERNETES_[A-Z0-9_]+$",
    // Service links: FOO_SERVICE_HOST, FOO_PORT_80_TCP_ADDR, …
    "^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT|PORT)(_[A-Z0-9_]+)?$",
];

/// One mount a container may have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedMount {
    pub destination: String,
    /// The OCI mount types accepted.
    pub types: Vec<String>,
    /// Regular expression the whole source must match.
    pub source: String,
    /// Options the mount must carry (e.g. "ro").
    pub required_options: Vec<String>,
}

impl AllowedMount {
    fn new(destination: &str, types: &[&str], source: String, required: &[&str]) -> Self {
        AllowedMount {
            destination: destination.to_owned(),
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            source,
            required_options: required.iter().map(|o| (*o).to_owned()).collect(),
        }
    }

    /// A pod volume: a share below the guest's shared folder, or tmpfs.
    pub fn volume(destination: &str, read_only: bool) -> Self {
        let required: &[&str] = if read_only { &["ro"] } else { &[] };
        AllowedMount::new(
            destination,
            &["bind", "none", "tmpfs"],
            format!("^({}/.+|tmpfs)$", regex_escape(GUEST_SHARED_DIR)),
            required,
        )
    }

    /// Exactly this mount (from an OCI config.json).
    pub fn exact(destination: &str, kind: &str, source: &str, options: &[String]) -> Self {
        AllowedMount {
            destination: destination.to_owned(),
            types: vec![kind.to_owned()],
            source: format!("^{}$", regex_escape(source)),
            required_options: options.to_vec(),
        }
    }
}

/// The mounts containerd and the kubelet give every container.
pub fn default_mounts() -> Vec<AllowedMount> {
    let shared = format!("^{}/.+$", regex_escape(GUEST_SHARED_DIR));
    let fixed = |s: &str| format!("^{}$", regex_escape(s));
    let bind = ["bind", "none"];
    vec![
        AllowedMount::new("/proc", &["proc"], fixed("proc"), &[]),
        AllowedMount::new("/dev", &["tmpfs"], fixed("tmpfs"), &[]),
        AllowedMount::new("/dev/pts", &["devpts"], fixed("devpts"), &[]),
        AllowedMount::new(
            "/dev/shm",
            &["tmpfs", "bind", "none"],
            format!("^(shm|{}/.+)$", regex_escape(GUEST_SHARED_DIR)),
            &[],
        ),
        AllowedMount::new("/dev/mqueue", &["mqueue"], fixed("mqueue"), &[]),
        AllowedMount::new("/sys", &["sysfs"], fixed("sysfs"), &["ro"]),
        AllowedMount::new(
            "/sys/fs/cgroup",
            &["cgroup", "cgroup2"],
            "^cgroup2?$".into(),
            &["ro"],
        ),
        AllowedMount::new("/etc/hosts", &bind, shared.clone(), &[]),
        AllowedMount::new("/etc/hostname", &bind, shared.clone(), &[]),
        AllowedMount::new("/etc/resolv.conf", &bind, shared.clone(), &[]),
        AllowedMount::new("/dev/termination-log", &bind, shared.clone(), &[]),
        AllowedMount::new(
            "/var/run/secrets/kubernetes.io/serviceaccount",
            &bind,
            shared,
            &["ro"],
        ),
    ]
}

/// One kind of container the pod may create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedContainer {
    /// The manifest's container name (for people reading the policy).
    pub name: String,
    /// The CRI sandbox (pause) container.
    pub sandbox: bool,
    /// Image references accepted (empty: any).
    pub images: Vec<String>,
    /// The exact process.args (None: any, the manifest left it to the image).
    pub args: Option<Vec<String>>,
    /// `NAME=VALUE` entries that must be present, unchanged.
    pub env: Vec<String>,
    /// Regular expressions of further variable names accepted.
    pub env_extra_names: Vec<String>,
    /// Mounts besides the default ones.
    pub mounts: Vec<AllowedMount>,
    /// Capabilities any of the process's sets may hold.
    pub capabilities: Vec<String>,
    /// The process's uid (None: any, the image decides).
    pub uid: Option<u32>,
    /// The root file system must be mounted read-only.
    pub read_only_root: bool,
    /// The process must run with no_new_privs.
    pub no_new_privileges: bool,
    /// linux.namespaces by type; a type not listed must be absent.
    pub namespaces: BTreeMap<String, NamespaceRule>,
    /// linux.sysctl entries the spec may carry, with their values.
    pub sysctls: BTreeMap<String, String>,
    /// Device cgroup rules (linux.resources.devices) besides
    /// `policy_data.default_device_rules`.
    pub device_rules: Vec<DeviceCgroupRule>,
    /// What linux.seccomp must be.
    pub seccomp: SeccompRule,
}

/// What one kind of namespace in linux.namespaces must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceRule {
    /// Present, without a path: the container's own.
    New,
    /// Present, with a path `/proc/<pid>/ns/<kind>`: the pod's sandbox
    /// container's (CRI names it by the sandbox's guest pid). The rules
    /// check that `<pid>` is the sandbox container's init by the agent's
    /// `namespace_owners`, not by the path's form alone.
    Join,
    /// A new one or none (containerd adds a cgroup namespace on cgroup v2
    /// hosts only).
    NewOrAbsent,
}

/// One device cgroup rule, as the rules compare it: OCI's
/// `LinuxDeviceCgroup` with its defaults filled in (type `a`, `-1` for a
/// wildcard number).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DeviceCgroupRule {
    pub allow: bool,
    #[serde(rename = "type")]
    pub kind: String,
    pub major: i64,
    pub minor: i64,
    pub access: String,
}

impl DeviceCgroupRule {
    fn new(allow: bool, kind: &str, major: i64, minor: i64, access: &str) -> Self {
        DeviceCgroupRule {
            allow,
            kind: kind.to_owned(),
            major,
            minor,
            access: access.to_owned(),
        }
    }

    /// A rule of an OCI spec (None when it is not one).
    pub fn from_oci(rule: &serde_json::Value) -> Option<Self> {
        let number = |key: &str| match rule.get(key) {
            None | Some(serde_json::Value::Null) => Some(-1),
            Some(n) => n.as_i64(),
        };
        Some(DeviceCgroupRule {
            allow: rule.get("allow")?.as_bool()?,
            kind: rule
                .get("type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("a")
                .to_owned(),
            major: number("major")?,
            minor: number("minor")?,
            access: rule
                .get("access")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }
}

/// The device cgroup rules any container may carry: containerd's deny-all
/// (all CRI sends for a container that asks for no device) and allow
/// rules for what the agent gives every container anyway (its
/// `DEFAULT_ALLOWED`, after runc: mknod, /dev/null, zero, full, random,
/// urandom, tty, console, ptmx, the pts; as runtimes that spell the
/// defaults out write them). They grant nothing a container does not
/// already have.
pub fn default_device_rules() -> Vec<DeviceCgroupRule> {
    let mut rules = vec![
        DeviceCgroupRule::new(false, "a", -1, -1, "rwm"),
        DeviceCgroupRule::new(true, "c", -1, -1, "m"),
        DeviceCgroupRule::new(true, "b", -1, -1, "m"),
        DeviceCgroupRule::new(true, "c", 136, -1, "rwm"),
    ];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        rules.push(DeviceCgroupRule::new(true, "c", major, minor, "rwm"));
    }
    rules
}

/// What a container's linux.seccomp must be, from the manifest's
/// `seccompProfile` (the container's, else the pod's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompRule {
    /// Unconfined, or not said (kubelet's default depends on its
    /// `--seccomp-default`): any profile or none.
    #[default]
    Any,
    /// RuntimeDefault: a profile whose default action refuses (the
    /// runtime's default profile allows a list and refuses the rest).
    RuntimeDefault,
    /// Localhost: a profile that refuses something (its text is on the
    /// node, not in the manifest).
    Localhost,
}

/// One file system SetupSandbox may mount in the guest, in the shape of
/// the agent's input (every field compared exactly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedGuestMount {
    pub fstype: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// The guest's resolver settings SetupSandbox may write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedDns {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// What SetupSandbox may ask of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedSandbox {
    /// Regular expressions for the guest's host name (one must match).
    pub hostnames: Vec<String>,
    /// The only mounts it may make (a subset, each target once).
    pub mounts: Vec<AllowedGuestMount>,
    /// The resolver settings, exactly.
    pub dns: AllowedDns,
    /// Guest-wide sysctls it may set, with their values.
    pub sysctls: BTreeMap<String, String>,
}

impl AllowedSandbox {
    /// Exactly what the shim's SetupSandbox carries
    /// ([`crate::sandbox::setup_request`]: the shared folder, no DNS, no
    /// sysctls), with host names matching `hostnames`. A confidential pod
    /// that shares nothing sends no mount, which this allows too.
    pub fn as_the_shim_sends(hostnames: Vec<String>) -> Self {
        let request = crate::sandbox::setup_request("");
        let dns = request.dns.clone().unwrap_or_default();
        AllowedSandbox {
            hostnames,
            mounts: request
                .mounts
                .iter()
                .map(|m| AllowedGuestMount {
                    fstype: m.fstype.clone(),
                    source: m.source.clone(),
                    target: m.target.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            dns: AllowedDns {
                nameservers: dns.nameservers,
                searches: dns.searches,
                options: dns.options,
            },
            sysctls: request.sysctls.into_iter().collect(),
        }
    }
}

/// A user an exec may run as in any container besides the container's
/// own (`--exec-user UID[:GID]`; the gid defaults to the uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExecUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for ExecUser {
    type Err = PolicyGenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || PolicyGenError::ExecUser {
            value: text.to_owned(),
        };
        let (uid, gid) = text.split_once(':').unwrap_or((text, text));
        Ok(ExecUser {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        })
    }
}

/// The OCI linux.resources fields an UpdateContainer may carry: limits,
/// and the device rules only unchanged (the rules check that).
pub const UPDATABLE_RESOURCES: [&str; 6] = [
    "memory",
    "cpu",
    "pids",
    "hugepageLimits",
    "unified",
    "devices",
];

/// cgroup v2 files an update may write through linux.resources.unified:
/// the limits kubelet sets (in-place resize, memory QoS, OOM grouping),
/// never `cgroup.*` files that move or kill processes.
pub const UPDATABLE_CGROUP_FILES: [&str; 15] = [
    "memory.min",
    "memory.low",
    "memory.high",
    "memory.max",
    "memory.swap.max",
    "memory.swap.high",
    "memory.oom.group",
    "cpu.weight",
    "cpu.weight.nice",
    "cpu.max",
    "cpu.max.burst",
    "cpu.idle",
    "cpuset.cpus",
    "cpuset.mems",
    "pids.max",
];

/// What an UpdateContainer may change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedUpdate {
    /// Top-level keys of linux.resources.
    pub resources: Vec<String>,
    /// Keys of linux.resources.unified.
    pub unified_files: Vec<String>,
}

impl Default for AllowedUpdate {
    fn default() -> Self {
        AllowedUpdate {
            resources: UPDATABLE_RESOURCES
                .iter()
                .map(|r| (*r).to_owned())
                .collect(),
            unified_files: UPDATABLE_CGROUP_FILES
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
        }
    }
}

/// The whole `policy_data` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyData {
    pub containers: Vec<AllowedContainer>,
    pub default_mounts: Vec<AllowedMount>,
    pub sandbox: AllowedSandbox,
    pub update: AllowedUpdate,
    /// Each an exact process.args an ExecProcess may run.
    pub exec_commands: Vec<Vec<String>>,
    /// Users an exec may run as besides the container's own.
    pub exec_users: Vec<ExecUser>,
    /// Device paths a container spec may list.
    pub devices: Vec<String>,
    /// Device cgroup rules every container may carry.
    pub default_device_rules: Vec<DeviceCgroupRule>,
    pub allow_privileged: bool,
    /// The host may read stdout/stderr.
    pub allow_stdio_read: bool,
    /// The host may write stdin.
    pub allow_stdin: bool,
}

/// `s` with regular expression metacharacters escaped.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escape_escapes_metacharacters_only() {
        assert_eq!(regex_escape("/run/a.b+c"), "/run/a\\.b\\+c");
        assert_eq!(regex_escape("plain/path"), "plain/path");
    }

    #[test]
    fn exec_user_parses_uid_or_uid_and_gid() {
        assert_eq!(
            "0".parse::<ExecUser>().unwrap(),
            ExecUser { uid: 0, gid: 0 }
        );
        assert_eq!(
            "1000:100".parse::<ExecUser>().unwrap(),
            ExecUser {
                uid: 1000,
                gid: 100
            }
        );
        let err = "root".parse::<ExecUser>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "exec user \"root\" is not UID or UID:GID (numbers)"
        );
    }

    #[test]
    fn sandbox_allows_the_shims_shared_folder_and_nothing_else() {
        let sandbox = AllowedSandbox::as_the_shim_sends(vec!["^web$".into()]);

        assert_eq!(
            sandbox.mounts,
            [AllowedGuestMount {
                fstype: "virtiofs".into(),
                source: crate::sandbox::SHARED_FS_TAG.into(),
                target: GUEST_SHARED_DIR.into(),
                options: Vec::new(),
            }]
        );
        assert!(sandbox.dns.nameservers.is_empty() && sandbox.sysctls.is_empty());
    }

    #[test]
    fn read_only_volume_requires_ro() {
        let m = AllowedMount::volume("/data", true);
        assert_eq!(m.required_options, ["ro"]);
        assert_eq!(m.source, "^(/run/cloister/shared/.+|tmpfs)$");
    }
}
