//! Starting container init helpers with clone3, and reaping every child.
//!
//! The agent is a multithreaded tokio program, so between clone3 and execve
//! the child only calls dup2, execve and _exit (async-signal-safe). All real
//! work happens in the freshly exec'd helper (`container::helper`).
//!
//! The agent reaps every child itself (it is PID 1 in the guest, a child
//! subreaper on the host): one SIGCHLD task calls waitpid(-1) and hands each
//! status to whoever registered the pid, or keeps it for a late
//! registration (a process may exit before its pid is registered).

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// The fds a helper starts with: stdin, stdout, stderr and the sync socket.
pub struct HelperFds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub sync: OwnedFd,
}

/// Argument the agent binary recognises as "be a container init helper".
pub const HELPER_ARG: &str = "__container-init";

fn dup_high(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Starts `/proc/self/exe __container-init` with `clone_flags` (CLONE_NEW*)
/// and, when given, directly inside the cgroup open at `cgroup_fd`.
pub fn spawn_helper(clone_flags: u64, cgroup_fd: Option<RawFd>, fds: HelperFds) -> io::Result<Pid> {
    let exe = c"/proc/self/exe";
    let arg0 = c"cloister-agent";
    let arg1 = CString::new(HELPER_ARG).map_err(io::Error::other)?;
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // Above 3 so the dup2 calls in the child cannot clobber each other.
    let sources = [
        dup_high(&fds.stdin)?,
        dup_high(&fds.stdout)?,
        dup_high(&fds.stderr)?,
        dup_high(&fds.sync)?,
    ];
    let raw: [RawFd; 4] = [
        sources[0].as_raw_fd(),
        sources[1].as_raw_fd(),
        sources[2].as_raw_fd(),
        sources[3].as_raw_fd(),
    ];

    let mut flags = clone_flags;
    let mut cgroup = 0u64;
    if let Some(fd) = cgroup_fd {
        // libc's CLONE_INTO_CGROUP constant is deprecated for overflowing c_int.
        flags |= 0x2_0000_0000u64;
        cgroup = u64::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    }
    // SAFETY: clone_args is plain data; all-zero is its documented default.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = cgroup;

    // SAFETY: clone3 without CLONE_VM and without a stack behaves like
    // fork. The child below only calls async-signal-safe functions (dup2,
    // execve, _exit) on memory prepared before the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if rc == 0 {
        // SAFETY: child side of clone3; see above.
        unsafe {
            for (target, source) in raw.iter().enumerate() {
                if libc::dup2(*source, target as i32) < 0 {
                    libc::_exit(126);
                }
            }
            libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(sources);
    let pid = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))?;
    Ok(Pid::from_raw(pid))
}

/// How a process ended, as a shell reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number.
    pub status: u32,
    /// Nanoseconds since the Unix epoch.
    pub at_ns: u64,
}

impl ExitInfo {
    fn from_wait(status: &WaitStatus) -> Option<(Pid, ExitInfo)> {
        let at_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        match *status {
            WaitStatus::Exited(pid, code) => Some((
                pid,
                ExitInfo {
                    status: code as u32 & 0xff,
                    at_ns,
                },
            )),
            WaitStatus::Signaled(pid, signal, _) => Some((
                pid,
                ExitInfo {
                    status: 128 + signal as u32,
                    at_ns,
                },
            )),
            _ => None,
        }
    }
}

/// Exits nobody registered yet, kept for a while for late registrations.
const UNCLAIMED_LIMIT: usize = 1024;

#[derive(Default)]
struct ReaperState {
    waiters: HashMap<i32, oneshot::Sender<ExitInfo>>,
    unclaimed: VecDeque<(i32, ExitInfo)>,
}

/// Reaps all children; delivers exits to registered waiters.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<ReaperState>,
}

impl Reaper {
    /// Registers interest in `pid`'s exit.
    pub fn register(&self, pid: Pid) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = state.unclaimed.iter().position(|(p, _)| *p == pid.as_raw()) {
            if let Some((_, info)) = state.unclaimed.remove(i) {
                let _ = tx.send(info);
            }
            return rx;
        }
        state.waiters.insert(pid.as_raw(), tx);
        rx
    }

    /// Reaps every child that has exited so far.
    pub fn reap_now(&self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let Some((pid, info)) = ExitInfo::from_wait(&status) else {
                continue;
            };
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(info);
                }
                None => {
                    if state.unclaimed.len() == UNCLAIMED_LIMIT {
                        state.unclaimed.pop_front();
                    }
                    state.unclaimed.push_back((pid.as_raw(), info));
                }
            }
        }
    }

    /// Runs the SIGCHLD loop forever.
    pub async fn run(self: Arc<Self>) -> io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        loop {
            self.reap_now();
            if sigchld.recv().await.is_none() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_shell_convention() {
        let (_, info) = ExitInfo::from_wait(&WaitStatus::Exited(Pid::from_raw(5), 3)).unwrap();
        assert_eq!(info.status, 3);
        let (_, info) = ExitInfo::from_wait(&WaitStatus::Signaled(
            Pid::from_raw(5),
            nix::sys::signal::Signal::SIGKILL,
            false,
        ))
        .unwrap();
        assert_eq!(info.status, 137);
    }

    #[test]
    fn exit_before_registration_is_delivered_on_register() {
        let reaper = Reaper::default();
        reaper.state.lock().unwrap().unclaimed.push_back((
            77,
            ExitInfo {
                status: 1,
                at_ns: 1,
            },
        ));
        let mut rx = reaper.register(Pid::from_raw(77));
        assert_eq!(rx.try_recv().unwrap().status, 1);
    }
}
