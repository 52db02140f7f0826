//! The VM's configuration: from the command line, a JSON file, or both
//! (command-line flags override the file). Every field is validated before
//! anything touches KVM.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::boot::cmdline::DEFAULT_CMDLINE;
use crate::boot::layout::{MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB};
use crate::boot::mptable::MAX_MPTABLE_CPUS;
use crate::cpuid::CpuTemplate;

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

/// Largest number of virtio-blk disks (each takes one of the
/// [`MAX_VIRTIO_DEVICES`] interrupt lines).
pub const MAX_BLOCK_DEVICES: usize = 8;
/// virtio-blk's `VIRTIO_BLK_ID_BYTES`: the serial a `GET_ID` request returns.
pub const MAX_BLOCK_SERIAL_BYTES: usize = 20;
/// Guest CIDs 0-2 are the hypervisor, local and host; `u32::MAX` is
/// `VMADDR_CID_ANY`.
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// `sizeof(sockaddr_un.sun_path)` on Linux, including the NUL.
const SUN_PATH_BYTES: usize = 108;
/// Guest-initiated connections to host port P go to `<uds_path>_<P>`:
/// the longest suffix is `_4294967295`.
const VSOCK_PORT_SUFFIX_BYTES: usize = 11;
/// Longest `uds_path` whose port sockets still fit `sun_path`.
pub const MAX_VSOCK_UDS_PATH_BYTES: usize = SUN_PATH_BYTES - 1 - VSOCK_PORT_SUFFIX_BYTES;

/// The virtio-vsock device: hybrid vsock on a host Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The Unix socket the host connects to (`CONNECT <port>`).
    pub uds_path: PathBuf,
}

/// One virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (`GET_ID`).
    #[serde(default)]
    pub serial: Option<String>,
}

/// Where the virtio console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioConsoleOutput {
    Stdout,
    File(PathBuf),
}

impl FromStr for VirtioConsoleOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match (s, s.strip_prefix("file:")) {
            ("stdout", _) => Ok(Self::Stdout),
            (_, Some(path)) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            _ => Err(ConfigError::Invalid {
                field: "console.output",
                value: s.to_string(),
                reason: "expected stdout or file:PATH".into(),
            }),
        }
    }
}

impl fmt::Display for VirtioConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl Serialize for VirtioConsoleOutput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VirtioConsoleOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The virtio console (hvc0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub output: VirtioConsoleOutput,
}

/// Splits a command-line device spec `key=value,key=value` into pairs;
/// `flag` names the option in errors.
fn key_values<'a>(
    flag: &'static str,
    text: &'a str,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    text.split(',')
        .map(|item| {
            item.split_once('=').ok_or_else(|| ConfigError::Invalid {
                field: flag,
                value: text.to_string(),
                reason: format!("{item:?} is not key=value"),
            })
        })
        .collect()
}

fn parse_bool(field: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" | "on" | "yes" => Ok(true),
        "false" | "off" | "no" => Ok(false),
        _ => Err(ConfigError::Invalid {
            field,
            value: value.to_string(),
            reason: "expected true or false".into(),
        }),
    }
}

/// `--vsock guest_cid=3,uds_path=/run/vm.sock`
impl FromStr for VsockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut cid, mut path) = (None, None);
        for (key, value) in key_values("vsock", s)? {
            match key {
                "guest_cid" => {
                    cid = Some(value.parse().map_err(|e| ConfigError::Invalid {
                        field: "vsock.guest_cid",
                        value: value.to_string(),
                        reason: format!("{e}"),
                    })?)
                }
                "uds_path" => path = Some(PathBuf::from(value)),
                _ => return Err(unknown_key("vsock", s, key, "guest_cid, uds_path")),
            }
        }
        match (cid, path) {
            (Some(guest_cid), Some(uds_path)) => Ok(VsockConfig {
                guest_cid,
                uds_path,
            }),
            _ => Err(ConfigError::Invalid {
                field: "vsock",
                value: s.to_string(),
                reason: "needs guest_cid=CID,uds_path=PATH".into(),
            }),
        }
    }
}

/// `--block path=/img.raw,read_only=true,serial=disk0`
impl FromStr for BlockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = BlockConfig {
            path: PathBuf::new(),
            read_only: false,
            serial: None,
        };
        for (key, value) in key_values("block", s)? {
            match key {
                "path" => cfg.path = PathBuf::from(value),
                "read_only" => cfg.read_only = parse_bool("block.read_only", value)?,
                "serial" => cfg.serial = Some(value.to_string()),
                _ => return Err(unknown_key("block", s, key, "path, read_only, serial")),
            }
        }
        Ok(cfg)
    }
}

fn unknown_key(field: &'static str, text: &str, key: &str, known: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: text.to_string(),
        reason: format!("unknown key {key:?}, expected {known}"),
    }
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.guest_cid) {
            return Err(ConfigError::Invalid {
                field: "vsock.guest_cid",
                value: self.guest_cid.to_string(),
                reason: format!(
                    "must be between {MIN_GUEST_CID} and {MAX_GUEST_CID} (0-2 are reserved, {} is VMADDR_CID_ANY)",
                    u32::MAX
                ),
            });
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_VSOCK_UDS_PATH_BYTES {
            return Err(ConfigError::Invalid {
                field: "vsock.uds_path",
                value: self.uds_path.display().to_string(),
                reason: format!(
                    "is {len} bytes; must be 1 to {MAX_VSOCK_UDS_PATH_BYTES} so that it and its port sockets (<path>_<port>) fit sun_path ({SUN_PATH_BYTES} bytes)"
                ),
            });
        }
        Ok(())
    }
}

impl BlockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "block.path",
                value: String::new(),
                reason: "a disk needs an image file".into(),
            });
        }
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_BLOCK_SERIAL_BYTES
                || serial.chars().any(|c| !c.is_ascii_graphic())
            {
                return Err(ConfigError::Invalid {
                    field: "block.serial",
                    value: serial.clone(),
                    reason: format!(
                        "must be at most {MAX_BLOCK_SERIAL_BYTES} printable ASCII characters without spaces (VIRTIO_BLK_ID_BYTES)"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The virtio devices of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VirtioDevicesConfig {
    pub rng: bool,
    pub vsock: Option<VsockConfig>,
    pub block: Vec<BlockConfig>,
    pub console: Option<ConsoleConfig>,
}

impl VirtioDevicesConfig {
    /// How many virtio-mmio slots the devices take.
    pub fn count(&self) -> usize {
        usize::from(self.rng)
            + usize::from(self.vsock.is_some())
            + usize::from(self.console.is_some())
            + self.block.len()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if self.block.len() > MAX_BLOCK_DEVICES {
            return Err(ConfigError::Invalid {
                field: "block",
                value: format!("{} disks", self.block.len()),
                reason: format!("at most {MAX_BLOCK_DEVICES} are supported"),
            });
        }
        for (i, disk) in self.block.iter().enumerate() {
            disk.validate()?;
            if self.block[..i].iter().any(|other| other.path == disk.path) {
                return Err(ConfigError::Invalid {
                    field: "block.path",
                    value: disk.path.display().to_string(),
                    reason: "is attached twice".into(),
                });
            }
        }
        if let Some(ConsoleConfig {
            output: VirtioConsoleOutput::File(path),
        }) = &self.console
        {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid {
                    field: "console.output",
                    value: "file:".into(),
                    reason: "needs a path".into(),
                });
            }
        }
        if self.count() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::Invalid {
                field: "devices",
                value: self.count().to_string(),
                reason: format!(
                    "at most {MAX_VIRTIO_DEVICES} virtio devices fit the interrupt lines"
                ),
            });
        }
        Ok(())
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
        }
    }

    /// The virtio devices this config asks for.
    pub fn devices(&self) -> VirtioDevicesConfig {
        VirtioDevicesConfig {
            rng: self.rng,
            vsock: self.vsock.clone(),
            block: self.block.clone(),
            console: self.console.clone(),
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
    fn vsock_with_reserved_cid_is_refused() {
        for cid in [0u64, 2, u64::from(u32::MAX), 1 << 40] {
            let mut cfg = VmConfig::new("/k");
            cfg.vsock = Some(VsockConfig {
                guest_cid: cid,
                uds_path: "/s".into(),
            });
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("vsock.guest_cid = {cid}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn vsock_with_path_too_long_for_sun_path_is_refused() {
        let mut cfg = VmConfig::new("/k");
        let fits = format!("/{}", "a".repeat(MAX_VSOCK_UDS_PATH_BYTES - 1));
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: fits.clone().into(),
        });
        cfg.validate().unwrap();
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: format!("{fits}b").into(),
        });
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("vsock.uds_path = /aaa"), "{msg}");
        assert!(msg.contains("sun_path"), "{msg}");
    }

    #[test]
    fn block_with_long_or_unprintable_serial_is_refused() {
        for serial in [
            "a".repeat(21),
            "has space".to_string(),
            "tab\tx".to_string(),
        ] {
            let mut cfg = VmConfig::new("/k");
            cfg.block = vec![BlockConfig {
                path: "/img".into(),
                read_only: false,
                serial: Some(serial.clone()),
            }];
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("block.serial = {serial}")),
                "{msg}"
            );
        }
        let mut cfg = VmConfig::new("/k");
        cfg.block = vec![BlockConfig {
            path: "/img".into(),
            read_only: false,
            serial: Some("a".repeat(20)),
        }];
        cfg.validate().unwrap();
    }

    #[test]
    fn block_with_too_many_disks_or_duplicate_path_is_refused() {
        let disk = |p: &str| BlockConfig {
            path: p.into(),
            read_only: false,
            serial: None,
        };
        let mut cfg = VmConfig::new("/k");
        cfg.block = (0..=MAX_BLOCK_DEVICES)
            .map(|i| disk(&format!("/d{i}")))
            .collect();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("block = 9 disks"), "{msg}");
        cfg.block = vec![disk("/a"), disk("/a")];
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.starts_with("block.path = /a"), "{msg}");
        cfg.block = vec![disk("")];
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("block.path"));
    }

    #[test]
    fn device_flags_parse_key_value_lists() {
        let vsock: VsockConfig = "guest_cid=42,uds_path=/run/v.sock".parse().unwrap();
        assert_eq!(vsock.guest_cid, 42);
        assert_eq!(vsock.uds_path, PathBuf::from("/run/v.sock"));
        let err = "guest_cid=x,uds_path=/s"
            .parse::<VsockConfig>()
            .unwrap_err();
        assert!(err.to_string().starts_with("vsock.guest_cid = x"), "{err}");
        assert!("guest_cid=3".parse::<VsockConfig>().is_err());
        let block: BlockConfig = "path=/i.raw,read_only=true,serial=d0".parse().unwrap();
        assert_eq!(
            block,
            BlockConfig {
                path: "/i.raw".into(),
                read_only: true,
                serial: Some("d0".into())
            }
        );
        let err = "path=/i,ro=1".parse::<BlockConfig>().unwrap_err();
        assert!(err.to_string().contains("unknown key \"ro\""), "{err}");
        let err = "path=/i,read_only=maybe"
            .parse::<BlockConfig>()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("block.read_only = maybe"),
            "{err}"
        );
        assert_eq!(
            "file:/x".parse::<VirtioConsoleOutput>().unwrap(),
            VirtioConsoleOutput::File("/x".into())
        );
    }

    #[test]
    fn serial_output_roundtrips_through_text() {
        for text in ["stdout", "none", "file:/x/y"] {
            assert_eq!(text.parse::<SerialOutput>().unwrap().to_string(), text);
        }
        assert!("file:".parse::<SerialOutput>().is_err());
    }
}
