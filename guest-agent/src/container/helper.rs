//! The container init helper: `cloister-agent __container-init`, started
//! by the agent with clone3 (new namespaces, in the container's cgroup) and
//! its sync socket on fd 3. A fresh single-threaded process, so it may do
//! everything fork-unsafe code may not: build the rootfs, drop privileges,
//! install seccomp, and finally execve the container's process.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::plan::{CapabilityPlan, HelperPlan, NamespaceKind, ProcessPlan};
use super::setup::apply_rootfs;
use super::sync::{read_blocking, write_blocking, FromHelper, ToHelper};
use super::syscalls::LinuxSyscalls;

/// The fd the agent passes the sync socket on.
pub const SYNC_FD: i32 = 3;

/// Runs the helper; returns the exit code when it could not exec.
pub fn run() -> i32 {
    // SAFETY: the agent placed the sync socket on fd 3 for us and nothing
    // else in this fresh process owns it.
    let mut sync = unsafe { File::from_raw_fd(SYNC_FD) };
    // dup2 in the agent cleared close-on-exec: set it again, so the
    // container's process does not inherit the socket and the agent sees
    // EOF once execve succeeded.
    if nix::fcntl::fcntl(
        &sync,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .is_err()
    {
        return 125;
    }
    let plan = match read_blocking::<ToHelper>(&mut sync) {
        Ok(Some(ToHelper::Plan(plan))) => *plan,
        Ok(_) => return 125,
        Err(_) => return 125,
    };
    let message = match execute(plan, &mut sync) {
        Ok(never) => match never {},
        Err(message) => message,
    };
    let _ = write_blocking(&mut sync, &FromHelper::Error { message });
    127
}

enum Never {}

fn execute(plan: HelperPlan, sync: &mut File) -> Result<Never, String> {
    match plan {
        HelperPlan::Create(plan) => {
            for (kind, path) in &plan.join_namespaces {
                join_namespace(*kind, path)
                    .map_err(|e| format!("join {kind:?} namespace {}: {e}", path.display()))?;
            }
            let root = apply_rootfs(&plan, &mut LinuxSyscalls).map_err(|e| e.to_string())?;
            nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
            if plan.process.terminal {
                open_terminal(sync)?;
            }
            let prepared = prepare_process(&plan.process)?;
            write_blocking(sync, &FromHelper::Ready { root })
                .map_err(|e| format!("report ready: {e}"))?;
            match read_blocking::<ToHelper>(sync) {
                Ok(Some(ToHelper::Start)) => {}
                _ => return Err("agent went away before start".into()),
            }
            exec_process(&plan.process, prepared)
        }
        HelperPlan::Exec(plan) => {
            let mut handles = Vec::new();
            // Open every namespace first: after joining the mount namespace
            // /proc is the container's.
            for kind in ordered_for_join(&plan.namespaces) {
                let path =
                    PathBuf::from(format!("/proc/{}/ns/{}", plan.init_pid, kind.proc_name()));
                let file =
                    File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
                handles.push((kind, file));
            }
            for (kind, file) in &handles {
                setns(file, *kind).map_err(|e| {
                    format!("join {kind:?} namespace of pid {}: {e}", plan.init_pid)
                })?;
            }
            // A joined pid namespace applies to children only.
            // SAFETY: this process is single-threaded (a fresh exec of the
            // agent binary), so fork is safe.
            match unsafe { nix::unistd::fork() } {
                Err(e) => Err(format!("fork into container: {e}")),
                Ok(nix::unistd::ForkResult::Parent { child }) => {
                    let _ = write_blocking(
                        sync,
                        &FromHelper::Forked {
                            pid: child.as_raw(),
                        },
                    );
                    #[allow(clippy::exit)]
                    std::process::exit(0)
                }
                Ok(nix::unistd::ForkResult::Child) => {
                    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
                    if plan.process.terminal {
                        open_terminal(sync)?;
                    }
                    let prepared = prepare_process(&plan.process)?;
                    exec_process(&plan.process, prepared)
                }
            }
        }
    }
}

/// Allocates a pty from the container's /dev/ptmx, makes the slave our
/// stdin/stdout/stderr and sends the master to the agent.
fn open_terminal(sync: &mut File) -> Result<(), String> {
    use nix::fcntl::OFlag;
    use std::io::IoSlice;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| {
            format!("process.terminal: open /dev/ptmx in the container (is /dev/pts mounted?): {e}")
        })?;
    nix::pty::grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    nix::pty::unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let slave_path = nix::pty::ptsname_r(&master).map_err(|e| format!("ptsname: {e}"))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)
        .map_err(|e| format!("open {slave_path}: {e}"))?;
    for target in 0..3 {
        // SAFETY: dup2 of a valid fd onto a standard stream.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(format!("dup2 terminal: {}", io::Error::last_os_error()));
        }
    }
    write_blocking(sync, &FromHelper::Console).map_err(|e| format!("report console: {e}"))?;
    let fds = [master.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        sync.as_raw_fd(),
        &[IoSlice::new(&[0])],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("send terminal to agent: {e}"))?;
    Ok(())
}

fn ordered_for_join(kinds: &[NamespaceKind]) -> Vec<NamespaceKind> {
    let order = [
        NamespaceKind::Ipc,
        NamespaceKind::Uts,
        NamespaceKind::Network,
        NamespaceKind::Cgroup,
        NamespaceKind::Pid,
        NamespaceKind::Mount,
    ];
    order.into_iter().filter(|k| kinds.contains(k)).collect()
}

fn join_namespace(kind: NamespaceKind, path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    setns(&file, kind)
}

fn setns(file: &File, kind: NamespaceKind) -> io::Result<()> {
    let flag = libc::c_int::try_from(kind.clone_flag())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid namespace fd and a CLONE_NEW* constant.
    let rc = unsafe { libc::setns(file.as_raw_fd(), flag) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

/// Everything up to the final execve: cwd, rlimits, terminal, user,
/// capabilities, no_new_privs. Runs inside the container root.
fn prepare_process(process: &ProcessPlan) -> Result<Prepared, String> {
    let program = find_program(&process.args[0], &process.env)?;
    let to_c = |s: &String| CString::new(s.as_bytes()).map_err(|_| format!("{s:?} contains NUL"));
    let argv = process
        .args
        .iter()
        .map(to_c)
        .collect::<Result<Vec<_>, _>>()?;
    let envp = process
        .env
        .iter()
        .map(to_c)
        .collect::<Result<Vec<_>, _>>()?;

    std::env::set_current_dir(&process.cwd)
        .map_err(|e| format!("process.cwd {:?}: {e}", process.cwd))?;
    if let Some(umask) = process.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    }
    for rlimit in &process.rlimits {
        let limit = libc::rlimit {
            rlim_cur: rlimit.soft,
            rlim_max: rlimit.hard,
        };
        // SAFETY: `limit` is a valid rlimit struct.
        let rc = unsafe { libc::setrlimit(rlimit.resource as _, &limit) };
        if rc != 0 {
            return Err(format!(
                "setrlimit {}: {}",
                rlimit.resource,
                io::Error::last_os_error()
            ));
        }
    }
    // Without a value in the spec, undo the agent's own protection
    // (inherited through clone) so containers are killed before the agent.
    let adj = process.oom_score_adj.unwrap_or(0);
    let current: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if adj != current {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("process.oomScoreAdj {adj}: {e}"))?;
    }
    if process.terminal {
        // SAFETY: TIOCSCTTY on stdin (the pty slave) with argument 0.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc != 0 {
            return Err(format!(
                "make the pty the controlling terminal: {}",
                io::Error::last_os_error()
            ));
        }
    }
    // Installing a filter needs no_new_privs or CAP_SYS_ADMIN. Without
    // no_new_privs, install it while we still hold every capability (as
    // runc does); the calls up to execve must then pass the profile.
    if let (Some(seccomp), false) = (&process.seccomp, process.no_new_privs) {
        super::seccomp::install(seccomp).map_err(|e| format!("install seccomp filter: {e}"))?;
    }
    set_user_and_capabilities(process)?;
    if process.no_new_privs {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(format!("no_new_privs: {}", io::Error::last_os_error()));
        }
    }
    Ok(Prepared {
        program,
        argv,
        envp,
    })
}

fn exec_process(process: &ProcessPlan, prepared: Prepared) -> Result<Never, String> {
    if let (Some(seccomp), true) = (&process.seccomp, process.no_new_privs) {
        super::seccomp::install(seccomp).map_err(|e| format!("install seccomp filter: {e}"))?;
    }
    let err = nix::unistd::execve(&prepared.program, &prepared.argv, &prepared.envp).unwrap_err();
    Err(format!("exec {:?}: {err}", process.args[0]))
}

/// Finds `name` like execvp does, in the container's PATH.
fn find_program(name: &str, env: &[String]) -> Result<CString, String> {
    let to_c = |p: &str| CString::new(p).map_err(|_| format!("process.args[0] {p:?} contains NUL"));
    if name.contains('/') {
        return to_c(name);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return to_c(&candidate.to_string_lossy());
            }
        }
    }
    Err(format!(
        "process.args[0] {name:?}: executable not found in PATH {path:?}"
    ))
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn mask(set: &[u32], last: u32) -> [u32; 2] {
    let mut out = [0u32; 2];
    for &cap in set.iter().filter(|&&c| c <= last) {
        out[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    out
}

fn set_user_and_capabilities(process: &ProcessPlan) -> Result<(), String> {
    let caps: &CapabilityPlan = &process.capabilities;
    let last = last_cap();
    for cap in 0..=last {
        if !caps.bounding.contains(&cap) {
            // SAFETY: prctl with integer arguments.
            let rc =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
            if rc != 0 {
                return Err(format!(
                    "drop capability {cap} from bounding set: {}",
                    io::Error::last_os_error()
                ));
            }
        }
    }
    // Keep permitted capabilities across the uid change; capset below sets
    // the final sets.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let groups: Vec<nix::unistd::Gid> = process
        .additional_gids
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups)
        .map_err(|e| format!("process.user.additionalGids: setgroups: {e}"))?;
    nix::unistd::setresgid(
        nix::unistd::Gid::from_raw(process.gid),
        nix::unistd::Gid::from_raw(process.gid),
        nix::unistd::Gid::from_raw(process.gid),
    )
    .map_err(|e| format!("process.user.gid {}: {e}", process.gid))?;
    nix::unistd::setresuid(
        nix::unistd::Uid::from_raw(process.uid),
        nix::unistd::Uid::from_raw(process.uid),
        nix::unistd::Uid::from_raw(process.uid),
    )
    .map_err(|e| format!("process.user.uid {}: {e}", process.uid))?;
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };

    let eff = mask(&caps.effective, last);
    let perm = mask(&caps.permitted, last);
    let inh = mask(&caps.inheritable, last);
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: eff[0],
            permitted: perm[0],
            inheritable: inh[0],
        },
        CapData {
            effective: eff[1],
            permitted: perm[1],
            inheritable: inh[1],
        },
    ];
    // SAFETY: header and two data structs as capset(2) v3 expects.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "process.capabilities: capset: {}",
            io::Error::last_os_error()
        ));
    }
    for &cap in caps.ambient.iter().filter(|&&c| c <= last) {
        // SAFETY: prctl with integer arguments.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                libc::c_ulong::from(cap),
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(format!(
                "process.capabilities.ambient {cap}: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
