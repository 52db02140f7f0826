//! Undoing a pod's mounts and folders without following a symlink the
//! guest planted.
//!
//! The guest writes `shared/` through virtio-fs as uid 0 while the shim
//! tears a container down: between the shim reading `/proc/self/mountinfo`
//! and calling umount(2), or between listing a folder and descending into
//! one of its entries, it can swap a directory for a symlink to a host
//! folder. Path-based teardown would then unmount a host mount (another
//! container's rootfs is also called `rootfs`) or delete host files. So,
//! as [`crate::safe_path`] does for mounting, every component is opened
//! relative to its parent's fd with `O_NOFOLLOW`, unmounting goes through
//! `/proc/self/fd/<N>` of the opened mount root, and removal uses
//! `unlinkat` on directory fds, never crossing into another file system.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("refusing to tear down {path}: only plain names below {root} are allowed")]
    NotBeneath { path: PathBuf, root: PathBuf },
    #[error(
        "refusing to remove {path}: it is a mount point (another file system below the folder)"
    )]
    MountPoint { path: PathBuf },
    #[error("refusing to remove {path}: folders nest deeper than {MAX_DEPTH} levels there")]
    TooDeep { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: Errno,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> TeardownError + 'a {
    move |source| TeardownError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The plain names of `relative`; anything else is refused.
fn plain_names(root: &Path, relative: &Path) -> Result<Vec<OsString>, TeardownError> {
    let mut names = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(name.to_owned()),
            Component::CurDir => {}
            _ => {
                return Err(TeardownError::NotBeneath {
                    path: root.join(relative),
                    root: root.to_path_buf(),
                })
            }
        }
    }
    Ok(names)
}

/// `O_PATH | O_NOFOLLOW` of `name` in `parent`.
fn open_path(parent: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(
        parent,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn is_symlink(fd: impl AsFd) -> Result<bool, Errno> {
    let stat = fstat(fd)?;
    Ok(SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
}

fn is_dir(fd: impl AsFd) -> Result<bool, Errno> {
    let stat = fstat(fd)?;
    Ok(SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

/// Unmounts everything stacked at `root/relative` (a folder, or a file a
/// file was bound onto; lazily: the guest may still hold files), reaching
/// it without following a symlink. A missing path, a symlink, or a
/// non-folder on the way means nothing of ours is mounted there: nothing
/// is done. `root` is the shim's own folder.
pub fn unmount_beneath(root: &Path, relative: &Path) -> Result<(), TeardownError> {
    let path = root.join(relative);
    let mut names = plain_names(root, relative)?;
    let Some(last) = names.pop() else {
        return Err(TeardownError::NotBeneath {
            path,
            root: root.to_path_buf(),
        });
    };
    let mut parent = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open", root))?;
    for name in &names {
        match open_path(&parent, name) {
            Ok(fd) if is_dir(&fd).map_err(io("stat", &path))? => parent = fd,
            // A symlink (or a file) where a folder was: the guest's doing,
            // and not where our mount is.
            Ok(_) | Err(Errno::ENOENT) => {
                tracing::warn!(path = %path.display(), component = %name.to_string_lossy(), "not a folder on the way to a mount: left alone");
                return Ok(());
            }
            Err(e) => return Err(io("open", &path)(e)),
        }
    }
    loop {
        // Opened afresh each round: after an unmount the name shows what
        // was mounted beneath (or the folder itself).
        let fd = match open_path(&parent, &last) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(io("open", &path)(e)),
        };
        if is_symlink(&fd).map_err(io("stat", &path))? {
            // Our mounts are folders or files (a bind of /etc/hosts): a
            // symlink here is the guest's, not one of them.
            return Ok(());
        }
        let magic = crate::safe_path::fd_path(fd.as_raw_fd());
        match umount2(&magic, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            // Not a mount point: done.
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(io("unmount", &path)(e)),
        }
    }
}

/// Removes the folder `path` and everything in it, refusing to enter
/// another file system (a mount left below it) and never following a
/// symlink: each entry is examined and removed through its parent's fd.
/// The folder's own parent is trusted (the shim's state folder). A missing
/// folder is fine.
pub fn remove_tree(path: &Path) -> Result<(), TeardownError> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(TeardownError::NotBeneath {
            path: path.to_path_buf(),
            root: PathBuf::from("/"),
        });
    };
    let parent_fd = match openat(
        nix::fcntl::AT_FDCWD,
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io("open", parent)(e)),
    };
    let dev = match fstatat(&parent_fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => stat.st_dev,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io("stat", path)(e)),
    };
    remove_entry(&parent_fd, name, dev, path, 0)
}

/// How deep [`remove_tree`] descends: each level holds a descriptor and a
/// stack frame, and the guest decides the depth of what it writes. A
/// deeper tree is refused (and left, named) rather than exhausting the
/// shim's descriptors or stack.
const MAX_DEPTH: usize = 256;

/// Removes `name` in the directory `parent`: a folder on device `dev`
/// with its contents, or anything else as a name.
fn remove_entry(
    parent: &OwnedFd,
    name: &OsStr,
    dev: u64,
    path: &Path,
    depth: usize,
) -> Result<(), TeardownError> {
    let dir = match open_dir_on_this_mount(parent, name) {
        Ok(dir) => dir,
        // A mount point (a bind from the same file system too, which the
        // device check below cannot tell): the guest may have moved another
        // container's folder, mounts and all, in here.
        Err(Errno::EXDEV) => {
            return Err(TeardownError::MountPoint {
                path: path.to_path_buf(),
            })
        }
        // Not a folder (a symlink gives ELOOP, a file ENOTDIR), whatever
        // it was a moment ago: removed as a name, its target untouched.
        Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
            return match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(io("remove", path)(e)),
            }
        }
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io("open", path)(e)),
    };
    if fstat(&dir).map_err(io("stat", path))?.st_dev != dev {
        return Err(TeardownError::MountPoint {
            path: path.to_path_buf(),
        });
    }
    for entry in list(&dir).map_err(io("list", path))? {
        if depth >= MAX_DEPTH {
            return Err(TeardownError::TooDeep {
                path: path.to_path_buf(),
            });
        }
        remove_entry(&dir, &entry, dev, &path.join(&entry), depth + 1)?;
    }
    match unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

/// Opens the folder `name` in `parent` without following a symlink and
/// without crossing into another mount (`openat2` `RESOLVE_NO_XDEV`:
/// EXDEV). Kernels before 5.6 lack openat2: there only the device check
/// of the caller stands between the walk and a mount.
fn open_dir_on_this_mount(parent: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_NO_XDEV
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_BENEATH,
    );
    match openat2(parent, name, how) {
        Err(Errno::ENOSYS) => openat(parent, name, flags, Mode::empty()),
        other => other,
    }
}

/// The names in the directory `dir` (without `.` and `..`).
fn list(dir: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    // Dir takes ownership of the fd it reads: give it a duplicate.
    let mut reader = nix::dir::Dir::from_fd(dir.try_clone().map_err(|_| Errno::EMFILE)?)?;
    let mut names = Vec::new();
    for entry in reader.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn mounted_at(path: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let wanted = path.to_str().unwrap();
        info.lines()
            .any(|line| line.split(' ').nth(4) == Some(wanted))
    }

    fn tmpfs_at(path: &Path) {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
    }

    #[test]
    fn removes_a_tree_but_not_what_its_symlinks_point_at() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "host file").unwrap();
        let pod = dir.path().join("pod");
        std::fs::create_dir_all(pod.join("shared/c1/deep")).unwrap();
        std::fs::write(pod.join("shared/c1/deep/f"), "x").unwrap();
        symlink(outside.path(), pod.join("shared/c1/link")).unwrap();
        symlink(outside.path().join("keep"), pod.join("shared/file-link")).unwrap();

        remove_tree(&pod).unwrap();

        assert!(!pod.exists());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("keep")).unwrap(),
            "host file"
        );
        // Missing is fine.
        remove_tree(&pod).unwrap();
    }

    #[test]
    fn removal_refuses_to_enter_a_mounted_file_system() {
        if !is_root() {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pod");
        let mounted = pod.join("shared/c1/rootfs");
        std::fs::create_dir_all(&mounted).unwrap();
        tmpfs_at(&mounted);
        std::fs::write(mounted.join("precious"), "data").unwrap();

        let err = remove_tree(&pod).unwrap_err();
        assert!(matches!(err, TeardownError::MountPoint { .. }), "{err}");
        assert!(err.to_string().contains("c1/rootfs"), "{err}");
        assert_eq!(
            std::fs::read_to_string(mounted.join("precious")).unwrap(),
            "data"
        );

        unmount_beneath(&pod, Path::new("shared/c1/rootfs")).unwrap();
        assert!(!mounted_at(&mounted));
        remove_tree(&pod).unwrap();
        assert!(!pod.exists());
    }

    /// CRI binds files (`/etc/hosts`, `/etc/resolv.conf`) into the share.
    #[test]
    fn a_file_bind_mount_is_unmounted_too() {
        if !is_root() {
            eprintln!("SKIP: bind mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let source = host.path().join("hosts");
        std::fs::write(&source, "127.0.0.1 localhost\n").unwrap();
        let target = dir.path().join("c1/mounts/0");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, "").unwrap();
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        assert!(mounted_at(&target));
        unmount_beneath(dir.path(), Path::new("c1/mounts/0")).unwrap();
        assert!(!mounted_at(&target), "the file bind is still mounted");
        remove_tree(&dir.path().join("c1")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&source).unwrap(),
            "127.0.0.1 localhost\n"
        );
    }

    /// Another container's folder moved in by the guest, with a writable
    /// bind of a host folder on the same file system (a hostPath on /run
    /// next to /run/cloister): same device, still never entered.
    #[test]
    fn removal_refuses_a_bind_mount_from_the_same_file_system() {
        if !is_root() {
            eprintln!("SKIP: bind mounting needs root");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let host = base.path().join("host-volume");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("data"), "keep me").unwrap();
        let pod = base.path().join("pod");
        let target = pod.join("shared/c1/moved-in/mounts/0");
        std::fs::create_dir_all(&target).unwrap();
        nix::mount::mount(
            Some(&host),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();

        let err = remove_tree(&pod.join("shared/c1")).unwrap_err();

        let still = std::fs::read_to_string(host.join("data"));
        umount2(&target, MntFlags::MNT_DETACH).unwrap();
        assert!(matches!(err, TeardownError::MountPoint { .. }), "{err}");
        assert_eq!(still.unwrap(), "keep me");
    }

    #[test]
    fn stacked_mounts_all_go_and_a_plain_folder_is_no_error() {
        if !is_root() {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c1/rootfs");
        std::fs::create_dir_all(&target).unwrap();
        tmpfs_at(&target);
        tmpfs_at(&target);
        unmount_beneath(dir.path(), Path::new("c1/rootfs")).unwrap();
        assert!(!mounted_at(&target));
        unmount_beneath(dir.path(), Path::new("c1/rootfs")).unwrap();
        unmount_beneath(dir.path(), Path::new("c9/absent")).unwrap();
    }

    /// The guest moved the container's folder away and put a symlink to a
    /// host folder with a mount called `rootfs` in its place: the host's
    /// mount stays.
    #[test]
    fn a_planted_symlink_never_leads_the_unmount_to_a_host_mount() {
        if !is_root() {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let host_mount = host.path().join("rootfs");
        std::fs::create_dir_all(&host_mount).unwrap();
        tmpfs_at(&host_mount);
        symlink(host.path(), dir.path().join("c1")).unwrap();

        unmount_beneath(dir.path(), Path::new("c1/rootfs")).unwrap();
        assert!(mounted_at(&host_mount), "the host's mount was unmounted");

        // And a symlink as the last component.
        std::fs::create_dir(dir.path().join("c2")).unwrap();
        symlink(&host_mount, dir.path().join("c2/rootfs")).unwrap();
        unmount_beneath(dir.path(), Path::new("c2/rootfs")).unwrap();
        assert!(mounted_at(&host_mount), "the host's mount was unmounted");
        umount2(&host_mount, MntFlags::MNT_DETACH).unwrap();
    }

    #[test]
    fn a_tree_nested_too_deep_is_refused_not_followed_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().join("c1");
        for _ in 0..MAX_DEPTH + 2 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = remove_tree(&dir.path().join("c1")).unwrap_err();
        assert!(matches!(err, TeardownError::TooDeep { .. }), "{err}");
        // A tree within the limit goes.
        let shallow = dir.path().join("c2/a/b/c");
        std::fs::create_dir_all(&shallow).unwrap();
        remove_tree(&dir.path().join("c2")).unwrap();
        assert!(!dir.path().join("c2").exists());
    }

    #[test]
    fn names_that_climb_out_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = unmount_beneath(dir.path(), Path::new("../etc")).unwrap_err();
        assert!(matches!(err, TeardownError::NotBeneath { .. }), "{err}");
        assert!(unmount_beneath(dir.path(), Path::new("")).is_err());
    }
}
