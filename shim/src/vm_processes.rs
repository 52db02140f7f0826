//! The host processes of a pod's VM, recorded in its sandbox folder so
//! that `shim delete` — what containerd runs after a shim died — can end
//! any that outlived the shim.
//!
//! Why a record and not only `PR_SET_PDEATHSIG`: a process loses its
//! parent-death signal when it changes credentials, and QEMU drops to the
//! pod's uid itself (`-runas`, `-run-with user=`) after the shim armed
//! it; a VMM still setting up its jail when the shim dies is in the same
//! window. Each line is `PID START` (START: field 22 of
//! `/proc/PID/stat`, clock ticks since boot), so a pid the kernel has
//! since given to another process is left alone; the signal goes through
//! a pidfd opened before that check, so it cannot reach a process that
//! took the pid after it.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long `kill_recorded` waits for the killed processes to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// The fields of a `/proc/PID/stat` line after the command name (which
/// may hold spaces and parentheses: they follow the last ')'), from
/// field 3 (the state) on.
fn fields_after_comm(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// Field 22 of a stat line: when the process started.
fn start_time_in(stat: &str) -> Option<u64> {
    fields_after_comm(stat)?.nth(19)?.parse().ok()
}

fn start_time(pid: u32) -> Option<u64> {
    start_time_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Appends `pid` to the record at `path`.
pub fn record(path: &Path, pid: u32) -> std::io::Result<()> {
    let start = start_time(pid).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {pid} is already gone"),
        )
    })?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{pid} {start}")
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILLs every recorded process that is still the one recorded and
/// waits (up to a few seconds) until they are gone. Returns how many it
/// killed. A missing record is no process.
pub fn kill_recorded(path: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    let mut killed = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(start))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            tracing::warn!("{}: not a `PID START` line: {line:?}", path.display());
            continue;
        };
        let Some(pidfd) = pidfd_open(pid) else {
            continue;
        };
        // The pidfd pins the process: if it is still the one recorded
        // now, the signal reaches it and no other.
        if start_time(pid) != Some(start) {
            continue;
        }
        // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            tracing::warn!(pid, "a process of the pod's VM outlived its shim: killed");
            killed.push((pid, start));
        }
    }
    let deadline = Instant::now() + EXIT_WAIT;
    while killed
        .iter()
        .any(|&(pid, start)| start_time(pid) == Some(start) && !is_zombie(pid))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed.len()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| fields_after_comm(&stat)?.next().map(|state| state == "Z"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    #[test]
    fn recorded_processes_are_killed_and_others_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let record_file = dir.path().join("vm.pids");
        let mut recorded = sleeper();
        let mut bystander = sleeper();
        record(&record_file, recorded.id()).unwrap();
        // The bystander's pid with another start time: a reused pid.
        let stale = start_time(bystander.id()).unwrap() + 1;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&record_file)
            .unwrap()
            .write_all(format!("{} {stale}\nnot a line\n4194304 1\n", bystander.id()).as_bytes())
            .unwrap();

        let killed = kill_recorded(&record_file);

        use std::os::unix::process::ExitStatusExt;
        assert_eq!(killed, 1);
        assert_eq!(recorded.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(
            bystander.try_wait().unwrap(),
            None,
            "a reused pid was killed"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
        assert_eq!(kill_recorded(&dir.path().join("none")), 0);
    }

    #[test]
    fn start_time_reads_past_a_comm_with_spaces_and_parentheses() {
        let fields: Vec<String> = (3..=22).map(|n| n.to_string()).collect();
        let line = format!("4242 (a) b (c) {}", fields.join(" "));
        assert_eq!(start_time_in(&line), Some(22));
        assert_eq!(start_time_in("4242 (no fields)"), None);
        assert_eq!(start_time_in("no parenthesis"), None);
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
        assert_eq!(start_time(4_194_304), None);
    }
}
