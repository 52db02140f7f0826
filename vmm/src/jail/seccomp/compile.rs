//! From the allowlists of `rules.rs` to BPF with seccompiler: shared by
//! `build.rs`, which compiles every thread kind's filter for every mix of
//! device kinds when the VMM is built, and by the VMM (the supervisor's
//! filter names its child's pid, known only at run time; tests compare
//! the built filters with freshly compiled ones).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::rules::{self, DeviceKinds};

#[cfg(target_arch = "x86_64")]
pub const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
pub const ARCH: TargetArch = TargetArch::aarch64;

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
    /// Every thread of a vhost-user server.
    VhostUser,
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `syscalls` allowed with any arguments.
fn allow(syscalls: &[i64]) -> Rules {
    syscalls.iter().map(|&nr| (nr, Vec::new())).collect()
}

/// `syscall` allowed only when argument `arg` (its low 32 bits) is one of
/// `values`.
fn allow_arg(rules: &mut Rules, syscall: i64, arg: u8, values: &[u64]) -> Result<(), String> {
    let conditions = values
        .iter()
        .map(|&value| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    rules.insert(syscall, conditions);
    Ok(())
}

/// The rules of `kind` for a VM or server with `devices`.
pub fn thread_rules(kind: ThreadKind, devices: DeviceKinds) -> Result<Rules, String> {
    let (syscalls, ioctls) = match kind {
        ThreadKind::Main => (rules::main(devices), Vec::new()),
        ThreadKind::Helper => (rules::helper(), Vec::new()),
        ThreadKind::Vcpu => (rules::vcpu(devices), rules::vcpu_ioctls(devices)),
        ThreadKind::Virtio => (rules::virtio(devices), rules::virtio_ioctls(devices)),
        ThreadKind::VhostUser => (rules::vhost_user(devices), rules::virtio_ioctls(devices)),
    };
    let mut map = allow(&syscalls);
    if !ioctls.is_empty() {
        allow_arg(&mut map, libc::SYS_ioctl, 1, &ioctls)?;
    }
    Ok(map)
}

/// The supervisor's rules: signals go to `child` only.
pub fn supervisor_rules(child: libc::pid_t) -> Result<Rules, String> {
    let mut map = allow(&rules::supervisor());
    allow_arg(&mut map, libc::SYS_kill, 0, &[child as u32 as u64])?;
    Ok(map)
}

/// BPF that allows `rules` and kills the process (SIGSYS) on anything
/// else.
pub fn compile(rules: Rules) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        ARCH,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}
