//! The jail's processes. `unshare(CLONE_NEWPID)` only moves the children
//! of the caller, so the VMM forks: the child is PID 1 of the new PID
//! namespace and becomes the jailed VMM; the parent stays as a small
//! supervisor that whoever started `cloister-vmm` keeps talking to. It
//! forwards SIGTERM/SIGINT/SIGHUP to the VMM and ends the way the VMM
//! ended: the same exit code, or killed by the same signal (so a test sees
//! a seccomp SIGSYS on the pid it started). The supervisor keeps only
//! CAP_KILL (the VMM runs as another uid), sets no_new_privs and runs
//! under a seccomp filter that lets it wait, signal only its child, and
//! exit.

use std::process::ExitCode;

use super::privileges::{restrict_capabilities, CAP_KILL};
use super::seccomp::supervisor_filter;
use super::JailError;

/// The signals the supervisor waits for.
const SUPERVISED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset adds valid
    // signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// The VMM's end of a pipe whose other end only the supervisor holds:
/// it hangs up when the supervisor is gone, which the parent-death signal
/// cannot tell a VMM that arms it only after its last credential change.
pub struct SupervisorLink(std::os::fd::OwnedFd);

/// Which side of the fork this process is.
pub enum Forked {
    /// The jailed VMM, PID 1 of its namespace: continue setting up.
    Vmm(SupervisorLink),
    /// The supervisor, after the VMM ended: exit with this.
    Supervisor(ExitCode),
}

/// Unshares the PID namespace and forks. Must run while the process has
/// one thread.
pub fn fork_into_pid_namespace() -> Result<Forked, JailError> {
    let step = |step: &'static str| JailError::Step {
        step,
        value: String::new(),
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: unshare with a flag only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(step("unshare PID namespace"));
    }
    // Blocked before the fork so a SIGTERM cannot kill the supervisor
    // before it waits; the child keeps SIGTERM/SIGINT/SIGHUP blocked (the
    // VMM takes them with sigwait) and unblocks SIGCHLD.
    let set = signal_set(&SUPERVISED);
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(JailError::Step {
            step: "block signals",
            value: String::new(),
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    let mut ends = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two new fds into `ends`.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(step("create the supervisor pipe"));
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both fds were just created and are owned by nothing else.
    let (vmm_end, supervisor_end) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(ends[0]),
            std::os::fd::OwnedFd::from_raw_fd(ends[1]),
        )
    };
    // SAFETY: the process has a single thread, so the child is a complete
    // copy; it continues in Rust code that allocates freely.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(step("fork into PID namespace")),
        0 => {
            drop(supervisor_end);
            let chld = signal_set(&[libc::SIGCHLD]);
            // SAFETY: as above.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut()) };
            Ok(Forked::Vmm(SupervisorLink(vmm_end)))
        }
        child => {
            drop(vmm_end);
            // Held, never written, until the supervisor exits: released as
            // a raw fd, since dropping it under the supervisor's seccomp
            // filter would make calls (fcntl in debug builds) it forbids.
            use std::os::fd::IntoRawFd;
            let _held = supervisor_end.into_raw_fd();
            Ok(Forked::Supervisor(supervise(child)))
        }
    }
}

/// The parent's side: restricts itself, forwards signals, reaps the VMM.
fn supervise(child: libc::pid_t) -> ExitCode {
    if let Err(e) = restrict_supervisor(child) {
        eprintln!("cloister-vmm: {e}; killing the jailed VMM");
        // SAFETY: kill with integer arguments; `child` is our child.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    let set = signal_set(&SUPERVISED);
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialised, `signal` a valid place for the result.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        if signal != libc::SIGCHLD {
            // SAFETY: as above.
            unsafe { libc::kill(child, signal) };
            continue;
        }
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into `status`.
        let rc = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if rc != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            return ExitCode::from(libc::WEXITSTATUS(status) as u8);
        }
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            eprintln!("cloister-vmm: the jailed VMM was killed by signal {signal}");
            return die_like(signal);
        }
    }
}

fn restrict_supervisor(child: libc::pid_t) -> Result<(), JailError> {
    restrict_capabilities(&[CAP_KILL])?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::Step {
            step: "set no_new_privs",
            value: "supervisor".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let filter = supervisor_filter(child)?;
    seccompiler::apply_filter(&filter).map_err(|e| JailError::Seccomp {
        kind: "supervisor",
        reason: e.to_string(),
    })
}

/// Ends this process by `signal` as the VMM ended, or 128+signal if that
/// signal does not kill by default.
fn die_like(signal: libc::c_int) -> ExitCode {
    let set = signal_set(&[signal]);
    // SAFETY: resetting a signal to its default action and unblocking it
    // touches no memory but the initialised set.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
    ExitCode::from(128 + (signal & 0x7f) as u8)
}

/// Joins the network namespace at `path` (to open taps there).
pub fn join_netns(path: &std::path::Path) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(|source| JailError::Step {
        step: "open netns",
        value: path.display().to_string(),
        source,
    })?;
    // SAFETY: setns on a namespace fd we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(JailError::Step {
            step: "join netns",
            value: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Closes every descriptor above stderr that this process inherited from
/// its caller, except `keep`. Inherited ones are those without
/// close-on-exec: everything this process opened itself (Rust opens with
/// O_CLOEXEC, the taps are F_DUPFD_CLOEXEC copies) has the flag, and a
/// descriptor that survived our exec cannot have it. Such a descriptor
/// (the shim's listening socket, a folder of the host) would outlive the
/// pivot and lead out of the jail, so it goes before the root is built.
pub fn close_inherited_fds(keep: &[std::os::fd::RawFd]) -> Result<(), JailError> {
    let step = |step: &'static str, value: String, source| JailError::Step {
        step,
        value,
        source,
    };
    // Collected first: closing while reading the folder would close its fd.
    let fds: Vec<libc::c_int> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| step("list inherited fds", "/proc/self/fd".into(), e))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd <= libc::STDERR_FILENO || keep.contains(&fd) {
            continue;
        }
        // SAFETY: F_GETFD on an integer; a closed fd (the folder's own,
        // gone by now) returns -1 and is skipped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        // SAFETY: `fd` was inherited and is owned by no Rust object of this
        // process (those are all close-on-exec).
        if unsafe { libc::close(fd) } != 0 {
            return Err(step(
                "close inherited fd",
                fd.to_string(),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// New mount, IPC, UTS and network namespaces for the VMM.
pub fn unshare_namespaces() -> Result<(), JailError> {
    // SAFETY: unshare with flags only changes this process's namespaces.
    let rc = unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
        )
    };
    if rc != 0 {
        return Err(JailError::Step {
            step: "unshare mount, IPC, UTS and network namespaces",
            value: String::new(),
            source: std::io::Error::last_os_error(),
        });
    }
    let name = b"cloister-vmm";
    // SAFETY: sethostname reads `name.len()` bytes of `name`.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(JailError::Step {
            step: "set hostname",
            value: "cloister-vmm".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The VMM dies with its supervisor (set after the last credential
/// change, which clears it). A supervisor that died before that (its own
/// caller died, and it with it) left the pipe hung up: the VMM then stops
/// here instead of running unwatched.
pub fn die_with_supervisor(link: SupervisorLink) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(JailError::Step {
            step: "set parent death signal",
            value: "SIGKILL".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if supervisor_gone(&link) {
        return Err(JailError::Step {
            step: "check the supervisor",
            value: String::new(),
            source: std::io::Error::other("it died while the jail was being set up"),
        });
    }
    Ok(())
}

/// Whether the supervisor's end of the link is closed (it never writes,
/// so the read end only ever shows a hang-up).
fn supervisor_gone(link: &SupervisorLink) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: link.0.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd given, without waiting.
    // A poll that fails (-1) says nothing about the supervisor.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}

extern "C" fn exit_on_signal(signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe and takes an integer.
    unsafe { libc::_exit(128 + signal) };
}

/// For a jailed process without a signal thread (the vhost-user server):
/// SIGTERM, SIGINT and SIGHUP end it. As PID 1 of its namespace it gets
/// only the signals it has a handler for, and they arrive blocked from the
/// fork.
pub fn exit_on_termination_signals() -> Result<(), JailError> {
    let set = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls _exit.
        let previous = unsafe {
            libc::signal(
                signal,
                exit_on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
        if previous == libc::SIG_ERR {
            return Err(JailError::Step {
                step: "install termination handler",
                value: signal.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn link_and_supervisor_end() -> (SupervisorLink, OwnedFd) {
        let mut ends = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two new fds into `ends`.
        let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned by nothing else.
        unsafe {
            (
                SupervisorLink(OwnedFd::from_raw_fd(ends[0])),
                OwnedFd::from_raw_fd(ends[1]),
            )
        }
    }

    #[test]
    fn a_vmm_knows_its_supervisor_is_gone_when_the_link_hangs_up() {
        let (link, supervisor_end) = link_and_supervisor_end();
        assert!(!supervisor_gone(&link), "the supervisor holds its end");
        drop(supervisor_end);
        assert!(supervisor_gone(&link), "its end closed with it");
    }
}
