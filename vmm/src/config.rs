//! The VM's configuration: from the command line, a JSON file, or both
//! (command-line flags override the file). Every field is validated before
//! anything touches KVM.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::boot::cmdline::DEFAULT_CMDLINE;
use crate::boot::layout::MIN_MEMORY_MIB;
use crate::boot::mptable::MAX_MPTABLE_CPUS;
use crate::cpuid::CpuTemplate;
pub use crate::jail::JailConfig;
use crate::tee::config::{TeeConfig, TeeConfigError};

mod devices;
pub use crate::devices::virtio::fs::CacheMode;
pub use devices::{
    BlockConfig, ConsoleConfig, NetConfig, TapSource, VirtioConsoleOutput, VirtioDevicesConfig,
    VsockConfig, MAX_BLOCK_DEVICES, MAX_BLOCK_SERIAL_BYTES, MAX_GUEST_CID,
    MAX_VSOCK_UDS_PATH_BYTES, MIN_GUEST_CID,
};
pub use devices::{FsConfig, MAX_FS_DEVICES};

/// Largest guest we accept: 1 TiB, far beyond a pod, well inside the
/// address space.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 128;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    #[default]
    Stdout,
    File(PathBuf),
    None,
}

impl FromStr for SerialOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialOutput::File(PathBuf::from(path))),
                _ => Err(ConfigError::Invalid {
                    field: "serial",
                    value: s.to_string(),
                    reason: "expected stdout, none or file:PATH".into(),
                }),
            },
        }
    }
}

impl fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => f.write_str("stdout"),
            SerialOutput::None => f.write_str("none"),
            SerialOutput::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Serialize for SerialOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vmlinux (PVH entry when present) or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default)]
    pub serial: SerialOutput,
    /// `None`: chosen for the host (see [`CpuTemplate::for_host`]).
    #[serde(default)]
    pub cpu_template: Option<CpuTemplate>,
    /// Back guest memory with 2 MiB hugetlb pages.
    #[serde(default)]
    pub hugepages: bool,
    /// virtio-rng, fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// virtio-console (hvc0).
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// virtio-fs shares, one device each.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net NICs, each on a tap.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Launch as an SEV-SNP or TDX guest (`crate::tee::config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee: Option<TeeConfig>,
    /// Run jailed (see [`crate::jail`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailConfig>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}

/// A configuration that cannot be used.
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
        source: serde_json::Error,
    },
    #[error("{field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("no kernel given: pass --kernel PATH or set \"kernel\" in the config file")]
    NoKernel,
    #[error(transparent)]
    Tee(#[from] TeeConfigError),
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            serial: SerialOutput::Stdout,
            cpu_template: None,
            hugepages: false,
            rng: false,
            vsock: None,
            block: Vec::new(),
            console: None,
            fs: Vec::new(),
            net: Vec::new(),
            tee: None,
            jail: None,
        }
    }

    /// The virtio devices this config asks for.
    pub fn devices(&self) -> VirtioDevicesConfig {
        VirtioDevicesConfig {
            rng: self.rng,
            vsock: self.vsock.clone(),
            block: self.block.clone(),
            console: self.console.clone(),
            fs: self.fs.clone(),
            net: self.net.clone(),
        }
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Checks every field's range; files are checked when they are opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_resources(self.vcpus, self.memory_mib, self.hugepages)?;
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if let Some(tee) = &self.tee {
            tee.validate()?;
        }
        if let Some(jail) = &self.jail {
            jail.validate()?;
        }
        self.devices().validate()
    }
}

/// The ranges of a VM's size, for a config file and a `VmSpec` alike.
pub fn validate_resources(vcpus: u8, memory_mib: u32, hugepages: bool) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > MAX_MPTABLE_CPUS {
        return Err(ConfigError::Invalid {
            field: "vcpus",
            value: vcpus.to_string(),
            reason: format!("must be between 1 and {MAX_MPTABLE_CPUS}"),
        });
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(ConfigError::Invalid {
            field: "memory_mib",
            value: memory_mib.to_string(),
            reason: format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB"),
        });
    }
    if hugepages && !memory_mib.is_multiple_of(2) {
        return Err(ConfigError::Invalid {
            field: "memory_mib",
            value: memory_mib.to_string(),
            reason: "must be a multiple of 2 MiB with hugepages".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(text, Path::new("vm.json"))
    }

    #[test]
    fn config_with_only_kernel_gets_defaults() {
        let cfg = parse(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(cfg, VmConfig::new("/k"));
        cfg.validate().unwrap();
    }

    #[test]
    fn config_with_all_fields_parses() {
        let cfg = parse(
            r#"{"kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0", "vcpus": 2,
                "memory_mib": 256, "serial": "file:/tmp/s.log", "cpu_template": "nested-pvm",
                "hugepages": true}"#,
        )
        .unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.serial, SerialOutput::File("/tmp/s.log".into()));
        assert_eq!(cfg.cpu_template, Some(CpuTemplate::NestedPvm));
        cfg.validate().unwrap();
    }

    #[test]
    fn config_with_unknown_field_names_it() {
        let err = parse(r#"{"kernel": "/k", "vcpu": 2}"#).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `vcpu`"), "{msg}");
        assert!(msg.contains("vm.json"), "{msg}");
    }

    #[test]
    fn config_with_zero_vcpus_is_refused() {
        let cfg = parse(r#"{"kernel": "/k", "vcpus": 0}"#).unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("vcpus = 0"), "{msg}");
    }

    #[test]
    fn config_with_too_many_vcpus_is_refused() {
        let cfg = parse(r#"{"kernel": "/k", "vcpus": 33}"#).unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("between 1 and 32"));
    }

    #[test]
    fn config_with_tiny_or_huge_memory_is_refused() {
        for bad in [0u32, 15, MAX_MEMORY_MIB + 1] {
            let mut cfg = VmConfig::new("/k");
            cfg.memory_mib = bad;
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(msg.starts_with(&format!("memory_mib = {bad}")), "{msg}");
        }
    }

    #[test]
    fn config_with_odd_memory_and_hugepages_is_refused() {
        let mut cfg = VmConfig::new("/k");
        cfg.memory_mib = 129;
        cfg.hugepages = true;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of 2"));
    }

    #[test]
    fn config_with_bad_serial_or_template_names_value() {
        let err = parse(r#"{"kernel": "/k", "serial": "tty"}"#).unwrap_err();
        assert!(err.to_string().contains("serial = tty"), "{err}");
        let err = parse(r#"{"kernel": "/k", "cpu_template": "skylake"}"#).unwrap_err();
        assert!(err.to_string().contains("skylake"), "{err}");
        let err = parse(r#"{"kernel": "/k", "vcpus": -1}"#).unwrap_err();
        assert!(err.to_string().contains("-1"), "{err}");
    }

    #[test]
    fn config_with_devices_parses_and_validates() {
        let cfg = parse(
            r#"{"kernel": "/k", "rng": true,
                "vsock": {"guest_cid": 3, "uds_path": "/run/vm.sock"},
                "block": [{"path": "/img.raw", "read_only": true, "serial": "disk0"}, {"path": "/b"}],
                "console": {"output": "file:/tmp/hvc0.log"}}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let devices = cfg.devices();
        assert!(devices.rng);
        assert_eq!(devices.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(devices.block.len(), 2);
        assert!(!devices.block[1].read_only);
        assert_eq!(
            devices.console.unwrap().output,
            VirtioConsoleOutput::File("/tmp/hvc0.log".into())
        );
        assert_eq!(cfg.devices().count(), 5);
    }

    /// The shape `containerd-shim-cloister-v2` writes into vm.json
    /// (`shim/src/vmm_client/cloister.rs`, `VmFsConfig`).
    #[test]
    fn config_with_fs_shares_as_the_shim_writes_them_parses() {
        let cfg = parse(
            r#"{"kernel": "/k", "fs": [{"tag": "cloister", "shared_dir": "/run/cloister/p/shared"},
                {"tag": "ro", "shared_dir": "/srv", "read_only": true, "cache": "none", "request_queues": 2}]}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let fs = cfg.devices().fs;
        assert_eq!(fs.len(), 2);
        assert_eq!(fs[0].tag, "cloister");
        assert_eq!(fs[0].shared_dir, PathBuf::from("/run/cloister/p/shared"));
        assert_eq!(
            (fs[0].read_only, fs[0].cache, fs[0].request_queues),
            (false, CacheMode::Auto, 1)
        );
        assert_eq!(
            (fs[1].read_only, fs[1].cache, fs[1].request_queues),
            (true, CacheMode::None, 2)
        );
        assert_eq!(cfg.devices().count(), 2);

        let err = parse(
            r#"{"kernel": "/k", "fs": [{"tag": "t", "shared_dir": "/d", "cache": "never"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
        let err = parse(r#"{"kernel": "/k", "fs": [{"tag": "t", "path": "/d"}]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `path`"), "{err}");
    }

    #[test]
    fn config_with_nics_parses_and_validates() {
        let cfg = parse(
            r#"{"kernel": "/k",
                "net": [{"tap": "tap0", "mac": "02:00:00:00:00:01"}, {"fd": 3}]}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let devices = cfg.devices();
        assert_eq!(devices.net.len(), 2);
        assert_eq!(devices.net[0].source().unwrap(), TapSource::Name("tap0"));
        assert_eq!(devices.net[1].source().unwrap(), TapSource::Fd(3));
        assert_eq!(devices.count(), 2);
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(
            text.contains(r#""net":[{"tap":"tap0","mac":"02:00:00:00:00:01"},{"fd":3}]"#),
            "{text}"
        );
    }

    #[test]
    fn config_with_bad_nic_names_the_value() {
        let err = parse(r#"{"kernel": "/k", "net": [{"tap": "t0", "mac": "ff:ff:ff:ff:ff:ff"}]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("ff:ff:ff:ff:ff:ff"), "{err}");
        let err = parse(r#"{"kernel": "/k", "net": [{"tap": "t0", "queues": 2}]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `queues`"), "{err}");
        let cfg = parse(r#"{"kernel": "/k", "net": [{"tap": "t0", "fd": 4}]}"#).unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("net = tap=t0,fd=4"), "{msg}");
    }

    #[test]
    fn config_with_unknown_device_field_names_it() {
        let err = parse(r#"{"kernel": "/k", "vsock": {"cid": 3, "uds_path": "/s"}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cid`"), "{err}");
        let err = parse(r#"{"kernel": "/k", "block": [{"path": "/b", "ro": true}]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `ro`"), "{err}");
        let err = parse(r#"{"kernel": "/k", "console": {"output": "tty"}}"#).unwrap_err();
        assert!(err.to_string().contains("console.output = tty"), "{err}");
    }

    #[test]
    fn config_with_tee_section_parses_and_validates_by_name() {
        let cfg =
            parse(r#"{"kernel": "/k", "tee": {"type": "snp", "policy": "0x30000"}}"#).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.tee.as_ref().unwrap().kind(), crate::tee::TeeKind::Snp);
        let cfg = parse(r#"{"kernel": "/k", "tee": {"type": "snp", "policy": "0x1"}}"#).unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("tee.policy = 0x1"), "{msg}");
        let err =
            parse(r#"{"kernel": "/k", "tee": {"type": "tdx", "policy": "0x1"}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `policy`"), "{err}");
        // Without a tee section the JSON the shim writes is unchanged.
        assert!(!serde_json::to_string(&VmConfig::new("/k"))
            .unwrap()
            .contains("tee"));
    }

    #[test]
    fn config_with_jail_parses_and_validates_it_by_name() {
        let cfg = parse(
            r#"{"kernel": "/k", "jail": {"root": "/run/p/jail", "uid": 64000, "gid": 64000,
                "cgroups": ["/sys/fs/cgroup/pod"], "netns": "/var/run/netns/p"}}"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.jail.as_ref().unwrap().uid, 64000);
        let cfg = parse(r#"{"kernel": "/k", "jail": {"root": "/j", "uid": 0, "gid": 1}}"#).unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("jail.uid = 0"), "{msg}");
        let err = parse(r#"{"kernel": "/k", "jail": {"root": "/j", "uid": 1}}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `gid`"), "{err}");
    }

    #[test]
    fn serial_output_roundtrips_through_text() {
        for text in ["stdout", "none", "file:/x/y"] {
            assert_eq!(text.parse::<SerialOutput>().unwrap().to_string(), text);
        }
        assert!("file:".parse::<SerialOutput>().is_err());
    }
}
