//! `cloister-vmm vhost-user --device KIND --socket PATH …`: serves one
//! device to one vhost-user front end and returns when it disconnects.
//!
//! ```text
//! cloister-vmm vhost-user --device vsock --guest-cid 3 --uds /run/vm/vsock.sock --socket /run/vm/vhu-vsock.sock
//! cloister-vmm vhost-user --device rng --socket /run/vm/vhu-rng.sock
//! cloister-vmm vhost-user --device block --path disk.img [--read-only] [--serial ID] --socket /run/vm/vhu-blk.sock
//! cloister-vmm vhost-user --device fs --shared-dir DIR --tag TAG [--read-only] [--cache none|auto|always] [--request-queues N] --socket /run/vm/vhu-fs.sock
//! cloister-vmm vhost-user --device net --tap tap0 [--mac 02:00:00:00:00:01] --socket /run/vm/vhu-net.sock
//! cloister-vmm vhost-user --device net --tap-fd 3 --socket /run/vm/vhu-net.sock
//! ```
//!
//! For QEMU's `-device vhost-user-fs-device,chardev=…,tag=TAG`: QEMU keeps
//! the tag and queue count in its own configuration space, so `--tag` here
//! only names the share in logs, and `--request-queues` must equal QEMU's
//! `num-request-queues` (default 1): the device starts once every queue it
//! has is running.
//!
//! For net, QEMU keeps the configuration space (MAC, link status) to
//! itself: the guest sees the `mac=` of QEMU's `virtio-net-device`, and
//! `--mac` only names the address in this process's logs; give both the
//! same value.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use crate::devices::virtio::block::{BlockConfig, BlockDevice, BlockError};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::fs::{CacheMode, FsConfig, FsDevice, FsError};
use crate::devices::virtio::net::{MacAddress, NetDevice, NetError, Tap};
use crate::devices::virtio::rng::RngDevice;
use crate::devices::virtio::vsock::{VsockDevice, VsockError};
use crate::jail::config::JailArgs;
use crate::jail::plan::URANDOM_NODE;
use crate::jail::seccomp::{apply_vhost_user_filter, DeviceKinds};
use crate::jail::{Entered, JailError, JailPlan, NO_JAIL_WARNING};

use super::{serve, VhostUserError};

/// The devices that can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// Hybrid vsock (`--guest-cid`, `--uds`).
    Vsock,
    /// Entropy from the host's getrandom.
    Rng,
    /// A raw disk image (`--path`, `--read-only`, `--serial`).
    Block,
    /// virtio-fs: a host directory (`--shared-dir`, `--tag`, `--read-only`,
    /// `--cache`, `--request-queues`).
    Fs,
    /// virtio-net on a tap (`--tap` or `--tap-fd`, `--mac`).
    Net,
}

/// Serves one virtio device over vhost-user (QEMU's `vhost-user-vsock-device`,
/// `vhost-user-fs-device`, `vhost-user-rng`, `vhost-user-blk`, `-netdev vhost-user`)
/// until the front end disconnects.
#[derive(Debug, Parser)]
#[command(name = "cloister-vmm vhost-user")]
pub struct VhostUserArgs {
    /// Which device to serve.
    #[arg(long, value_enum)]
    pub device: DeviceKind,
    /// The vhost-user socket to listen on (a stale file is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// vsock: the guest's CID (3 or more).
    #[arg(long)]
    pub guest_cid: Option<u64>,
    /// vsock: the hybrid-vsock Unix socket host programs connect to; guest
    /// connections to host port P go to `<uds>_P`.
    #[arg(long)]
    pub uds: Option<PathBuf>,
    /// block: the disk image.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// block, fs: refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// block: the serial GET_ID returns (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// fs: the directory to share.
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
    /// fs: the share's tag (1-36 bytes; QEMU's `tag=` is what the guest sees).
    #[arg(long)]
    pub tag: Option<String>,
    /// fs: how much the guest may cache.
    #[arg(long, value_enum)]
    pub cache: Option<CacheMode>,
    /// fs: request queues besides the hiprio queue; QEMU's
    /// `num-request-queues`.
    #[arg(long)]
    pub request_queues: Option<u16>,
    /// net: the tap to open (created if missing) in this process's network
    /// namespace.
    #[arg(long)]
    pub tap: Option<String>,
    /// net: an inherited fd of a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR.
    #[arg(long)]
    pub tap_fd: Option<i32>,
    /// net: the guest's MAC address (random if absent).
    #[arg(long)]
    pub mac: Option<MacAddress>,
    #[command(flatten)]
    pub jail: JailArgs,
    /// Set once the process is in its jail: the server then runs under
    /// its seccomp filter.
    #[arg(skip)]
    pub jailed: bool,
}

/// Errors of the `vhost-user` subcommand.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserCliError {
    #[error("--device {device:?} needs {flag}")]
    MissingFlag {
        device: DeviceKind,
        flag: &'static str,
    },
    #[error("{flag} does not apply to --device {device:?}")]
    ForeignFlag {
        device: DeviceKind,
        flag: &'static str,
    },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("--device Net needs exactly one of --tap and --tap-fd")]
    TapSource,
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Serve(#[from] VhostUserError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Jail(#[from] JailError),
}

impl VhostUserArgs {
    /// The device the flags describe; flags of another device are refused
    /// so a typo does not go unnoticed.
    pub fn build_device(&self) -> Result<Box<dyn VirtioDevice>, VhostUserCliError> {
        let device = self.device;
        let missing = |flag| VhostUserCliError::MissingFlag { device, flag };
        let foreign = |flag| VhostUserCliError::ForeignFlag { device, flag };
        let vsock_flags = [
            ("--guest-cid", self.guest_cid.is_some()),
            ("--uds", self.uds.is_some()),
        ];
        let block_flags = [
            ("--path", self.path.is_some()),
            ("--serial", self.serial.is_some()),
        ];
        let fs_flags = [
            ("--shared-dir", self.shared_dir.is_some()),
            ("--tag", self.tag.is_some()),
            ("--cache", self.cache.is_some()),
            ("--request-queues", self.request_queues.is_some()),
        ];
        let read_only_flag = [("--read-only", self.read_only)];
        let net_flags = [
            ("--tap", self.tap.is_some()),
            ("--tap-fd", self.tap_fd.is_some()),
            ("--mac", self.mac.is_some()),
        ];
        let refuse = |flags: &[(&'static str, bool)]| match flags.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(foreign(flag)),
            None => Ok(()),
        };
        Ok(match device {
            DeviceKind::Vsock => {
                refuse(&block_flags)?;
                refuse(&fs_flags)?;
                refuse(&read_only_flag)?;
                refuse(&net_flags)?;
                let cid = self.guest_cid.ok_or_else(|| missing("--guest-cid"))?;
                let uds = self.uds.clone().ok_or_else(|| missing("--uds"))?;
                Box::new(VsockDevice::new(cid, uds)?)
            }
            DeviceKind::Rng => {
                refuse(&vsock_flags)?;
                refuse(&block_flags)?;
                refuse(&fs_flags)?;
                refuse(&read_only_flag)?;
                refuse(&net_flags)?;
                Box::new(RngDevice::new())
            }
            DeviceKind::Block => {
                refuse(&vsock_flags)?;
                refuse(&fs_flags)?;
                refuse(&net_flags)?;
                let path = self.path.clone().ok_or_else(|| missing("--path"))?;
                Box::new(BlockDevice::new(BlockConfig {
                    path,
                    read_only: self.read_only,
                    serial: self.serial.clone(),
                })?)
            }
            DeviceKind::Fs => {
                refuse(&vsock_flags)?;
                refuse(&block_flags)?;
                refuse(&net_flags)?;
                let shared_dir = self
                    .shared_dir
                    .clone()
                    .ok_or_else(|| missing("--shared-dir"))?;
                let tag = self.tag.clone().ok_or_else(|| missing("--tag"))?;
                Box::new(FsDevice::new(FsConfig {
                    read_only: self.read_only,
                    cache: self.cache.unwrap_or_default(),
                    request_queues: self.request_queues.unwrap_or(1),
                    ..FsConfig::new(tag, shared_dir)
                })?)
            }
            DeviceKind::Net => {
                refuse(&vsock_flags)?;
                refuse(&block_flags)?;
                refuse(&fs_flags)?;
                refuse(&read_only_flag)?;
                let tap = match (&self.tap, self.tap_fd) {
                    (Some(name), None) => Tap::open(name)?,
                    (None, Some(fd)) => Tap::adopt_fd(fd)?,
                    _ => return Err(VhostUserCliError::TapSource),
                };
                let device = NetDevice::new("net", Box::new(tap), self.mac)?;
                tracing::info!(
                    "net: tap {} with mac {}",
                    device.backend_name(),
                    device.mac()
                );
                Box::new(device)
            }
        })
    }

    fn device_kinds(&self) -> DeviceKinds {
        DeviceKinds {
            vsock: self.device == DeviceKind::Vsock,
            block: self.device == DeviceKind::Block,
            fs: self.device == DeviceKind::Fs,
            net: self.device == DeviceKind::Net,
            rng: self.device == DeviceKind::Rng,
            console: false,
        }
    }

    /// What the jail's root holds for this server; rewrites the paths to
    /// their places in it.
    fn jail_plan(&mut self) -> Result<JailPlan, JailError> {
        let mut plan = JailPlan {
            devices: vec![URANDOM_NODE],
            serves_fs: self.device == DeviceKind::Fs,
            writes_guest_files: matches!(self.device, DeviceKind::Fs | DeviceKind::Block),
            ..Default::default()
        };
        self.socket = plan.in_folder_of("--socket", &self.socket, "/sock/vhost-user")?;
        if let Some(uds) = &self.uds {
            self.uds = Some(plan.in_folder_of("--uds", uds, "/sock/vsock")?);
        }
        if let Some(path) = &self.path {
            self.path = Some(plan.file(path, "/disk/0", self.read_only));
        }
        if let Some(dir) = &self.shared_dir {
            self.shared_dir = Some(plan.folder(dir, "/share/0", self.read_only));
        }
        Ok(plan)
    }

    /// Enters the jail the flags ask for, rewriting the paths to their
    /// places in it; `Some(code)` in the supervisor once the server ended.
    pub fn enter_jail(&mut self) -> Result<Option<ExitCode>, VhostUserCliError> {
        let Some(jail) = self.jail.jail()? else {
            if self.jail.no_jail {
                eprintln!("{NO_JAIL_WARNING}");
            }
            return Ok(None);
        };
        let plan = self.jail_plan()?;
        let tap = self.tap.take();
        let mut nics = Vec::new();
        let entered = crate::jail::enter(&jail, &plan, || {
            if let Some(name) = tap {
                nics.push(crate::config::NetConfig {
                    tap: Some(name),
                    fd: None,
                    mac: None,
                });
                crate::jail::taps::open_named_taps(&mut nics)?;
            }
            Ok(())
        })?;
        match entered {
            Entered::Supervisor(code) => Ok(Some(code)),
            Entered::Jailed => {
                if let Some(fd) = nics.first().and_then(|n| n.fd) {
                    self.tap_fd = Some(fd);
                }
                crate::jail::process::exit_on_termination_signals()?;
                tracing::info!(
                    "jailed in {} as {}:{}",
                    jail.root.display(),
                    jail.uid,
                    jail.gid
                );
                self.jailed = true;
                Ok(None)
            }
        }
    }

    pub fn run(&self) -> Result<(), VhostUserCliError> {
        let device = self.build_device()?;
        if self.jailed {
            // One list for every thread: rust-vmm's daemon starts its own.
            apply_vhost_user_filter(self.device_kinds())?;
        }
        serve(device, &self.socket)?;
        Ok(())
    }
}

/// The subcommand's entry: `args` start with `vhost-user`. Exits 0 when the
/// front end disconnected, 2 on a configuration or serving error.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let mut args = VhostUserArgs::parse_from(args);
    match args.enter_jail() {
        Ok(Some(code)) => return code,
        Ok(None) => {}
        Err(e) => {
            eprintln!("cloister-vmm vhost-user: {e}");
            return ExitCode::from(2);
        }
    }
    match args.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloister-vmm vhost-user: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> VhostUserArgs {
        VhostUserArgs::try_parse_from(std::iter::once("vhost-user").chain(args.split_whitespace()))
            .unwrap()
    }

    #[test]
    fn vsock_args_build_a_vsock_device() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let args = parse(&format!(
            "--device vsock --guest-cid 3 --uds {} --socket /s",
            uds.display()
        ));
        let device = args.build_device().unwrap();
        assert_eq!(device.device_type(), 19);
    }

    #[test]
    fn vsock_without_uds_names_the_flag() {
        let err = parse("--device vsock --guest-cid 3 --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "--device Vsock needs --uds");
    }

    #[test]
    fn rng_with_a_block_flag_is_refused() {
        let err = parse("--device rng --read-only --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "--read-only does not apply to --device Rng"
        );
    }

    #[test]
    fn block_with_missing_image_names_the_path() {
        let err = parse("--device block --path /nonexistent/disk.img --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }

    #[test]
    fn fs_args_build_an_fs_device_with_hiprio_and_request_queues() {
        let dir = tempfile::tempdir().unwrap();
        let args = parse(&format!(
            "--device fs --shared-dir {} --tag rootfs --read-only --cache none --request-queues 2 --socket /s",
            dir.path().display()
        ));
        let device = args.build_device().unwrap();
        assert_eq!(device.device_type(), 26);
        assert_eq!(device.queue_max_sizes().len(), 3);
        let mut tag = [0u8; 6];
        device.read_config(0, &mut tag);
        assert_eq!(&tag, b"rootfs");
    }

    #[test]
    fn fs_without_tag_or_with_a_block_flag_names_the_flag() {
        let err = parse("--device fs --shared-dir /tmp --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "--device Fs needs --tag");
        let err = parse("--device fs --shared-dir /tmp --tag t --serial x --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "--serial does not apply to --device Fs");
        let err = parse("--device block --path /x --tag t --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "--tag does not apply to --device Block");
        let err = parse("--device fs --shared-dir /nonexistent/share --tag t --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/share"), "{err}");
    }

    #[test]
    fn net_needs_one_tap_source_and_refuses_foreign_flags() {
        for args in [
            "--device net --socket /s",
            "--device net --tap t0 --tap-fd 3 --socket /s",
        ] {
            let err = parse(args).build_device().err().unwrap();
            assert_eq!(
                err.to_string(),
                "--device Net needs exactly one of --tap and --tap-fd"
            );
        }
        let err = parse("--device net --tap t0 --path /d --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "--path does not apply to --device Net");
        let err = parse("--device block --path /d --mac 02:00:00:00:00:01 --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "--mac does not apply to --device Block");
        let err = parse("--device net --tap-fd 987654 --socket /s")
            .build_device()
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("fd 987654 is not an open"),
            "{err}"
        );
    }

    #[test]
    fn net_with_a_multicast_mac_is_a_parse_error() {
        let err = VhostUserArgs::try_parse_from([
            "vhost-user",
            "--device",
            "net",
            "--tap",
            "t0",
            "--mac",
            "03:00:00:00:00:01",
            "--socket",
            "/s",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("03:00:00:00:00:01"), "{err}");
    }

    #[test]
    fn jailed_fs_server_paths_move_into_the_jail() {
        let mut args = parse(
            "--device fs --shared-dir /srv/share --tag t --read-only --socket /run/p/sockets/fs.sock \
             --jail-root /run/p/jail --jail-uid 64000 --jail-gid 64000",
        );
        assert_eq!(args.jail.jail().unwrap().unwrap().uid, 64000);

        let plan = args.jail_plan().unwrap();

        assert_eq!(args.socket, PathBuf::from("/sock/vhost-user/fs.sock"));
        assert_eq!(args.shared_dir, Some(PathBuf::from("/share/0")));
        assert!(plan.serves_fs && plan.writes_guest_files);
        assert_eq!(plan.devices, [URANDOM_NODE]);
        let binds: Vec<(&str, &str, bool)> = plan
            .binds
            .iter()
            .map(|b| {
                (
                    b.source.to_str().unwrap(),
                    b.target.to_str().unwrap(),
                    b.read_only,
                )
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("/run/p/sockets", "/sock/vhost-user", false),
                ("/srv/share", "/share/0", true)
            ]
        );
    }

    #[test]
    fn jailed_vsock_server_gets_both_socket_folders() {
        let mut args = parse(
            "--device vsock --guest-cid 3 --uds /run/p/sockets/vsock.sock --socket /run/p/sockets/vhost-vsock.sock \
             --jail-root /run/p/jail --jail-uid 1 --jail-gid 1",
        );

        let plan = args.jail_plan().unwrap();

        assert_eq!(args.uds, Some(PathBuf::from("/sock/vsock/vsock.sock")));
        assert_eq!(
            args.socket,
            PathBuf::from("/sock/vhost-user/vhost-vsock.sock")
        );
        assert!(!plan.serves_fs && !plan.writes_guest_files);
    }

    #[test]
    fn unknown_device_is_a_parse_error() {
        assert!(
            VhostUserArgs::try_parse_from(["vhost-user", "--device", "gpu", "--socket", "/s"])
                .is_err()
        );
    }
}
