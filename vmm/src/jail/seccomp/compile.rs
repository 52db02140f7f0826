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

use super::rules::{self, DeviceKinds, TeeThreads};

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

impl ThreadKind {
    /// Every kind, for what is built or checked per kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Helper,
        ThreadKind::Vcpu,
        ThreadKind::Virtio,
        ThreadKind::VhostUser,
    ];
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
    tee_thread_rules(kind, devices, TeeThreads::None)
}

/// The rules of `kind` for a VM with `devices`, confidential as `tee`
/// says: only vCPU threads get the TEE additions.
pub fn tee_thread_rules(
    kind: ThreadKind,
    devices: DeviceKinds,
    tee: TeeThreads,
) -> Result<Rules, String> {
    let (mut syscalls, mut ioctls, mut with_args) = match kind {
        ThreadKind::Main => (rules::main(devices), Vec::new(), Vec::new()),
        ThreadKind::Helper => (rules::helper(), Vec::new(), Vec::new()),
        ThreadKind::Vcpu => (
            rules::vcpu(devices),
            rules::vcpu_ioctls(devices),
            Vec::new(),
        ),
        ThreadKind::Virtio => (
            rules::virtio(devices),
            rules::virtio_ioctls(devices),
            Vec::new(),
        ),
        ThreadKind::VhostUser => (
            rules::vhost_user(devices),
            rules::virtio_ioctls(devices),
            rules::vhost_user_with_args(),
        ),
    };
    if kind == ThreadKind::Vcpu {
        syscalls.extend(rules::tee_vcpu(tee));
        ioctls.extend(rules::tee_vcpu_ioctls(tee));
        with_args.extend(rules::tee_vcpu_with_args(tee));
    }
    let mut map = allow(&syscalls);
    if !ioctls.is_empty() {
        allow_arg(&mut map, libc::SYS_ioctl, 1, &ioctls)?;
    }
    for (syscall, arg, values) in with_args {
        // Allowed with any arguments already: a condition would narrow it.
        if !map.contains_key(&syscall) {
            allow_arg(&mut map, syscall, arg, &values)?;
        }
    }
    // The threads that get the device lists (the helper gets none).
    let unshare_flags = match kind {
        ThreadKind::Helper => Vec::new(),
        _ => rules::unshare_flags(devices),
    };
    if !unshare_flags.is_empty() {
        allow_arg(&mut map, libc::SYS_unshare, 0, &unshare_flags)?;
    }
    refuse_exec_prot(&mut map)?;
    Ok(map)
}

/// The supervisor's rules: signals go to `child` only.
pub fn supervisor_rules(child: libc::pid_t) -> Result<Rules, String> {
    let mut map = allow(&rules::supervisor());
    allow_arg(&mut map, libc::SYS_kill, 0, &[child as u32 as u64])?;
    refuse_exec_prot(&mut map)?;
    Ok(map)
}

/// Narrows the calls of [`rules::NO_EXEC_PROT`] that `rules` allow to a
/// `prot` (argument 2) without PROT_EXEC. Its low 32 bits are enough: the
/// kernel reads PROT_EXEC from bit 2 and nothing above bit 31 makes a
/// mapping executable.
fn refuse_exec_prot(rules: &mut Rules) -> Result<(), String> {
    for syscall in rules::NO_EXEC_PROT {
        let Some(existing) = rules.get_mut(syscall) else {
            continue;
        };
        // Narrowing conditional rules would need the condition on each:
        // no list has any, so refuse rather than silently widen or drop.
        if !existing.is_empty() {
            return Err(format!(
                "syscall {syscall} already has argument conditions: cannot add the PROT_EXEC one"
            ));
        }
        let no_exec = SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| e.to_string())?;
        *existing = vec![no_exec];
    }
    Ok(())
}

/// BPF that answers [`rules::vhost_user_enosys`] with ENOSYS and allows
/// everything else: the vhost-user server installs it before its
/// allowlist (which allows those calls for that reason), so glibc's
/// `pthread_create` falls back to `clone`, whose flags the allowlist can
/// check, and malloc does without the overcommit setting. One seccompiler
/// filter has one match action, hence a second filter rather than rules.
pub fn vhost_user_enosys(devices: DeviceKinds) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        allow(&rules::vhost_user_enosys(devices)),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn arg_is(arg: u8, value: u64) -> SeccompRule {
        let condition =
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).unwrap();
        SeccompRule::new(vec![condition]).unwrap()
    }

    /// Whether `rules` allow `syscall` with argument `arg` = `value`
    /// (unconditionally, or by a condition on exactly that).
    fn allows(rules: &Rules, syscall: i64, arg: u8, value: u64) -> bool {
        rules
            .get(&syscall)
            .is_some_and(|r| r.is_empty() || r.contains(&arg_is(arg, value)))
    }

    const TEES: [TeeThreads; 3] = [
        TeeThreads::None,
        TeeThreads::Confidential,
        TeeThreads::ConfidentialWithQuoteService,
    ];
    const VM_THREADS: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Helper,
        ThreadKind::Vcpu,
        ThreadKind::Virtio,
    ];

    #[test]
    fn tee_conversions_are_allowed_on_vcpu_threads_only_and_only_with_a_tee() {
        let punch_hole = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;
        for kind in VM_THREADS {
            for tee in TEES {
                let rules = tee_thread_rules(kind, DeviceKinds::default(), tee).unwrap();
                let expected = kind == ThreadKind::Vcpu && tee != TeeThreads::None;
                assert_eq!(
                    allows(&rules, libc::SYS_ioctl, 1, rules::KVM_SET_MEMORY_ATTRIBUTES),
                    expected,
                    "KVM_SET_MEMORY_ATTRIBUTES on {kind:?} {tee:?}"
                );
                assert_eq!(
                    allows(&rules, libc::SYS_fallocate, 1, punch_hole),
                    expected,
                    "fallocate(PUNCH_HOLE|KEEP_SIZE) on {kind:?} {tee:?}"
                );
                // Only that mode: no allocation, no other hole punching.
                assert!(
                    !allows(&rules, libc::SYS_fallocate, 1, 0),
                    "{kind:?} {tee:?}"
                );
                // The launch is done before any filter: never in a list.
                for launch_only in [
                    0xc008_aeba, // KVM_MEMORY_ENCRYPT_OP
                    0xc040_aed4, // KVM_CREATE_GUEST_MEMFD
                    0x40a0_ae49, // KVM_SET_USER_MEMORY_REGION2
                ] {
                    assert!(
                        !allows(&rules, libc::SYS_ioctl, 1, launch_only),
                        "{launch_only:#x} on {kind:?} {tee:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn quote_service_calls_come_only_with_a_quote_service_on_vcpu_threads() {
        for kind in VM_THREADS {
            for tee in TEES {
                let rules = tee_thread_rules(kind, DeviceKinds::default(), tee).unwrap();
                let expected =
                    kind == ThreadKind::Vcpu && tee == TeeThreads::ConfidentialWithQuoteService;
                for syscall in [
                    libc::SYS_connect,
                    libc::SYS_setsockopt,
                    libc::SYS_sendto,
                    libc::SYS_recvfrom,
                ] {
                    assert_eq!(
                        rules.contains_key(&syscall),
                        expected,
                        "syscall {syscall} on {kind:?} {tee:?}"
                    );
                }
                assert_eq!(
                    allows(&rules, libc::SYS_socket, 0, libc::AF_UNIX as u64),
                    expected,
                    "{kind:?} {tee:?}"
                );
                assert_eq!(
                    allows(&rules, libc::SYS_socket, 0, libc::AF_VSOCK as u64),
                    expected,
                    "{kind:?} {tee:?}"
                );
                assert!(!allows(&rules, libc::SYS_socket, 0, libc::AF_INET as u64));
            }
        }
    }

    #[test]
    fn tee_conditions_do_not_narrow_what_devices_allow_outright() {
        let rules = tee_thread_rules(
            ThreadKind::Vcpu,
            DeviceKinds::all(),
            TeeThreads::ConfidentialWithQuoteService,
        )
        .unwrap();
        // block/fs allocate, vsock opens sockets: any arguments.
        assert_eq!(rules.get(&libc::SYS_fallocate), Some(&Vec::new()));
        assert_eq!(rules.get(&libc::SYS_socket), Some(&Vec::new()));
        assert!(allows(
            &rules,
            libc::SYS_ioctl,
            1,
            rules::KVM_SET_MEMORY_ATTRIBUTES
        ));
    }

    #[test]
    fn kvm_set_memory_attributes_request_number_matches_the_uapi() {
        // _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
        let size = std::mem::size_of::<kvm_bindings::kvm_memory_attributes>() as u64;
        assert_eq!(
            rules::KVM_SET_MEMORY_ATTRIBUTES,
            (1 << 30) | (size << 16) | (0xae << 8) | 0xd2
        );
    }

    #[test]
    fn unshare_is_allowed_only_with_clone_fs_and_only_with_an_fs_device() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Virtio,
            ThreadKind::VhostUser,
        ] {
            let with_fs = thread_rules(kind, DeviceKinds::all()).unwrap();
            let rules = with_fs.get(&libc::SYS_unshare).expect("fs threads unshare");
            let clone_fs = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::CLONE_FS as u64,
            )
            .unwrap();
            assert_eq!(
                rules,
                &vec![SeccompRule::new(vec![clone_fs]).unwrap()],
                "{kind:?}"
            );
            let without_fs = thread_rules(kind, DeviceKinds::default()).unwrap();
            assert!(!without_fs.contains_key(&libc::SYS_unshare), "{kind:?}");
        }
    }
}
