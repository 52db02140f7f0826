//! The system calls that set up a container's file system, behind a trait
//! so the plan → calls translation is unit-tested with a recording fake.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Mount namespace and file system operations used by `setup.rs`.
pub trait Syscalls {
    fn mount(
        &mut self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: u64,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn umount_detach(&mut self, target: &Path) -> io::Result<()>;
    /// pivot_root(".", ".") inside the current directory.
    fn pivot_root_here(&mut self) -> io::Result<()>;
    fn chroot_here(&mut self) -> io::Result<()>;
    fn chdir(&mut self, path: &Path) -> io::Result<()>;
    fn mkdir_all(&mut self, path: &Path) -> io::Result<()>;
    fn create_file(&mut self, path: &Path) -> io::Result<()>;
    fn mknod(&mut self, path: &Path, mode: u32, major: u64, minor: u64) -> io::Result<()>;
    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    fn symlink(&mut self, target: &str, link: &Path) -> io::Result<()>;
    fn write_file(&mut self, path: &Path, contents: &str) -> io::Result<()>;
    fn sethostname(&mut self, name: &str) -> io::Result<()>;
    /// `Some(true)` directory, `Some(false)` other file, `None` missing.
    fn is_dir(&mut self, path: &Path) -> Option<bool>;
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cstr_opt(s: Option<&str>) -> io::Result<Option<CString>> {
    s.map(|s| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The real system calls.
pub struct LinuxSyscalls;

impl Syscalls for LinuxSyscalls {
    fn mount(
        &mut self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: u64,
        data: Option<&str>,
    ) -> io::Result<()> {
        let source = cstr_opt(source)?;
        let target = cstring(target)?;
        let fstype = cstr_opt(fstype)?;
        let data = cstr_opt(data.filter(|d| !d.is_empty()))?;
        let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: every pointer is either null or a NUL-terminated string
        // that lives until the call returns.
        check(unsafe {
            libc::mount(
                ptr(&source),
                target.as_ptr(),
                ptr(&fstype),
                flags as libc::c_ulong,
                ptr(&data).cast(),
            )
        })
    }

    fn umount_detach(&mut self, target: &Path) -> io::Result<()> {
        let target = cstring(target)?;
        // SAFETY: `target` is a valid C string.
        check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })
    }

    fn pivot_root_here(&mut self) -> io::Result<()> {
        let dot = c".";
        // SAFETY: both arguments are valid C strings.
        let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn chroot_here(&mut self) -> io::Result<()> {
        // SAFETY: a valid C string.
        check(unsafe { libc::chroot(c".".as_ptr()) })
    }

    fn chdir(&mut self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn mkdir_all(&mut self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn create_file(&mut self, path: &Path) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map(drop)
    }

    fn mknod(&mut self, path: &Path, mode: u32, major: u64, minor: u64) -> io::Result<()> {
        let path = cstring(path)?;
        let dev = libc::makedev(
            u32::try_from(major).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            u32::try_from(minor).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        );
        // SAFETY: a valid C string; mknod has no memory side effects.
        check(unsafe { libc::mknod(path.as_ptr(), mode, dev) })
    }

    fn chown(&mut self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    fn symlink(&mut self, target: &str, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn write_file(&mut self, path: &Path, contents: &str) -> io::Result<()> {
        std::fs::write(path, contents)
    }

    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(io::Error::from)
    }

    fn is_dir(&mut self, path: &Path) -> Option<bool> {
        std::fs::metadata(path).ok().map(|m| m.is_dir())
    }
}
