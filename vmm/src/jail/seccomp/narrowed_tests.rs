//! The calls the lists allow only with some arguments, under the filters
//! the VMM really installs: thread starts (`clone` with
//! `pthread_create`'s flags, `clone3` answered ENOSYS), `prctl` options,
//! and `mmap`/`mprotect` never executable. What must be refused runs in a
//! forked child, since SIGSYS ends the whole process; what must work runs
//! on a filtered thread of the test process, so a kill fails the run.

use seccompiler::BpfProgram;

use super::compile::{self, ThreadKind};
use super::rules::{self, DeviceKinds};
use super::{built_filter, supervisor_filter, vhost_user_filters};

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum ChildEnd {
    Exited(i32),
    Killed(i32),
}

const KILLED_BY_SECCOMP: ChildEnd = ChildEnd::Killed(libc::SIGSYS);
/// The child could not install the filters.
const NOT_FILTERED: i32 = 100;

/// Forks a child that installs `programs` in order and exits with what
/// `body` returns. `body` runs after fork in a multi-threaded process: raw
/// system calls only, no allocation, no locks.
fn filtered_child(programs: &[&BpfProgram], body: impl Fn() -> i32) -> ChildEnd {
    // SAFETY: the child only installs prebuilt filters (no allocation)
    // and runs `body`, which keeps to raw system calls, then _exit.
    match unsafe { libc::fork() } {
        0 => {
            for program in programs {
                if seccompiler::apply_filter(program).is_err() {
                    // SAFETY: ends the child.
                    unsafe { libc::_exit(NOT_FILTERED) };
                }
            }
            let code = body();
            // SAFETY: ends the child.
            unsafe { libc::_exit(code) };
        }
        pid => {
            assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if libc::WIFSIGNALED(status) {
                ChildEnd::Killed(libc::WTERMSIG(status))
            } else {
                ChildEnd::Exited(libc::WEXITSTATUS(status))
            }
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `clone` as a fork (`flags`, no new stack); a child that got through
/// leaves at once. Returns 0 in the parent if the kernel made the child.
fn raw_clone(flags: u64) -> i32 {
    // SAFETY: without CLONE_VM the child has its own copy of the stack,
    // and it only calls _exit.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
    if rc == 0 {
        // SAFETY: ends the child's child.
        unsafe { libc::_exit(0) };
    }
    if rc > 0 {
        0
    } else {
        errno()
    }
}

/// `clone3` with no arguments: the kernel would refuse it with EFAULT or
/// EINVAL, so ENOSYS can only come from the filter.
fn raw_clone3() -> i32 {
    // SAFETY: null args of size 0: the kernel reads nothing.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    if rc == -1 {
        errno()
    } else {
        0
    }
}

/// An anonymous page mapped with `prot`, or the errno.
fn raw_mmap(prot: i32) -> Result<*mut libc::c_void, i32> {
    // SAFETY: a new anonymous private mapping, no fixed address.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        Err(errno())
    } else {
        Ok(addr)
    }
}

/// mmap read-write and mprotect read-only (where `mprotect` is listed)
/// work; then `exec_step` runs, which must be killed. Exit codes name the
/// step that failed.
fn no_exec_body(has_mprotect: bool, exec_step: ExecStep) -> impl Fn() -> i32 {
    move || {
        let Ok(page) = raw_mmap(libc::PROT_READ | libc::PROT_WRITE) else {
            return 10;
        };
        // SAFETY: our own mapping, made above.
        if has_mprotect && unsafe { libc::mprotect(page, 4096, libc::PROT_READ) } != 0 {
            return 11;
        }
        exec_step(page);
        0
    }
}

/// A step that must be killed, given the page the body mapped.
type ExecStep = fn(*mut libc::c_void);

fn mmap_exec(_: *mut libc::c_void) {
    let _ = raw_mmap(libc::PROT_READ | libc::PROT_EXEC);
}

fn mprotect_exec(page: *mut libc::c_void) {
    // SAFETY: our own mapping.
    unsafe { libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC) };
}

fn mmap_exec_only(_: *mut libc::c_void) {
    let _ = raw_mmap(libc::PROT_EXEC);
}

/// Every filter the VMM installs, by name, with whether it lists
/// `mprotect`. The vhost-user pair counts as one: it is installed as one.
fn every_filter() -> Vec<(String, Vec<BpfProgram>, bool)> {
    let mut filters = Vec::new();
    for kind in [
        ThreadKind::Main,
        ThreadKind::Helper,
        ThreadKind::Vcpu,
        ThreadKind::Virtio,
    ] {
        for devices in [DeviceKinds::default(), DeviceKinds::all()] {
            filters.push((
                format!("{kind:?} {}", devices.mask()),
                vec![built_filter(kind, devices)],
                true,
            ));
        }
    }
    for devices in [DeviceKinds::default(), DeviceKinds::all()] {
        filters.push((
            format!("VhostUser {}", devices.mask()),
            vhost_user_filters(devices).unwrap().into(),
            true,
        ));
    }
    // SAFETY: no arguments.
    let pid = unsafe { libc::getpid() };
    filters.push((
        "supervisor".into(),
        vec![supervisor_filter(pid).unwrap()],
        false,
    ));
    filters
}

#[test]
fn no_filter_lets_a_thread_map_executable_memory_but_every_one_maps_data() {
    for (name, programs, has_mprotect) in every_filter() {
        let programs: Vec<&BpfProgram> = programs.iter().collect();
        let mut steps: Vec<(&str, ExecStep)> = vec![
            ("mmap(PROT_READ|PROT_EXEC)", mmap_exec),
            ("mmap(PROT_EXEC)", mmap_exec_only),
        ];
        if has_mprotect {
            steps.push(("mprotect(PROT_READ|PROT_EXEC)", mprotect_exec));
        }
        for (step, exec_step) in steps {
            assert_eq!(
                filtered_child(&programs, no_exec_body(has_mprotect, exec_step)),
                KILLED_BY_SECCOMP,
                "{name}: {step} (10/11: the read-write mmap/read-only mprotect failed)"
            );
        }
    }
}

#[test]
fn exec_prot_is_refused_in_every_rule_set_that_allows_mmap_or_mprotect() {
    let no_exec = seccompiler::SeccompRule::new(vec![seccompiler::SeccompCondition::new(
        2,
        seccompiler::SeccompCmpArgLen::Dword,
        seccompiler::SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
    .unwrap()])
    .unwrap();
    let mut sets = vec![(
        "supervisor".to_string(),
        compile::supervisor_rules(1).unwrap(),
    )];
    for kind in ThreadKind::ALL {
        for mask in 0..1 << rules::MASK_KINDS {
            for variant in 0..rules::TEE_VARIANTS {
                let tee = rules::TeeThreads::from_index(variant);
                let devices = DeviceKinds::from_mask(mask);
                sets.push((
                    format!("{kind:?} {tee:?} {mask}"),
                    compile::tee_thread_rules(kind, devices, tee).unwrap(),
                ));
            }
        }
    }
    for (name, set) in sets {
        assert!(set.contains_key(&libc::SYS_mmap), "{name} maps memory");
        for syscall in rules::NO_EXEC_PROT {
            if let Some(rules) = set.get(syscall) {
                assert_eq!(rules, &vec![no_exec.clone()], "{name}: syscall {syscall}");
            }
        }
    }
}

/// The server's threads: `clone3` gets ENOSYS, glibc falls back to
/// `clone`, the worker names itself and runs; all on a thread of the test
/// process that installed the same filters as a jailed server.
#[test]
fn vhost_user_filters_start_and_name_threads_through_clone() {
    let programs = vhost_user_filters(DeviceKinds::all()).unwrap();
    let server = std::thread::spawn(move || {
        for program in &programs {
            seccompiler::apply_filter(program).unwrap();
        }
        assert_eq!(raw_clone3(), libc::ENOSYS);
        let worker = std::thread::Builder::new()
            .name("vring_worker".into())
            .spawn(|| {
                let name = c"renamed";
                // SAFETY: a NUL-terminated name that outlives the call.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }
            })
            .unwrap();
        worker.join().unwrap()
    });
    assert_eq!(server.join().expect("the filtered thread survived"), 0);
}

#[test]
fn vhost_user_filters_kill_a_fork_but_let_clone3_fail_with_enosys() {
    let programs = vhost_user_filters(DeviceKinds::all()).unwrap();
    let programs: Vec<&BpfProgram> = programs.iter().collect();
    assert_eq!(
        filtered_child(&programs, raw_clone3),
        ChildEnd::Exited(libc::ENOSYS)
    );
    for flags in [
        libc::SIGCHLD as u64,
        (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64,
        // pthread_create's flags and one more: the kernel refuses both
        // (a new user namespace for a thread, a new mount namespace with a
        // shared fs), so a filter letting them through shows as EINVAL
        // rather than as a thread on this thread's stack; the filter must
        // refuse them itself.
        rules::THREAD_CLONE_FLAGS | libc::CLONE_NEWUSER as u64,
        rules::THREAD_CLONE_FLAGS | libc::CLONE_NEWNS as u64,
    ] {
        assert_eq!(
            filtered_child(&programs, || raw_clone(flags)),
            KILLED_BY_SECCOMP,
            "clone flags {flags:#x}"
        );
    }
}

#[test]
fn vhost_user_filters_allow_only_pr_set_name() {
    let programs = vhost_user_filters(DeviceKinds::all()).unwrap();
    let programs: Vec<&BpfProgram> = programs.iter().collect();
    // Each with arguments the kernel refuses, so that a filter letting it
    // through shows as an exit code, not as a changed child.
    for (name, option, arg) in [
        ("PR_SET_DUMPABLE", libc::PR_SET_DUMPABLE, 7),
        ("PR_SET_SECCOMP", libc::PR_SET_SECCOMP, 99),
        ("PR_SET_PDEATHSIG", libc::PR_SET_PDEATHSIG, 999),
        ("PR_SET_SECUREBITS", libc::PR_SET_SECUREBITS, 1 << 30),
        ("PR_GET_NAME", libc::PR_GET_NAME, 0),
        ("PR_SET_VMA", 0x53564d41, 99),
    ] {
        let end = filtered_child(&programs, || {
            let named = c"vring_worker";
            // SAFETY: a NUL-terminated name that outlives the call.
            if unsafe { libc::prctl(libc::PR_SET_NAME, named.as_ptr()) } != 0 {
                return 10;
            }
            // SAFETY: integer arguments only (PR_GET_NAME's null pointer
            // would fail with EFAULT).
            unsafe { libc::prctl(option, arg as libc::c_ulong, 0, 0, 0) };
            0
        });
        assert_eq!(end, KILLED_BY_SECCOMP, "{name} (10: PR_SET_NAME failed)");
    }
}

/// The VM's threads start no thread once filtered: any clone, clone3 and
/// so `pthread_create` kill, as does any `prctl`.
#[test]
fn vm_thread_filters_kill_every_clone_thread_start_and_prctl() {
    extern "C" fn nothing(_: *mut libc::c_void) -> *mut libc::c_void {
        std::ptr::null_mut()
    }
    for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Virtio] {
        let rules = compile::thread_rules(kind, DeviceKinds::all()).unwrap();
        for syscall in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_prctl] {
            assert!(!rules.contains_key(&syscall), "{kind:?}: {syscall}");
        }
        let program = built_filter(kind, DeviceKinds::all());
        let programs = [&program];
        assert_eq!(
            filtered_child(&programs, raw_clone3),
            KILLED_BY_SECCOMP,
            "{kind:?}: clone3"
        );
        assert_eq!(
            filtered_child(&programs, || raw_clone(libc::SIGCHLD as u64)),
            KILLED_BY_SECCOMP,
            "{kind:?}: fork"
        );
        let end = filtered_child(&programs, || {
            let mut thread = 0;
            // SAFETY: a valid out pointer and a start routine that returns
            // at once; glibc supports pthread_create after fork.
            let rc = unsafe {
                libc::pthread_create(&mut thread, std::ptr::null(), nothing, std::ptr::null_mut())
            };
            rc + 20
        });
        assert_eq!(end, KILLED_BY_SECCOMP, "{kind:?}: pthread_create");
        let end = filtered_child(&programs, || {
            let named = c"vcpu";
            // SAFETY: a NUL-terminated name that outlives the call.
            unsafe { libc::prctl(libc::PR_SET_NAME, named.as_ptr()) }
        });
        assert_eq!(end, KILLED_BY_SECCOMP, "{kind:?}: prctl(PR_SET_NAME)");
    }
}

/// `openat` of what glibc's malloc reads, or the errno; 0 if it opened.
fn raw_open_overcommit() -> i32 {
    let path = c"/proc/sys/vm/overcommit_memory";
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        errno()
    } else {
        // SAFETY: the descriptor just opened.
        unsafe { libc::close(fd) };
        0
    }
}

#[test]
fn enosys_filter_answers_only_clone3_and_openat_without_an_fs_device() {
    let vsock = DeviceKinds {
        vsock: true,
        ..Default::default()
    };
    let program = compile::vhost_user_enosys(vsock).unwrap();
    let end = filtered_child(&[&program], || {
        if raw_clone3() != libc::ENOSYS {
            return 10;
        }
        if raw_open_overcommit() != libc::ENOSYS {
            return 11;
        }
        // Everything else passes: a fork, then getppid.
        if raw_clone(libc::SIGCHLD as u64) != 0 {
            return 12;
        }
        // SAFETY: no arguments.
        if unsafe { libc::getppid() } <= 0 {
            return 13;
        }
        0
    });
    assert_eq!(end, ChildEnd::Exited(0));
    let with_fs = compile::vhost_user_enosys(DeviceKinds::all()).unwrap();
    assert_eq!(
        filtered_child(&[&with_fs], raw_open_overcommit),
        ChildEnd::Exited(0)
    );
}

/// What glibc's malloc opens when it first shrinks a thread's arena fails
/// under a vsock server's filters (it then frees with madvise) and opens
/// under an fs server's; the older `open`, which glibc does not use,
/// still kills the vsock server.
#[test]
fn vhost_user_filters_let_malloc_fail_to_open_overcommit_without_an_fs_device() {
    let vsock = DeviceKinds {
        vsock: true,
        ..Default::default()
    };
    for (devices, expected) in [
        (vsock, ChildEnd::Exited(libc::ENOSYS)),
        (DeviceKinds::all(), ChildEnd::Exited(0)),
    ] {
        let programs = vhost_user_filters(devices).unwrap();
        let programs: Vec<&BpfProgram> = programs.iter().collect();
        assert_eq!(
            filtered_child(&programs, raw_open_overcommit),
            expected,
            "{devices:?}"
        );
    }
    let programs = vhost_user_filters(vsock).unwrap();
    let programs: Vec<&BpfProgram> = programs.iter().collect();
    let end = filtered_child(&programs, || {
        let path = c"/proc/sys/vm/overcommit_memory";
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::syscall(libc::SYS_open, path.as_ptr(), libc::O_RDONLY) as i32 }
    });
    assert_eq!(end, KILLED_BY_SECCOMP);
}
