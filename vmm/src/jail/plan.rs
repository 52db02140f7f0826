//! What goes into a jail's root and where: every host path the VMM needs
//! becomes a bind mount at a fixed place inside the root, and the config is
//! rewritten to use that place. Pure: the mounts are made by
//! [`super::root`].
//!
//! ```text
//! /boot/kernel /boot/initrd   read-only binds of the files
//! /disk/N                     block images (read-only when the disk is)
//! /share/N                    virtio-fs shared folders (recursive binds)
//! /sock/NAME/                 folders holding sockets the VMM creates
//! /log/NAME/                  folders of output files the VMM creates
//! /sock/qgs/                  the TDX quote service's folder (read-only)
//! /dev/kvm /dev/urandom       device nodes (and /dev/sev for SEV-SNP)
//! /proc                       a procfs of the jail's PID namespace
//! ```

use std::path::{Path, PathBuf};

use crate::config::{VirtioConsoleOutput, VmConfig};
use crate::tee::config::TeeConfig;

use super::JailError;

/// What a bind mount's source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    File,
    Folder,
}

/// One host path made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute inside the jail.
    pub target: PathBuf,
    pub kind: BindKind,
    pub read_only: bool,
}

/// A character device the jail gets a node of (same numbers as the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    pub host: &'static str,
    pub mode: u32,
    /// What provides the node, for the error when the host has none.
    pub provided_by: &'static str,
}

pub const KVM_NODE: DeviceNode = DeviceNode {
    host: "/dev/kvm",
    mode: 0o600,
    provided_by: "the kvm module",
};
pub const URANDOM_NODE: DeviceNode = DeviceNode {
    host: "/dev/urandom",
    mode: 0o444,
    provided_by: "the kernel",
};
/// The AMD Secure Processor: every SEV command the SNP launch issues hands
/// KVM an open fd of it (`crate::tee::kvm::KvmTeeVm`).
pub const SEV_NODE: DeviceNode = DeviceNode {
    host: "/dev/sev",
    mode: 0o600,
    provided_by: "the ccp module on an SEV-SNP host (kvm_amd sev_snp=1)",
};

/// Everything the root holds besides its fixed folders.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JailPlan {
    pub binds: Vec<Bind>,
    pub devices: Vec<DeviceNode>,
    /// Whether a virtio-fs device is served: it keeps the capabilities the
    /// passthrough file system needs (see [`super::privileges`]).
    pub serves_fs: bool,
    /// Whether guest-sized files are written (disks, shares): no file size
    /// limit then.
    pub writes_guest_files: bool,
}

impl JailPlan {
    /// Binds the file `source` read-only (or not) at `target`; returns
    /// `target`.
    pub fn file(&mut self, source: &Path, target: &str, read_only: bool) -> PathBuf {
        self.bind(source, target, BindKind::File, read_only)
    }

    /// Binds the folder `source` (and the mounts below it) at `target`.
    pub fn folder(&mut self, source: &Path, target: &str, read_only: bool) -> PathBuf {
        self.bind(source, target, BindKind::Folder, read_only)
    }

    /// Makes the folder of `path` (a socket or output file the VMM
    /// creates) writable at `folder`; returns the path inside the jail.
    pub fn in_folder_of(
        &mut self,
        field: &'static str,
        path: &Path,
        folder: &str,
    ) -> Result<PathBuf, JailError> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(JailError::Path {
                field,
                path: path.to_path_buf(),
                reason: "has no folder and file name",
            });
        };
        if !path.is_absolute() {
            return Err(JailError::Path {
                field,
                path: path.to_path_buf(),
                reason: "must be absolute in a jail",
            });
        }
        Ok(self.folder(parent, folder, false).join(name))
    }

    fn bind(&mut self, source: &Path, target: &str, kind: BindKind, read_only: bool) -> PathBuf {
        let target = PathBuf::from(target);
        self.binds.push(Bind {
            source: source.to_path_buf(),
            target: target.clone(),
            kind,
            read_only,
        });
        target
    }

    /// The plan for a VM, rewriting `cfg`'s paths to their places in the
    /// jail. The serial file is opened before the jail and stays as it is;
    /// taps are opened before it too ([`super::taps`]).
    pub fn for_vm(cfg: &mut VmConfig) -> Result<Self, JailError> {
        let mut plan = JailPlan {
            devices: vec![KVM_NODE, URANDOM_NODE],
            serves_fs: !cfg.fs.is_empty(),
            writes_guest_files: !cfg.fs.is_empty() || !cfg.block.is_empty(),
            ..Default::default()
        };
        cfg.kernel = plan.file(&cfg.kernel, "/boot/kernel", true);
        if let Some(initrd) = &cfg.initrd {
            cfg.initrd = Some(plan.file(initrd, "/boot/initrd", true));
        }
        for (index, disk) in cfg.block.iter_mut().enumerate() {
            disk.path = plan.file(&disk.path, &format!("/disk/{index}"), disk.read_only);
        }
        for (index, share) in cfg.fs.iter_mut().enumerate() {
            share.shared_dir = plan.folder(
                &share.shared_dir,
                &format!("/share/{index}"),
                share.read_only,
            );
        }
        if let Some(vsock) = &mut cfg.vsock {
            vsock.uds_path = plan.in_folder_of("vsock.uds_path", &vsock.uds_path, "/sock/vsock")?;
        }
        if let Some(tee) = &mut cfg.tee {
            plan.confidential(tee)?;
        }
        if let Some(console) = &mut cfg.console {
            if let VirtioConsoleOutput::File(path) = &console.output {
                console.output = VirtioConsoleOutput::File(plan.in_folder_of(
                    "console.output",
                    path,
                    "/log/console",
                )?);
            }
        }
        Ok(plan)
    }

    /// What a confidential VM needs besides `/dev/kvm` (guest_memfd needs
    /// no node): `/dev/sev` for SNP, and for TDX the quote service's
    /// socket when it is `unix:PATH` (its folder, read-only, so a QGS that
    /// recreates its socket is still found; connecting needs no write
    /// access to the mount). `vsock:CID:PORT` needs nothing: vsock is not
    /// in the network namespace.
    fn confidential(&mut self, tee: &mut TeeConfig) -> Result<(), JailError> {
        match tee {
            TeeConfig::Snp(_) => self.devices.push(SEV_NODE),
            TeeConfig::Tdx(tdx) => {
                let Some(unix) = tdx
                    .quote_service
                    .as_deref()
                    .and_then(|q| q.strip_prefix("unix:"))
                else {
                    return Ok(());
                };
                let path = Path::new(unix);
                let (Some(folder), Some(name)) = (path.parent(), path.file_name()) else {
                    return Err(JailError::Path {
                        field: "tee.quote_service",
                        path: path.to_path_buf(),
                        reason: "has no folder and file name",
                    });
                };
                if !path.is_absolute() {
                    return Err(JailError::Path {
                        field: "tee.quote_service",
                        path: path.to_path_buf(),
                        reason: "must be absolute in a jail",
                    });
                }
                let inside = self.folder(folder, "/sock/qgs", true).join(name);
                tdx.quote_service = Some(format!("unix:{}", inside.display()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlockConfig, CacheMode, ConsoleConfig, FsConfig, VsockConfig};
    use crate::tee::config::TdxConfig;

    fn vm() -> VmConfig {
        let mut cfg = VmConfig::new("/usr/share/cloister/vmlinux");
        cfg.initrd = Some("/usr/share/cloister/initramfs.cpio.gz".into());
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/run/cloister/p/sockets/vsock.sock".into(),
        });
        cfg.block = vec![BlockConfig {
            path: "/var/lib/disk.raw".into(),
            read_only: true,
            serial: None,
        }];
        cfg.fs = vec![FsConfig {
            tag: "cloister".into(),
            shared_dir: "/run/cloister/p/shared".into(),
            read_only: false,
            cache: CacheMode::Auto,
            request_queues: 1,
        }];
        cfg.console = Some(ConsoleConfig {
            output: VirtioConsoleOutput::File("/run/cloister/p/hvc0.log".into()),
        });
        cfg
    }

    #[test]
    fn vm_paths_are_rewritten_to_their_places_in_the_jail() {
        let mut cfg = vm();

        let plan = JailPlan::for_vm(&mut cfg).unwrap();

        assert_eq!(cfg.kernel, Path::new("/boot/kernel"));
        assert_eq!(cfg.initrd.as_deref(), Some(Path::new("/boot/initrd")));
        assert_eq!(cfg.block[0].path, Path::new("/disk/0"));
        assert_eq!(cfg.fs[0].shared_dir, Path::new("/share/0"));
        assert_eq!(
            cfg.vsock.as_ref().unwrap().uds_path,
            Path::new("/sock/vsock/vsock.sock")
        );
        assert_eq!(
            cfg.console.as_ref().unwrap().output,
            VirtioConsoleOutput::File("/log/console/hvc0.log".into())
        );
        cfg.validate().unwrap();
        let binds: Vec<(&str, &str, BindKind, bool)> = plan
            .binds
            .iter()
            .map(|b| {
                (
                    b.source.to_str().unwrap(),
                    b.target.to_str().unwrap(),
                    b.kind,
                    b.read_only,
                )
            })
            .collect();
        assert_eq!(
            binds,
            [
                (
                    "/usr/share/cloister/vmlinux",
                    "/boot/kernel",
                    BindKind::File,
                    true
                ),
                (
                    "/usr/share/cloister/initramfs.cpio.gz",
                    "/boot/initrd",
                    BindKind::File,
                    true
                ),
                ("/var/lib/disk.raw", "/disk/0", BindKind::File, true),
                (
                    "/run/cloister/p/shared",
                    "/share/0",
                    BindKind::Folder,
                    false
                ),
                (
                    "/run/cloister/p/sockets",
                    "/sock/vsock",
                    BindKind::Folder,
                    false
                ),
                ("/run/cloister/p", "/log/console", BindKind::Folder, false),
            ]
        );
        assert_eq!(plan.devices, [KVM_NODE, URANDOM_NODE]);
        assert!(plan.serves_fs && plan.writes_guest_files);
    }

    #[test]
    fn vm_without_devices_binds_only_the_kernel() {
        let mut cfg = VmConfig::new("/k");

        let plan = JailPlan::for_vm(&mut cfg).unwrap();

        assert_eq!(plan.binds.len(), 1);
        assert!(!plan.serves_fs && !plan.writes_guest_files);
    }

    #[test]
    fn snp_gets_the_sev_node_and_no_bind() {
        let mut cfg = VmConfig::new("/k");
        cfg.tee = Some(TeeConfig::of_kind(crate::tee::TeeKind::Snp));

        let plan = JailPlan::for_vm(&mut cfg).unwrap();

        assert_eq!(plan.devices, [KVM_NODE, URANDOM_NODE, SEV_NODE]);
        assert_eq!(plan.binds.len(), 1);
    }

    #[test]
    fn tdx_quote_service_socket_folder_is_bound_read_only_and_the_path_rewritten() {
        let mut cfg = VmConfig::new("/k");
        cfg.tee = Some(TeeConfig::Tdx(TdxConfig {
            quote_service: Some("unix:/var/run/tdx-qgs/qgs.socket".into()),
            ..Default::default()
        }));

        let plan = JailPlan::for_vm(&mut cfg).unwrap();

        assert_eq!(plan.devices, [KVM_NODE, URANDOM_NODE]);
        assert_eq!(
            plan.binds[1],
            Bind {
                source: "/var/run/tdx-qgs".into(),
                target: "/sock/qgs".into(),
                kind: BindKind::Folder,
                read_only: true,
            }
        );
        let Some(TeeConfig::Tdx(tdx)) = &cfg.tee else {
            unreachable!()
        };
        assert_eq!(
            tdx.quote_service.as_deref(),
            Some("unix:/sock/qgs/qgs.socket")
        );
        // Still a valid section (the shim's field, only the path moved).
        cfg.tee.as_ref().unwrap().validate().unwrap();
    }

    #[test]
    fn tdx_without_a_unix_quote_service_binds_nothing_and_no_tee_gets_no_sev() {
        for quote_service in [None, Some("vsock:2:4050".to_string())] {
            let mut cfg = VmConfig::new("/k");
            cfg.tee = Some(TeeConfig::Tdx(TdxConfig {
                quote_service: quote_service.clone(),
                ..Default::default()
            }));
            let plan = JailPlan::for_vm(&mut cfg).unwrap();
            assert_eq!(plan.binds.len(), 1, "{quote_service:?}");
            assert_eq!(plan.devices, [KVM_NODE, URANDOM_NODE]);
        }
        let mut cfg = VmConfig::new("/k");
        let plan = JailPlan::for_vm(&mut cfg).unwrap();
        assert!(!plan.devices.contains(&SEV_NODE));
    }

    #[test]
    fn relative_quote_service_socket_is_refused_naming_the_field() {
        let mut cfg = VmConfig::new("/k");
        cfg.tee = Some(TeeConfig::Tdx(TdxConfig {
            quote_service: Some("unix:qgs.socket".into()),
            ..Default::default()
        }));
        let err = JailPlan::for_vm(&mut cfg).unwrap_err().to_string();
        assert!(err.contains("tee.quote_service"), "{err}");
    }

    #[test]
    fn relative_socket_path_is_refused_naming_it() {
        let mut cfg = VmConfig::new("/k");
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "vsock.sock".into(),
        });

        let err = JailPlan::for_vm(&mut cfg).unwrap_err().to_string();

        assert!(err.contains("vsock.uds_path = vsock.sock"), "{err}");
    }
}
