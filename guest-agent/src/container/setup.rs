//! Applies a [`CreatePlan`]'s file system part inside the new mount
//! namespace: propagation, rootfs bind, spec mounts, devices, pivot_root,
//! masked and read-only paths, sysctls, hostname.

use std::io;
use std::path::{Path, PathBuf};

use super::plan::{CreatePlan, MountPlan};
use super::syscalls::Syscalls;

/// A setup step that failed, naming what it worked on.
#[derive(Debug, thiserror::Error)]
#[error("{step} {what}: {source}")]
pub struct SetupError {
    pub step: &'static str,
    pub what: String,
    #[source]
    pub source: io::Error,
}

fn at<T>(
    step: &'static str,
    what: impl std::fmt::Display,
    r: io::Result<T>,
) -> Result<T, SetupError> {
    r.map_err(|source| SetupError {
        step,
        what: what.to_string(),
        source,
    })
}

const MS_BIND: u64 = libc::MS_BIND;
const MS_REC: u64 = libc::MS_REC;
const MS_REMOUNT: u64 = libc::MS_REMOUNT;
const MS_RDONLY: u64 = libc::MS_RDONLY;
const MS_MOVE: u64 = libc::MS_MOVE;

/// How the helper entered the container's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RootSwitch {
    /// pivot_root, old root detached: nothing of the guest stays reachable.
    PivotRoot,
    /// MS_MOVE + chroot, when the current root cannot be pivoted (the
    /// initramfs itself); weaker against CAP_SYS_CHROOT holders.
    MoveAndChroot,
}

/// Sets up the rootfs and switches into it. Runs in the container init
/// helper, inside the new mount namespace.
pub fn apply_rootfs(plan: &CreatePlan, sys: &mut dyn Syscalls) -> Result<RootSwitch, SetupError> {
    let root = plan.rootfs.as_path();
    at(
        "set propagation of",
        "/",
        sys.mount(None, Path::new("/"), None, plan.rootfs_propagation, None),
    )?;
    at(
        "bind rootfs",
        root.display(),
        sys.mount(root.to_str(), root, None, MS_BIND | MS_REC, None),
    )?;
    for mount in &plan.mounts {
        apply_mount(mount, sys)?;
    }
    for device in &plan.devices {
        if let Some(parent) = device.target.parent() {
            at("create directory", parent.display(), sys.mkdir_all(parent))?;
        }
        match sys.mknod(&device.target, device.mode, device.major, device.minor) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(at::<()>("create device", device.target.display(), Err(e)).unwrap_err())
            }
        }
        at(
            "chown device",
            device.target.display(),
            sys.chown(&device.target, device.uid, device.gid),
        )?;
    }
    let dev = root.join("dev");
    if sys.is_dir(&dev) == Some(true) {
        for (target, link) in [
            ("/proc/self/fd", "fd"),
            ("/proc/self/fd/0", "stdin"),
            ("/proc/self/fd/1", "stdout"),
            ("/proc/self/fd/2", "stderr"),
        ] {
            match sys.symlink(target, &dev.join(link)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(
                        at::<()>("create symlink", format!("/dev/{link}"), Err(e)).unwrap_err()
                    )
                }
            }
        }
        if sys.is_dir(&dev.join("pts")) == Some(true) && sys.is_dir(&dev.join("ptmx")).is_none() {
            at(
                "create symlink",
                "/dev/ptmx",
                sys.symlink("pts/ptmx", &dev.join("ptmx")),
            )?;
        }
    }

    at("chdir to rootfs", root.display(), sys.chdir(root))?;
    let switch = match sys.pivot_root_here() {
        Ok(()) => {
            at("detach old root", "/", sys.umount_detach(Path::new(".")))?;
            RootSwitch::PivotRoot
        }
        // The initramfs root (rootfs) cannot be pivoted away from: move the
        // container's root over it and chroot, as runc's --no-pivot does.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            at(
                "move rootfs",
                root.display(),
                sys.mount(root.to_str(), Path::new("/"), None, MS_MOVE, None),
            )?;
            at("chroot into", root.display(), sys.chroot_here())?;
            RootSwitch::MoveAndChroot
        }
        Err(e) => return Err(at::<()>("pivot_root into", root.display(), Err(e)).unwrap_err()),
    };
    at("chdir to", "/", sys.chdir(Path::new("/")))?;

    // Before masked and read-only paths, as runc does: CRI's specs list
    // /proc/sys among the read-only paths and set sysctls
    // (net.ipv4.ip_unprivileged_port_start) at the same time.
    for (key, value) in &plan.sysctls {
        let file = PathBuf::from("/proc/sys").join(key);
        at(
            "write sysctl",
            key.replace('/', "."),
            sys.write_file(&file, value),
        )?;
    }

    for path in &plan.masked_paths {
        let target = Path::new(path);
        match sys.is_dir(target) {
            None => {}
            Some(true) => at(
                "mask",
                path,
                sys.mount(Some("tmpfs"), target, Some("tmpfs"), MS_RDONLY, None),
            )?,
            Some(false) => at(
                "mask",
                path,
                sys.mount(Some("/dev/null"), target, None, MS_BIND, None),
            )?,
        }
    }
    for path in &plan.readonly_paths {
        let target = Path::new(path);
        if sys.is_dir(target).is_none() {
            continue;
        }
        at(
            "bind read-only path",
            path,
            sys.mount(Some(path), target, None, MS_BIND | MS_REC, None),
        )?;
        at(
            "remount read-only",
            path,
            sys.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
        )?;
    }
    if let Some(hostname) = &plan.hostname {
        at("set hostname", hostname, sys.sethostname(hostname))?;
    }
    if plan.readonly_rootfs {
        at(
            "remount read-only",
            "/",
            sys.mount(
                None,
                Path::new("/"),
                None,
                MS_BIND | MS_REMOUNT | MS_RDONLY,
                None,
            ),
        )?;
    }
    Ok(switch)
}

fn apply_mount(mount: &MountPlan, sys: &mut dyn Syscalls) -> Result<(), SetupError> {
    let what = &mount.destination;
    if mount.bind_flags != 0 {
        let source = mount.source.as_deref().unwrap_or_default();
        match sys.is_dir(Path::new(source)) {
            Some(true) => at("create mount point", what, sys.mkdir_all(&mount.target))?,
            Some(false) => at("create mount point", what, sys.create_file(&mount.target))?,
            None => {
                return Err(SetupError {
                    step: "bind mount",
                    what: format!("{source} onto {what}"),
                    source: io::Error::from_raw_os_error(libc::ENOENT),
                })
            }
        }
        at(
            "bind mount",
            format!("{source} onto {what}"),
            sys.mount(Some(source), &mount.target, None, mount.bind_flags, None),
        )?;
        // Bind mounts ignore most flags on the first call.
        if mount.flags & !MS_REMOUNT != 0 {
            at(
                "remount",
                what,
                sys.mount(
                    None,
                    &mount.target,
                    None,
                    mount.flags | MS_BIND | MS_REMOUNT,
                    None,
                ),
            )?;
        }
    } else {
        at("create mount point", what, sys.mkdir_all(&mount.target))?;
        let fstype = mount.fstype.as_deref();
        let source = mount.source.as_deref().or(fstype);
        at(
            "mount",
            format!("{} on {what}", fstype.unwrap_or_default()),
            sys.mount(
                source,
                &mount.target,
                fstype,
                mount.flags,
                Some(&mount.data),
            ),
        )?;
    }
    for &propagation in &mount.propagation {
        at(
            "set propagation of",
            what,
            sys.mount(None, &mount.target, None, propagation, None),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::spec::{parse_spec, plan_container};

    /// Records calls; pretends every path in `dirs` is a directory and every
    /// path in `files` a file.
    #[derive(Default)]
    struct RecordingSyscalls {
        calls: Vec<String>,
        dirs: Vec<PathBuf>,
        files: Vec<PathBuf>,
        pivot_fails_with: Option<i32>,
    }

    impl Syscalls for RecordingSyscalls {
        fn mount(
            &mut self,
            source: Option<&str>,
            target: &Path,
            fstype: Option<&str>,
            flags: u64,
            data: Option<&str>,
        ) -> io::Result<()> {
            self.calls.push(format!(
                "mount {} {} {} {:#x} {}",
                source.unwrap_or("-"),
                target.display(),
                fstype.unwrap_or("-"),
                flags,
                data.filter(|d| !d.is_empty()).unwrap_or("-")
            ));
            Ok(())
        }
        fn umount_detach(&mut self, target: &Path) -> io::Result<()> {
            self.calls.push(format!("umount {}", target.display()));
            Ok(())
        }
        fn pivot_root_here(&mut self) -> io::Result<()> {
            self.calls.push("pivot_root".into());
            match self.pivot_fails_with {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }
        fn chroot_here(&mut self) -> io::Result<()> {
            self.calls.push("chroot".into());
            Ok(())
        }
        fn chdir(&mut self, path: &Path) -> io::Result<()> {
            self.calls.push(format!("chdir {}", path.display()));
            Ok(())
        }
        fn mkdir_all(&mut self, path: &Path) -> io::Result<()> {
            self.calls.push(format!("mkdir {}", path.display()));
            Ok(())
        }
        fn create_file(&mut self, path: &Path) -> io::Result<()> {
            self.calls.push(format!("touch {}", path.display()));
            Ok(())
        }
        fn mknod(&mut self, path: &Path, mode: u32, major: u64, minor: u64) -> io::Result<()> {
            self.calls.push(format!(
                "mknod {} {:o} {major}:{minor}",
                path.display(),
                mode
            ));
            Ok(())
        }
        fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
            self.calls
                .push(format!("chown {} {uid}:{gid}", path.display()));
            Ok(())
        }
        fn symlink(&mut self, target: &str, link: &Path) -> io::Result<()> {
            self.calls
                .push(format!("symlink {} -> {target}", link.display()));
            Ok(())
        }
        fn write_file(&mut self, path: &Path, contents: &str) -> io::Result<()> {
            self.calls
                .push(format!("write {} {contents}", path.display()));
            Ok(())
        }
        fn sethostname(&mut self, name: &str) -> io::Result<()> {
            self.calls.push(format!("hostname {name}"));
            Ok(())
        }
        fn is_dir(&mut self, path: &Path) -> Option<bool> {
            if self.dirs.iter().any(|d| d == path) {
                Some(true)
            } else if self.files.iter().any(|f| f == path) {
                Some(false)
            } else {
                None
            }
        }
    }

    fn spec_json() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.1.0",
            "hostname": "box",
            "process": { "args": ["sh"], "cwd": "/", "user": { "uid": 0, "gid": 0 } },
            "root": { "path": "rootfs", "readonly": true },
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                  "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
                { "destination": "/etc/hosts", "type": "bind", "source": "/host/hosts",
                  "options": ["rbind", "ro", "rprivate"] }
            ],
            "linux": {
                "namespaces": [{ "type": "mount" }, { "type": "pid" }, { "type": "uts" }],
                "maskedPaths": ["/proc/kcore", "/proc/acpi"],
                "readonlyPaths": ["/proc/sys"],
                "sysctl": { "net.ipv4.ip_forward": "1" }
            }
        })
    }

    #[test]
    fn spec_translates_to_expected_call_sequence() {
        let root = tempfile::tempdir().unwrap();
        let spec = parse_spec(spec_json().to_string().as_bytes()).unwrap();
        let plan = plan_container(&spec, root.path()).unwrap();
        let r = root.path().display().to_string();
        let mut sys = RecordingSyscalls {
            dirs: vec![
                root.path().join("dev"),
                PathBuf::from("/proc/acpi"),
                PathBuf::from("/proc/sys"),
            ],
            files: vec![PathBuf::from("/host/hosts"), PathBuf::from("/proc/kcore")],
            ..Default::default()
        };

        assert_eq!(
            apply_rootfs(&plan, &mut sys).unwrap(),
            RootSwitch::PivotRoot
        );

        let expected_prefix = vec![
            "mount - / - 0x84000 -".to_owned(),
            format!("mount {r} {r} - 0x5000 -"),
            format!("mkdir {r}/proc"),
            format!("mount proc {r}/proc proc 0x0 -"),
            format!("mkdir {r}/dev"),
            format!("mount tmpfs {r}/dev tmpfs 0x1000002 mode=755,size=65536k"),
            format!("touch {r}/etc/hosts"),
            format!("mount /host/hosts {r}/etc/hosts - 0x5000 -"),
            format!("mount - {r}/etc/hosts - 0x1021 -"),
            format!("mount - {r}/etc/hosts - 0x44000 -"),
            format!("mkdir {r}/dev"),
            format!("mknod {r}/dev/null 20666 1:3"),
            format!("chown {r}/dev/null 0:0"),
        ];
        assert_eq!(sys.calls[..expected_prefix.len()], expected_prefix[..]);
        let tail: Vec<&str> = sys
            .calls
            .iter()
            .map(String::as_str)
            .skip_while(|c| !c.starts_with("chdir"))
            .collect();
        assert_eq!(
            tail,
            vec![
                &format!("chdir {r}") as &str,
                "pivot_root",
                "umount .",
                "chdir /",
                // Sysctls while /proc/sys is still writable.
                "write /proc/sys/net/ipv4/ip_forward 1",
                "mount /dev/null /proc/kcore - 0x1000 -",
                "mount tmpfs /proc/acpi tmpfs 0x1 -",
                "mount /proc/sys /proc/sys - 0x5000 -",
                "mount - /proc/sys - 0x1021 -",
                "hostname box",
                "mount - / - 0x1021 -",
            ]
        );
    }

    #[test]
    fn pivot_root_einval_falls_back_to_move_and_chroot() {
        let root = tempfile::tempdir().unwrap();
        let spec = parse_spec(spec_json().to_string().as_bytes()).unwrap();
        let plan = plan_container(&spec, root.path()).unwrap();
        let mut sys = RecordingSyscalls {
            files: vec![PathBuf::from("/host/hosts")],
            pivot_fails_with: Some(libc::EINVAL),
            ..Default::default()
        };
        assert_eq!(
            apply_rootfs(&plan, &mut sys).unwrap(),
            RootSwitch::MoveAndChroot
        );
        let i = sys.calls.iter().position(|c| c == "pivot_root").unwrap();
        assert!(
            sys.calls[i + 1].starts_with("mount ") && sys.calls[i + 1].contains(" / - 0x2000 ")
        );
        assert_eq!(sys.calls[i + 2], "chroot");
    }

    #[test]
    fn bind_mount_with_missing_source_returns_error_naming_destination() {
        let root = tempfile::tempdir().unwrap();
        let spec = parse_spec(spec_json().to_string().as_bytes()).unwrap();
        let plan = plan_container(&spec, root.path()).unwrap();
        let mut sys = RecordingSyscalls::default();
        let err = apply_rootfs(&plan, &mut sys).unwrap_err();
        assert!(err.to_string().contains("/etc/hosts"), "{err}");
    }
}
