//! A real Linux guest on a tap in a network namespace of its own: the
//! kernel from `kernel-config/` under QEMU/TCG `-M microvm`, its NIC
//! either our virtio-net served over vhost-user (`cloister-vmm vhost-user
//! --device net`) or QEMU's own virtio-net on the tap (`vhost=off`), for
//! the comparison. The tap is made beforehand (`ip tuntap`), with
//! [`HOST_IP`] on the host side. The guest's `/init` is a busybox script:
//! it pings the host and runs one TCP exchange with the host (send, then
//! read the answer), printing what it saw on the console with [`PREFIX`].
//!
//! Needs root, QEMU (`qemu-system-x86`), busybox (`busybox-static`), `ip`
//! (`iproute2`), `sha256sum` (`coreutils`), the built kernel and, for ours,
//! `cloister-vmm`; [`NetGuestFixture::locate`] says what is missing.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cloister_guest_image::cpio::Initramfs;
use cloister_guest_image::{elf, paths};

use crate::agent_guest::BackendProcess;
use crate::cloister_vmm::find_cloister_vmm;
use crate::console::{ConsoleRun, WaitPolicy};
use crate::qemu::{
    qemu_available, Accel, QemuConfig, QemuMicrovm, KERNEL_PANIC, PANIC_GRACE, QEMU_BINARY,
};

pub const TAP: &str = "clnetg0";
pub const HOST_IP: &str = "10.0.2.1";
pub const GUEST_IP: &str = "10.0.2.2";
pub const GUEST_MAC: &str = "02:00:00:00:00:2a";
const TCP_PORT: u16 = 5555;
const BUSYBOX: &str = "/bin/busybox";
/// Every line the guest script prints starts with this.
pub const PREFIX: &str = "net-guest:";
/// The script's last line.
pub const DONE: &str = "net-guest: done";
/// Boot and the exchange under TCG take seconds; a loaded CI host more.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// Which virtio-net the guest gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// Ours: `cloister-vmm vhost-user --device net --tap`.
    Cloister { vmm: PathBuf },
    /// QEMU's own device model on the tap, without vhost-net.
    QemuTap,
}

impl NicBackend {
    pub fn name(&self) -> &'static str {
        match self {
            NicBackend::Cloister { .. } => "cloister-vmm vhost-user net",
            NicBackend::QemuTap => "QEMU virtio-net (tap, vhost=off)",
        }
    }
}

/// What the guest sends to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestSends {
    /// `seq 1 N`: text the host checks byte for byte.
    Lines(u32),
    /// `N` MiB of zeroes, for throughput.
    ZeroMib(u32),
}

impl GuestSends {
    /// The bytes the host must receive.
    pub fn bytes(self) -> Vec<u8> {
        match self {
            GuestSends::Lines(n) => (1..=n)
                .map(|i| format!("{i}\n"))
                .collect::<String>()
                .into_bytes(),
            GuestSends::ZeroMib(n) => vec![0; n as usize * (1 << 20)],
        }
    }

    fn shell(self) -> String {
        match self {
            GuestSends::Lines(n) => format!("seq 1 {n}"),
            GuestSends::ZeroMib(n) => format!("dd if=/dev/zero bs=1048576 count={n} 2>/dev/null"),
        }
    }
}

/// One guest run.
#[derive(Debug, Clone)]
pub struct NetGuestPlan {
    pub backend: NicBackend,
    pub pings: u32,
    pub guest_sends: GuestSends,
    /// What the host answers; the guest prints its SHA-256.
    pub host_answer: Vec<u8>,
    /// QEMU's `mrg_rxbuf`: off makes the (legacy virtio-mmio) driver use
    /// the 10-byte header.
    pub mergeable_rx: bool,
}

/// What the host saw of the TCP exchange.
#[derive(Debug)]
pub struct TcpReport {
    pub received: Vec<u8>,
    /// From the first byte received to the last.
    pub receive_time: Duration,
}

/// Everything a run produced.
#[derive(Debug)]
pub struct NetGuestOutcome {
    pub console: ConsoleRun,
    pub tcp: Result<TcpReport, String>,
    /// Our back end's log (empty for QEMU's tap).
    pub backend_log: String,
}

impl NetGuestOutcome {
    /// The guest script's lines, without [`PREFIX`].
    pub fn guest_lines(&self) -> Vec<&str> {
        self.console
            .console
            .iter()
            .filter_map(|l| l.text.split_once(PREFIX).map(|(_, rest)| rest.trim()))
            .collect()
    }

    /// The console and back-end log, for failure messages.
    pub fn context(&self) -> String {
        format!(
            "console:\n{}\n--- back end ---\n{}",
            self.console.transcript(),
            self.backend_log
        )
    }
}

/// What a run needs on this host.
#[derive(Debug, Clone)]
pub struct NetGuestFixture {
    pub vmlinux: PathBuf,
    busybox: Vec<u8>,
}

impl NetGuestFixture {
    /// `Err` says what is missing (to print when skipping).
    pub fn locate() -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (a network namespace and a tap)".into());
        }
        if !qemu_available(Path::new(QEMU_BINARY)) {
            return Err(format!(
                "{QEMU_BINARY} does not run (Debian package qemu-system-x86)"
            ));
        }
        let vmlinux = paths::kernel_dir().join("vmlinux");
        if !vmlinux.is_file() {
            return Err(format!(
                "{} not built (kernel-config/build-kernel.sh)",
                vmlinux.display()
            ));
        }
        let busybox = std::fs::read(BUSYBOX)
            .map_err(|e| format!("{BUSYBOX}: {e} (Debian package busybox-static)"))?;
        if !matches!(elf::interpreter(&busybox), Ok(None)) {
            return Err(format!(
                "{BUSYBOX} is not static (Debian package busybox-static)"
            ));
        }
        for tool in ["ip", "sha256sum"] {
            let runs = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !runs {
                return Err(format!(
                    "{tool} is missing (Debian packages iproute2, coreutils)"
                ));
            }
        }
        Ok(Self { vmlinux, busybox })
    }

    /// Our back end, or why there is none.
    pub fn cloister_backend() -> Result<NicBackend, String> {
        find_cloister_vmm()
            .map(|vmm| NicBackend::Cloister { vmm })
            .ok_or_else(|| {
                "cloister-vmm not built next to the tests (cargo build -p cloister-vmm, or set CLOISTER_VMM)"
                    .to_string()
            })
    }
}

/// The guest's `/init`.
fn init_script(plan: &NetGuestPlan) -> String {
    let pings = plan.pings;
    let sends = plan.guest_sends.shell();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "{PREFIX} $*"; }}
say "mac $(cat /sys/class/net/eth0/address)"
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ping -c {pings} -W 10 {HOST_IP} 2>&1 | while read -r line; do say "ping: $line"; done
{sends} | nc {HOST_IP} {TCP_PORT} | sha256sum | while read -r sum rest; do say "received sha256 $sum"; done
say "done"
reboot -f
"#
    )
}

/// The guest's initramfs: busybox and the script as `/init`.
fn initramfs(busybox: Vec<u8>, script: String) -> Vec<u8> {
    let mut image = Initramfs::new();
    image
        .directory("/dev", 0o755)
        .and_then(|i| i.char_device("/dev/console", 0o600, 5, 1))
        .and_then(|i| i.directory("/proc", 0o555))
        .and_then(|i| i.directory("/sys", 0o555))
        .and_then(|i| i.directory("/bin", 0o755))
        .and_then(|i| i.file("/bin/busybox", 0o755, busybox))
        .and_then(|i| i.file("/init", 0o755, script.into_bytes()))
        .expect("initramfs entries");
    image.to_bytes()
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The SHA-256 of `bytes` as hex, by the host's `sha256sum`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let Ok(mut child) = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    else {
        return String::new();
    };
    let Some(mut stdin) = child.stdin.take() else {
        return String::new();
    };
    let data = bytes.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output();
    let _ = writer.join();
    output
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

/// The host's side: one connection; reads exactly `expect_len` bytes (the
/// guest's nc does not half-close), answers, closes.
fn serve_tcp(
    listener: TcpListener,
    expect_len: usize,
    answer: Vec<u8>,
) -> Result<TcpReport, String> {
    let deadline = Instant::now() + DEADLINE;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream: TcpStream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest never connected".into());
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut received = vec![0u8; expect_len];
    let mut filled = 0;
    let mut first_byte = None;
    while filled < expect_len {
        let n = stream
            .read(&mut received[filled..])
            .map_err(|e| format!("reading from the guest after {filled} bytes: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the guest closed after {filled} of {expect_len} bytes"
            ));
        }
        first_byte.get_or_insert_with(Instant::now);
        filled += n;
    }
    let receive_time = first_byte.map(|t| t.elapsed()).unwrap_or_default();
    stream
        .write_all(&answer)
        .map_err(|e| format!("answering the guest: {e}"))?;
    Ok(TcpReport {
        received,
        receive_time,
    })
}

/// Runs `plan` on a thread in a fresh network namespace (its child
/// processes inherit it; it goes away with them).
pub fn run_in_fresh_netns(
    fixture: &NetGuestFixture,
    plan: &NetGuestPlan,
) -> Result<NetGuestOutcome, String> {
    let (fixture, plan) = (fixture.clone(), plan.clone());
    thread::spawn(move || {
        // SAFETY: unshare of this thread's network namespace only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        run_in_netns(&fixture, &plan)
    })
    .join()
    .map_err(|_| "the guest run panicked".to_string())?
}

fn run_in_netns(fixture: &NetGuestFixture, plan: &NetGuestPlan) -> Result<NetGuestOutcome, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
    let initrd = dir.path().join("net-guest.cpio");
    std::fs::write(
        &initrd,
        initramfs(fixture.busybox.clone(), init_script(plan)),
    )
    .map_err(|e| format!("{}: {e}", initrd.display()))?;
    run(Command::new("ip").args(["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]))?;
    run(Command::new("ip").args(["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]))?;
    run(Command::new("ip").args(["link", "set", TAP, "up"]))?;

    let mut qemu = QemuConfig::new(Accel::Tcg, &fixture.vmlinux, Some(&initrd));
    let mut device = format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}");
    if !plan.mergeable_rx {
        device.push_str(",mrg_rxbuf=off");
    }
    let mut backend = None;
    match &plan.backend {
        NicBackend::Cloister { vmm } => {
            let socket = dir.path().join("net.sock");
            let mut command = Command::new(vmm);
            command
                .args(["vhost-user", "--device", "net", "--tap", TAP])
                .args(["--mac", GUEST_MAC, "--socket"])
                .arg(&socket)
                .env("NO_COLOR", "1");
            backend = Some(BackendProcess::spawn(
                "net",
                command,
                &socket,
                &dir.path().join("net.log"),
            )?);
            qemu.shared_memory = true;
            let mut chardev = OsString::from("socket,id=netc0,path=");
            chardev.push(&socket);
            qemu.extra_args.extend([
                "-chardev".to_string(),
                chardev.to_string_lossy().into_owned(),
                "-netdev".to_string(),
                "vhost-user,id=net0,chardev=netc0".to_string(),
            ]);
        }
        NicBackend::QemuTap => qemu.extra_args.extend([
            "-netdev".to_string(),
            format!("tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off"),
        ]),
    }
    qemu.extra_args.extend(["-device".to_string(), device]);

    let listener = TcpListener::bind((HOST_IP, TCP_PORT))
        .map_err(|e| format!("listen on {HOST_IP}:{TCP_PORT}: {e}"))?;
    let expect_len = plan.guest_sends.bytes().len();
    let answer = plan.host_answer.clone();
    let tcp = thread::spawn(move || serve_tcp(listener, expect_len, answer));
    let vm = QemuMicrovm::spawn(&qemu).map_err(|e| e.to_string())?;
    let policy = WaitPolicy {
        timeout: DEADLINE,
        end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
        idle_limit: None,
    };
    let console = vm.wait_until(&policy, |_| {});
    let tcp = if tcp.is_finished() || console.find(DONE).is_some() {
        tcp.join()
            .unwrap_or_else(|_| Err("host TCP thread panicked".into()))
    } else {
        Err("the guest never finished; host TCP side abandoned".into())
    };
    let backend_log = match &backend {
        Some(backend) => {
            // The back end logs its counters when QEMU disconnects.
            let started = Instant::now();
            while !backend.log_text().contains("front end disconnected")
                && started.elapsed() < Duration::from_secs(10)
            {
                thread::sleep(Duration::from_millis(20));
            }
            backend.log_text()
        }
        None => String::new(),
    };
    Ok(NetGuestOutcome {
        console,
        tcp,
        backend_log,
    })
}

/// The value of counter `key` in our back end's final metrics line.
pub fn backend_counter(log: &str, key: &str) -> Option<u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("front end disconnected"))?;
    let rest = &line[line.find(&format!("\"{key}\":"))? + key.len() + 3..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_counter_reads_the_final_metrics_line() {
        let log = "INFO net: serving\nINFO net: front end disconnected; metrics {\"requests\":439,\"errors\":0}\n";
        assert_eq!(backend_counter(log, "requests"), Some(439));
        assert_eq!(backend_counter(log, "errors"), Some(0));
        assert_eq!(backend_counter(log, "interrupts"), None);
        assert_eq!(backend_counter("no metrics", "requests"), None);
    }

    #[test]
    fn guest_sends_lines_as_seq_prints_them() {
        assert_eq!(GuestSends::Lines(3).bytes(), b"1\n2\n3\n");
        assert_eq!(GuestSends::ZeroMib(2).bytes().len(), 2 << 20);
    }
}
