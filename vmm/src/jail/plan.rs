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
//! /dev/kvm /dev/urandom       device nodes
//! /proc                       a procfs of the jail's PID namespace
//! ```

use std::path::{Path, PathBuf};

use crate::config::{VirtioConsoleOutput, VmConfig};

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
}

pub const KVM_NODE: DeviceNode = DeviceNode {
    host: "/dev/kvm",
    mode: 0o600,
};
pub const URANDOM_NODE: DeviceNode = DeviceNode {
    host: "/dev/urandom",
    mode: 0o444,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlockConfig, CacheMode, ConsoleConfig, FsConfig, VsockConfig};

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
