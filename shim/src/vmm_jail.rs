//! What the shim prepares so that `cloister-vmm` (and its vhost-user
//! servers) run jailed (`[vmm] jail`, on by default): the jail's root
//! folder `<sandbox>/jail` (empty on the host: the VMM mounts its own
//! tmpfs over it in its own mount namespace), a sockets folder
//! `<sandbox>/sockets` the jail uid owns (the only host folder the VMM
//! can create files in), the shared folder made a shared mount (so the
//! containers' rootfs, mounted below it after the VM started, reach the
//! jailed VMM's view), and the pod's cgroup from the sandbox spec's
//! `linux.cgroupsPath`.
//!
//! cgroupsPath forms: a path (`/kubepods/burstable/pod<uid>/<id>`, the
//! cgroupfs driver; `ctr` writes `/<namespace>/<id>`) is placed under
//! `/sys/fs/cgroup` on cgroup v2 and under every v1 hierarchy otherwise
//! (hybrid hosts included); missing folders are created (cpuset ones get
//! their parent's cpus and mems) and removed when the VM is gone. The
//! systemd driver's `slice:prefix:name` becomes the path runc's systemd
//! driver would use, `<slice expanded>/<prefix>-<name>.scope`
//! (`kubepods-burstable-pod1.slice` → `kubepods.slice/
//! kubepods-burstable.slice/kubepods-burstable-pod1.slice`), made as a
//! plain cgroup folder: the VMM is accounted to the pod's slice, but no
//! systemd scope unit exists for it.

use std::path::{Component, Path, PathBuf};

/// The cgroup file systems' mount point.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Why a pod's jail could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum VmmJailError {
    #[error("linux.cgroupsPath = {0}: not a systemd slice:prefix:name (the slice must be NAME.slice of dash-separated parts, prefix and name without / or :)")]
    BadSystemdPath(String),
    #[error("linux.cgroupsPath = {0}: must be a path without ..")]
    BadCgroupsPath(String),
    #[error("no cgroup hierarchy under {0}")]
    NoHierarchy(PathBuf),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmmJailError {
    let path = path.to_path_buf();
    move |source| VmmJailError::Io { what, path, source }
}

/// The cgroup folders `cgroups_path` names under `cgroup_root`: one on
/// v2, one per v1 hierarchy.
pub fn cgroup_dirs(cgroup_root: &Path, cgroups_path: &str) -> Result<Vec<PathBuf>, VmmJailError> {
    let systemd;
    let path = if !cgroups_path.starts_with('/') && cgroups_path.split(':').count() == 3 {
        systemd = systemd_cgroup_path(cgroups_path)?;
        systemd.as_str()
    } else {
        cgroups_path
    };
    let relative = Path::new(path.trim_start_matches('/'));
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !plain || relative.as_os_str().is_empty() {
        return Err(VmmJailError::BadCgroupsPath(cgroups_path.into()));
    }
    if cgroup_root.join("cgroup.controllers").exists() {
        return Ok(vec![cgroup_root.join(relative)]);
    }
    let mut dirs = Vec::new();
    let entries = std::fs::read_dir(cgroup_root).map_err(io("read cgroup root", cgroup_root))?;
    for entry in entries.flatten() {
        // `cpu` and `cpuacct` are often symlinks to `cpu,cpuacct`.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && entry.path().join("cgroup.procs").exists() {
            dirs.push(entry.path().join(relative));
        }
    }
    if dirs.is_empty() {
        return Err(VmmJailError::NoHierarchy(cgroup_root.to_path_buf()));
    }
    dirs.sort();
    Ok(dirs)
}

/// `slice:prefix:name` as runc's systemd driver lays it out: the slice
/// expanded into its parents, then `prefix-name.scope` (an empty slice is
/// `system.slice`).
pub fn systemd_cgroup_path(cgroups_path: &str) -> Result<String, VmmJailError> {
    let bad = || VmmJailError::BadSystemdPath(cgroups_path.into());
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
    let plain = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
    if !plain(name) || prefix.contains('/') || prefix == ".." {
        return Err(bad());
    }
    let mut path = String::new();
    if stem != "-" {
        let words: Vec<&str> = stem.split('-').collect();
        if words.iter().any(|w| !plain(w)) {
            return Err(bad());
        }
        for end in 1..=words.len() {
            path.push('/');
            path.push_str(&words[..end].join("-"));
            path.push_str(".slice");
        }
    }
    let scope = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    Ok(format!("{path}/{scope}"))
}

/// Creates the missing folders of `dirs` (and their missing parents);
/// returns the folders it created, parents first.
pub fn create_cgroups(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, VmmJailError> {
    let mut created = Vec::new();
    for dir in dirs {
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
        missing.reverse();
        for folder in missing {
            std::fs::create_dir(folder).map_err(io("create cgroup", folder))?;
            created.push(folder.to_path_buf());
            inherit_cpuset(folder)?;
        }
    }
    Ok(created)
}

/// A new v1 cpuset cgroup has no cpus and mems: no task could join it.
fn inherit_cpuset(folder: &Path) -> Result<(), VmmJailError> {
    let Some(parent) = folder.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = folder.join(file);
        if !own.exists() {
            continue;
        }
        let value =
            std::fs::read_to_string(parent.join(file)).map_err(io("read", &parent.join(file)))?;
        std::fs::write(&own, value.trim()).map_err(io("write", &own))?;
    }
    Ok(())
}

/// Removes the cgroups [`create_cgroups`] made, children first; a cgroup
/// that still holds a process stays (and is named in the log).
pub fn remove_cgroups(created: &[PathBuf]) {
    for folder in created.iter().rev() {
        if let Err(e) = std::fs::remove_dir(folder) {
            tracing::warn!("cannot remove cgroup {}: {e}", folder.display());
        }
    }
}

/// Makes `dir` a mount point with shared propagation (a bind onto
/// itself), so mounts made below it later also appear in the jailed VMM's
/// mount namespace. Idempotent.
pub fn make_shared_mount(dir: &Path) -> Result<(), VmmJailError> {
    if !is_mount_point(dir) {
        nix::mount::mount(
            Some(dir),
            dir,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io("bind shared folder onto itself", dir)(e.into()))?;
    }
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        nix::mount::MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| io("make shared folder a shared mount", dir)(e.into()))
}

/// Undoes [`make_shared_mount`]; refuses (EBUSY) while mounts remain
/// below it.
pub fn remove_shared_mount(dir: &Path) -> Result<(), VmmJailError> {
    if !is_mount_point(dir) {
        return Ok(());
    }
    nix::mount::umount2(dir, nix::mount::MntFlags::empty())
        .map_err(|e| io("unmount shared folder", dir)(e.into()))
}

fn is_mount_point(dir: &Path) -> bool {
    crate::sandbox::mounts_below(dir).iter().any(|m| m == dir)
}

/// Creates `dir` (if missing) owned by `uid:gid`, mode 0700.
pub fn create_owned_folder(dir: &Path, uid: u32, gid: u32) -> Result<(), VmmJailError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io("create folder", dir))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io("chown folder", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod folder", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_path_on_v2_is_one_folder() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory").unwrap();

        let dirs = cgroup_dirs(root.path(), "/kubepods/pod1/abc").unwrap();

        assert_eq!(dirs, [root.path().join("kubepods/pod1/abc")]);
    }

    #[test]
    fn cgroupfs_path_on_v1_is_one_folder_per_hierarchy_without_symlinks() {
        let root = tempfile::tempdir().unwrap();
        for controller in ["cpu,cpuacct", "memory", "unified"] {
            std::fs::create_dir(root.path().join(controller)).unwrap();
            std::fs::write(root.path().join(controller).join("cgroup.procs"), "").unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", root.path().join("cpu")).unwrap();

        let dirs = cgroup_dirs(root.path(), "/default/sb1").unwrap();

        assert_eq!(
            dirs,
            [
                root.path().join("cpu,cpuacct/default/sb1"),
                root.path().join("memory/default/sb1"),
                root.path().join("unified/default/sb1"),
            ]
        );
    }

    #[test]
    fn systemd_driver_path_becomes_the_slice_tree_and_a_scope() {
        assert_eq!(
            systemd_cgroup_path("kubepods-burstable-pod1.slice:cri-containerd:abc").unwrap(),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
        );
        assert_eq!(
            systemd_cgroup_path(":cri-containerd:abc").unwrap(),
            "/system.slice/cri-containerd-abc.scope"
        );
        assert_eq!(systemd_cgroup_path("-.slice::abc").unwrap(), "/abc.scope");
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let dirs = cgroup_dirs(root.path(), "kubepods-pod1.slice:cri-containerd:abc").unwrap();
        assert_eq!(
            dirs,
            [root
                .path()
                .join("kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope")]
        );
    }

    #[test]
    fn bad_systemd_paths_are_refused_naming_them() {
        for bad in [
            "kubepods:cri-containerd:abc",
            "a--b.slice:p:n",
            "a.slice:p:../x",
            "a.slice:p:",
        ] {
            let err = cgroup_dirs(Path::new("/nonexistent"), bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("linux.cgroupsPath = {bad}: not a systemd")),
                "{err}"
            );
        }
    }

    #[test]
    fn cgroups_path_with_dotdot_is_refused() {
        let err = cgroup_dirs(Path::new("/nonexistent"), "/a/../../etc").unwrap_err();
        assert!(err.to_string().contains("/a/../../etc"), "{err}");
    }

    #[test]
    fn created_cgroups_are_removed_children_first() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cpuset.cpus"), "0-1\n").unwrap();
        let leaf = root.path().join("a/b");

        let created = create_cgroups(std::slice::from_ref(&leaf)).unwrap();

        assert_eq!(created, [root.path().join("a"), leaf.clone()]);
        remove_cgroups(&created);
        assert!(!root.path().join("a").exists());
    }
}
