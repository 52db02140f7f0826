//! The runtime configuration: `/etc/cloister/config.toml`, or the file the
//! runtime option `ConfigPath` (per RuntimeClass) or `CLOISTER_CONFIG` names,
//! and how a pod's annotations size its microVM.
//!
//! Sizing follows the pod, not the first container: the VM gets the
//! configured default vCPUs and memory *plus* what CRI says the pod's
//! containers may use (`io.kubernetes.cri.sandbox-cpu-quota/period`,
//! `io.kubernetes.cri.sandbox-memory`), so a pod that asks for 2 CPUs keeps
//! room for the guest kernel and agent. `io.cloister.*` annotations then
//! replace a value, but only those the config lists in
//! `annotations.allowed`: a pod author must not be able to ask for a 1 TiB VM
//! on a node whose admin did not allow it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cloister_protocol::annotations;
use serde::Deserialize;

/// Where the config lives when nothing else names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cloister/config.toml";
/// Environment variable naming another config file.
pub const CONFIG_ENV: &str = "CLOISTER_CONFIG";

/// CRI annotations on the sandbox container (containerd's `pkg/cri/annotations`).
pub const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const CRI_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
pub const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The guest kernel needs this much to boot with our initramfs.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Upper bounds for the limits themselves (the VMM's own ceilings).
pub const CEILING_VCPUS: u32 = 32;
pub const CEILING_MEMORY_MIB: u32 = 1 << 20;

/// Errors reading or applying the runtime configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config key {key} = {value}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("annotation {key} = {value:?}: {reason}")]
    BadAnnotation {
        key: String,
        value: String,
        reason: String,
    },
    #[error("runtime options: {0}")]
    RuntimeOptions(String),
}

/// Which hypervisor runs the pod's microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// `cloister-vmm`: devices in-process over virtio-mmio.
    #[default]
    Cloister,
    /// QEMU `-M microvm` with our vsock/fs devices over vhost-user.
    Qemu,
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QemuAccel {
    /// KVM when `/dev/kvm` opens, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// `[vmm]`: the cloister-vmm binary and its jail.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmSection {
    pub path: PathBuf,
    /// Run `cloister-vmm` and the vhost-user servers jailed (namespaces,
    /// own root, unprivileged uid, no capabilities, seccomp). `false` is
    /// for development only and logged as a warning at every pod start.
    pub jail: bool,
    /// The uid and gid jailed VMMs run as; they need not exist in
    /// /etc/passwd, but no other process should run as them.
    pub jail_uid: u32,
    pub jail_gid: u32,
    /// How many uid/gid pairs, from `jail_uid`/`jail_gid` on, pods lease:
    /// each jailed pod's VMM gets its own (`crate::jail_ids`), so this is
    /// also how many jailed pods the host runs at once.
    pub jail_id_count: u32,
}

/// The first uid/gid of jailed VMMs: above the ranges systemd hands out
/// on its own (DynamicUser 61184–65519, containers 524288–1879048191),
/// which only skip ids in NSS or their own locks, not ours, and below
/// 2^31, where some tools read ids as signed.
pub const DEFAULT_JAIL_ID: u32 = 2_000_000_000;
/// Pods that can run jailed at once with the default range.
pub const DEFAULT_JAIL_ID_COUNT: u32 = 1024;
/// The most ids a range may hold (Linux's uid space is 32-bit; more
/// than this many VMs on one host is not a real configuration).
pub const MAX_JAIL_ID_COUNT: u32 = 65536;

impl Default for VmmSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/usr/bin/cloister-vmm"),
            jail: true,
            jail_uid: DEFAULT_JAIL_ID,
            jail_gid: DEFAULT_JAIL_ID,
            jail_id_count: DEFAULT_JAIL_ID_COUNT,
        }
    }
}

/// `[qemu]`: the QEMU binary and its accelerator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    pub path: PathBuf,
    pub accel: QemuAccel,
}

impl Default for QemuSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accel: QemuAccel::Auto,
        }
    }
}

/// `[guest]`: what the microVM boots.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSection {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Appended to the command line the hypervisor backend builds.
    pub kernel_params: String,
}

impl Default for GuestSection {
    fn default() -> Self {
        Self {
            kernel: PathBuf::from("/usr/share/cloister/vmlinux"),
            initramfs: PathBuf::from("/usr/share/cloister/initramfs.cpio"),
            kernel_params: String::new(),
        }
    }
}

/// `[resources]`: default size of a pod's VM and the node's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesSection {
    pub default_vcpus: u32,
    pub default_memory_mib: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
}

impl Default for ResourcesSection {
    fn default() -> Self {
        Self {
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
        }
    }
}

/// `[annotations]`: which `io.cloister.*` pod annotations may override the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotationsSection {
    pub allowed: Vec<String>,
}

impl Default for AnnotationsSection {
    fn default() -> Self {
        Self {
            allowed: vec![annotations::VCPUS.into(), annotations::MEMORY_MIB.into()],
        }
    }
}

/// `[agent]`: how long to wait for the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    pub connect_timeout_secs: u64,
}

impl Default for AgentSection {
    fn default() -> Self {
        // TCG guests on nested hosts take seconds to boot.
        Self {
            connect_timeout_secs: 60,
        }
    }
}

/// `[network]`: which pod networks the shim accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Host-network pods share the node's network namespace, which a VM
    /// cannot join: such a pod's guest gets no network at all. Refused
    /// unless this is set.
    pub allow_host_network: bool,
}

/// What the shim does with a container's least-privilege findings at create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InspectionMode {
    /// No inspection.
    Off,
    /// An event and an audit record per container with findings.
    #[default]
    Warn,
    /// Create fails on findings listed in `refuse_on`; others warn.
    Refuse,
}

/// `[inspection]`: least-privilege checks of each container's OCI spec
/// (see [`crate::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InspectionSection {
    pub mode: InspectionMode,
    /// Finding ids that refuse a container in `refuse` mode; an unknown id
    /// fails the config naming it.
    pub refuse_on: Vec<crate::inspect::FindingId>,
}

impl Default for InspectionSection {
    fn default() -> Self {
        use crate::inspect::FindingId;
        Self {
            mode: InspectionMode::Warn,
            refuse_on: vec![FindingId::Privileged, FindingId::HostNamespace],
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub hypervisor: HypervisorKind,
    pub vmm: VmmSection,
    pub qemu: QemuSection,
    pub guest: GuestSection,
    pub resources: ResourcesSection,
    pub annotations: AnnotationsSection,
    pub agent: AgentSection,
    pub network: NetworkSection,
    pub inspection: InspectionSection,
    pub audit: crate::audit::AuditSection,
    pub confidential: crate::confidential::ConfidentialSection,
}

/// Annotations that may appear in `annotations.allowed`.
const OVERRIDABLE: [&str; 4] = [
    annotations::VCPUS,
    annotations::MEMORY_MIB,
    annotations::HYPERVISOR,
    annotations::KERNEL_PARAMS,
];

impl RuntimeConfig {
    /// Parses and validates a config file's text.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: RuntimeConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the file; a missing file is an error only when someone named it.
    pub fn load(source: &ConfigSource) -> Result<Self, ConfigError> {
        let path = source.path();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && source.is_default() => {
                Ok(Self::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Range checks serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.resources;
        check_range("resources.max_vcpus", r.max_vcpus, 1, CEILING_VCPUS)?;
        check_range(
            "resources.max_memory_mib",
            r.max_memory_mib,
            MIN_MEMORY_MIB,
            CEILING_MEMORY_MIB,
        )?;
        check_range("resources.default_vcpus", r.default_vcpus, 1, r.max_vcpus)?;
        check_range(
            "resources.default_memory_mib",
            r.default_memory_mib,
            MIN_MEMORY_MIB,
            r.max_memory_mib,
        )?;
        for name in &self.annotations.allowed {
            if !OVERRIDABLE.contains(&name.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "annotations.allowed",
                    value: name.clone(),
                    reason: format!("not an overridable annotation (one of {OVERRIDABLE:?})"),
                });
            }
        }
        if self.agent.connect_timeout_secs == 0 || self.agent.connect_timeout_secs > 3600 {
            return Err(ConfigError::Invalid {
                key: "agent.connect_timeout_secs",
                value: self.agent.connect_timeout_secs.to_string(),
                reason: "must be between 1 and 3600".into(),
            });
        }
        let count = self.vmm.jail_id_count;
        if count == 0 || count > MAX_JAIL_ID_COUNT {
            return Err(ConfigError::Invalid {
                key: "vmm.jail_id_count",
                value: count.to_string(),
                reason: format!("must be between 1 and {MAX_JAIL_ID_COUNT}"),
            });
        }
        for (key, id) in [
            ("vmm.jail_uid", self.vmm.jail_uid),
            ("vmm.jail_gid", self.vmm.jail_gid),
        ] {
            if self.vmm.jail && id == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    value: id.to_string(),
                    reason: "a jailed VMM must not run as root".into(),
                });
            }
            // u32::MAX is the kernel's "no id" (-1): setuid refuses it.
            if id.checked_add(count).is_none() {
                return Err(ConfigError::Invalid {
                    key,
                    value: id.to_string(),
                    reason: format!(
                        "with vmm.jail_id_count = {count} the range passes the last uid {}",
                        u32::MAX - 1
                    ),
                });
            }
        }
        for (key, path) in [
            ("vmm.path", &self.vmm.path),
            ("qemu.path", &self.qemu.path),
            ("guest.kernel", &self.guest.kernel),
            ("guest.initramfs", &self.guest.initramfs),
            ("audit.path", &self.audit.path),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid {
                    key,
                    value: path.display().to_string(),
                    reason: "must be an absolute path".into(),
                });
            }
        }
        self.confidential.tee_settings(&self.guest.kernel)?;
        self.validate_measured_launch()?;
        Ok(())
    }

    /// An SNP/TDX class: pods may not override what is measured beyond
    /// their size (the kernel command line, the backend), and the keys
    /// the class's backend cannot honour are refused here, when the
    /// config is read, rather than failing every pod.
    fn validate_measured_launch(&self) -> Result<(), ConfigError> {
        use crate::confidential::TeeKind;
        let Some(tee @ (TeeKind::Snp | TeeKind::Tdx)) = self.confidential.tee else {
            return Ok(());
        };
        for key in [annotations::KERNEL_PARAMS, annotations::HYPERVISOR] {
            if self.annotations.allowed.iter().any(|a| a == key) {
                return Err(ConfigError::Invalid {
                    key: "annotations.allowed",
                    value: key.into(),
                    reason: format!(
                        "a {} pod's launch is measured: a per-pod override of it would only fail attestation",
                        tee.as_str()
                    ),
                });
            }
        }
        if self.hypervisor == HypervisorKind::Qemu {
            let qemu_refuses = [
                (
                    "confidential.cpu_signature",
                    self.confidential.cpu_signature.map(|v| format!("{v:#x}")),
                    "QEMU takes a CPU model: set confidential.vcpu_type instead",
                ),
                (
                    "confidential.tdx_xfam",
                    self.confidential.tdx_xfam.map(|v| format!("{v:#x}")),
                    "QEMU derives XFAM from its -cpu features: unset it for the qemu backend",
                ),
            ];
            for (key, value, reason) in qemu_refuses {
                if let Some(value) = value {
                    return Err(ConfigError::Invalid {
                        key,
                        value,
                        reason: reason.into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The pod's VM: config defaults, plus CRI pod resources, then allowed
    /// `io.cloister.*` overrides, each checked against the limits.
    pub fn pod_vm(&self, annotations: &HashMap<String, String>) -> Result<PodVm, ConfigError> {
        let limits = &self.resources;
        let mut vcpus = limits.default_vcpus;
        let mut memory_mib = limits.default_memory_mib;

        let quota = annotation_number::<i64>(annotations, CRI_CPU_QUOTA)?;
        let period = annotation_number::<u64>(annotations, CRI_CPU_PERIOD)?;
        // Shares are a relative weight, not a size: checked, not used.
        annotation_number::<u64>(annotations, CRI_CPU_SHARES)?;
        if let (Some(quota), Some(period)) = (quota, period) {
            // A quota of -1 (or 0) means "unlimited": no extra vCPUs.
            if quota > 0 && period > 0 {
                let quota = quota.unsigned_abs();
                let extra = quota.div_ceil(period);
                vcpus = add_within(vcpus, extra, limits.max_vcpus, CRI_CPU_QUOTA, quota)?;
            }
        }
        if let Some(bytes) = annotation_number::<u64>(annotations, CRI_MEMORY)? {
            let extra = bytes.div_ceil(1 << 20);
            memory_mib = add_within(memory_mib, extra, limits.max_memory_mib, CRI_MEMORY, bytes)?;
        }

        let mut hypervisor = self.hypervisor;
        let mut kernel_params = self.guest.kernel_params.clone();
        for (key, value) in annotations {
            if !key.starts_with(annotations::PREFIX) || !OVERRIDABLE.contains(&key.as_str()) {
                continue;
            }
            if !self.annotations.allowed.iter().any(|a| a == key) {
                return Err(ConfigError::BadAnnotation {
                    key: key.clone(),
                    value: value.clone(),
                    reason: "not allowed by annotations.allowed in the runtime config".into(),
                });
            }
            match key.as_str() {
                annotations::VCPUS => {
                    vcpus = parse_in_range(key, value, 1, limits.max_vcpus)?;
                }
                annotations::MEMORY_MIB => {
                    memory_mib = parse_in_range(key, value, MIN_MEMORY_MIB, limits.max_memory_mib)?;
                }
                annotations::HYPERVISOR => {
                    hypervisor = match value.as_str() {
                        "cloister" => HypervisorKind::Cloister,
                        "qemu" => HypervisorKind::Qemu,
                        _ => {
                            return Err(ConfigError::BadAnnotation {
                                key: key.clone(),
                                value: value.clone(),
                                reason: "expected cloister or qemu".into(),
                            })
                        }
                    };
                }
                annotations::KERNEL_PARAMS => {
                    if !kernel_params.is_empty() {
                        kernel_params.push(' ');
                    }
                    kernel_params.push_str(value);
                }
                _ => {}
            }
        }
        Ok(PodVm {
            hypervisor,
            vcpus,
            memory_mib,
            kernel_params,
            shared_fs: true,
            nics: Vec::new(),
            cgroups_path: None,
        })
    }
}

/// A NIC of the pod's VM: a tap the shim opened in the pod's network
/// namespace (the fd is inherited by the VMM) and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    pub tap_fd: i32,
    pub mac: String,
}

/// The size and kind of one pod's microVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVm {
    pub hypervisor: HypervisorKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Extra kernel parameters (config, then annotation).
    pub kernel_params: String,
    /// Whether the VM gets the pod's shared folder (virtio-fs), where the
    /// containers' rootfs mounts are. A VM whose containers come from its
    /// own image or block devices does without.
    pub shared_fs: bool,
    /// The pod's network interfaces, filled in by the sandbox launcher.
    pub nics: Vec<VmNic>,
    /// The sandbox spec's `linux.cgroupsPath`, filled in by the sandbox
    /// launcher: a jailed VMM joins that cgroup.
    pub cgroups_path: Option<String>,
}

/// Which file the configuration comes from, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The runtime option `ConfigPath` of the RuntimeClass.
    RuntimeOption(PathBuf),
    /// `CLOISTER_CONFIG`.
    Environment(PathBuf),
    /// [`DEFAULT_CONFIG_PATH`].
    Default,
}

impl ConfigSource {
    /// The runtime option wins over the environment, which wins over the default.
    pub fn resolve(config_path_option: Option<&str>, env: Option<&str>) -> Self {
        match (config_path_option, env) {
            (Some(p), _) if !p.is_empty() => ConfigSource::RuntimeOption(PathBuf::from(p)),
            (_, Some(p)) if !p.is_empty() => ConfigSource::Environment(PathBuf::from(p)),
            _ => ConfigSource::Default,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ConfigSource::RuntimeOption(p) | ConfigSource::Environment(p) => p,
            ConfigSource::Default => Path::new(DEFAULT_CONFIG_PATH),
        }
    }

    fn is_default(&self) -> bool {
        matches!(self, ConfigSource::Default)
    }
}

/// `ConfigPath` from containerd's generic runtime options.
///
/// For a runtime type other than runc, CRI passes the runtime entry's
/// `options` as `runtimeoptions.v1.Options { type_url = 1; config_path = 2;
/// config_body = 3 }` (the message Kata reads too). Decoded by hand: the
/// message is not in containerd-shim-protos.
pub fn config_path_from_options(bytes: &[u8]) -> Result<Option<String>, ConfigError> {
    use protobuf::rt::WireType;
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    let mut path = None;
    loop {
        let tag = input
            .read_raw_tag_or_eof()
            .map_err(|e| ConfigError::RuntimeOptions(e.to_string()))?;
        let Some(tag) = tag else { break };
        let field = tag >> 3;
        let wire = WireType::new(tag & 7)
            .ok_or_else(|| ConfigError::RuntimeOptions(format!("bad wire type in tag {tag}")))?;
        if field == 2 && wire == WireType::LengthDelimited {
            path = Some(
                input
                    .read_string()
                    .map_err(|e| ConfigError::RuntimeOptions(e.to_string()))?,
            );
        } else {
            input
                .skip_field(wire)
                .map_err(|e| ConfigError::RuntimeOptions(e.to_string()))?;
        }
    }
    Ok(path.filter(|p| !p.is_empty()))
}

fn check_range(key: &'static str, value: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: format!("must be between {min} and {max}"),
    })
}

fn annotation_number<T: std::str::FromStr>(
    annotations: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    let Some(value) = annotations.get(key) else {
        return Ok(None);
    };
    value
        .trim()
        .parse()
        .map(Some)
        .map_err(|e: T::Err| ConfigError::BadAnnotation {
            key: key.into(),
            value: value.clone(),
            reason: e.to_string(),
        })
}

fn add_within(base: u32, extra: u64, max: u32, key: &str, raw: u64) -> Result<u32, ConfigError> {
    let total = u64::from(base).saturating_add(extra);
    match u32::try_from(total) {
        Ok(total) if total <= max => Ok(total),
        _ => Err(ConfigError::BadAnnotation {
            key: key.into(),
            value: raw.to_string(),
            reason: format!("needs {total} with the VM's base {base}, above the limit {max}"),
        }),
    }
}

fn parse_in_range(key: &str, value: &str, min: u32, max: u32) -> Result<u32, ConfigError> {
    let bad = |reason: String| ConfigError::BadAnnotation {
        key: key.into(),
        value: value.into(),
        reason,
    };
    let n: u32 = value.trim().parse().map_err(|e| bad(format!("{e}")))?;
    if !(min..=max).contains(&n) {
        return Err(bad(format!("must be between {min} and {max}")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RuntimeConfig, ConfigError> {
        RuntimeConfig::from_toml(text, Path::new("config.toml"))
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FULL: &str = r#"
hypervisor = "qemu"
[vmm]
path = "/opt/cloister/bin/cloister-vmm"
[qemu]
path = "/usr/bin/qemu-system-x86_64"
accel = "tcg"
[guest]
kernel = "/opt/cloister/vmlinux"
initramfs = "/opt/cloister/initramfs.cpio"
kernel_params = "quiet"
[resources]
default_vcpus = 2
default_memory_mib = 512
max_vcpus = 4
max_memory_mib = 2048
[annotations]
allowed = ["io.cloister.vcpus"]
[agent]
connect_timeout_secs = 10
"#;

    #[test]
    fn confidential_class_refuses_overrides_of_measured_inputs_and_keys_its_backend_ignores() {
        let err = parse(
            "[annotations]\nallowed = [\"io.cloister.kernel-params\"]\n[confidential]\ntee = \"snp\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("annotations.allowed"), "{err}");
        assert!(err.contains("io.cloister.kernel-params"), "{err}");
        // Sizing stays a pod's choice (each size is a digest of its own).
        parse("[annotations]\nallowed = [\"io.cloister.vcpus\"]\n[confidential]\ntee = \"snp\"\n")
            .unwrap();
        // The sample TEE measures nothing.
        parse("[annotations]\nallowed = [\"io.cloister.kernel-params\"]\n[confidential]\ntee = \"sample\"\n")
            .unwrap();
        let err = parse(
            "hypervisor = \"qemu\"\n[confidential]\ntee = \"snp\"\ncpu_signature = 0xa00f11\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("confidential.cpu_signature = 0xa00f11"),
            "{err}"
        );
        let err = parse("hypervisor = \"qemu\"\n[confidential]\ntee = \"tdx\"\ntdx_xfam = 0xe7\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("confidential.tdx_xfam = 0xe7"), "{err}");
        parse("[confidential]\ntee = \"snp\"\ncpu_signature = 0xa00f11\n").unwrap();
    }

    #[test]
    fn full_file_parses_every_section() {
        let config = parse(FULL).unwrap();
        assert_eq!(config.hypervisor, HypervisorKind::Qemu);
        assert_eq!(config.qemu.accel, QemuAccel::Tcg);
        assert_eq!(config.vmm.path, Path::new("/opt/cloister/bin/cloister-vmm"));
        assert_eq!(config.guest.kernel_params, "quiet");
        assert_eq!(config.resources.default_memory_mib, 512);
        assert_eq!(config.annotations.allowed, vec!["io.cloister.vcpus"]);
        assert_eq!(config.agent.connect_timeout_secs, 10);
    }

    #[test]
    fn vmm_jail_keys_parse_and_root_is_refused() {
        let config = parse("[vmm]\njail = false\njail_uid = 0\n").unwrap();
        assert!(!config.vmm.jail);
        let config = parse("[vmm]\njail_uid = 1000\njail_gid = 1001\n").unwrap();
        assert!(config.vmm.jail);
        assert_eq!((config.vmm.jail_uid, config.vmm.jail_gid), (1000, 1001));
        let err = parse("[vmm]\njail_gid = 0\n").unwrap_err();
        assert!(err.to_string().contains("vmm.jail_gid = 0"), "{err}");
    }

    #[test]
    fn jail_id_range_must_fit_below_the_no_id_uid() {
        assert_eq!(parse("").unwrap().vmm.jail_id_count, 1024);
        let config = parse("[vmm]\njail_uid = 4294967294\njail_gid = 5\njail_id_count = 1\n");
        assert_eq!(config.unwrap().vmm.jail_uid, u32::MAX - 1);
        let err = parse("[vmm]\njail_uid = 4294967295\njail_id_count = 1\n").unwrap_err();
        assert!(
            err.to_string().contains("vmm.jail_uid = 4294967295"),
            "{err}"
        );
        let err = parse("[vmm]\njail_gid = 4294967000\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("vmm.jail_gid = 4294967000: with vmm.jail_id_count = 1024"),
            "{err}"
        );
        for count in ["0", "65537"] {
            let err = parse(&format!("[vmm]\njail_id_count = {count}\n")).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("vmm.jail_id_count = {count}")),
                "{err}"
            );
        }
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let example = include_str!("../deploy/config.toml");
        assert_eq!(parse(example).unwrap(), RuntimeConfig::default());
    }

    #[test]
    fn audit_section_defaults_to_var_log_and_refuses_a_relative_path() {
        let defaults = parse("").unwrap().audit;
        assert!(defaults.enabled);
        assert_eq!(defaults.path, Path::new("/var/log/cloister/audit.jsonl"));
        let config = parse("[audit]\nenabled = false\npath = \"/srv/audit.jsonl\"\n").unwrap();
        assert!(!config.audit.enabled);
        assert_eq!(config.audit.path, Path::new("/srv/audit.jsonl"));
        let err = parse("[audit]\npath = \"audit.jsonl\"\n").unwrap_err();
        assert!(err.to_string().contains("audit.path"), "{err}");
        let err = parse("[audit]\nfile = \"/x\"\n").unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
    }

    #[test]
    fn inspection_section_parses_mode_and_refuse_list() {
        use crate::inspect::FindingId;
        let config = parse(
            "[inspection]\nmode = \"refuse\"\nrefuse_on = [\"privileged\", \"host-path-mount\"]\n",
        )
        .unwrap();
        assert_eq!(config.inspection.mode, InspectionMode::Refuse);
        assert_eq!(
            config.inspection.refuse_on,
            [FindingId::Privileged, FindingId::HostPathMount]
        );
        let defaults = parse("").unwrap().inspection;
        assert_eq!(defaults.mode, InspectionMode::Warn);
        assert_eq!(
            defaults.refuse_on,
            [FindingId::Privileged, FindingId::HostNamespace]
        );
    }

    #[test]
    fn inspection_unknown_finding_id_or_mode_is_rejected_naming_it() {
        let err = parse("[inspection]\nrefuse_on = [\"privileged\", \"hostpid\"]\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown finding id \"hostpid\""),
            "{err}"
        );
        let err = parse("[inspection]\nmode = \"block\"\n").unwrap_err();
        assert!(err.to_string().contains("block"), "{err}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, RuntimeConfig::default());
        assert_eq!(config.hypervisor, HypervisorKind::Cloister);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = parse("[resources]\nmax_cpus = 4\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("max_cpus"), "{text}");
        let err = parse("hypervisr = \"qemu\"\n").unwrap_err();
        assert!(err.to_string().contains("hypervisr"), "{err}");
    }

    #[test]
    fn unknown_hypervisor_is_rejected_with_its_value() {
        let err = parse("hypervisor = \"xen\"\n").unwrap_err();
        assert!(err.to_string().contains("xen"), "{err}");
    }

    #[test]
    fn default_above_max_is_rejected_naming_key_and_value() {
        let err = parse("[resources]\ndefault_vcpus = 9\nmax_vcpus = 8\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config key resources.default_vcpus = 9: must be between 1 and 8"
        );
        let err = parse("[resources]\ndefault_memory_mib = 16\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("resources.default_memory_mib = 16"),
            "{err}"
        );
        let err = parse("[resources]\nmax_vcpus = 0\n").unwrap_err();
        assert!(err.to_string().contains("resources.max_vcpus = 0"), "{err}");
    }

    #[test]
    fn relative_path_and_unknown_allowed_annotation_are_rejected() {
        let err = parse("[guest]\nkernel = \"vmlinux\"\n").unwrap_err();
        assert!(err.to_string().contains("guest.kernel = vmlinux"), "{err}");
        let err = parse("[annotations]\nallowed = [\"io.cloister.tee\"]\n").unwrap_err();
        assert!(err.to_string().contains("io.cloister.tee"), "{err}");
        let err = parse("[agent]\nconnect_timeout_secs = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("agent.connect_timeout_secs"),
            "{err}"
        );
    }

    #[test]
    fn pod_without_annotations_gets_defaults() {
        let config = parse(FULL).unwrap();
        let vm = config.pod_vm(&HashMap::new()).unwrap();
        assert_eq!(
            vm,
            PodVm {
                hypervisor: HypervisorKind::Qemu,
                vcpus: 2,
                memory_mib: 512,
                kernel_params: "quiet".into(),
                shared_fs: true,
                nics: Vec::new(),
                cgroups_path: None,
            }
        );
    }

    #[test]
    fn cri_pod_resources_add_to_the_base_size() {
        let config = RuntimeConfig::default();
        // 1.5 CPUs -> 2 extra vCPUs; 300 MiB + 1 byte -> 301 MiB extra.
        let vm = config
            .pod_vm(&annotations(&[
                (CRI_CPU_QUOTA, "150000"),
                (CRI_CPU_PERIOD, "100000"),
                (CRI_CPU_SHARES, "1536"),
                (CRI_MEMORY, &(300u64 * 1024 * 1024 + 1).to_string()),
            ]))
            .unwrap();
        assert_eq!(vm.vcpus, 3);
        assert_eq!(vm.memory_mib, 256 + 301);
    }

    #[test]
    fn unlimited_cri_quota_adds_nothing() {
        let vm = RuntimeConfig::default()
            .pod_vm(&annotations(&[
                (CRI_CPU_QUOTA, "-1"),
                (CRI_CPU_PERIOD, "100000"),
            ]))
            .unwrap();
        assert_eq!(vm.vcpus, 1);
    }

    #[test]
    fn cri_request_above_limit_names_annotation() {
        let err = RuntimeConfig::default()
            .pod_vm(&annotations(&[(CRI_MEMORY, "17179869184")]))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(CRI_MEMORY), "{text}");
        assert!(text.contains("17179869184"), "{text}");
        let err = RuntimeConfig::default()
            .pod_vm(&annotations(&[
                (CRI_CPU_QUOTA, "abc"),
                (CRI_CPU_PERIOD, "1"),
            ]))
            .unwrap_err();
        assert!(err.to_string().contains("\"abc\""), "{err}");
    }

    #[test]
    fn allowed_cloister_annotations_override_size() {
        let vm = RuntimeConfig::default()
            .pod_vm(&annotations(&[
                (annotations::VCPUS, "4"),
                (annotations::MEMORY_MIB, "1024"),
                (CRI_MEMORY, "1048576"),
            ]))
            .unwrap();
        assert_eq!((vm.vcpus, vm.memory_mib), (4, 1024));
    }

    #[test]
    fn cloister_annotation_out_of_range_names_key_and_value() {
        let err = RuntimeConfig::default()
            .pod_vm(&annotations(&[(annotations::VCPUS, "64")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation io.cloister.vcpus = \"64\": must be between 1 and 8"
        );
        let err = RuntimeConfig::default()
            .pod_vm(&annotations(&[(annotations::MEMORY_MIB, "lots")]))
            .unwrap_err();
        assert!(err.to_string().contains("\"lots\""), "{err}");
    }

    #[test]
    fn annotation_not_in_allowed_list_is_refused() {
        let config = parse(FULL).unwrap();
        let err = config
            .pod_vm(&annotations(&[(annotations::MEMORY_MIB, "1024")]))
            .unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
        // Other io.cloister.* keys (tee, init-data) are not sizing: ignored here.
        config
            .pod_vm(&annotations(&[(annotations::TEE, "none")]))
            .unwrap();
    }

    #[test]
    fn hypervisor_and_kernel_params_annotations_when_allowed() {
        let config = parse(
            "[annotations]\nallowed = [\"io.cloister.hypervisor\", \"io.cloister.kernel-params\"]\n[guest]\nkernel_params = \"quiet\"\n",
        )
        .unwrap();
        let vm = config
            .pod_vm(&annotations(&[
                (annotations::HYPERVISOR, "qemu"),
                (annotations::KERNEL_PARAMS, "debug"),
            ]))
            .unwrap();
        assert_eq!(vm.hypervisor, HypervisorKind::Qemu);
        assert_eq!(vm.kernel_params, "quiet debug");
        let err = config
            .pod_vm(&annotations(&[(annotations::HYPERVISOR, "xen")]))
            .unwrap_err();
        assert!(err.to_string().contains("\"xen\""), "{err}");
    }

    #[test]
    fn source_prefers_option_then_env_then_default() {
        assert_eq!(
            ConfigSource::resolve(Some("/a.toml"), Some("/b.toml")),
            ConfigSource::RuntimeOption("/a.toml".into())
        );
        assert_eq!(
            ConfigSource::resolve(Some(""), Some("/b.toml")),
            ConfigSource::Environment("/b.toml".into())
        );
        assert_eq!(ConfigSource::resolve(None, None), ConfigSource::Default);
        assert_eq!(ConfigSource::Default.path(), Path::new(DEFAULT_CONFIG_PATH));
    }

    #[test]
    fn load_of_named_missing_file_fails_but_default_missing_is_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = RuntimeConfig::load(&ConfigSource::Environment(missing.clone())).unwrap_err();
        assert!(err.to_string().contains("nope.toml"), "{err}");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[resources]\ndefault_vcpus = 2\n").unwrap();
        let config = RuntimeConfig::load(&ConfigSource::RuntimeOption(file)).unwrap();
        assert_eq!(config.resources.default_vcpus, 2);
    }

    #[test]
    fn config_path_is_read_from_runtime_options_message() {
        // runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/c.toml" }
        let mut bytes = vec![0x0a, 1, b'x', 0x12, 11];
        bytes.extend_from_slice(b"/etc/c.toml");
        assert_eq!(
            config_path_from_options(&bytes).unwrap().as_deref(),
            Some("/etc/c.toml")
        );
        assert_eq!(config_path_from_options(&[]).unwrap(), None);
        // Truncated length-delimited field.
        assert!(config_path_from_options(&[0x12, 5, b'a']).is_err());
    }
}
