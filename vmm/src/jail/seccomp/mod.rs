//! Seccomp allowlists per thread kind, compiled with `seccompiler` when the
//! jail is entered (before anything untrusted runs) and installed by each
//! thread itself once its own setup is done, before it touches guest
//! input. A call outside the list kills the whole process with SIGSYS
//! (SECCOMP_RET_KILL_PROCESS), which the supervisor passes on to whoever
//! started `cloister-vmm`.
//!
//! Filters stack: a thread inherits the filter of the thread that spawned
//! it. The main thread therefore installs its own only after it has
//! spawned every other thread ([`apply_to_this_thread`] is a no-op
//! outside a jail), and no filter uses SECCOMP_FILTER_FLAG_TSYNC except the
//! vhost-user server's, which is one process-wide list installed before
//! rust-vmm's daemon starts its threads.
//!
//! The lists come from `strace -f` of the VMM's tests (payloads, every
//! virtio device under a Linux guest, the vhost-user devices under a QEMU
//! guest): see `rules.rs`.

mod rules;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::JailError;
pub use rules::DeviceKinds;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The kinds of threads the VMM runs, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for the exit, tears down.
    Main,
    /// Signal watcher, metrics printer, vCPU nudger.
    Helper,
    /// `KVM_RUN` and the exits it hands to devices.
    Vcpu,
    /// The virtio event loop: every device's queues.
    Virtio,
}

/// The compiled filters of one jailed VMM.
pub struct ThreadFilters {
    main: BpfProgram,
    helper: BpfProgram,
    vcpu: BpfProgram,
    virtio: BpfProgram,
}

static FILTERS: OnceLock<ThreadFilters> = OnceLock::new();

fn compile(
    kind: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<BpfProgram, JailError> {
    let error = |e: &dyn std::fmt::Display| JailError::Seccomp {
        kind,
        reason: e.to_string(),
    };
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        ARCH,
    )
    .map_err(|e| error(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| error(&e))
}

/// `syscalls` allowed with any arguments.
fn allow(syscalls: &[i64]) -> BTreeMap<i64, Vec<SeccompRule>> {
    syscalls.iter().map(|&nr| (nr, Vec::new())).collect()
}

/// `syscall` allowed when argument `arg` is one of `values`.
fn allow_arg(
    map: &mut BTreeMap<i64, Vec<SeccompRule>>,
    syscall: i64,
    arg: u8,
    len: SeccompCmpArgLen,
    values: &[u64],
    kind: &'static str,
) -> Result<(), JailError> {
    let rules = values
        .iter()
        .map(|&value| {
            SeccompCondition::new(arg, len.clone(), SeccompCmpOp::Eq, value)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| JailError::Seccomp {
            kind,
            reason: e.to_string(),
        })?;
    map.insert(syscall, rules);
    Ok(())
}

impl ThreadFilters {
    /// The filters of a VM serving `devices`.
    pub fn for_vm(devices: DeviceKinds) -> Result<Self, JailError> {
        let mut vcpu = allow(&rules::vcpu(devices));
        allow_arg(
            &mut vcpu,
            libc::SYS_ioctl,
            1,
            SeccompCmpArgLen::Dword,
            &rules::vcpu_ioctls(devices),
            "vcpu",
        )?;
        let mut virtio = allow(&rules::virtio(devices));
        let ioctls = rules::virtio_ioctls(devices);
        if !ioctls.is_empty() {
            allow_arg(
                &mut virtio,
                libc::SYS_ioctl,
                1,
                SeccompCmpArgLen::Dword,
                &ioctls,
                "virtio",
            )?;
        }
        Ok(Self {
            main: compile("main", allow(&rules::main(devices)))?,
            helper: compile("helper", allow(&rules::helper()))?,
            vcpu: compile("vcpu", vcpu)?,
            virtio: compile("virtio", virtio)?,
        })
    }

    /// Makes [`apply_to_this_thread`] install these from now on.
    pub fn enable(self) -> Result<(), JailError> {
        FILTERS.set(self).map_err(|_| JailError::Seccomp {
            kind: "all",
            reason: "filters were already enabled".into(),
        })
    }
}

/// Installs the filter of `kind` on the calling thread, if the VMM is
/// jailed; does nothing otherwise.
pub fn apply_to_this_thread(kind: ThreadKind) -> Result<(), JailError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let program = match kind {
        ThreadKind::Main => &filters.main,
        ThreadKind::Helper => &filters.helper,
        ThreadKind::Vcpu => &filters.vcpu,
        ThreadKind::Virtio => &filters.virtio,
    };
    seccompiler::apply_filter(program).map_err(|e| JailError::Seccomp {
        kind: "install",
        reason: format!("{kind:?}: {e}"),
    })
}

/// For threads that cannot return an error: a thread must never run
/// unfiltered in a jail, so failing to filter it ends the process. It can
/// only fail if the kernel refuses a filter, which the main thread's
/// earlier ones proved it does not.
pub fn apply_to_this_thread_or_abort(kind: ThreadKind) {
    if let Err(e) = apply_to_this_thread(kind) {
        eprintln!("cloister-vmm: {e}");
        std::process::abort();
    }
}

/// The vhost-user server's list, for every thread of the process
/// (installed with TSYNC before the daemon starts its threads).
pub fn apply_vhost_user_filter(devices: DeviceKinds) -> Result<(), JailError> {
    let mut map = allow(&rules::vhost_user(devices));
    let ioctls = rules::virtio_ioctls(devices);
    if !ioctls.is_empty() {
        allow_arg(
            &mut map,
            libc::SYS_ioctl,
            1,
            SeccompCmpArgLen::Dword,
            &ioctls,
            "vhost-user",
        )?;
    }
    let program = compile("vhost-user", map)?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| JailError::Seccomp {
        kind: "vhost-user",
        reason: e.to_string(),
    })
}

/// The supervisor's list: wait for signals and the child, signal only
/// `child`, exit (possibly by re-raising the child's signal).
pub fn supervisor_filter(child: libc::pid_t) -> Result<BpfProgram, JailError> {
    let mut map = allow(&rules::supervisor());
    allow_arg(
        &mut map,
        libc::SYS_kill,
        0,
        SeccompCmpArgLen::Dword,
        &[child as u32 as u64],
        "supervisor",
    )?;
    compile("supervisor", map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_for_every_device_mix() {
        for devices in [DeviceKinds::default(), DeviceKinds::all()] {
            ThreadFilters::for_vm(devices).unwrap();
        }
        supervisor_filter(1234).unwrap();
    }
}
