//! Boots a guest in QEMU's `microvm` machine and records its serial console
//! with the time of each line since QEMU started.
//!
//! QEMU is Debian's `qemu-system-x86_64` (package `qemu-system-x86`). The
//! kernel is the uncompressed `vmlinux`, entered through PVH; the initramfs
//! is raw `newc` (decompressing is slow when emulated). Without ACPI the
//! guest cannot power off, so it reboots (`reboot=t`) and `-no-reboot`
//! turns that into QEMU exiting with status 0.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use cloister_guest_image::cmdline::{self, RebootMethod};

use crate::guest_image::{TEST_INIT_MARKER, TEST_INIT_POWER_OFF};

/// The QEMU binary (Debian package `qemu-system-x86`).
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Errors starting QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
}

/// How QEMU runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works everywhere, ~1-3 s to `/init` here.
    Tcg,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
}

/// A QEMU `microvm` invocation.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub accel: Accel,
    /// `-cpu` model.
    pub cpu: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Appended as given (devices, `-global`s, ...).
    pub extra_args: Vec<String>,
}

impl QemuConfig {
    /// One vCPU, 256 MiB, and the CPU model and command line the guest
    /// kernel needs with `accel` on this host: on nested, paravirtualized
    /// KVM (`kvm_pvm`) a CPU model without the features that host cannot
    /// emulate and the matching kernel parameters.
    pub fn new(accel: Accel, kernel: &Path, initrd: Option<&Path>) -> Self {
        let nested = accel == Accel::Kvm && cmdline::host_is_nested_pvm();
        let cpu = match accel {
            Accel::Tcg => "qemu64",
            // `-cpu host` fails on nested KVM ("failed to set MSR 0x10a").
            Accel::Kvm if nested => cmdline::NESTED_KVM_QEMU_CPU,
            Accel::Kvm => "host",
        };
        Self {
            binary: PathBuf::from(QEMU_BINARY),
            accel,
            cpu: cpu.to_string(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: cmdline::guest_cmdline(RebootMethod::TripleFault, nested),
            memory_mib: 256,
            vcpus: 1,
            extra_args: Vec::new(),
        }
    }

    /// QEMU's arguments (without the binary).
    pub fn args(&self) -> Vec<OsString> {
        let accel = match self.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        let mut args: Vec<OsString> = [
            "-M",
            "microvm,acpi=off",
            "-accel",
            accel,
            "-cpu",
            &self.cpu,
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.vcpus.to_string(),
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-append",
            &self.cmdline,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("-kernel".into());
        args.push(self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            args.push("-initrd".into());
            args.push(initrd.clone().into());
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }
}

/// One line of the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    /// Since the VMM process was started.
    pub at: Duration,
    /// Without the line ending.
    pub text: String,
}

/// How a QEMU run ended.
#[derive(Debug)]
pub struct QemuRun {
    /// `None` when QEMU was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// From process start to exit (or to the kill).
    pub elapsed: Duration,
    pub console: Vec<ConsoleLine>,
    /// QEMU's own messages.
    pub stderr: String,
}

impl QemuRun {
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
            out.push_str("--- qemu stderr ---\n");
            out.push_str(&self.stderr);
        }
        out
    }
}

/// A console message that marks a stage of the boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Milestone {
    pub name: &'static str,
    /// Text that the stage's console line contains.
    pub needle: &'static str,
}

/// The boot stages tests time, in boot order.
pub const MILESTONES: &[Milestone] = &[
    Milestone {
        name: "kernel started",
        needle: "Linux version",
    },
    Milestone {
        name: "fpu set up",
        needle: "x86/fpu",
    },
    // 6.12 prints "Freeing unused kernel image (initmem) memory", older
    // kernels "Freeing unused kernel memory".
    Milestone {
        name: "init memory freed",
        needle: "Freeing unused kernel",
    },
    Milestone {
        name: "run /init",
        needle: "Run /init",
    },
    Milestone {
        name: "init reached",
        needle: TEST_INIT_MARKER,
    },
    Milestone {
        name: "powering off",
        needle: TEST_INIT_POWER_OFF,
    },
];

/// When each of [`MILESTONES`] first appeared on `console` (`None`: never).
pub fn milestones(console: &[ConsoleLine]) -> Vec<(Milestone, Option<Duration>)> {
    MILESTONES
        .iter()
        .map(|m| {
            let at = console
                .iter()
                .find(|line| line.text.contains(m.needle))
                .map(|line| line.at);
            (*m, at)
        })
        .collect()
}

/// A running QEMU; killed when dropped.
pub struct QemuMicrovm {
    child: Child,
    started: Instant,
    console: Receiver<ConsoleLine>,
    stderr: Option<JoinHandle<String>>,
}

impl QemuMicrovm {
    /// Starts QEMU with `config`; the clock for console times starts here.
    pub fn spawn(config: &QemuConfig) -> Result<Self, QemuError> {
        let started = Instant::now();
        let mut child = Command::new(&config.binary)
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: config.binary.clone(),
                source,
            })?;
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

    /// Collects the console until QEMU exits or `timeout` (from the start)
    /// passes; then kills it.
    pub fn wait(mut self, timeout: Duration) -> QemuRun {
        let deadline = self.started + timeout;
        let mut console = Vec::new();
        let mut timed_out = false;
        // Console lines until stdout closes (QEMU exiting) or the deadline.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.console.recv_timeout(left) {
                Ok(line) => console.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    break;
                }
            }
        }
        let status = if timed_out {
            None
        } else {
            self.wait_exit(deadline)
        };
        timed_out |= status.is_none();
        if status.is_none() {
            self.kill();
        }
        let elapsed = self.started.elapsed();
        // Lines that arrived between the deadline and the kill.
        console.extend(self.console.try_iter());
        let stderr = self
            .stderr
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default();
        QemuRun {
            status,
            timed_out,
            elapsed,
            console,
            stderr,
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
        // Errors mean it has already exited; either way it is reaped below.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuMicrovm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
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

/// Whether `binary` can be run (found on `PATH` or as a path).
pub fn qemu_available(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ms: u64, text: &str) -> ConsoleLine {
        ConsoleLine {
            at: Duration::from_millis(ms),
            text: text.to_string(),
        }
    }

    #[test]
    fn milestones_take_first_occurrence_and_leave_missing_ones_none() {
        let console = [
            line(
                300,
                "[    0.000000] Linux version 6.12.117 (cloister@cloister)",
            ),
            line(590, "[    0.103728] x86/fpu: x87 FPU will use FXSAVE"),
            line(600, "[    0.110000] x86/fpu: again"),
            line(
                1030,
                "[    0.827337] Freeing unused kernel image (initmem) memory: 744K",
            ),
            line(1050, "[    0.835811] Run /init as init process"),
        ];
        let found = milestones(&console);
        let times: Vec<Option<u64>> = found
            .iter()
            .map(|(_, at)| at.map(|d| d.as_millis() as u64))
            .collect();
        assert_eq!(
            times,
            [Some(300), Some(590), Some(1030), Some(1050), None, None]
        );
        assert_eq!(found[4].0.needle, TEST_INIT_MARKER);
    }

    #[test]
    fn args_for_tcg_boot_pvh_vmlinux_with_raw_initrd_and_serial_on_stdio() {
        let config = QemuConfig::new(
            Accel::Tcg,
            Path::new("/k/vmlinux"),
            Some(Path::new("/i.cpio")),
        );
        let args: Vec<String> = config
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-M microvm,acpi=off -accel tcg -cpu qemu64 -m 256 -smp 1"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-serial stdio"));
        assert!(joined.ends_with("-kernel /k/vmlinux -initrd /i.cpio"));
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert!(args[append + 1].contains("reboot=t"));
        assert!(args[append + 1].contains("console=ttyS0"));
        // TCG needs none of the nested-KVM workarounds.
        assert!(!args[append + 1].contains("clearcpuid"));
    }

    #[test]
    fn read_console_strips_line_endings_and_keeps_last_partial_line() {
        let (sender, receiver) = mpsc::channel();
        read_console(&b"first\r\nsecond\nno newline"[..], Instant::now(), &sender);
        drop(sender);
        let texts: Vec<String> = receiver.iter().map(|l| l.text).collect();
        assert_eq!(texts, ["first", "second", "no newline"]);
    }

    #[test]
    fn spawn_of_missing_binary_names_it() {
        let mut config = QemuConfig::new(Accel::Tcg, Path::new("/k"), None);
        config.binary = PathBuf::from("/nonexistent/qemu");
        let err = QemuMicrovm::spawn(&config).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
