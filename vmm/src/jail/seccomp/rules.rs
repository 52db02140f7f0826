//! The allowlists, by thread kind and device kind. Measured, not guessed:
//! `strace -f -qq` of `vmm/tests/{kvm_payloads,virtio_mmio_payload,
//! virtio_guest}.rs` (every in-process device under a Linux guest) and of
//! the vhost-user servers under the QEMU guests of `tests/tests/
//! {vhost_user_devices,virtiofs_guest}.rs`, grouped by thread name, minus
//! what each thread does before it installs its filter (thread start,
//! device construction, KVM setup). The jailed runs of the same tests
//! (`vmm/tests/{jail,virtio_guest}.rs`, `tests/tests/virtiofs_guest.rs`,
//! the shim's guest and containerd tests) fail with SIGSYS if a list
//! misses a call. To re-derive: `strace -f -qq -o OUT <test binary>`,
//! group the calls by the thread names `prctl(PR_SET_NAME)` shows.
//!
//! Three calls are allowed only with some arguments, also measured:
//! - `mmap`/`mprotect` never with PROT_EXEC ([`NO_EXEC_PROT`]): in every
//!   trace the only executable mappings are ld.so loading the binary and
//!   its libraries, long before any filter, so a thread that maps
//!   executable memory is running injected code.
//! - `clone` only with the flags of glibc's `pthread_create`
//!   ([`THREAD_CLONE_FLAGS`]), and `clone3` answered with ENOSYS by a
//!   second filter ([`vhost_user_enosys`]): clone3 takes its flags in
//!   memory, where no filter can read them, and glibc falls back to
//!   `clone` on ENOSYS. Only the vhost-user servers start threads after
//!   their filter (rust-vmm's daemon starts its vring workers); strace
//!   shows each `clone3` with exactly those flags.
//! - `prctl` only with the options a list names ([`vhost_user_with_args`]):
//!   the servers' threads call only PR_SET_NAME (std naming the vring
//!   workers); the jail's PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS,
//!   PR_SET_DUMPABLE, PR_SET_PDEATHSIG, PR_SET_SECUREBITS all come before.
//!
//! The servers without an fs device get ENOSYS for `openat` from the same
//! second filter: glibc's malloc opens the overcommit setting once, at
//! a moment that depends on the load (seen only with every server jailed
//! under the e2e guests: [`vhost_user_enosys`]).

use libc::*;

/// Which device kinds a VM or vhost-user server has: each adds the calls
/// its host side makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceKinds {
    pub vsock: bool,
    pub block: bool,
    pub fs: bool,
    pub net: bool,
    pub rng: bool,
    pub console: bool,
}

/// The device kinds whose host side changes an allowlist, as bits of a
/// mask (`rng` and `console` add no calls): the filters are built for
/// each of the 16 mixes.
pub const MASK_KINDS: usize = 4;

impl DeviceKinds {
    pub fn mask(self) -> usize {
        usize::from(self.vsock)
            | usize::from(self.block) << 1
            | usize::from(self.fs) << 2
            | usize::from(self.net) << 3
    }

    /// The kinds of a mask (`rng` and `console` off: they add nothing).
    pub fn from_mask(mask: usize) -> Self {
        Self {
            vsock: mask & 1 != 0,
            block: mask & 2 != 0,
            fs: mask & 4 != 0,
            net: mask & 8 != 0,
            rng: false,
            console: false,
        }
    }

    pub fn all() -> Self {
        Self {
            vsock: true,
            block: true,
            fs: true,
            net: true,
            rng: true,
            console: true,
        }
    }
}

/// What a confidential VM adds to its threads' lists. Only what runs
/// after a thread installed its filter counts: the launch
/// (`KVM_CREATE_VM` with a TEE type, `KVM_CREATE_GUEST_MEMFD`,
/// `KVM_SET_USER_MEMORY_REGION2`, `KVM_MEMORY_ENCRYPT_OP` for every SEV
/// and TDX command, `KVM_TDX_INIT_VCPU` on the vCPU fds, `KVM_ENABLE_CAP`,
/// `KVM_SET_CPUID2`, ...) is done by the main thread before it spawns the
/// vCPUs and installs its own filter (`crate::tee::run::run_launched`), so
/// no list holds those. Once the guest runs, only the vCPU threads do TEE
/// work: they serve the conversion and GetQuote exits (`crate::tee::exits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TeeThreads {
    /// No `"tee"`: nothing added.
    #[default]
    None,
    /// SNP, or TDX without a quote service: page conversions.
    Confidential,
    /// TDX with `quote_service`: conversions and the QGS client.
    ConfidentialWithQuoteService,
}

/// How many [`TeeThreads`] variants the filters are built for.
pub const TEE_VARIANTS: usize = 3;

impl TeeThreads {
    pub fn index(self) -> usize {
        match self {
            TeeThreads::None => 0,
            TeeThreads::Confidential => 1,
            TeeThreads::ConfidentialWithQuoteService => 2,
        }
    }

    pub fn from_index(index: usize) -> Self {
        match index {
            1 => TeeThreads::Confidential,
            2 => TeeThreads::ConfidentialWithQuoteService,
            _ => TeeThreads::None,
        }
    }
}

/// `KVM_SET_MEMORY_ATTRIBUTES` (`_IOW(KVMIO, 0xd2, struct
/// kvm_memory_attributes)`, 32 bytes): a conversion exit
/// (`KVM_HC_MAP_GPA_RANGE`, `KVM_EXIT_MEMORY_FAULT`) sets the range
/// private or shared from the vCPU thread that took it.
pub const KVM_SET_MEMORY_ATTRIBUTES: u64 = 0x4020_aed2;

/// ioctl requests a confidential VM's vCPU threads add.
pub fn tee_vcpu_ioctls(tee: TeeThreads) -> Vec<u64> {
    match tee {
        TeeThreads::None => Vec::new(),
        _ => vec![KVM_SET_MEMORY_ATTRIBUTES],
    }
}

/// Calls a confidential VM's vCPU threads add with any arguments: the QGS
/// client's (`crate::tee::tdx::quote::QgsClient`, measured with strace:
/// connect, SO_RCVTIMEO/SO_SNDTIMEO, one request out, the reply in; the
/// vsock variant reads and writes, which every vCPU thread may). After a
/// conversion the old side is freed with `madvise(MADV_DONTNEED)`, which
/// [`BASE`] already allows.
pub fn tee_vcpu(tee: TeeThreads) -> Vec<i64> {
    match tee {
        TeeThreads::ConfidentialWithQuoteService => {
            vec![SYS_connect, SYS_setsockopt, SYS_sendto, SYS_recvfrom]
        }
        _ => Vec::new(),
    }
}

/// Calls a confidential VM's vCPU threads add only with one argument
/// value, as (syscall, argument index, allowed values): the guest_memfd
/// hole punched after a conversion to shared, the QGS socket's family.
/// Where a device's list already allows the call with any arguments
/// (`fallocate` for block, `socket` for vsock), that stays.
pub fn tee_vcpu_with_args(tee: TeeThreads) -> Vec<(i64, u8, Vec<u64>)> {
    let punch_hole = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) as u64;
    match tee {
        TeeThreads::None => Vec::new(),
        TeeThreads::Confidential => vec![(SYS_fallocate, 1, vec![punch_hole])],
        TeeThreads::ConfidentialWithQuoteService => vec![
            (SYS_fallocate, 1, vec![punch_hole]),
            (SYS_socket, 0, vec![AF_UNIX as u64, AF_VSOCK as u64]),
        ],
    }
}

/// Calls whose `prot` (argument 2) may never hold PROT_EXEC, in every
/// list that has them: nothing maps code once the filters are in place.
/// PROT_READ never implies PROT_EXEC here: that takes the
/// READ_IMPLIES_EXEC personality, which x86-64 binaries with a
/// non-executable stack do not get and no list lets a thread set.
pub const NO_EXEC_PROT: &[i64] = &[SYS_mmap, SYS_mprotect, SYS_pkey_mprotect];

/// The one `clone` a thread may make: glibc's `pthread_create` (its
/// `create_thread`, after `clone3` failed with ENOSYS). Anything else (a
/// fork, new namespaces, a thread sharing less) is refused.
pub const THREAD_CLONE_FLAGS: u64 = (CLONE_VM
    | CLONE_FS
    | CLONE_FILES
    | CLONE_SIGHAND
    | CLONE_THREAD
    | CLONE_SYSVSEM
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID) as u64;

/// What every Rust thread needs once running: memory (never executable:
/// [`NO_EXEC_PROT`]), locks, its own end, signal return, time, logging to
/// stderr.
const BASE: &[i64] = &[
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mprotect,
    SYS_futex,
    SYS_exit,
    SYS_exit_group,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_gettid,
    SYS_getpid,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_restart_syscall,
    SYS_write,
    SYS_writev,
    SYS_close,
    // Rust's std checks a descriptor is open (F_GETFD) when it closes one.
    SYS_fcntl,
    SYS_getrandom,
];

/// Host-side socket work of hybrid vsock: accepting host connections,
/// connecting guest-initiated ones to `<uds>_<port>`, moving bytes.
const VSOCK: &[i64] = &[
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_accept4,
    SYS_socket,
    SYS_connect,
    SYS_read,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_shutdown,
    SYS_fcntl,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_timerfd_gettime,
    SYS_unlink,
];

/// Block requests straight into guest memory.
const BLOCK: &[i64] = &[
    SYS_preadv,
    SYS_pwritev,
    SYS_pread64,
    SYS_pwrite64,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_lseek,
];

/// The passthrough file system, including the per-request credential
/// switch (raw setresuid/setresgid on the serving thread) and re-opening
/// inodes through /proc/self/fd. Its private umask (unshare(CLONE_FS)) is
/// in [`unshare_flags`]: unshare with any flags would let the thread make
/// a user namespace (all capabilities in it) or new mount namespaces.
/// Beyond what the tests' guests made it call (they run as root and use
/// no xattrs or hard links), this holds every call fuse-backend-rs's
/// passthrough makes for the FUSE operations it serves.
const FS: &[i64] = &[
    SYS_openat,
    SYS_open,
    SYS_statx,
    SYS_newfstatat,
    SYS_fstat,
    SYS_fstatfs,
    SYS_statfs,
    SYS_getdents64,
    SYS_lseek,
    SYS_read,
    SYS_readv,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchownat,
    SYS_fchown,
    SYS_utimensat,
    SYS_linkat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_unlinkat,
    SYS_renameat2,
    SYS_renameat,
    SYS_fcntl,
    SYS_flock,
    SYS_setresuid,
    SYS_setresgid,
    SYS_umask,
    SYS_capget,
    SYS_capset,
    SYS_fgetxattr,
    SYS_fsetxattr,
    SYS_flistxattr,
    SYS_fremovexattr,
    SYS_getxattr,
    SYS_lgetxattr,
    SYS_setxattr,
    SYS_lsetxattr,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_removexattr,
    SYS_lremovexattr,
    SYS_fchdir,
    SYS_dup,
    SYS_readlink,
    SYS_copy_file_range,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
];

/// The only `unshare` flags a thread serving `devices` may pass: CLONE_FS
/// for the fs device's private umask (`devices/virtio/fs/share.rs`).
pub fn unshare_flags(devices: DeviceKinds) -> Vec<u64> {
    if devices.fs {
        vec![CLONE_FS as u64]
    } else {
        Vec::new()
    }
}

/// Frames to and from the tap.
const NET: &[i64] = &[
    SYS_read,
    SYS_readv,
    SYS_write,
    SYS_writev,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
];

/// The event loop itself and the eventfds it waits on.
const EVENT_LOOP: &[i64] = &[SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl, SYS_read];

fn with_devices(mut list: Vec<i64>, devices: DeviceKinds) -> Vec<i64> {
    if devices.vsock {
        list.extend_from_slice(VSOCK);
    }
    if devices.block {
        list.extend_from_slice(BLOCK);
    }
    if devices.fs {
        list.extend_from_slice(FS);
    }
    if devices.net {
        list.extend_from_slice(NET);
    }
    list.sort_unstable();
    list.dedup();
    list
}

/// The main thread while the VM runs and when it ends: waits on the exit
/// eventfd, kicks and joins the vCPUs, drops the devices (the vsock device
/// removes its socket), prints the metrics.
pub fn main(devices: DeviceKinds) -> Vec<i64> {
    let mut list = BASE.to_vec();
    list.extend_from_slice(&[SYS_read, SYS_poll, SYS_ppoll, SYS_tgkill, SYS_sigaltstack]);
    with_devices(list, devices)
}

/// The signal watcher (`sigwait`), the metrics printer, the vCPU nudger
/// (`pthread_kill` of vCPU threads).
pub fn helper() -> Vec<i64> {
    let mut list = BASE.to_vec();
    list.extend_from_slice(&[SYS_rt_sigtimedwait, SYS_tgkill, SYS_read]);
    list
}

/// A vCPU thread: KVM_RUN and the exits it dispatches. MMIO writes reach
/// the virtio transports on this thread, so device activation and reset
/// (the net device's TUNSETOFFLOAD, the fs device re-importing its root)
/// run here too.
pub fn vcpu(devices: DeviceKinds) -> Vec<i64> {
    let mut list = BASE.to_vec();
    list.extend_from_slice(&[SYS_read, SYS_tgkill]);
    with_devices(list, devices)
}

/// ioctl requests of a vCPU thread: its own run loop and register dump,
/// and the taps' offload setting done at activation.
pub fn vcpu_ioctls(devices: DeviceKinds) -> Vec<u64> {
    let mut list = vec![
        kvm_ioctl::KVM_RUN,
        kvm_ioctl::KVM_GET_REGS,
        kvm_ioctl::KVM_GET_SREGS,
        kvm_ioctl::KVM_SET_REGS,
    ];
    list.extend(virtio_ioctls(devices));
    list
}

/// ioctl requests of the device side: the tap's offloads.
pub fn virtio_ioctls(devices: DeviceKinds) -> Vec<u64> {
    let mut list = Vec::new();
    if devices.net {
        list.push(TUNSETOFFLOAD);
    }
    if devices.vsock || devices.fs {
        // FIONBIO: sockets and descriptors made non-blocking.
        list.push(FIONBIO);
    }
    list
}

/// The virtio event loop.
pub fn virtio(devices: DeviceKinds) -> Vec<i64> {
    let mut list = BASE.to_vec();
    list.extend_from_slice(EVENT_LOOP);
    with_devices(list, devices)
}

/// A vhost-user server from the moment it creates its socket: rust-vmm's
/// daemon (listening, accepting the front end, its messages with fds,
/// mapping guest memory from them, its worker threads with their signal
/// handler) and the device's own calls. Its thread starts and names are
/// in [`vhost_user_with_args`].
pub fn vhost_user(devices: DeviceKinds) -> Vec<i64> {
    let mut list = BASE.to_vec();
    list.extend_from_slice(EVENT_LOOP);
    list.extend_from_slice(&[
        SYS_accept4,
        SYS_accept,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_epoll_create1,
        SYS_eventfd2,
        SYS_fcntl,
        // These two are allowed here only because the filter installed
        // before this one answers them with ENOSYS ([`vhost_user_enosys`];
        // `openat` only where no fs device needs it): the kernel takes the
        // most restrictive answer of all filters, and an errno beats
        // allow. Left out, they would kill the server.
        SYS_clone3,
        SYS_openat,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_shutdown,
        SYS_unlink,
        SYS_memfd_create,
        SYS_ftruncate,
        SYS_dup,
        SYS_poll,
        SYS_socket,
        SYS_bind,
        SYS_listen,
        // The net relay connects to the back end's own socket.
        SYS_connect,
        SYS_rt_sigaction,
        SYS_read,
        SYS_madvise,
    ]);
    with_devices(list, devices)
}

/// Calls of a vhost-user server allowed only with one argument value, as
/// (syscall, argument index, allowed values): its worker threads' start
/// (`clone` as `pthread_create` makes it) and name (`prctl(PR_SET_NAME)`;
/// other options would let a compromised server make itself dumpable,
/// change its securebits or its parent-death signal, ...).
pub fn vhost_user_with_args() -> Vec<(i64, u8, Vec<u64>)> {
    vec![
        (SYS_clone, 0, vec![THREAD_CLONE_FLAGS]),
        (SYS_prctl, 0, vec![PR_SET_NAME as u64]),
    ]
}

/// Calls a vhost-user server's threads make that must fail rather than
/// kill the server, answered ENOSYS by a filter installed before its
/// allowlist:
/// - `clone3`, so that glibc starts threads with `clone`
///   ([`vhost_user_with_args`] checks its flags);
/// - `openat` in servers without an fs device: glibc's malloc opens
///   `/proc/sys/vm/overcommit_memory` the first time it shrinks a
///   thread's arena (measured: the vsock server's vring worker, under
///   `tests/tests/vsock_guest.rs`'s 256 MiB transfers, every jailed run),
///   and without the file it simply gives the memory back with
///   `madvise`. Nothing else in these servers opens files once filtered.
pub fn vhost_user_enosys(devices: DeviceKinds) -> Vec<i64> {
    let mut list = vec![SYS_clone3];
    if !devices.fs {
        list.push(SYS_openat);
    }
    list
}

/// The supervisor: waits, forwards signals, exits or dies like the VMM.
pub fn supervisor() -> Vec<i64> {
    vec![
        SYS_rt_sigtimedwait,
        SYS_rt_sigprocmask,
        SYS_rt_sigaction,
        SYS_rt_sigreturn,
        SYS_wait4,
        SYS_waitid,
        SYS_tgkill,
        SYS_getpid,
        SYS_gettid,
        SYS_write,
        SYS_writev,
        SYS_close,
        SYS_munmap,
        SYS_brk,
        SYS_mmap,
        SYS_futex,
        SYS_sigaltstack,
        SYS_exit,
        SYS_exit_group,
        SYS_restart_syscall,
    ]
}

/// KVM's ioctl request numbers (linux/kvm.h), as the filter compares them.
mod kvm_ioctl {
    const KVMIO: u64 = 0xAE;
    const fn io(nr: u64) -> u64 {
        (KVMIO << 8) | nr
    }
    const fn ior(nr: u64, size: u64) -> u64 {
        (2 << 30) | (size << 16) | (KVMIO << 8) | nr
    }
    const fn iow(nr: u64, size: u64) -> u64 {
        (1 << 30) | (size << 16) | (KVMIO << 8) | nr
    }
    pub const KVM_RUN: u64 = io(0x80);
    /// `struct kvm_regs` is 144 bytes, `struct kvm_sregs` 312.
    pub const KVM_GET_REGS: u64 = ior(0x81, 144);
    pub const KVM_SET_REGS: u64 = iow(0x82, 144);
    pub const KVM_GET_SREGS: u64 = ior(0x83, 312);

    #[cfg(test)]
    mod tests {
        #[test]
        fn request_numbers_match_kvm_bindings() {
            assert_eq!(super::KVM_RUN, 0xae80);
            assert_eq!(super::KVM_GET_REGS, 0x8090_ae81);
            assert_eq!(super::KVM_SET_REGS, 0x4090_ae82);
            assert_eq!(super::KVM_GET_SREGS, 0x8138_ae83);
        }
    }
}
