//! What the jailed process may still do: its cgroups, resource limits,
//! uid/gid and capabilities.
//!
//! Capabilities: none, except when a virtio-fs device is served. The
//! passthrough file system (fuse-backend-rs, like virtiofsd) switches the
//! serving thread's effective uid/gid to the guest caller's for each
//! request and back to 0 after it, and opens, chowns and changes modes of
//! files owned by the guest's users: it needs CAP_CHOWN, CAP_DAC_OVERRIDE,
//! CAP_FOWNER, CAP_FSETID, CAP_SETUID and CAP_SETGID. A jail with an fs
//! device keeps exactly those (permitted and effective, nothing
//! inheritable, ambient or in the bounding set beyond them) and runs with
//! real and saved uid = the jail uid but effective uid 0, the identity the
//! passthrough file system returns to after every request (so files the
//! guest's root creates belong to root on the host, as without a jail).
//! SECBIT_NO_SETUID_FIXUP keeps those uid switches from touching the
//! capability sets; SECBIT_NOROOT keeps uid 0 from meaning capabilities on
//! exec (which seccomp forbids anyway). Such a process can take any uid,
//! but holds no other capability and sees only its own root, PID and
//! network namespaces.

use std::io;

use super::JailError;

/// Capability numbers (linux/capability.h).
pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_FSETID: u32 = 4;
pub const CAP_KILL: u32 = 5;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;

/// What the virtio-fs passthrough needs (virtiofsd keeps the same set).
pub const FS_CAPABILITIES: [u32; 6] = [
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETUID,
    CAP_SETGID,
];

/// Threads per uid (RLIMIT_NPROC counts every thread of the uid on the
/// host, across all VMs that share it): far above a VM's few threads.
pub const NPROC_LIMIT: u64 = 8192;
/// Largest file a VM without disks or shares writes: its bounded logs.
pub const FSIZE_LIMIT_WITHOUT_GUEST_FILES: u64 = 128 << 20;
/// Open files: virtio-fs holds an O_PATH descriptor per inode the guest
/// knows (see `crate::limits`); virtiofsd asks for a million too.
pub const NOFILE_LIMIT: u64 = 1 << 20;

fn step_error(step: &'static str, value: impl ToString) -> JailError {
    JailError::Step {
        step,
        value: value.to_string(),
        source: io::Error::last_os_error(),
    }
}

/// Writes this process's pid into each cgroup: `cgroup.procs` (v2, and v1
/// controllers), `tasks` where a v1 hierarchy has no `cgroup.procs`.
pub fn join_cgroups(cgroups: &[std::path::PathBuf]) -> Result<(), JailError> {
    let pid = std::process::id().to_string();
    for cgroup in cgroups {
        let procs = cgroup.join("cgroup.procs");
        let file = if procs.exists() {
            procs
        } else {
            cgroup.join("tasks")
        };
        std::fs::write(&file, &pid).map_err(|source| JailError::Step {
            step: "join cgroup",
            value: file.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

fn set_limit(
    step: &'static str,
    resource: libc::__rlimit_resource_t,
    wanted: u64,
) -> Result<(), JailError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(step_error(step, wanted));
    }
    // Only ever lowered: raising a hard limit needs CAP_SYS_RESOURCE, which
    // the host may not give the shim.
    let value = wanted.min(limit.rlim_max);
    limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(step_error(step, value));
    }
    Ok(())
}

/// Open files, threads, file size, no core dumps (they would hold guest
/// memory).
pub fn set_limits(writes_guest_files: bool) -> Result<(), JailError> {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(NOFILE_LIMIT);
    set_limit(
        "set RLIMIT_NOFILE",
        libc::RLIMIT_NOFILE,
        NOFILE_LIMIT.min(nr_open),
    )?;
    set_limit("set RLIMIT_NPROC", libc::RLIMIT_NPROC, NPROC_LIMIT)?;
    let fsize = if writes_guest_files {
        libc::RLIM_INFINITY
    } else {
        FSIZE_LIMIT_WITHOUT_GUEST_FILES
    };
    set_limit("set RLIMIT_FSIZE", libc::RLIMIT_FSIZE, fsize)?;
    set_limit("set RLIMIT_CORE", libc::RLIMIT_CORE, 0)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn cap_mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0u64, |mask, cap| mask | (1u64 << cap))
}

/// Sets permitted = effective = `caps`, inheritable = none.
fn set_capabilities(caps: &[u32]) -> Result<(), JailError> {
    let mask = cap_mask(caps);
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // The two 32-bit halves of the 64-bit sets.
    let data = [
        CapData {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        CapData {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads the header and two data structs of the layout
    // version 3 prescribes, all owned here.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(step_error("capset", format!("{mask:#x}")));
    }
    Ok(())
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(40)
}

fn prctl(step: &'static str, option: libc::c_int, arg: libc::c_ulong) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, arg, 0, 0, 0) } != 0 {
        return Err(step_error(step, arg));
    }
    Ok(())
}

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;

/// Drops every capability but `keep` from the bounding set, clears the
/// ambient set, and sets permitted = effective = `keep`. Call as root with
/// CAP_SETPCAP; the uid is left alone.
pub fn restrict_capabilities(keep: &[u32]) -> Result<(), JailError> {
    let keep_mask = cap_mask(keep);
    for cap in 0..=last_cap() {
        if keep_mask & (1u64 << cap) == 0 {
            prctl(
                "drop bounding capability",
                libc::PR_CAPBSET_DROP,
                cap.into(),
            )?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(step_error("clear ambient capabilities", 0));
    }
    set_capabilities(keep)
}

/// Becomes `uid`/`gid` with no supplementary groups and only the
/// capabilities a served fs device needs (`serves_fs`) or none; sets
/// no_new_privs and makes the process undumpable.
pub fn drop_privileges(uid: u32, gid: u32, serves_fs: bool) -> Result<(), JailError> {
    prctl(
        "set securebits",
        libc::PR_SET_SECUREBITS,
        SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED,
    )?;
    let keep: &[u32] = if serves_fs { &FS_CAPABILITIES } else { &[] };
    let keep_mask = cap_mask(keep);
    for cap in 0..=last_cap() {
        if keep_mask & (1u64 << cap) == 0 {
            prctl(
                "drop bounding capability",
                libc::PR_CAPBSET_DROP,
                cap.into(),
            )?;
        }
    }
    // SAFETY: setgroups with an empty list reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(step_error("setgroups", "[]"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(step_error("setresgid", gid));
    }
    // With an fs device the effective uid stays 0: see the module doc.
    let euid = if serves_fs { 0 } else { uid };
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(uid, euid, uid) } != 0 {
        return Err(step_error("setresuid", uid));
    }
    // SAFETY: integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(step_error("clear ambient capabilities", 0));
    }
    set_capabilities(keep)?;
    prctl("set no_new_privs", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    prctl("make undumpable", libc::PR_SET_DUMPABLE, 0)
}
