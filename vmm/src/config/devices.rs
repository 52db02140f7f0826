//! The virtio devices of a VM as the configuration names them: JSON
//! objects in the config file, `key=value,...` lists on the command line.
//! Validated here, with errors that name the field and the value; the
//! devices themselves check what only opening them can tell (files,
//! sockets).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::boot::layout::MAX_VIRTIO_DEVICES;
use crate::devices::virtio::fs::{validate_tag, CacheMode, MAX_REQUEST_QUEUES};
use crate::devices::virtio::net::tap::valid_tap_name;
use crate::devices::virtio::net::MacAddress;

/// Largest number of virtio-blk disks (each takes one of the
/// [`MAX_VIRTIO_DEVICES`] interrupt lines).
pub const MAX_BLOCK_DEVICES: usize = 8;
/// Largest number of virtio-fs shares (each takes an interrupt line).
pub const MAX_FS_DEVICES: usize = 8;
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

/// One virtio-fs share: a host directory the guest mounts by its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// What the guest mounts: `mount -t virtiofs TAG DIR` (1-36 bytes).
    pub tag: String,
    /// The host directory; it must exist when the VM starts.
    pub shared_dir: PathBuf,
    /// Every change from the guest is refused (EROFS).
    #[serde(default)]
    pub read_only: bool,
    /// none, auto or always.
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default = "default_request_queues")]
    pub request_queues: u16,
}

fn default_request_queues() -> u16 {
    1
}

/// Where the virtio console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioConsoleOutput {
    Stdout,
    File(PathBuf),
    /// Discarded (still counted).
    None,
}

impl FromStr for VirtioConsoleOutput {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match (s, s.strip_prefix("file:")) {
            ("stdout", _) => Ok(Self::Stdout),
            ("none", _) => Ok(Self::None),
            (_, Some(path)) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            _ => Err(ConfigError::Invalid {
                field: "console.output",
                value: s.to_string(),
                reason: "expected stdout, none or file:PATH".into(),
            }),
        }
    }
}

impl fmt::Display for VirtioConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::None => f.write_str("none"),
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

/// One virtio-net NIC on a tap device: opened by name (`tap`), or adopted
/// from a file descriptor the parent process opened (in the pod's network
/// namespace) and left open (`fd`). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// The guest's MAC address; a random locally administered one if
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
}

/// Where a NIC's tap comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapSource<'a> {
    Name(&'a str),
    Fd(i32),
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(tap) = &self.tap {
            parts.push(format!("tap={tap}"));
        }
        if let Some(fd) = self.fd {
            parts.push(format!("fd={fd}"));
        }
        if let Some(mac) = self.mac {
            parts.push(format!("mac={mac}"));
        }
        f.write_str(&parts.join(","))
    }
}

impl NetConfig {
    /// The tap to use, or why the NIC names none or two.
    pub fn source(&self) -> Result<TapSource<'_>, ConfigError> {
        match (&self.tap, self.fd) {
            (Some(name), None) => Ok(TapSource::Name(name)),
            (None, Some(fd)) => Ok(TapSource::Fd(fd)),
            _ => Err(ConfigError::Invalid {
                field: "net",
                value: self.to_string(),
                reason: "needs exactly one of tap=NAME or fd=N".into(),
            }),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.source()? {
            TapSource::Name(name) if !valid_tap_name(name) => Err(ConfigError::Invalid {
                field: "net.tap",
                value: name.to_string(),
                reason: "an interface name is 1 to 15 bytes without '/'".into(),
            }),
            TapSource::Fd(fd) if fd < 3 => Err(ConfigError::Invalid {
                field: "net.fd",
                value: fd.to_string(),
                reason: "must be an inherited descriptor, 3 or more (0-2 are stdio)".into(),
            }),
            _ => Ok(()),
        }
    }
}

/// `--net tap=tap0[,mac=02:00:00:00:00:01]` or `--net fd=3[,mac=...]`
impl FromStr for NetConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = NetConfig {
            tap: None,
            fd: None,
            mac: None,
        };
        for (key, value) in key_values("net", s)? {
            let invalid = |field, reason: String| ConfigError::Invalid {
                field,
                value: value.to_string(),
                reason,
            };
            match key {
                "tap" => cfg.tap = Some(value.to_string()),
                "fd" => {
                    cfg.fd = Some(
                        value
                            .parse()
                            .map_err(|e| invalid("net.fd", format!("{e}")))?,
                    )
                }
                "mac" => {
                    cfg.mac = Some(
                        value
                            .parse()
                            .map_err(|e| invalid("net.mac", format!("{e}")))?,
                    )
                }
                _ => return Err(unknown_key("net", s, key, "tap, fd, mac")),
            }
        }
        cfg.source()?;
        Ok(cfg)
    }
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

/// `--fs tag=T,path=DIR[,readonly][,cache=none|auto|always][,queues=N]`
/// (`shared_dir=`, `read_only=BOOL` and `request_queues=` are accepted
/// too, as in the JSON config).
impl FromStr for FsConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = FsConfig {
            tag: String::new(),
            shared_dir: PathBuf::new(),
            read_only: false,
            cache: CacheMode::default(),
            request_queues: default_request_queues(),
        };
        const KNOWN: &str = "tag, path, readonly, cache, queues";
        for item in s.split(',') {
            let (key, value) = match item.split_once('=') {
                Some(pair) => pair,
                None if item == "readonly" || item == "read_only" => {
                    cfg.read_only = true;
                    continue;
                }
                None => {
                    return Err(ConfigError::Invalid {
                        field: "fs",
                        value: s.to_string(),
                        reason: format!("{item:?} is neither key=value nor readonly"),
                    })
                }
            };
            match key {
                "tag" => cfg.tag = value.to_string(),
                "path" | "shared_dir" => cfg.shared_dir = PathBuf::from(value),
                "readonly" | "read_only" => cfg.read_only = parse_bool("fs.read_only", value)?,
                "cache" => {
                    cfg.cache = value.parse().map_err(|reason| ConfigError::Invalid {
                        field: "fs.cache",
                        value: value.to_string(),
                        reason,
                    })?
                }
                "queues" | "request_queues" => {
                    cfg.request_queues = value.parse().map_err(|e| ConfigError::Invalid {
                        field: "fs.request_queues",
                        value: value.to_string(),
                        reason: format!("{e}"),
                    })?
                }
                _ => return Err(unknown_key("fs", s, key, KNOWN)),
            }
        }
        Ok(cfg)
    }
}

impl FsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_tag(&self.tag).map_err(|e| ConfigError::Invalid {
            field: "fs.tag",
            value: self.tag.clone(),
            reason: e.to_string(),
        })?;
        if self.shared_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "fs.shared_dir",
                value: String::new(),
                reason: format!("share {:?} needs a host directory", self.tag),
            });
        }
        if self.request_queues == 0 || self.request_queues > MAX_REQUEST_QUEUES {
            return Err(ConfigError::Invalid {
                field: "fs.request_queues",
                value: self.request_queues.to_string(),
                reason: format!("must be between 1 and {MAX_REQUEST_QUEUES}"),
            });
        }
        Ok(())
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
    pub fs: Vec<FsConfig>,
    pub net: Vec<NetConfig>,
}

impl VirtioDevicesConfig {
    /// How many virtio-mmio slots the devices take.
    pub fn count(&self) -> usize {
        usize::from(self.rng)
            + usize::from(self.vsock.is_some())
            + usize::from(self.console.is_some())
            + self.block.len()
            + self.fs.len()
            + self.net.len()
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
        if self.fs.len() > MAX_FS_DEVICES {
            return Err(ConfigError::Invalid {
                field: "fs",
                value: format!("{} shares", self.fs.len()),
                reason: format!("at most {MAX_FS_DEVICES} are supported"),
            });
        }
        for (i, share) in self.fs.iter().enumerate() {
            share.validate()?;
            if self.fs[..i].iter().any(|other| other.tag == share.tag) {
                return Err(ConfigError::Invalid {
                    field: "fs.tag",
                    value: share.tag.clone(),
                    reason: "is used by two shares; tags must be unique".into(),
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
        self.validate_net()?;
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

impl VirtioDevicesConfig {
    /// Each NIC, and no tap, fd or MAC address used twice.
    fn validate_net(&self) -> Result<(), ConfigError> {
        for (i, nic) in self.net.iter().enumerate() {
            nic.validate()?;
            let earlier = &self.net[..i];
            let twice = |field, value: String| ConfigError::Invalid {
                field,
                value,
                reason: "is used by two NICs".into(),
            };
            if let Some(tap) = &nic.tap {
                if earlier.iter().any(|other| other.tap.as_ref() == Some(tap)) {
                    return Err(twice("net.tap", tap.clone()));
                }
            }
            if let Some(fd) = nic.fd {
                if earlier.iter().any(|other| other.fd == Some(fd)) {
                    return Err(twice("net.fd", fd.to_string()));
                }
            }
            if let Some(mac) = nic.mac {
                if earlier.iter().any(|other| other.mac == Some(mac)) {
                    return Err(twice("net.mac", mac.to_string()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_vsock(guest_cid: u64, uds_path: &str) -> VirtioDevicesConfig {
        VirtioDevicesConfig {
            vsock: Some(VsockConfig {
                guest_cid,
                uds_path: uds_path.into(),
            }),
            ..Default::default()
        }
    }

    fn disk(path: &str, serial: Option<&str>) -> BlockConfig {
        BlockConfig {
            path: path.into(),
            read_only: false,
            serial: serial.map(str::to_string),
        }
    }

    fn with_disks(block: Vec<BlockConfig>) -> VirtioDevicesConfig {
        VirtioDevicesConfig {
            block,
            ..Default::default()
        }
    }

    #[test]
    fn vsock_with_reserved_cid_is_refused() {
        for cid in [0u64, 2, u64::from(u32::MAX), 1 << 40] {
            let msg = with_vsock(cid, "/s").validate().unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!("vsock.guest_cid = {cid}")),
                "{msg}"
            );
        }
        with_vsock(3, "/s").validate().unwrap();
        with_vsock(MAX_GUEST_CID, "/s").validate().unwrap();
    }

    #[test]
    fn vsock_with_path_too_long_for_sun_path_is_refused() {
        let fits = format!("/{}", "a".repeat(MAX_VSOCK_UDS_PATH_BYTES - 1));
        with_vsock(3, &fits).validate().unwrap();
        let msg = with_vsock(3, &format!("{fits}b"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("vsock.uds_path = /aaa"), "{msg}");
        assert!(msg.contains("sun_path"), "{msg}");
        assert!(with_vsock(3, "").validate().is_err());
    }

    #[test]
    fn block_with_long_or_unprintable_serial_is_refused() {
        for serial in [
            "a".repeat(21),
            "has space".to_string(),
            "tab\tx".to_string(),
        ] {
            let msg = with_disks(vec![disk("/img", Some(&serial))])
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                msg.starts_with(&format!("block.serial = {serial}")),
                "{msg}"
            );
        }
        let twenty = "a".repeat(MAX_BLOCK_SERIAL_BYTES);
        with_disks(vec![disk("/img", Some(&twenty))])
            .validate()
            .unwrap();
    }

    #[test]
    fn block_with_too_many_disks_or_duplicate_path_is_refused() {
        let many = (0..=MAX_BLOCK_DEVICES)
            .map(|i| disk(&format!("/d{i}"), None))
            .collect();
        let msg = with_disks(many).validate().unwrap_err().to_string();
        assert!(msg.starts_with("block = 9 disks"), "{msg}");
        let msg = with_disks(vec![disk("/a", None), disk("/a", None)])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("block.path = /a"), "{msg}");
        let msg = with_disks(vec![disk("", None)]).validate().unwrap_err();
        assert!(msg.to_string().starts_with("block.path"), "{msg}");
    }

    fn share(tag: &str, dir: &str) -> FsConfig {
        FsConfig {
            tag: tag.into(),
            shared_dir: dir.into(),
            read_only: false,
            cache: CacheMode::Auto,
            request_queues: 1,
        }
    }

    fn with_shares(fs: Vec<FsConfig>) -> VirtioDevicesConfig {
        VirtioDevicesConfig {
            fs,
            ..Default::default()
        }
    }

    fn nic(text: &str) -> NetConfig {
        text.parse().unwrap()
    }

    fn with_nics(net: Vec<NetConfig>) -> VirtioDevicesConfig {
        VirtioDevicesConfig {
            net,
            ..Default::default()
        }
    }

    #[test]
    fn fs_flag_parses_every_option() {
        let cfg: FsConfig = "tag=rootfs,path=/run/pod/shared,readonly,cache=none,queues=2"
            .parse()
            .unwrap();
        assert_eq!(
            cfg,
            FsConfig {
                tag: "rootfs".into(),
                shared_dir: "/run/pod/shared".into(),
                read_only: true,
                cache: CacheMode::None,
                request_queues: 2,
            }
        );
        let cfg: FsConfig = "tag=t,shared_dir=/d,read_only=false,request_queues=1"
            .parse()
            .unwrap();
        assert_eq!(cfg, share("t", "/d"));
        assert_eq!(
            "tag=t,path=/d".parse::<FsConfig>().unwrap().cache,
            CacheMode::Auto
        );
    }

    #[test]
    fn fs_flag_with_bad_value_names_it() {
        let err = "tag=t,path=/d,cache=sometimes"
            .parse::<FsConfig>()
            .unwrap_err();
        assert!(err.to_string().starts_with("fs.cache = sometimes"), "{err}");
        let err = "tag=t,path=/d,queues=many".parse::<FsConfig>().unwrap_err();
        assert!(
            err.to_string().starts_with("fs.request_queues = many"),
            "{err}"
        );
        let err = "tag=t,path=/d,dax".parse::<FsConfig>().unwrap_err();
        assert!(err.to_string().contains("\"dax\""), "{err}");
        let err = "tag=t,ro=1".parse::<FsConfig>().unwrap_err();
        assert!(err.to_string().contains("unknown key \"ro\""), "{err}");
    }

    #[test]
    fn fs_with_bad_tag_queues_or_duplicate_tag_is_refused() {
        let long = "x".repeat(37);
        for (tag, want) in [
            ("", "fs.tag = "),
            (long.as_str(), "37 bytes"),
            ("a\0b", "NUL"),
        ] {
            let msg = with_shares(vec![share(tag, "/d")])
                .validate()
                .unwrap_err()
                .to_string();
            assert!(msg.contains(want), "{msg}");
        }
        let mut queues = share("t", "/d");
        queues.request_queues = 9;
        let msg = with_shares(vec![queues])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("fs.request_queues = 9"), "{msg}");
        let msg = with_shares(vec![share("t", "")])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("fs.shared_dir"), "{msg}");
        let msg = with_shares(vec![share("a", "/1"), share("b", "/2"), share("a", "/3")])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("fs.tag = a: is used by two shares"),
            "{msg}"
        );
        with_shares(vec![share("a", "/1"), share("b", "/1")])
            .validate()
            .unwrap();
        let many = (0..=MAX_FS_DEVICES)
            .map(|i| share(&format!("t{i}"), "/d"))
            .collect();
        let msg = with_shares(many).validate().unwrap_err().to_string();
        assert!(msg.starts_with("fs = 9 shares"), "{msg}");
    }

    #[test]
    fn net_flags_parse_tap_or_fd_with_optional_mac() {
        let by_name = nic("tap=tap0,mac=02:00:00:00:00:01");
        assert_eq!(by_name.source().unwrap(), TapSource::Name("tap0"));
        assert_eq!(by_name.mac.unwrap().to_string(), "02:00:00:00:00:01");
        assert_eq!(by_name.to_string(), "tap=tap0,mac=02:00:00:00:00:01");
        let by_fd = nic("fd=5");
        assert_eq!(by_fd.source().unwrap(), TapSource::Fd(5));
        assert_eq!(by_fd.mac, None);
        with_nics(vec![by_name, by_fd]).validate().unwrap();
    }

    #[test]
    fn net_flags_with_bad_values_name_them() {
        for (text, start) in [
            (
                "tap=t0,mac=01:00:00:00:00:01",
                "net.mac = 01:00:00:00:00:01",
            ),
            ("tap=t0,mac=xyz", "net.mac = xyz"),
            ("fd=three", "net.fd = three"),
            ("tap=t0,fd=3", "net = tap=t0,fd=3"),
            ("mac=02:00:00:00:00:01", "net = mac=02:00:00:00:00:01"),
        ] {
            let err = text.parse::<NetConfig>().unwrap_err().to_string();
            assert!(err.starts_with(start), "{text}: {err}");
        }
        let err = "tap=t0,queues=2".parse::<NetConfig>().unwrap_err();
        assert!(err.to_string().contains("unknown key \"queues\""), "{err}");
    }

    #[test]
    fn net_with_bad_tap_name_or_stdio_fd_is_refused() {
        let long = "t".repeat(16);
        let msg = with_nics(vec![nic(&format!("tap={long}"))])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with(&format!("net.tap = {long}")), "{msg}");
        let msg = with_nics(vec![nic("fd=2")])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("net.fd = 2"), "{msg}");
    }

    #[test]
    fn net_with_a_tap_fd_or_mac_used_twice_names_it() {
        for (a, b, start) in [
            ("tap=t0", "tap=t0", "net.tap = t0"),
            ("fd=4", "fd=4", "net.fd = 4"),
            (
                "tap=t0,mac=02:00:00:00:00:07",
                "tap=t1,mac=02:00:00:00:00:07",
                "net.mac = 02:00:00:00:00:07",
            ),
        ] {
            let msg = with_nics(vec![nic(a), nic(b)])
                .validate()
                .unwrap_err()
                .to_string();
            assert!(msg.starts_with(start), "{msg}");
            assert!(msg.ends_with("is used by two NICs"), "{msg}");
        }
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
}
