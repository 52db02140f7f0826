//! The validated, fully resolved description of what the container init
//! helper does. Built from an OCI spec by `spec.rs` in the agent (where
//! errors reach the client), serialized to the helper, applied by
//! `setup.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::seccomp::SeccompPlan;

/// What a helper process is asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelperPlan {
    /// Become the init process of a new container.
    Create(CreatePlan),
    /// Enter a running container and run one more process in it.
    Exec(ExecPlan),
}

/// Linux namespace kinds we create or join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceKind {
    Mount,
    Pid,
    Network,
    Ipc,
    Uts,
    Cgroup,
}

impl NamespaceKind {
    /// The CLONE_NEW* flag.
    pub fn clone_flag(self) -> u64 {
        let flag = match self {
            NamespaceKind::Mount => libc::CLONE_NEWNS,
            NamespaceKind::Pid => libc::CLONE_NEWPID,
            NamespaceKind::Network => libc::CLONE_NEWNET,
            NamespaceKind::Ipc => libc::CLONE_NEWIPC,
            NamespaceKind::Uts => libc::CLONE_NEWUTS,
            NamespaceKind::Cgroup => libc::CLONE_NEWCGROUP,
        };
        u64::from(flag.unsigned_abs())
    }

    /// The file name under /proc/PID/ns/.
    pub fn proc_name(self) -> &'static str {
        match self {
            NamespaceKind::Mount => "mnt",
            NamespaceKind::Pid => "pid",
            NamespaceKind::Network => "net",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Uts => "uts",
            NamespaceKind::Cgroup => "cgroup",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatePlan {
    /// The rootfs directory, as the agent sees it.
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    /// Propagation applied to `/` of the new mount namespace (MS_* bits).
    pub rootfs_propagation: u64,
    /// Namespaces created by clone (their flags are passed to clone3).
    pub new_namespaces: Vec<NamespaceKind>,
    /// Existing namespaces to join by path, in order.
    pub join_namespaces: Vec<(NamespaceKind, PathBuf)>,
    pub hostname: Option<String>,
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    /// Container paths (absolute, checked) masked after pivot_root.
    pub masked_paths: Vec<String>,
    /// Container paths (absolute, checked) made read-only after pivot_root.
    pub readonly_paths: Vec<String>,
    /// (key as a /proc/sys path relative part, value).
    pub sysctls: Vec<(String, String)>,
    pub process: ProcessPlan,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecPlan {
    /// The container's init process, whose namespaces are joined.
    pub init_pid: i32,
    pub namespaces: Vec<NamespaceKind>,
    pub process: ProcessPlan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// Resolved target below the rootfs, as the agent sees it.
    pub target: PathBuf,
    /// The spec's destination, for error messages.
    pub destination: String,
    pub source: Option<String>,
    pub fstype: Option<String>,
    /// MS_* flags without propagation and bind bits.
    pub flags: u64,
    /// MS_BIND (| MS_REC) when this is a bind mount.
    pub bind_flags: u64,
    /// Propagation flags applied after the mount.
    pub propagation: Vec<u64>,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlan {
    /// Path below the rootfs, as the agent sees it.
    pub target: PathBuf,
    /// S_IFCHR, S_IFBLK or S_IFIFO | permission bits.
    pub mode: u32,
    pub major: u64,
    pub minor: u64,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityPlan {
    pub bounding: Vec<u32>,
    pub effective: Vec<u32>,
    pub permitted: Vec<u32>,
    pub inheritable: Vec<u32>,
    pub ambient: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RlimitPlan {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub capabilities: CapabilityPlan,
    pub rlimits: Vec<RlimitPlan>,
    pub no_new_privs: bool,
    pub terminal: bool,
    pub oom_score_adj: Option<i32>,
    pub seccomp: Option<SeccompPlan>,
}
