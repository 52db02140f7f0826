//! OCI runtime spec → [`CreatePlan`] / [`ProcessPlan`]: every field is
//! validated here, in the agent, so a bad spec fails the RPC with a message
//! naming the field before any process exists.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::names::{capability_number, mount_option, rlimit_number, MountOption};
use super::plan::{
    CapabilityPlan, CreatePlan, DevicePlan, MountPlan, NamespaceKind, ProcessPlan, RlimitPlan,
};
use super::rootfs_path::{check_spec_path, resolve_in_rootfs, RootfsPathError};
use super::seccomp::{self, SeccompError};

/// Errors in a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("oci_spec_json is not a valid OCI runtime spec: {0}")]
    Malformed(serde_json::Error),
    #[error("process_json is not a valid OCI process: {0}")]
    MalformedProcess(serde_json::Error),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Path(#[from] RootfsPathError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses the spec JSON of a CreateContainer request.
pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    serde_json::from_slice(json).map_err(|e| {
        // serde's message has a line and column but no field; name the
        // field for the device rules, whose letters are easy to get wrong.
        serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| {
                super::device_rules::explain_malformed(
                    "linux.resources.devices",
                    v.pointer("/linux/resources/devices"),
                )
            })
            .unwrap_or(SpecError::Malformed(e))
    })
}

/// Parses the process JSON of an ExecProcess request.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    serde_json::from_slice(json).map_err(SpecError::MalformedProcess)
}

/// The devices every container gets, as runc creates them.
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// A device node number: Linux has 12 bits of major and 20 of minor, and
/// the device program compares exactly these.
fn device_number(index: usize, name: &str, value: i64, max: u32) -> Result<u64, SpecError> {
    u64::try_from(value)
        .ok()
        .filter(|v| *v <= u64::from(max))
        .ok_or_else(|| {
            invalid(
                format!("linux.devices[{index}].{name}"),
                format!("{value} is out of range (0..={max})"),
            )
        })
}

/// Builds the plan for a new container whose rootfs is `rootfs`.
pub fn plan_container(spec: &Spec, rootfs: &Path) -> Result<CreatePlan, SpecError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or(SpecError::Missing("process"))?;
    let linux = spec.linux().as_ref().ok_or(SpecError::Missing("linux"))?;

    let mut new_namespaces = Vec::new();
    let mut join_namespaces = Vec::new();
    for (i, ns) in linux.namespaces().iter().flatten().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let kind = match ns.typ() {
            LinuxNamespaceType::Mount => NamespaceKind::Mount,
            LinuxNamespaceType::Pid => NamespaceKind::Pid,
            LinuxNamespaceType::Network => NamespaceKind::Network,
            LinuxNamespaceType::Ipc => NamespaceKind::Ipc,
            LinuxNamespaceType::Uts => NamespaceKind::Uts,
            LinuxNamespaceType::Cgroup => NamespaceKind::Cgroup,
            other => {
                return Err(invalid(
                    format!("{field}.type"),
                    format!("{other:?} namespaces are not supported"),
                ))
            }
        };
        if new_namespaces.contains(&kind) || join_namespaces.iter().any(|(k, _)| *k == kind) {
            return Err(invalid(field, format!("{kind:?} namespace listed twice")));
        }
        match ns.path() {
            None => new_namespaces.push(kind),
            Some(_) if matches!(kind, NamespaceKind::Pid | NamespaceKind::Mount) => {
                return Err(invalid(
                    format!("{field}.path"),
                    format!("joining an existing {kind:?} namespace by path is not supported"),
                ))
            }
            Some(path) => join_namespaces.push((kind, path.clone())),
        }
    }
    if !new_namespaces.contains(&NamespaceKind::Mount) {
        return Err(invalid(
            "linux.namespaces",
            "a new mount namespace is required (the rootfs is set up with pivot_root)",
        ));
    }

    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if hostname.is_some() && !new_namespaces.contains(&NamespaceKind::Uts) {
        return Err(invalid(
            "hostname",
            "setting a hostname needs a new uts namespace",
        ));
    }

    let mut mounts = Vec::new();
    for (i, mount) in spec.mounts().iter().flatten().enumerate() {
        mounts.push(plan_mount(rootfs, i, mount)?);
    }

    let mut devices = Vec::new();
    for (i, device) in linux.devices().iter().flatten().enumerate() {
        let field = format!("linux.devices[{i}].path");
        let path = device.path().to_string_lossy().into_owned();
        check_spec_path(&field, &path)?;
        let kind = match device.typ() {
            oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U => {
                libc::S_IFCHR
            }
            oci_spec::runtime::LinuxDeviceType::B => libc::S_IFBLK,
            oci_spec::runtime::LinuxDeviceType::P => libc::S_IFIFO,
            oci_spec::runtime::LinuxDeviceType::A => {
                return Err(invalid(
                    format!("linux.devices[{i}].type"),
                    "type 'a' is only valid in device cgroup rules",
                ))
            }
        };
        devices.push(DevicePlan {
            target: resolve_in_rootfs(rootfs, &path, &field)?,
            mode: kind | device.file_mode().unwrap_or(0o666),
            major: device_number(i, "major", device.major(), crate::device_filter::MAX_MAJOR)?,
            minor: device_number(i, "minor", device.minor(), crate::device_filter::MAX_MINOR)?,
            uid: device.uid().unwrap_or(0),
            gid: device.gid().unwrap_or(0),
        });
    }
    for (path, major, minor) in DEFAULT_DEVICES {
        let target = resolve_in_rootfs(rootfs, path, "default device")?;
        if devices.iter().all(|d| d.target != target) {
            devices.push(DevicePlan {
                target,
                mode: libc::S_IFCHR | 0o666,
                major,
                minor,
                uid: 0,
                gid: 0,
            });
        }
    }

    let mut masked_paths = Vec::new();
    for (i, path) in linux.masked_paths().iter().flatten().enumerate() {
        check_spec_path(&format!("linux.maskedPaths[{i}]"), path)?;
        masked_paths.push(path.clone());
    }
    let mut readonly_paths = Vec::new();
    for (i, path) in linux.readonly_paths().iter().flatten().enumerate() {
        check_spec_path(&format!("linux.readonlyPaths[{i}]"), path)?;
        readonly_paths.push(path.clone());
    }

    let mut sysctls = Vec::new();
    for (key, value) in linux.sysctl().iter().flatten() {
        if key.is_empty() || key.contains('/') || key.contains("..") {
            return Err(invalid(format!("linux.sysctl[{key:?}]"), "invalid key"));
        }
        sysctls.push((key.replace('.', "/"), value.clone()));
    }
    sysctls.sort();

    let rootfs_propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") => libc::MS_SLAVE | libc::MS_REC,
        Some(p) => match mount_option(p) {
            Some(MountOption::Propagation(flags)) => flags,
            _ => {
                return Err(invalid(
                    "linux.rootfsPropagation",
                    format!("unknown propagation {p:?}"),
                ))
            }
        },
    };

    if let Some(resources) = linux.resources() {
        super::resources::validate(resources)?;
    }

    let mut process_plan = plan_process(process, rootfs, "process")?;
    if let Some(seccomp_profile) = linux.seccomp() {
        process_plan.seccomp = Some(seccomp::compile(seccomp_profile)?);
    }

    Ok(CreatePlan {
        rootfs: rootfs.to_path_buf(),
        readonly_rootfs: spec
            .root()
            .as_ref()
            .is_some_and(|r| r.readonly().unwrap_or(false)),
        rootfs_propagation,
        new_namespaces,
        join_namespaces,
        hostname,
        mounts,
        devices,
        masked_paths,
        readonly_paths,
        sysctls,
        process: process_plan,
    })
}

fn plan_mount(
    rootfs: &Path,
    index: usize,
    mount: &oci_spec::runtime::Mount,
) -> Result<MountPlan, SpecError> {
    let field = format!("mounts[{index}].destination");
    let destination = mount.destination().to_string_lossy().into_owned();
    let target = resolve_in_rootfs(rootfs, &destination, &field)?;
    let mut flags = 0u64;
    let mut bind_flags = 0u64;
    let mut propagation = Vec::new();
    let mut data = Vec::new();
    for option in mount.options().iter().flatten() {
        match mount_option(option) {
            Some(MountOption::Set(f)) => flags |= f,
            Some(MountOption::Clear(f)) => flags &= !f,
            Some(MountOption::Propagation(f)) => propagation.push(f),
            Some(MountOption::Bind { recursive }) => {
                bind_flags = libc::MS_BIND;
                if recursive {
                    bind_flags |= libc::MS_REC;
                }
            }
            None => data.push(option.as_str()),
        }
    }
    let mut fstype = mount.typ().clone().filter(|t| !t.is_empty());
    if fstype.as_deref() == Some("bind") {
        if bind_flags == 0 {
            bind_flags = libc::MS_BIND;
        }
        fstype = None;
    }
    // cgroup v1 mounts in specs become cgroup2: the guest has only v2.
    if fstype.as_deref() == Some("cgroup") {
        fstype = Some("cgroup2".to_owned());
        data.clear();
    }
    if bind_flags == 0 && fstype.is_none() {
        return Err(invalid(
            format!("mounts[{index}].type"),
            "missing (and the options do not say bind)",
        ));
    }
    let source = mount
        .source()
        .as_ref()
        .map(|s| s.to_string_lossy().into_owned());
    if bind_flags != 0 {
        let Some(src) = source.as_deref() else {
            return Err(invalid(
                format!("mounts[{index}].source"),
                "a bind mount needs a source",
            ));
        };
        if !src.starts_with('/') {
            return Err(invalid(
                format!("mounts[{index}].source"),
                format!("bind source {src:?} is not absolute"),
            ));
        }
    }
    Ok(MountPlan {
        target,
        destination,
        source,
        fstype,
        flags,
        bind_flags,
        propagation,
        data: data.join(","),
    })
}

/// Builds the plan of one process (`field` prefixes error messages).
pub fn plan_process(
    process: &Process,
    rootfs: &Path,
    field: &str,
) -> Result<ProcessPlan, SpecError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(invalid(format!("{field}.args"), "empty: nothing to run"));
    }
    let cwd = process.cwd().to_string_lossy().into_owned();
    check_spec_path(&format!("{field}.cwd"), &cwd)?;

    let mut env = process.env().clone().unwrap_or_default();
    for (i, entry) in env.iter().enumerate() {
        if !entry.contains('=') || entry.contains('\0') {
            return Err(invalid(
                format!("{field}.env[{i}]"),
                format!("{entry:?} is not KEY=VALUE"),
            ));
        }
    }
    let user = process.user();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(rootfs, user.uid())));
    }

    let mut capabilities = CapabilityPlan::default();
    if let Some(caps) = process.capabilities() {
        let sets = [
            ("bounding", caps.bounding(), &mut capabilities.bounding),
            ("effective", caps.effective(), &mut capabilities.effective),
            ("permitted", caps.permitted(), &mut capabilities.permitted),
            (
                "inheritable",
                caps.inheritable(),
                &mut capabilities.inheritable,
            ),
            ("ambient", caps.ambient(), &mut capabilities.ambient),
        ];
        for (name, set, out) in sets {
            for cap in set.iter().flatten() {
                let cap_name = serde_json::to_value(cap)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let number = capability_number(&cap_name).ok_or_else(|| {
                    invalid(
                        format!("{field}.capabilities.{name}"),
                        format!("unknown capability {cap_name:?}"),
                    )
                })?;
                out.push(number);
            }
            out.sort_unstable();
        }
    }

    let mut rlimits = Vec::new();
    for (i, rlimit) in process.rlimits().iter().flatten().enumerate() {
        let name = serde_json::to_value(rlimit.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let resource = rlimit_number(&name).ok_or_else(|| {
            invalid(
                format!("{field}.rlimits[{i}].type"),
                format!("unknown rlimit {name:?}"),
            )
        })?;
        if rlimit.soft() > rlimit.hard() {
            return Err(invalid(
                format!("{field}.rlimits[{i}]"),
                format!("soft {} is above hard {}", rlimit.soft(), rlimit.hard()),
            ));
        }
        rlimits.push(RlimitPlan {
            resource,
            soft: rlimit.soft(),
            hard: rlimit.hard(),
        });
    }

    if let Some(adj) = process.oom_score_adj() {
        if !(-1000..=1000).contains(&adj) {
            return Err(invalid(
                format!("{field}.oomScoreAdj"),
                format!("{adj} is outside -1000..=1000"),
            ));
        }
    }

    Ok(ProcessPlan {
        args,
        env,
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        capabilities,
        rlimits,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        terminal: process.terminal().unwrap_or(false),
        oom_score_adj: process.oom_score_adj(),
        seccomp: None,
    })
}

/// The home directory of `uid` from the container's own /etc/passwd (never
/// through NSS: the agent is static and the rootfs is not the agent's).
fn home_of(rootfs: &Path, uid: u32) -> String {
    let passwd = rootfs.join("etc/passwd");
    let Ok(meta) = std::fs::symlink_metadata(&passwd) else {
        return "/".to_owned();
    };
    if !meta.is_file() || meta.len() > 4 << 20 {
        return "/".to_owned();
    }
    let text = std::fs::read_to_string(&passwd).unwrap_or_default();
    home_from_passwd(&text, uid).unwrap_or_else(|| "/".to_owned())
}

/// Finds `uid`'s home in passwd(5) text.
pub fn home_from_passwd(text: &str, uid: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[2].parse::<u32>().ok()? != uid || fields[5].is_empty() {
            return None;
        }
        Some(fields[5].to_owned())
    })
}

/// The rootfs directory of a CreateContainer request (directory source).
pub fn check_rootfs_directory(path: &str) -> Result<PathBuf, SpecError> {
    check_spec_path("rootfs.directory", path)?;
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid("rootfs.directory", format!("{path:?}: {e}")))?;
    if !meta.is_dir() {
        return Err(invalid(
            "rootfs.directory",
            format!("{path:?} is not a directory"),
        ));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({
            "ociVersion": "1.1.0",
            "process": {
                "args": ["sh"], "cwd": "/", "env": ["PATH=/bin"],
                "user": { "uid": 1000, "gid": 1000 },
                "capabilities": { "bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"] },
                "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 100, "soft": 10 }]
            },
            "linux": { "namespaces": [{ "type": "mount" }, { "type": "pid" }] }
        })
    }

    fn plan(value: serde_json::Value) -> Result<CreatePlan, SpecError> {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "u:x:1000:1000::/home/u:/bin/sh\n",
        )
        .unwrap();
        plan_container(&parse_spec(value.to_string().as_bytes())?, root.path())
    }

    fn error_of(value: serde_json::Value) -> String {
        plan(value).unwrap_err().to_string()
    }

    #[test]
    fn valid_spec_translates_process_fields() {
        let plan = plan(base()).unwrap();
        assert_eq!(plan.process.uid, 1000);
        assert_eq!(plan.process.capabilities.bounding, vec![0, 5]);
        assert_eq!(plan.process.capabilities.effective, vec![5]);
        assert_eq!(plan.process.rlimits[0].resource, libc::RLIMIT_NOFILE);
        assert!(plan.process.env.contains(&"HOME=/home/u".to_owned()));
        assert_eq!(
            plan.new_namespaces,
            vec![NamespaceKind::Mount, NamespaceKind::Pid]
        );
        // The six default devices.
        assert_eq!(plan.devices.len(), 6);
    }

    #[test]
    fn spec_without_mount_namespace_returns_error() {
        let mut s = base();
        s["linux"]["namespaces"] = json!([{ "type": "pid" }]);
        assert!(error_of(s).contains("linux.namespaces"));
    }

    #[test]
    fn user_namespace_returns_error_naming_field() {
        let mut s = base();
        s["linux"]["namespaces"] = json!([{ "type": "mount" }, { "type": "user" }]);
        assert!(error_of(s).contains("linux.namespaces[1].type"));
    }

    #[test]
    fn joining_pid_namespace_by_path_returns_error() {
        let mut s = base();
        s["linux"]["namespaces"] =
            json!([{ "type": "mount" }, { "type": "pid", "path": "/proc/1/ns/pid" }]);
        assert!(error_of(s).contains("linux.namespaces[1].path"));
    }

    #[test]
    fn hostname_without_uts_namespace_returns_error() {
        let mut s = base();
        s["hostname"] = json!("box");
        assert!(error_of(s).contains("hostname"));
    }

    #[test]
    fn soft_rlimit_above_hard_returns_error() {
        let mut s = base();
        s["process"]["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": 1, "soft": 2 }]);
        assert!(error_of(s).contains("process.rlimits[0]"));
    }

    #[test]
    fn env_entry_without_equals_returns_error() {
        let mut s = base();
        s["process"]["env"] = json!(["PATH=/bin", "JUSTAKEY"]);
        assert!(error_of(s).contains("process.env[1]"));
    }

    #[test]
    fn bind_mount_with_relative_source_returns_error() {
        let mut s = base();
        s["mounts"] =
            json!([{ "destination": "/x", "type": "bind", "source": "rel", "options": ["rbind"] }]);
        assert!(error_of(s).contains("mounts[0].source"));
    }

    #[test]
    fn mount_without_type_or_bind_returns_error() {
        let mut s = base();
        s["mounts"] = json!([{ "destination": "/x", "source": "none" }]);
        assert!(error_of(s).contains("mounts[0].type"));
    }

    #[test]
    fn sysctl_key_with_slash_returns_error() {
        let mut s = base();
        s["linux"]["sysctl"] = json!({ "net/../../x": "1" });
        assert!(error_of(s).contains("linux.sysctl"));
    }

    #[test]
    fn unknown_rootfs_propagation_returns_error() {
        let mut s = base();
        s["linux"]["rootfsPropagation"] = json!("sideways");
        assert!(error_of(s).contains("linux.rootfsPropagation"));
    }

    #[test]
    fn device_type_a_returns_error() {
        let mut s = base();
        s["linux"]["devices"] = json!([{ "path": "/dev/x", "type": "a", "major": 1, "minor": 1 }]);
        assert!(error_of(s).contains("linux.devices[0].type"));
    }

    #[test]
    fn device_number_out_of_range_returns_error_naming_field() {
        let mut s = base();
        s["linux"]["devices"] =
            json!([{ "path": "/dev/x", "type": "c", "major": 4096, "minor": 1 }]);
        let err = error_of(s);
        assert!(
            err.contains("linux.devices[0].major") && err.contains("4096"),
            "{err}"
        );
        let mut s = base();
        s["linux"]["devices"] = json!([{ "path": "/dev/x", "type": "c", "major": 1, "minor": -1 }]);
        assert!(error_of(s).contains("linux.devices[0].minor"));
    }

    #[test]
    fn cgroup_v1_mount_becomes_cgroup2() {
        let mut s = base();
        s["mounts"] = json!([{ "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro", "nosuid"] }]);
        let plan = plan(s).unwrap();
        assert_eq!(plan.mounts[0].fstype.as_deref(), Some("cgroup2"));
    }

    #[test]
    fn malformed_json_returns_error_naming_oci_spec_json() {
        let err = parse_spec(b"{\"ociVersion\": ").unwrap_err();
        assert!(err.to_string().starts_with("oci_spec_json"));
    }

    #[test]
    fn unknown_device_rule_type_returns_error_naming_field_and_letter() {
        let json = br#"{"ociVersion": "1.1.0", "linux": {"resources": {"devices": [
            {"allow": false, "access": "rwm"}, {"allow": true, "type": "k", "access": "r"}]}}}"#;
        let err = parse_spec(json).unwrap_err().to_string();
        assert!(err.contains("linux.resources.devices[1].type"), "{err}");
        assert!(err.contains("\"k\""), "{err}");
    }

    #[test]
    fn home_comes_from_passwd_of_uid() {
        let text = "root:x:0:0:root:/root:/bin/sh\nbad line\nu:x:1000:1000::/home/u:/bin/sh\n";
        assert_eq!(home_from_passwd(text, 1000).as_deref(), Some("/home/u"));
        assert_eq!(home_from_passwd(text, 5), None);
    }
}
