//! PID 1 duties in the guest: the early mounts, the sandbox setup asked for
//! by the shim (hostname, DNS, shares, sysctls), and powering off.

use std::io;
use std::path::Path;

use cloister_protocol::agent;
use nix::mount::{mount, MsFlags};

use crate::container::manager::ContainerManager;

/// Errors of guest setup.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// Where sysfs offers configfs (present only when the kernel has it).
const CONFIGFS_MOUNT_POINT: &str = "/sys/kernel/config";

/// The file systems PID 1 mounts before anything else.
const EARLY_MOUNTS: [(&str, &str, &str, u64, &str); 7] = [
    (
        "proc",
        "/proc",
        "proc",
        (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC),
        "",
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC),
        "",
    ),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC),
        "nsdelegate",
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        (libc::MS_NOSUID | libc::MS_NODEV),
        "mode=0755",
    ),
    (
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        (libc::MS_NOSUID | libc::MS_NODEV),
        "mode=1777",
    ),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        (libc::MS_NOSUID | libc::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=0620",
    ),
];

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Moves PID 1 off the initramfs root mount, which has no parent mount and
/// so cannot be pivoted away from: bind `/` onto `/.root`, move that bind
/// over `/` and chroot into it (what switch_root does). Afterwards every
/// container's mount namespace has a root that pivot_root accepts; without
/// it containers fall back to MS_MOVE + chroot, which a process holding
/// CAP_SYS_CHROOT can escape.
pub fn leave_initramfs_root() -> Result<bool, InitError> {
    let root_type = nix::sys::statfs::statfs("/")
        .map(|s| s.filesystem_type().0)
        .map_err(|e| InitError::Io {
            what: "statfs /".into(),
            source: e.into(),
        })?;
    if root_type != RAMFS_MAGIC && root_type != TMPFS_MAGIC {
        return Ok(false);
    }
    let mount_err = |target: &str| {
        let target = target.to_owned();
        move |source| InitError::Mount {
            fstype: "bind".into(),
            target,
            source,
        }
    };
    std::fs::create_dir_all("/.root").map_err(|e| InitError::Io {
        what: "create /.root".into(),
        source: e,
    })?;
    // Recursive, so anything already mounted below / comes along.
    mount(
        Some("/"),
        "/.root",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("/.root"))?;
    nix::unistd::chdir("/.root").map_err(|e| InitError::Io {
        what: "chdir /.root".into(),
        source: e.into(),
    })?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(mount_err("/"))?;
    nix::unistd::chroot(".").map_err(|e| InitError::Io {
        what: "chroot into the bind of /".into(),
        source: e.into(),
    })?;
    nix::unistd::chdir("/").map_err(|e| InitError::Io {
        what: "chdir /".into(),
        source: e.into(),
    })?;
    Ok(true)
}

/// Mounts proc, sys, devtmpfs, cgroup2, /run, /dev/shm, /dev/pts and (when
/// the kernel has it) configfs. A file system that is already mounted
/// (EBUSY) is fine.
pub fn early_mounts() -> Result<(), InitError> {
    for (source, target, fstype, flags, data) in EARLY_MOUNTS {
        std::fs::create_dir_all(target).map_err(|e| InitError::Io {
            what: format!("create {target}"),
            source: e,
        })?;
        let data = (!data.is_empty()).then_some(data);
        match mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::from_bits_truncate(flags as _),
            data,
        ) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: fstype.to_owned(),
                    target: target.to_owned(),
                    source,
                })
            }
        }
    }
    // configfs, where a confidential guest gets its evidence (configfs-tsm
    // reports: SNP HOST_DATA, TDX MRCONFIGID). sysfs has the mount point
    // only when the kernel has configfs, so a kernel without it is fine.
    let configfs = Path::new(CONFIGFS_MOUNT_POINT);
    if configfs.is_dir() {
        match mount(
            Some("configfs"),
            configfs,
            Some("configfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: "configfs".into(),
                    target: CONFIGFS_MOUNT_POINT.into(),
                    source,
                })
            }
        }
    }
    // Enable every controller for the containers' subtree.
    let controllers = crate::cgroups::controllers(Path::new("/sys/fs/cgroup"));
    for controller in controllers {
        let _ = std::fs::write(
            "/sys/fs/cgroup/cgroup.subtree_control",
            format!("+{controller}"),
        );
    }
    Ok(())
}

/// Bytes of entropy the kernel reports (a warning goes to the console when
/// it is low: no virtio-rng).
pub fn entropy_available() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/random/entropy_avail")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Applies a SetupSandbox request to the guest.
pub fn setup_sandbox(
    request: &agent::SetupSandboxRequest,
    manager: &ContainerManager,
) -> Result<(), InitError> {
    if !request.hostname.is_empty() {
        nix::unistd::sethostname(&request.hostname).map_err(|e| InitError::Invalid {
            field: "hostname".into(),
            reason: e.to_string(),
        })?;
    }
    if let Some(dns) = request.dns.as_ref() {
        let mut text = String::new();
        for ns in &dns.nameservers {
            text.push_str(&format!("nameserver {ns}\n"));
        }
        if !dns.searches.is_empty() {
            text.push_str(&format!("search {}\n", dns.searches.join(" ")));
        }
        if !dns.options.is_empty() {
            text.push_str(&format!("options {}\n", dns.options.join(" ")));
        }
        std::fs::create_dir_all("/etc")
            .and_then(|()| std::fs::write("/etc/resolv.conf", text))
            .map_err(|e| InitError::Io {
                what: "write /etc/resolv.conf".into(),
                source: e,
            })?;
    }
    for (i, m) in request.mounts.iter().enumerate() {
        if !m.target.starts_with('/') || m.target.split('/').any(|c| c == "..") {
            return Err(InitError::Invalid {
                field: format!("mounts[{i}].target"),
                reason: format!("{:?} is not an absolute path without '..'", m.target),
            });
        }
        std::fs::create_dir_all(&m.target).map_err(|e| InitError::Io {
            what: format!("create {}", m.target),
            source: e,
        })?;
        let data = m.options.join(",");
        mount(
            Some(m.source.as_str()),
            m.target.as_str(),
            Some(m.fstype.as_str()),
            MsFlags::empty(),
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|source| InitError::Mount {
            fstype: m.fstype.clone(),
            target: m.target.clone(),
            source,
        })?;
        if m.fstype == "virtiofs" {
            manager.add_share(&m.source, m.target.clone().into());
        }
    }
    for (key, value) in &request.sysctls {
        if key.is_empty() || key.contains('/') || key.contains("..") {
            return Err(InitError::Invalid {
                field: format!("sysctls[{key:?}]"),
                reason: "invalid key".into(),
            });
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| InitError::Io {
            what: format!("sysctl {key}"),
            source: e,
        })?;
    }
    Ok(())
}

/// The `cloister.log_level=` kernel parameter, if present and valid.
pub fn log_level_from_cmdline(cmdline: &str) -> Option<tracing::Level> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix("cloister.log_level="))
        .and_then(|level| level.parse().ok())
}

/// Makes the OOM killer pick container processes before the agent (the
/// container init helper sets its own value back before exec).
pub fn protect_from_oom_killer() {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-997") {
        eprintln!("cloister-agent: cannot lower own oom_score_adj: {e}");
    }
}

/// Ends the guest (PID 1 only) so the VMM exits and the shim sees it.
///
/// The microVM has no ACPI, so a power-off request would only halt the
/// CPUs; a reset is what both VMMs treat as the end of the VM (`reboot=k`
/// through the i8042 for cloister-vmm, `reboot=t` with QEMU `-no-reboot`).
pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_is_read_from_kernel_command_line() {
        let cmdline = "console=ttyS0 cloister.log_level=debug quiet\n";
        assert_eq!(log_level_from_cmdline(cmdline), Some(tracing::Level::DEBUG));
        assert_eq!(log_level_from_cmdline("console=ttyS0"), None);
        assert_eq!(log_level_from_cmdline("cloister.log_level=loud"), None);
    }
}
