//! A real Linux guest on our virtio-net device: the kernel from
//! `kernel-config/` under QEMU/TCG `-M microvm`, its NIC served over
//! vhost-user by `cloister-vmm vhost-user --device net` on a tap in a
//! network namespace of the test's own, whose host side has 10.0.2.1.
//! The guest's `/init` is a busybox shell script that pings the host and
//! exchanges data over TCP; the test checks the console and the host's
//! side of the TCP connection:
//!
//! - the guest's NIC has the MAC given to QEMU;
//! - 5 pings, 5 replies;
//! - guest→host: `seq 1 40000` (228 KiB) arrives byte for byte;
//! - host→guest: 4 MiB of text (large TSO/GSO frames over mergeable rx
//!   buffers), whose SHA-256 the guest prints and the host compares;
//! - the back end counted frames both ways and no drops.
//!
//! Needs root (network namespace, tap), QEMU (Debian `qemu-system-x86`),
//! busybox (Debian `busybox-static`), `ip` (Debian `iproute2`),
//! `sha256sum` (coreutils), the built kernel and `cloister-vmm`; skips
//! with the reason otherwise.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cloister_e2e::agent_guest::BackendProcess;
use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::console::{ConsoleRun, WaitPolicy};
use cloister_e2e::qemu::{
    qemu_available, Accel, QemuConfig, QemuMicrovm, KERNEL_PANIC, PANIC_GRACE, QEMU_BINARY,
};
use cloister_guest_image::cpio::Initramfs;
use cloister_guest_image::{elf, paths};

const TAP: &str = "clnetg0";
const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";
const GUEST_MAC: &str = "02:00:00:00:00:2a";
const TCP_PORT: u16 = 5555;
const PINGS: u32 = 5;
/// The guest sends `seq 1 GUEST_LINES`.
const GUEST_LINES: u32 = 40_000;
/// The host answers with this many bytes.
const HOST_BYTES: usize = 4 << 20;
const BUSYBOX: &str = "/bin/busybox";
/// Every line the guest script prints starts with this.
const PREFIX: &str = "net-guest:";
const DONE: &str = "net-guest: done";
/// Boot and the exchange under TCG take seconds; a loaded CI host more.
const DEADLINE: Duration = Duration::from_secs(300);

/// The guest's `/init`.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say() {{ echo "{PREFIX} $*"; }}
say "mac $(cat /sys/class/net/eth0/address)"
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ping -c {PINGS} -W 10 {HOST_IP} 2>&1 | while read -r line; do say "ping: $line"; done
seq 1 {GUEST_LINES} | nc {HOST_IP} {TCP_PORT} | sha256sum | while read -r sum rest; do say "received sha256 $sum"; done
say "done"
reboot -f
"#
    )
}

/// The guest's initramfs: busybox and the script as `/init`.
fn initramfs(busybox: Vec<u8>) -> Vec<u8> {
    let mut image = Initramfs::new();
    image
        .directory("/dev", 0o755)
        .and_then(|i| i.char_device("/dev/console", 0o600, 5, 1))
        .and_then(|i| i.directory("/proc", 0o555))
        .and_then(|i| i.directory("/sys", 0o555))
        .and_then(|i| i.directory("/bin", 0o755))
        .and_then(|i| i.file("/bin/busybox", 0o755, busybox))
        .and_then(|i| i.file("/init", 0o755, init_script().into_bytes()))
        .expect("initramfs entries");
    image.to_bytes()
}

/// What the test needs, or why it cannot run here.
struct Fixture {
    vmlinux: PathBuf,
    vmm: PathBuf,
    busybox: Vec<u8>,
}

fn locate() -> Result<Fixture, String> {
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
    let vmm = find_cloister_vmm()
        .ok_or("cloister-vmm not built next to the tests (cargo build -p cloister-vmm, or set CLOISTER_VMM)")?;
    let busybox = std::fs::read(BUSYBOX)
        .map_err(|e| format!("{BUSYBOX}: {e} (Debian package busybox-static)"))?;
    match elf::interpreter(&busybox) {
        Ok(None) => {}
        _ => {
            return Err(format!(
                "{BUSYBOX} is not static (Debian package busybox-static)"
            ))
        }
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
    Ok(Fixture {
        vmlinux,
        vmm,
        busybox,
    })
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a host command");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the guest sends: `seq 1 GUEST_LINES`.
fn guest_bytes() -> Vec<u8> {
    (1..=GUEST_LINES)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// What the host sends: numbered text lines, `HOST_BYTES` long.
fn host_bytes() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HOST_BYTES + 64);
    let mut line = 0u64;
    while bytes.len() < HOST_BYTES {
        bytes.extend_from_slice(format!("host line {line:08}\n").as_bytes());
        line += 1;
    }
    bytes.truncate(HOST_BYTES);
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The host's side: one connection; reads what the guest sends (the guest's
/// nc does not half-close, so exactly the expected length), answers, closes.
/// Returns the bytes received.
fn serve_tcp(listener: TcpListener, expect_len: usize, answer: Vec<u8>) -> Result<Vec<u8>, String> {
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
    stream
        .read_exact(&mut received)
        .map_err(|e| format!("reading {expect_len} bytes from the guest: {e}"))?;
    stream
        .write_all(&answer)
        .map_err(|e| format!("answering the guest: {e}"))?;
    Ok(received)
}

/// Everything the run produced.
struct Outcome {
    console: ConsoleRun,
    tcp: Result<Vec<u8>, String>,
    backend_log: String,
}

/// Runs the whole exchange; called on a thread inside a fresh network
/// namespace (children inherit it).
fn run_in_netns(fixture: Fixture) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let initrd = dir.path().join("net-guest.cpio");
    std::fs::write(&initrd, initramfs(fixture.busybox)).unwrap();

    let mut backend_cmd = Command::new(&fixture.vmm);
    backend_cmd
        .args([
            "vhost-user",
            "--device",
            "net",
            "--tap",
            TAP,
            "--mac",
            GUEST_MAC,
            "--socket",
        ])
        .arg(&socket)
        .env("NO_COLOR", "1");
    let backend = BackendProcess::spawn("net", backend_cmd, &socket, &dir.path().join("net.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    // The tap exists now (the back end opened it before listening).
    run(Command::new("ip").args(["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]));
    run(Command::new("ip").args(["link", "set", TAP, "up"]));
    let listener = TcpListener::bind((HOST_IP, TCP_PORT)).expect("listen on the tap's address");
    let expect_len = guest_bytes().len();
    let tcp = thread::spawn(move || serve_tcp(listener, expect_len, host_bytes()));

    let mut qemu = QemuConfig::new(Accel::Tcg, &fixture.vmlinux, Some(&initrd));
    qemu.shared_memory = true;
    let mut chardev = std::ffi::OsString::from("socket,id=netc0,path=");
    chardev.push(&socket);
    qemu.extra_args.extend([
        "-chardev".to_string(),
        chardev.to_string_lossy().into_owned(),
        "-netdev".to_string(),
        "vhost-user,id=net0,chardev=netc0".to_string(),
        "-device".to_string(),
        format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"),
    ]);
    let vm = QemuMicrovm::spawn(&qemu).expect("start QEMU");
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
    // The back end logs its counters when QEMU disconnects.
    let started = Instant::now();
    while !backend.log_text().contains("front end disconnected")
        && started.elapsed() < Duration::from_secs(10)
    {
        thread::sleep(Duration::from_millis(20));
    }
    let backend_log = backend.log_text();
    Outcome {
        console,
        tcp,
        backend_log,
    }
}

/// The value after `key` in the back end's final metrics line.
fn counter(log: &str, key: &str) -> Option<u64> {
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

#[test]
fn guest_pings_and_exchanges_tcp_with_the_host_over_our_vhost_user_net() {
    let fixture = match locate() {
        Ok(fixture) => fixture,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let outcome = thread::spawn(move || {
        // SAFETY: unshare of this thread's network namespace only; the
        // processes it starts inherit it, and it goes away with them.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(run_in_netns(fixture))
    })
    .join()
    .expect("test thread");
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("SKIP: unshare(CLONE_NEWNET) failed: {e}");
            return;
        }
    };
    let context = || {
        format!(
            "console:\n{}\n--- back end ---\n{}",
            outcome.console.transcript(),
            outcome.backend_log
        )
    };
    let guest_lines: Vec<&str> = outcome
        .console
        .console
        .iter()
        .filter_map(|l| l.text.split_once(PREFIX).map(|(_, rest)| rest.trim()))
        .collect();
    let has = |needle: &str| guest_lines.iter().any(|l| l.contains(needle));

    assert!(
        has("done"),
        "the guest script did not finish\n{}",
        context()
    );
    assert!(
        has(&format!("mac {GUEST_MAC}")),
        "guest MAC is not {GUEST_MAC}\n{}",
        context()
    );
    assert!(
        has(&format!(
            "{PINGS} packets transmitted, {PINGS} packets received"
        )),
        "ping lost packets\n{}",
        context()
    );
    let received = outcome
        .tcp
        .as_ref()
        .unwrap_or_else(|e| panic!("host TCP side: {e}\n{}", context()));
    assert!(
        *received == guest_bytes(),
        "the host received other bytes than the guest sent\n{}",
        context()
    );
    let expected_sum = sha256_hex(&host_bytes());
    assert!(
        has(&format!("received sha256 {expected_sum}")),
        "the guest did not receive the host's {HOST_BYTES} bytes intact (sha256 {expected_sum})\n{}",
        context()
    );
    let requests = counter(&outcome.backend_log, "requests").unwrap_or(0);
    let errors = counter(&outcome.backend_log, "errors");
    assert!(requests > 0, "back end counted no frames\n{}", context());
    assert_eq!(errors, Some(0), "back end counted drops\n{}", context());

    let rtt = guest_lines
        .iter()
        .find(|l| l.contains("round-trip"))
        .copied()
        .unwrap_or("ping: no round-trip line");
    let done_at = outcome.console.find(DONE).map(|l| l.at);
    println!(
        "virtio-net over vhost-user (QEMU/TCG guest): {rtt}; TCP guest→host {} bytes, host→guest {HOST_BYTES} bytes (sha256 ok); {requests} frames, 0 drops; guest done at {:?}",
        received.len(),
        done_at
    );
}
