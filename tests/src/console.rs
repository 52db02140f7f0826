//! A VMM process whose serial console is its stdout: every console line is
//! stamped with the time since the process started, and the process's
//! peak memory (VmHWM) is sampled while it runs. Used for QEMU and for
//! `cloister-vmm` alike, so their timings are measured the same way.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the process's memory high-water mark is read.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Errors starting a VMM process.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
}

/// One line of the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// Since the VMM process was started.
    pub at: Duration,
    /// Without the line ending.
    pub text: String,
}

/// How a VMM run ended.
#[derive(Debug)]
pub struct ConsoleRun {
    /// `None` when the process was killed (timeout, idle console, or the
    /// grace period after an end marker ran out).
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// The console stayed silent for the policy's idle limit.
    pub went_idle: bool,
    /// From process start to exit (or to the kill).
    pub elapsed: Duration,
    pub console: Vec<ConsoleLine>,
    /// The VMM's own messages.
    pub stderr: String,
    /// Highest VmHWM seen (KiB): the process's peak resident memory.
    pub peak_rss_kib: Option<u64>,
}

impl ConsoleRun {
    /// The first console line containing `needle`, with its time.
    pub fn find(&self, needle: &str) -> Option<&ConsoleLine> {
        self.console.iter().find(|line| line.text.contains(needle))
    }

    /// The console, one line per entry with its time, for failure messages.
    pub fn transcript(&self) -> String {
        let mut out = String::new();
        for line in &self.console {
            out.push_str(&format!("{:8.3} {}\n", line.at.as_secs_f64(), line.text));
        }
        if !self.stderr.is_empty() {
            out.push_str("--- stderr ---\n");
            out.push_str(&self.stderr);
        }
        out
    }
}

/// How long to collect a console.
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy<'a> {
    /// From process start.
    pub timeout: Duration,
    /// Once a console line contains `.0`, the process gets only `.1` more
    /// to exit (then it is killed; not counted as a timeout): for guests
    /// known to end there whose VMM may not exit by itself.
    pub end_marker: Option<(&'a str, Duration)>,
    /// Ends the wait when the console has been silent this long: a guest
    /// that stopped (e.g. QEMU paused on a KVM internal error).
    pub idle_limit: Option<Duration>,
}

impl WaitPolicy<'_> {
    /// Only a timeout.
    pub fn timeout(timeout: Duration) -> Self {
        WaitPolicy {
            timeout,
            end_marker: None,
            idle_limit: None,
        }
    }
}

/// A running VMM process; killed when dropped.
pub struct ConsoleProcess {
    child: Child,
    started: Instant,
    console: Receiver<ConsoleLine>,
    stderr: Option<JoinHandle<String>>,
}

impl ConsoleProcess {
    /// Starts `command` with stdout and stderr captured; the clock for
    /// console times starts here.
    pub fn spawn(mut command: Command) -> Result<Self, ConsoleError> {
        let binary = PathBuf::from(command.get_program());
        let started = Instant::now();
        // Its own process group, so a kill reaches anything it started
        // (which would otherwise keep the console pipe open).
        let mut child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ConsoleError::Spawn { binary, source })?;
        let (sender, console) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            thread::spawn(move || read_console(stdout, started, &sender));
        }
        let stderr = child.stderr.take().map(|mut stderr| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            })
        });
        Ok(Self {
            child,
            started,
            console,
            stderr,
        })
    }

    /// The process id (it leads its own process group).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Collects the console until the process exits or `timeout` (from the
    /// start) passes; then kills it.
    pub fn wait(self, timeout: Duration) -> ConsoleRun {
        self.wait_with(timeout, |_| {})
    }

    /// Like [`wait`](Self::wait), calling `on_line` for each console line
    /// as it arrives.
    pub fn wait_with(self, timeout: Duration, on_line: impl FnMut(&ConsoleLine)) -> ConsoleRun {
        self.wait_until(&WaitPolicy::timeout(timeout), on_line)
    }

    /// Collects the console as `policy` says, calling `on_line` for each
    /// line as it arrives; kills the process when the wait ends before it
    /// exited.
    pub fn wait_until(
        mut self,
        policy: &WaitPolicy<'_>,
        mut on_line: impl FnMut(&ConsoleLine),
    ) -> ConsoleRun {
        let mut deadline = self.started + policy.timeout;
        let mut ended_by_marker = false;
        let mut went_idle = false;
        let mut last_output = Instant::now();
        let pid = self.child.id();
        let mut console = Vec::new();
        let mut timed_out = false;
        let mut peak_rss_kib = None;
        loop {
            peak_rss_kib = peak_rss_kib.max(read_vm_hwm_kib(pid));
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                timed_out = !ended_by_marker;
                break;
            }
            if policy
                .idle_limit
                .is_some_and(|idle| last_output.elapsed() >= idle)
            {
                went_idle = true;
                break;
            }
            match self.console.recv_timeout(left.min(RSS_SAMPLE_INTERVAL)) {
                Ok(line) => {
                    on_line(&line);
                    last_output = Instant::now();
                    if let Some((marker, grace)) = policy.end_marker {
                        if !ended_by_marker && line.text.contains(marker) {
                            ended_by_marker = true;
                            deadline = deadline.min(Instant::now() + grace);
                        }
                    }
                    console.push(line);
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        let status = if timed_out {
            None
        } else if went_idle {
            self.child.try_wait().ok().flatten()
        } else {
            self.wait_exit(deadline)
        };
        timed_out |= status.is_none() && !ended_by_marker && !went_idle;
        if status.is_none() {
            self.kill();
        }
        let elapsed = self.started.elapsed();
        for line in self.console.try_iter() {
            on_line(&line);
            console.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        ConsoleRun {
            status,
            timed_out,
            went_idle,
            elapsed,
            console,
            stderr,
            peak_rss_kib,
        }
    }

    fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    fn kill(&mut self) {
        kill_process_group(self.child.id());
        // Errors mean it has already exited; either way it is reaped here.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Kills the process group led by `pid` (a [`ConsoleProcess`], from any
/// thread, e.g. when a test gives up on its guest).
pub fn kill_process_group(pid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals the process group
        // this child leads (spawned with process_group(0)); no memory is
        // involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// The `VmHWM` line of `/proc/<pid>/status`, in KiB.
fn read_vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm_kib(&status)
}

fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Splits the serial output into lines stamped with their arrival time.
fn read_console(stdout: impl Read, started: Instant, sender: &mpsc::Sender<ConsoleLine>) {
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&raw);
                let line = ConsoleLine {
                    at: started.elapsed(),
                    text: text.trim_end_matches(['\r', '\n']).to_string(),
                };
                if sender.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_console_strips_line_endings_and_keeps_last_partial_line() {
        let (sender, receiver) = mpsc::channel();
        read_console(&b"first\r\nsecond\nno newline"[..], Instant::now(), &sender);
        drop(sender);
        let texts: Vec<String> = receiver.iter().map(|l| l.text).collect();
        assert_eq!(texts, ["first", "second", "no newline"]);
    }

    #[test]
    fn parse_vm_hwm_reads_kib() {
        let status = "Name:\tqemu\nVmPeak:\t  100 kB\nVmHWM:\t   23448 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(23448));
        assert_eq!(parse_vm_hwm_kib("Name:\tx\n"), None);
    }

    #[test]
    fn console_process_times_lines_and_reports_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; sleep 1; echo two; exit 3"]);
        let mut seen = Vec::new();
        let run = ConsoleProcess::spawn(cmd)
            .unwrap()
            .wait_with(Duration::from_secs(10), |l| seen.push(l.text.clone()));
        assert_eq!(seen, ["one", "two"]);
        assert_eq!(run.status.and_then(|s| s.code()), Some(3));
        assert!(!run.timed_out);
        let one = run.find("one").unwrap().at;
        let two = run.find("two").unwrap().at;
        // Stamped when read: a late reader shortens the gap, hence the margin.
        assert!(two >= one + Duration::from_millis(500), "{one:?} {two:?}");
        assert!(run.peak_rss_kib.is_some());
    }

    #[test]
    fn console_process_ending_at_marker_gets_only_the_grace_period() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo booting; echo Kernel panic; sleep 30"]);
        let policy = WaitPolicy {
            end_marker: Some(("Kernel panic", Duration::from_millis(200))),
            ..WaitPolicy::timeout(Duration::from_secs(60))
        };
        let run = ConsoleProcess::spawn(cmd)
            .unwrap()
            .wait_until(&policy, |_| {});
        assert!(!run.timed_out);
        assert!(run.status.is_none(), "killed after the grace period");
        assert!(run.elapsed < Duration::from_secs(5), "{:?}", run.elapsed);
        assert_eq!(run.console.len(), 2);
    }

    #[test]
    fn console_process_silent_for_the_idle_limit_is_ended() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; sleep 30"]);
        let policy = WaitPolicy {
            idle_limit: Some(Duration::from_millis(300)),
            ..WaitPolicy::timeout(Duration::from_secs(60))
        };
        let run = ConsoleProcess::spawn(cmd)
            .unwrap()
            .wait_until(&policy, |_| {});
        assert!(run.went_idle);
        assert!(!run.timed_out);
        assert!(run.elapsed < Duration::from_secs(5), "{:?}", run.elapsed);
    }

    #[test]
    fn console_process_is_killed_at_timeout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo start; sleep 30"]);
        let run = ConsoleProcess::spawn(cmd)
            .unwrap()
            .wait(Duration::from_secs(3));
        assert!(run.timed_out);
        assert!(run.status.is_none());
        assert!(run.elapsed < Duration::from_secs(15));
        // Ample time for `sh` to start and its line to be read, even on a
        // loaded machine.
        assert_eq!(run.console.len(), 1);
    }
}
