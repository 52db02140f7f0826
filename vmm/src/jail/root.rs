//! The jail's file system: a private tmpfs over the jail folder holding
//! only the plan's binds, device nodes and a fresh procfs, made read-only,
//! then `pivot_root` into it and the old root detached, so no path leads
//! back to the host.
//!
//! Propagation is MS_SLAVE, not MS_PRIVATE: nothing the jail mounts reaches
//! the host, while mounts the host adds later below a shared folder (the
//! containers' rootfs the shim mounts under the pod's shared folder, made a
//! shared mount for that) still reach the VMM's virtio-fs share.

use std::ffi::CString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::plan::{BindKind, DeviceNode, JailPlan};
use super::JailError;

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Path {
        field: "path",
        path: path.to_path_buf(),
        reason: "contains a NUL byte",
    })
}

fn last_error(step: &'static str, path: &Path) -> JailError {
    JailError::Step {
        step,
        value: path.display().to_string(),
        source: std::io::Error::last_os_error(),
    }
}

fn mount(
    step: &'static str,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    // SAFETY: every pointer is a NUL-terminated string that lives until the
    // call returns, or null where mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    if rc != 0 {
        return Err(last_error(step, target));
    }
    Ok(())
}

/// `root` + an absolute path inside the jail.
fn inside(root: &Path, jailed: &Path) -> PathBuf {
    root.join(jailed.strip_prefix("/").unwrap_or(jailed))
}

fn make_folder(path: &Path) -> Result<(), JailError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| JailError::Step {
            step: "create folder in jail",
            value: path.display().to_string(),
            source,
        })
}

/// Builds the root at `root` (in this process's own mount namespace) and
/// pivots into it. `uid`/`gid` own the device nodes.
pub fn enter_root(root: &Path, plan: &JailPlan, uid: u32, gid: u32) -> Result<(), JailError> {
    mount(
        "make mounts slave",
        None,
        Path::new("/"),
        None,
        libc::MS_SLAVE | libc::MS_REC,
        None,
    )?;
    make_folder(root)?;
    mount(
        "mount jail tmpfs",
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=256"),
    )?;
    for bind in &plan.binds {
        bind_into(root, bind)?;
    }
    for node in &plan.devices {
        make_device_node(root, node, uid, gid)?;
    }
    // Read-only: a virtio-fs server runs with effective uid 0, and uid 0
    // may write sysctls (core_pattern!) by their file mode alone. Reopening
    // a file through /proc/self/fd for writing still works (the mode
    // that counts is the file's mount's).
    let proc_dir = root.join("proc");
    make_folder(&proc_dir)?;
    mount(
        "mount procfs",
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    mount(
        "make jail root read-only",
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )?;
    pivot_into(root)
}

fn bind_into(root: &Path, bind: &super::plan::Bind) -> Result<(), JailError> {
    let target = inside(root, &bind.target);
    match bind.kind {
        BindKind::Folder => make_folder(&target)?,
        BindKind::File => {
            if let Some(parent) = target.parent() {
                make_folder(parent)?;
            }
            std::fs::File::create(&target).map_err(|source| JailError::Step {
                step: "create bind target in jail",
                value: target.display().to_string(),
                source,
            })?;
        }
    }
    let step = "bind into jail";
    let flags = libc::MS_BIND | libc::MS_REC;
    mount(step, Some(&bind.source), &target, None, flags, None).map_err(|e| match e {
        JailError::Step { source, .. } => JailError::Step {
            step,
            value: format!("{} at {}", bind.source.display(), bind.target.display()),
            source,
        },
        other => other,
    })?;
    // A bind takes the source's flags; read-only and nosuid need a remount.
    // A remount changes one mount only: the ones MS_REC brought along (a
    // folder's submounts) get the same flags one by one, or a read-only
    // share would stay writable below its first submount, and a submount
    // without nodev would let the jail open the device nodes it holds.
    let mut remount = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
    if bind.read_only {
        remount |= libc::MS_RDONLY;
    }
    mount("remount bind in jail", None, &target, None, remount, None)?;
    if bind.kind == BindKind::Folder {
        for submount in mounts_below(&target)? {
            mount(
                "remount submount in jail",
                None,
                &submount,
                None,
                remount,
                None,
            )?;
        }
    }
    Ok(())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`).
fn unescape_mount_point(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mount points strictly below `dir` in this mount namespace, parents
/// before children (mountinfo lists them in mount order).
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>, JailError> {
    // mountinfo names resolved paths (a jail root under /var/run is under
    // /run there).
    let dir = &std::fs::canonicalize(dir).map_err(|source| JailError::Step {
        step: "resolve bind target",
        value: dir.display().to_string(),
        source,
    })?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| JailError::Step {
            step: "read mountinfo",
            value: dir.display().to_string(),
            source,
        })?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_point)
        .filter(|point| point != dir && point.starts_with(dir))
        .collect())
}

fn make_device_node(root: &Path, node: &DeviceNode, uid: u32, gid: u32) -> Result<(), JailError> {
    let host = Path::new(node.host);
    let meta = std::fs::metadata(host).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            JailError::NoHostDevice {
                node: node.host,
                provided_by: node.provided_by,
            }
        } else {
            JailError::Step {
                step: "stat host device",
                value: node.host.to_string(),
                source,
            }
        }
    })?;
    let target = inside(root, host);
    if let Some(parent) = target.parent() {
        make_folder(parent)?;
    }
    let path = cstring(&target)?;
    // SAFETY: `path` is NUL-terminated and outlives the calls; mknod and
    // chown only create and change the node at that path.
    let rc = unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFCHR | node.mode,
            meta.rdev() as libc::dev_t,
        )
    };
    if rc != 0 {
        return Err(last_error("mknod device in jail", &target));
    }
    // SAFETY: as above.
    if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
        return Err(last_error("chown device in jail", &target));
    }
    // SAFETY: as above; chmod because the umask cut mknod's mode.
    if unsafe { libc::chmod(path.as_ptr(), node.mode) } != 0 {
        return Err(last_error("chmod device in jail", &target));
    }
    Ok(())
}

/// `pivot_root(".", ".")` in `root`, then detaches the old root stacked on
/// top of it: afterwards no mount of the host is reachable.
fn pivot_into(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(|source| JailError::Step {
        step: "chdir to jail root",
        value: root.display().to_string(),
        source,
    })?;
    let dot = c".";
    // SAFETY: pivot_root takes two NUL-terminated paths and no memory.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(last_error("pivot_root", root));
    }
    // SAFETY: umount2 of the old root, now mounted over ".".
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_error("detach old root", root));
    }
    std::env::set_current_dir("/").map_err(|source| JailError::Step {
        step: "chdir to / in jail",
        value: root.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_the_host_lacks_is_named_with_what_provides_it() {
        let root = tempfile::tempdir().unwrap();
        let node = DeviceNode {
            host: "/dev/cloister-test-no-such-device",
            mode: 0o600,
            provided_by: "the test",
        };
        let err = make_device_node(root.path(), &node, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no /dev/cloister-test-no-such-device") && err.contains("the test"),
            "{err}"
        );
        // Nothing was created.
        assert!(!root.path().join("dev").exists());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mount_point(r"/share/a\040b\134c\011"),
            Path::new("/share/a b\\c\t")
        );
        assert_eq!(unescape_mount_point(r"/x\0"), Path::new(r"/x\0"));
    }
}
