//! The real guest kernel's virtio drivers against our virtio-mmio
//! transport and every device, in `cloister-vmm`: one boot with rng,
//! vsock, console (also `console=hvc0`), two disks (one read-only) and a
//! virtio-fs share (probed, not mounted: only `/init` could mount it).
//!
//! The VMM runs with `--metrics-interval 1`; the test reads the
//! per-device counters it prints on stderr and ends as soon as every
//! device shows what only a working driver produces: status DRIVER_OK
//! (the whole negotiation and queue setup were accepted), and for the
//! devices Linux uses at probe time, requests answered and interrupts
//! raised: entropy from the rng, the partition-table read of each disk,
//! kernel messages through hvc0. No register access may be refused and no
//! device may need a reset. The kernel log must show the devices
//! registered from the command line and both disks' sizes. Probing
//! happens long before `/init`, so on nested paravirtualized KVM
//! (`kvm_pvm`, where kernel mode is emulated) this takes 1-4 minutes
//! (depending on load) rather than 1.5-5 minutes to init.
//!
//! Skipped, with the reason printed, without `/dev/kvm` or a built image
//! (`kernel-config/build-kernel.sh`, `kernel-config/build-initramfs.sh`).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use std::time::{Duration, Instant};

use cloister_e2e::cloister_vmm::CloisterVmmConfig;
use cloister_e2e::guest_image::GuestImage;
use cloister_guest_image::cmdline::host_is_nested_pvm;
use cloister_vmm::vstate::kvm::KvmContext;

const HARDWARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Every device was in use after 50 s here with the machine otherwise
/// idle and after 210 s with builds on both cores; the margin is for that.
const NESTED_TIMEOUT: Duration = Duration::from_secs(600);

/// DRIVER_OK | FEATURES_OK | DRIVER | ACKNOWLEDGE.
const STATUS_DRIVER_OK: u64 = 0xf;

/// Kills the VMM's process group when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pgid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group
            // this child leads (spawned with process_group(0)); no memory
            // is involved.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.0.wait();
    }
}

/// The devices, by report name, and whether the driver must have had a
/// request served by the time probing is over.
const DEVICES: &[(&str, bool)] = &[
    ("rng", true),
    ("vsock", false),
    ("console", true),
    ("block0", true),
    ("block1", true),
    ("fs0", false),
];

/// The device list of one metrics line, if the line is one.
fn device_counters(line: &str) -> Option<Vec<Value>> {
    let json: Value = serde_json::from_str(line.trim()).ok()?;
    json["devices"].as_array().cloned()
}

fn driver_used(devices: &[Value], name: &str, needs_requests: bool) -> bool {
    let Some(device) = devices.iter().find(|d| d["name"] == name) else {
        return false;
    };
    let n = |key: &str| device[key].as_u64().unwrap_or(0);
    n("status") == STATUS_DRIVER_OK
        && (!needs_requests || (n("requests") > 0 && n("interrupts") > 0))
}

fn every_driver_used(devices: &[Value]) -> bool {
    DEVICES
        .iter()
        .all(|(name, needs_requests)| driver_used(devices, name, *needs_requests))
}

#[test]
fn linux_virtio_drivers_probe_and_use_every_device() {
    probe_every_device(false);
}

/// The same in a jailed `cloister-vmm` (its seccomp lists included): the
/// disks, the console file and the vsock socket live in a folder the jail
/// uid owns, as the shim's sockets folder does.
#[test]
fn jailed_linux_virtio_drivers_probe_and_use_every_device() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: a jailed cloister-vmm needs root");
        return;
    }
    probe_every_device(true);
}

const JAIL_ID: u32 = 64000;

/// One guest at a time: two emulated-kernel boots side by side on two
/// cores would each take twice as long against the same timeout.
static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn probe_every_device(jailed: bool) {
    // A failed test poisons the lock; the next one still runs.
    let _one_guest = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(e) = KvmContext::open() {
        eprintln!("SKIP: needs a usable /dev/kvm: {e}");
        return;
    }
    let image = match GuestImage::locate() {
        Ok(image) => image,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return;
        }
    };
    let timeout = if host_is_nested_pvm() {
        NESTED_TIMEOUT
    } else {
        HARDWARE_TIMEOUT
    };
    let tempdir = tempfile::tempdir().expect("temporary directory");
    let vm_dir = tempdir.path().join("vm");
    std::fs::create_dir(&vm_dir).expect("vm folder");
    let dir = vm_dir.as_path();
    let disk = dir.join("disk.img");
    let read_only_disk = dir.join("ro.img");
    for (path, len) in [(&disk, 8 << 20), (&read_only_disk, 4 << 20)] {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(len))
            .expect("disk image");
    }
    let hvc_log = dir.join("hvc0.log");
    let share = tempdir.path().join("share");
    std::fs::create_dir(&share).expect("share directory");
    let mut config = CloisterVmmConfig::new(
        Path::new(env!("CARGO_BIN_EXE_cloister-vmm")),
        &image.vmlinux,
        Some(&image.initramfs),
    );
    config.cmdline.push_str(" console=hvc0");
    let mut command = config.command();
    command
        .args(["--rng", "--metrics-interval", "1"])
        .arg("--vsock")
        .arg(format!(
            "guest_cid=3,uds_path={}",
            dir.join("v.sock").display()
        ))
        .arg("--block")
        .arg(format!("path={},serial=disk0", disk.display()))
        .arg("--block")
        .arg(format!("path={},read_only=true", read_only_disk.display()))
        .arg("--console")
        .arg(format!("file:{}", hvc_log.display()))
        .arg("--fs")
        .arg(format!("tag=probe,path={}", share.display()))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if jailed {
        // The jailed VMM opens the disks and creates the socket and the
        // console file as the jail uid.
        let id = |n| {
            (
                Some(nix::unistd::Uid::from_raw(n)),
                Some(nix::unistd::Gid::from_raw(n)),
            )
        };
        for path in [dir, disk.as_path(), read_only_disk.as_path()] {
            let (uid, gid) = id(JAIL_ID);
            nix::unistd::chown(path, uid, gid).expect("chown to the jail uid");
        }
        command
            .arg("--jail-root")
            .arg(tempdir.path().join("jail"))
            .args(["--jail-uid", &JAIL_ID.to_string()])
            .args(["--jail-gid", &JAIL_ID.to_string()]);
    }
    let started = Instant::now();
    let mut child = KillOnDrop(command.spawn().expect("cloister-vmm starts"));

    let console = Arc::new(Mutex::new(String::new()));
    let stdout = child.0.stdout.take().expect("stdout piped");
    let console_writer = console.clone();
    let console_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut text = console_writer.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    let (lines, stderr_lines) = mpsc::channel();
    let stderr = child.0.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let mut last = None;
    let mut log = String::new();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        match stderr_lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(devices) = device_counters(&line) {
                    let done = every_driver_used(&devices);
                    last = Some(devices);
                    if done {
                        break;
                    }
                } else {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    let elapsed = started.elapsed();
    drop(child);
    // The process group is gone: the pipe ends and the reader has every
    // line the guest printed.
    let _ = console_reader.join();
    let console = console.lock().unwrap().clone();
    let devices = last.unwrap_or_else(|| {
        panic!("no metrics line with devices on stderr:\n{log}\nconsole:\n{console}")
    });
    eprintln!("after {:.1} s:", elapsed.as_secs_f64());
    for device in &devices {
        eprintln!("  {device}");
    }
    for (name, needs_requests) in DEVICES {
        assert!(
            driver_used(&devices, name, *needs_requests),
            "the guest's driver did not use {name} within {timeout:?}: {devices:?}\nconsole:\n{console}"
        );
    }
    for device in &devices {
        assert_eq!(device["refused_register_accesses"], 0, "{device}");
        assert_eq!(device["needs_reset_events"], 0, "{device}");
        assert_eq!(device["errors"], 0, "{device}");
    }
    for (slot, irq) in (0..5).zip(5..) {
        let line = format!(
            "virtio-mmio: Registering device virtio-mmio.{slot} at {:#x}-{:#x}, IRQ {irq}.",
            0xd000_0000u32 + slot * 0x1000,
            0xd000_0fffu32 + slot * 0x1000
        );
        assert!(
            console.contains(&line),
            "no \"{line}\" in the kernel log:\n{console}"
        );
    }
    assert!(
        console.contains("[vda] 16384 512-byte logical blocks"),
        "{console}"
    );
    assert!(
        console.contains("[vdb] 8192 512-byte logical blocks"),
        "{console}"
    );
    // The console is probed before the disks (slot order), so their
    // messages also go through hvc0.
    let hvc = std::fs::read_to_string(&hvc_log).unwrap_or_default();
    assert!(
        hvc.contains("[vda] 16384 512-byte logical blocks"),
        "no kernel messages through hvc0:\n{hvc}"
    );
}
