//! Opening mount targets beneath the pod's `shared/` folder without
//! following symlinks.
//!
//! The guest writes `shared/` through virtio-fs as uid 0: it can plant
//! `shared/<cid>/rootfs -> /usr/bin`, or swap a component between the shim's
//! `mkdir` and its `mount`, and make the root shim mount over a host folder
//! (Kata's CVE-2020-2026). So each component is created and opened relative
//! to its parent's fd with `O_NOFOLLOW`, and the mount goes onto
//! `/proc/self/fd/<N>` of the final fd: mount(2) resolves that magic link to
//! the very inode opened, so renaming the path afterwards redirects nothing.
//! Crossing into a file system mounted below `shared/` (a container's
//! rootfs, holding its volume mount points) is allowed: every component
//! there is checked the same way.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SafePathError {
    #[error("refusing to mount at {path}: component '{component}' is a symlink")]
    Symlink { path: PathBuf, component: String },
    #[error("refusing to mount at {path}: component '{component}' is not a directory")]
    NotDirectory { path: PathBuf, component: String },
    #[error(
        "refusing to mount at {path}: component '{component}' is a directory, a file was expected"
    )]
    IsDirectory { path: PathBuf, component: String },
    #[error("refusing to mount at {path}: only plain names below {root} are allowed")]
    NotBeneath { path: PathBuf, root: PathBuf },
    #[error("{op} {path} (component '{component}'): {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        component: String,
        source: std::io::Error,
    },
}

/// What the last component must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Directory,
    /// A file (created empty when missing), to bind a file onto.
    File,
}

/// An opened mount target: an `O_PATH` fd of it and of its parent.
#[derive(Debug)]
pub struct MountTarget {
    /// `root` joined with the relative path, for messages.
    pub path: PathBuf,
    parent: OwnedFd,
    name: OsString,
    fd: OwnedFd,
}

impl MountTarget {
    /// The path to hand to mount(2): the magic link to the opened inode.
    pub fn proc_path(&self) -> PathBuf {
        fd_path(self.fd.as_raw_fd())
    }

    /// Opens the target's name in its parent again, which lands on the
    /// root of whatever is mounted there now (mount(2) on `proc_path`
    /// reaches the covered inode, so a remount or a propagation change needs
    /// this). Still `O_NOFOLLOW` and relative to the parent's fd.
    pub fn reopen(&self) -> Result<OwnedFd, SafePathError> {
        let fd = open_path_nofollow(self.parent.as_raw_fd(), &self.name).map_err(|source| {
            SafePathError::Io {
                op: "reopen",
                path: self.path.clone(),
                component: self.name.to_string_lossy().into_owned(),
                source,
            }
        })?;
        if is_symlink(&fd).map_err(|source| self.io("stat", source))? {
            return Err(SafePathError::Symlink {
                path: self.path.clone(),
                component: self.name.to_string_lossy().into_owned(),
            });
        }
        Ok(fd)
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> SafePathError {
        SafePathError::Io {
            op,
            path: self.path.clone(),
            component: self.name.to_string_lossy().into_owned(),
            source,
        }
    }
}

/// `/proc/self/fd/<fd>`.
pub fn fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Opens (creating what is missing, folders mode 0755) `root/relative`
/// without following a symlink in any component of `relative`. `root`
/// itself is the shim's own folder and is trusted. `relative` must be plain
/// names: no `..`, no absolute path.
pub fn open_beneath(
    root: &Path,
    relative: &Path,
    leaf: Leaf,
) -> Result<MountTarget, SafePathError> {
    let path = root.join(relative);
    let not_beneath = || SafePathError::NotBeneath {
        path: path.clone(),
        root: root.to_path_buf(),
    };
    let mut names = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(name.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(not_beneath())
            }
        }
    }
    let Some(last) = names.pop() else {
        return Err(not_beneath());
    };
    let io = |op: &'static str, component: &OsStr, source| SafePathError::Io {
        op,
        path: path.clone(),
        component: component.to_string_lossy().into_owned(),
        source,
    };
    let root_c = cstring(root.as_os_str()).map_err(|e| io("open", root.as_os_str(), e))?;
    // SAFETY: a valid NUL-terminated path; the returned fd is checked and
    // owned below.
    let raw = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    let mut parent = owned(raw).map_err(|e| io("open", root.as_os_str(), e))?;
    for name in &names {
        parent = open_dir(&parent, name, &path)?;
    }
    let fd = match leaf {
        Leaf::Directory => open_dir(&parent, &last, &path)?,
        Leaf::File => open_file(&parent, &last, &path)?,
    };
    Ok(MountTarget {
        path,
        parent,
        name: last,
        fd,
    })
}

/// Creates (if missing) and opens the folder `name` in `parent`.
fn open_dir(parent: &OwnedFd, name: &OsStr, path: &Path) -> Result<OwnedFd, SafePathError> {
    let io = |op, source| SafePathError::Io {
        op,
        path: path.to_path_buf(),
        component: name.to_string_lossy().into_owned(),
        source,
    };
    let name_c = cstring(name).map_err(|e| io("mkdir", e))?;
    // SAFETY: a valid fd and NUL-terminated name; mkdirat never follows a
    // symlink in its last component (an existing one gives EEXIST).
    let made = unsafe { libc::mkdirat(parent.as_raw_fd(), name_c.as_ptr(), 0o755) };
    if made != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io("mkdir", e));
        }
    }
    let fd = open_path_nofollow(parent.as_raw_fd(), name).map_err(|e| io("open", e))?;
    let mode = file_type(&fd).map_err(|e| io("stat", e))?;
    match mode {
        libc::S_IFDIR => Ok(fd),
        libc::S_IFLNK => Err(SafePathError::Symlink {
            path: path.to_path_buf(),
            component: name.to_string_lossy().into_owned(),
        }),
        _ => Err(SafePathError::NotDirectory {
            path: path.to_path_buf(),
            component: name.to_string_lossy().into_owned(),
        }),
    }
}

/// Creates (if missing, empty, mode 0644) and opens the file `name` in
/// `parent`.
fn open_file(parent: &OwnedFd, name: &OsStr, path: &Path) -> Result<OwnedFd, SafePathError> {
    let io = |op, source| SafePathError::Io {
        op,
        path: path.to_path_buf(),
        component: name.to_string_lossy().into_owned(),
        source,
    };
    let name_c = cstring(name).map_err(|e| io("create", e))?;
    // SAFETY: a valid fd and NUL-terminated name; O_EXCL|O_NOFOLLOW never
    // opens through a symlink. The fd is owned (and closed) at once.
    let created = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name_c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    match owned(created) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(io("create", e)),
    }
    let fd = open_path_nofollow(parent.as_raw_fd(), name).map_err(|e| io("open", e))?;
    let mode = file_type(&fd).map_err(|e| io("stat", e))?;
    match mode {
        libc::S_IFLNK => Err(SafePathError::Symlink {
            path: path.to_path_buf(),
            component: name.to_string_lossy().into_owned(),
        }),
        libc::S_IFDIR => Err(SafePathError::IsDirectory {
            path: path.to_path_buf(),
            component: name.to_string_lossy().into_owned(),
        }),
        _ => Ok(fd),
    }
}

/// `O_PATH | O_NOFOLLOW`: a symlink yields an fd of the link itself, which
/// the callers recognise by its type (checked on the fd, so no race).
fn open_path_nofollow(parent: RawFd, name: &OsStr) -> std::io::Result<OwnedFd> {
    let name_c = cstring(name)?;
    // SAFETY: a valid fd and NUL-terminated name; the result is owned.
    let raw = unsafe {
        libc::openat(
            parent,
            name_c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    owned(raw)
}

fn file_type(fd: &OwnedFd) -> std::io::Result<libc::mode_t> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the buffer when it returns 0 (O_PATH fds are
    // accepted since Linux 3.6).
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful fstat above.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.st_mode & libc::S_IFMT)
}

fn is_symlink(fd: &OwnedFd) -> std::io::Result<bool> {
    Ok(file_type(fd)? == libc::S_IFLNK)
}

fn owned(raw: RawFd) -> std::io::Result<OwnedFd> {
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn cstring(name: &OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", name.to_string_lossy()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn mounted_at(path: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let wanted = path.to_str().unwrap();
        info.lines()
            .any(|line| line.split(' ').nth(4) == Some(wanted))
    }

    #[test]
    fn creates_missing_folders_and_opens_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = open_beneath(dir.path(), Path::new("c1/rootfs"), Leaf::Directory).unwrap();
        assert!(dir.path().join("c1/rootfs").is_dir());
        assert_eq!(target.path, dir.path().join("c1/rootfs"));
        let file = open_beneath(dir.path(), Path::new("c1/mounts/0"), Leaf::File).unwrap();
        assert!(dir.path().join("c1/mounts/0").is_file());
        assert!(file.proc_path().starts_with("/proc/self/fd/"));
    }

    #[test]
    fn a_symlink_at_the_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("c1")).unwrap();
        symlink(outside.path(), dir.path().join("c1/rootfs")).unwrap();
        let err = open_beneath(dir.path(), Path::new("c1/rootfs"), Leaf::Directory).unwrap_err();
        assert!(
            matches!(&err, SafePathError::Symlink { component, .. } if component == "rootfs"),
            "{err}"
        );
        assert!(
            err.to_string().contains("component 'rootfs' is a symlink"),
            "{err}"
        );
        // A symlink to a file, where a file is bound, too.
        let file = outside.path().join("passwd");
        std::fs::write(&file, "x").unwrap();
        symlink(&file, dir.path().join("c1/0")).unwrap();
        let err = open_beneath(dir.path(), Path::new("c1/0"), Leaf::File).unwrap_err();
        assert!(matches!(err, SafePathError::Symlink { .. }), "{err}");
        // A dangling symlink is not created through.
        symlink(outside.path().join("new"), dir.path().join("c1/1")).unwrap();
        let err = open_beneath(dir.path(), Path::new("c1/1"), Leaf::File).unwrap_err();
        assert!(matches!(err, SafePathError::Symlink { .. }), "{err}");
        assert!(!outside.path().join("new").exists());
    }

    #[test]
    fn a_symlink_in_an_intermediate_component_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), dir.path().join("c1")).unwrap();
        let err = open_beneath(dir.path(), Path::new("c1/mounts/0"), Leaf::File).unwrap_err();
        assert!(
            matches!(&err, SafePathError::Symlink { component, .. } if component == "c1"),
            "{err}"
        );
        // Nothing was created outside.
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        for relative in ["../escape", "c1/../../escape", "/tmp/escape", "", "."] {
            let err = open_beneath(&shared, Path::new(relative), Leaf::Directory).unwrap_err();
            assert!(
                matches!(err, SafePathError::NotBeneath { .. }),
                "{relative}: {err}"
            );
        }
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn a_file_in_place_of_a_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c1"), "").unwrap();
        let err = open_beneath(dir.path(), Path::new("c1/rootfs"), Leaf::Directory).unwrap_err();
        assert!(matches!(err, SafePathError::NotDirectory { .. }), "{err}");
    }

    #[test]
    fn a_bind_mount_onto_the_fd_lands_at_the_opened_folder_not_a_swapped_one() {
        if !is_root() {
            eprintln!("SKIP: bind mounts need root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let source = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("marker"), "m").unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = open_beneath(dir.path(), Path::new("c1/rootfs"), Leaf::Directory).unwrap();
        // The guest swaps the folder for a symlink after the shim opened it.
        let moved = dir.path().join("c1/moved");
        std::fs::rename(dir.path().join("c1/rootfs"), &moved).unwrap();
        symlink(outside.path(), dir.path().join("c1/rootfs")).unwrap();
        let none: Option<&str> = None;
        nix::mount::mount(
            Some(source.path()),
            &target.proc_path(),
            none,
            nix::mount::MsFlags::MS_BIND,
            none,
        )
        .unwrap();
        let landed_outside = outside.path().join("marker").exists();
        let landed_at_open = moved.join("marker").exists();
        let listed = mounted_at(&moved);
        nix::mount::umount2(&moved, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(!landed_outside, "the mount followed the swapped-in symlink");
        assert!(landed_at_open && listed);
        assert!(!mounted_at(&moved));
    }
}
