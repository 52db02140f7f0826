//! What the host prepares before a VM's processes start jailed: the
//! sockets folder, the pod's own uid/gid lease, the shared mount and
//! the pod's cgroups.

use super::*;

/// A pod's jail as prepared on the host: what the VMM processes get, and
/// the cgroups the shim created for them (removed when they are gone).
#[derive(Debug, Default)]
pub struct PreparedJail {
    pub jail: Option<VmJailConfig>,
    pub created_cgroups: Vec<PathBuf>,
    /// The pod's own uid/gid, held until the VMM processes are gone.
    pub ids: Option<JailIdLease>,
}

/// Prepares the sockets folder and, with `[vmm] jail` (the default), the
/// jail: a uid/gid of the pod's own (leased in `leases`), the shared
/// folder as a shared mount, the pod's cgroups.
pub fn prepare_jail(
    vmm: &VmmSection,
    vm: &PodVm,
    paths: &VmPaths,
    leases: &Path,
) -> Result<PreparedJail, HypervisorError> {
    let sockets = paths.sockets_dir();
    if !vmm.jail {
        tracing::warn!(
            "[vmm] jail = false: cloister-vmm runs WITHOUT its jail and seccomp, as root with every capability; for development only"
        );
        std::fs::create_dir_all(&sockets).map_err(|source| HypervisorError::File {
            path: sockets,
            source,
        })?;
        return Ok(PreparedJail::default());
    }
    let range = JailIdRange {
        first_uid: vmm.jail_uid,
        first_gid: vmm.jail_gid,
        count: vmm.jail_id_count,
    };
    // The sandbox folder's `pod` file holds `namespace/id`.
    let pod = std::fs::read_to_string(paths.dir.join("pod"))
        .map(|pod| pod.trim().to_owned())
        .unwrap_or_else(|_| paths.dir.display().to_string());
    let ids = range.lease(leases, &pod)?;
    create_owned_folder(&sockets, ids.uid, ids.gid)?;
    if vm.shared_fs {
        make_shared_mount(&paths.shared_dir())?;
    }
    let cgroups = match vm.cgroups_path.as_deref().filter(|p| !p.is_empty()) {
        Some(path) => cgroup_dirs(Path::new(CGROUP_ROOT), path)?,
        None => Vec::new(),
    };
    let created_cgroups = create_cgroups(&cgroups)?;
    Ok(PreparedJail {
        jail: Some(VmJailConfig {
            root: paths.jail_root(),
            uid: ids.uid,
            gid: ids.gid,
            cgroups,
        }),
        created_cgroups,
        ids: Some(ids),
    })
}
