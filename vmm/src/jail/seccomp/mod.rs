//! Seccomp allowlists per thread kind, compiled with `seccompiler` when the
//! VMM is built (`build.rs`: every thread kind for each of the 16 mixes of
//! device kinds that change a list) and installed by each thread itself
//! once its own setup is done, before it touches guest input. A call
//! outside the list kills the whole process with SIGSYS
//! (SECCOMP_RET_KILL_PROCESS), which the supervisor passes on to whoever
//! started `cloister-vmm`. Only the supervisor's filter is compiled at run
//! time: it names the pid of its child.
//!
//! Filters stack: a thread inherits the filter of the thread that spawned
//! it. The main thread therefore installs its own only after it has
//! spawned every other thread ([`apply_to_this_thread`] is a no-op
//! outside a jail), and no filter uses SECCOMP_FILTER_FLAG_TSYNC except the
//! vhost-user server's, which is one process-wide list installed before
//! rust-vmm's daemon starts its threads. The server is also the only one
//! that starts threads under its filter, so it alone stacks a second,
//! smaller filter under its list: `clone3` answered with ENOSYS, so that
//! glibc starts threads with `clone`, whose flags a filter can check (and
//! `openat` in servers that serve no files, which glibc's malloc tries
//! once: `rules::vhost_user_enosys`).
//!
//! The lists come from `strace -f` of the VMM's tests: see `rules.rs`.

pub mod compile;
#[cfg(test)]
mod narrowed_tests;
pub mod rules;

use std::sync::OnceLock;

use seccompiler::{sock_filter, BpfProgram};

use super::JailError;
pub use compile::ThreadKind;
pub use rules::{DeviceKinds, TeeThreads};

mod built {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// The programs `build.rs` compiled.
static FILTER_BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

fn kind_index(kind: ThreadKind) -> usize {
    match kind {
        ThreadKind::Main => 0,
        ThreadKind::Helper => 1,
        ThreadKind::Vcpu => 2,
        ThreadKind::Virtio => 3,
        ThreadKind::VhostUser => 4,
    }
}

/// The built filter of `kind` for `devices`.
pub fn built_filter(kind: ThreadKind, devices: DeviceKinds) -> BpfProgram {
    built_tee_filter(kind, devices, TeeThreads::None)
}

/// The built filter of `kind` for `devices` in a VM confidential as `tee`.
pub fn built_tee_filter(kind: ThreadKind, devices: DeviceKinds, tee: TeeThreads) -> BpfProgram {
    let (offset, len) = built::FILTER_INDEX[kind_index(kind)][tee.index()][devices.mask()];
    FILTER_BLOB[offset * 8..(offset + len) * 8]
        .chunks_exact(8)
        .map(|b| sock_filter {
            code: u16::from_le_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect()
}

/// The filters of one jailed VMM, by thread kind.
pub struct ThreadFilters {
    main: BpfProgram,
    helper: BpfProgram,
    vcpu: BpfProgram,
    virtio: BpfProgram,
}

static FILTERS: OnceLock<ThreadFilters> = OnceLock::new();

impl ThreadFilters {
    /// The filters of a VM serving `devices`.
    pub fn for_vm(devices: DeviceKinds) -> Self {
        Self::for_tee_vm(devices, TeeThreads::None)
    }

    /// The filters of a VM serving `devices`, confidential as `tee` says.
    pub fn for_tee_vm(devices: DeviceKinds, tee: TeeThreads) -> Self {
        Self {
            main: built_tee_filter(ThreadKind::Main, devices, tee),
            helper: built_tee_filter(ThreadKind::Helper, devices, tee),
            vcpu: built_tee_filter(ThreadKind::Vcpu, devices, tee),
            virtio: built_tee_filter(ThreadKind::Virtio, devices, tee),
        }
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
        ThreadKind::Virtio | ThreadKind::VhostUser => &filters.virtio,
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

/// The vhost-user server's filters in the order they are installed: the
/// one answering `clone3` (and `openat` without an fs device) with
/// ENOSYS, then the built allowlist (which allows those only because the
/// first one answers them; installing the first after the allowlist would
/// need `seccomp` in the allowlist).
pub fn vhost_user_filters(devices: DeviceKinds) -> Result<[BpfProgram; 2], JailError> {
    let enosys = compile::vhost_user_enosys(devices).map_err(|reason| JailError::Seccomp {
        kind: "vhost-user enosys",
        reason,
    })?;
    Ok([enosys, built_filter(ThreadKind::VhostUser, devices)])
}

/// The vhost-user server's filters, for every thread of the process
/// (installed with TSYNC before the daemon starts its threads).
pub fn apply_vhost_user_filter(devices: DeviceKinds) -> Result<(), JailError> {
    for program in vhost_user_filters(devices)? {
        seccompiler::apply_filter_all_threads(&program).map_err(|e| JailError::Seccomp {
            kind: "vhost-user",
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// The supervisor's list: wait for signals and the child, signal only
/// `child`, exit (possibly by re-raising the child's signal).
pub fn supervisor_filter(child: libc::pid_t) -> Result<BpfProgram, JailError> {
    let error = |reason| JailError::Seccomp {
        kind: "supervisor",
        reason,
    };
    compile::compile(compile::supervisor_rules(child).map_err(error)?).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_filters_are_the_rules_compiled_now() {
        for kind in ThreadKind::ALL {
            for mask in 0..1 << rules::MASK_KINDS {
                let devices = DeviceKinds::from_mask(mask);
                let now = compile::compile(compile::thread_rules(kind, devices).unwrap()).unwrap();
                assert_eq!(built_filter(kind, devices), now, "{kind:?} {mask}");
                for variant in 0..rules::TEE_VARIANTS {
                    let tee = TeeThreads::from_index(variant);
                    let now =
                        compile::compile(compile::tee_thread_rules(kind, devices, tee).unwrap())
                            .unwrap();
                    assert_eq!(
                        built_tee_filter(kind, devices, tee),
                        now,
                        "{kind:?} {tee:?} {mask}"
                    );
                }
            }
        }
    }

    /// The built TEE vCPU filter, installed on a thread of its own: the
    /// conversion calls and the real QGS client (against a QGS that reads
    /// the request and hangs up) get errors from the kernel, not SIGSYS.
    #[test]
    fn tee_vcpu_filter_lets_conversions_and_the_qgs_client_through() {
        use std::io::Read;

        use crate::tee::tdx::quote::{QgsClient, QuoteService, QuoteServiceAddr};

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qgs.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let qgs = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut body).unwrap();
        });
        let program = built_tee_filter(
            ThreadKind::Vcpu,
            DeviceKinds::default(),
            TeeThreads::ConfidentialWithQuoteService,
        );
        let vcpu = std::thread::spawn(move || {
            seccompiler::apply_filter(&program).unwrap();
            let errno = || std::io::Error::last_os_error().raw_os_error();
            // SAFETY: fd -1: the kernel refuses before reading the argument.
            let rc = unsafe { libc::ioctl(-1, rules::KVM_SET_MEMORY_ATTRIBUTES as _, 0) };
            assert_eq!((rc, errno()), (-1, Some(libc::EBADF)));
            // SAFETY: fd -1, no pointers.
            let rc = unsafe {
                libc::fallocate(
                    -1,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                )
            };
            assert_eq!((rc, errno()), (-1, Some(libc::EBADF)));
            let mut client = QgsClient::new(QuoteServiceAddr::Unix(socket));
            // Reached the reply: connect, timeouts, request, read all ran.
            client.get_quote(&[0u8; 1024]).unwrap_err().to_string()
        });
        let err = vcpu.join().expect("the filtered thread survived");
        qgs.join().unwrap();
        assert!(!err.is_empty());
    }

    /// Outside the list: the whole process dies with SIGSYS (in a child).
    #[test]
    fn tee_vcpu_filter_kills_on_other_fallocate_modes_and_without_a_tee() {
        for (tee, mode) in [
            (TeeThreads::Confidential, 0),
            (
                TeeThreads::None,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
        ] {
            let program = built_tee_filter(ThreadKind::Vcpu, DeviceKinds::default(), tee);
            // SAFETY: the child only installs a prebuilt filter and makes
            // raw system calls before _exit: no allocation, no locks.
            match unsafe { libc::fork() } {
                0 => {
                    if seccompiler::apply_filter(&program).is_err() {
                        // SAFETY: ends the child.
                        unsafe { libc::_exit(3) };
                    }
                    // SAFETY: fd -1, no pointers.
                    unsafe { libc::fallocate(-1, mode, 0, 4096) };
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(0) };
                }
                pid => {
                    assert!(pid > 0);
                    let mut status = 0;
                    // SAFETY: waits for our own child.
                    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                    assert!(
                        libc::WIFSIGNALED(status),
                        "{tee:?} mode {mode}: {status:#x}"
                    );
                    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "{tee:?} mode {mode}");
                }
            }
        }
    }

    #[test]
    fn device_mask_roundtrips_and_rng_console_do_not_count() {
        for mask in 0..16 {
            assert_eq!(DeviceKinds::from_mask(mask).mask(), mask);
        }
        assert_eq!(DeviceKinds::all().mask(), 15);
        let rng_only = DeviceKinds {
            rng: true,
            console: true,
            ..Default::default()
        };
        assert_eq!(rng_only.mask(), 0);
    }

    #[test]
    fn supervisor_filter_compiles() {
        assert!(!supervisor_filter(1234).unwrap().is_empty());
    }
}
