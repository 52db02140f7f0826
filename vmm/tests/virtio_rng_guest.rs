//! The real guest kernel's virtio_mmio and virtio_rng drivers against our
//! transport and rng device, in `cloister-vmm`.
//!
//! The VMM runs with `--rng --metrics-interval 1`; the test reads the
//! per-device counters it prints on stderr and ends as soon as the rng
//! device shows what only a working driver produces: status DRIVER_OK
//! (the whole negotiation and queue setup were accepted), kicks, requests
//! answered with entropy, and interrupts raised, with no refused register
//! access and no NEEDS_RESET. The kernel log must show the device
//! registered from the command line. Device probing happens long before
//! `/init`, so on nested paravirtualized KVM (`kvm_pvm`, where kernel mode
//! is emulated) this takes about 30 s rather than the 70+ s to init.
//!
//! Skipped, with the reason printed, without `/dev/kvm` or a built image
//! (`kernel-config/build-kernel.sh`, `kernel-config/build-initramfs.sh`).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloister_e2e::cloister_vmm::CloisterVmmConfig;
use cloister_e2e::guest_image::GuestImage;
use cloister_guest_image::cmdline::host_is_nested_pvm;
use cloister_vmm::vstate::kvm::KvmContext;

const HARDWARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Probing took 30 s here with the machine otherwise idle; the margin is
/// for 2 cores shared with builds.
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

/// The rng device's entry in one metrics line, if the line is one.
fn rng_counters(line: &str) -> Option<serde_json::Value> {
    let json: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    json["devices"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == "rng")
        .cloned()
}

fn driver_used_it(rng: &serde_json::Value) -> bool {
    let n = |key: &str| rng[key].as_u64().unwrap_or(0);
    n("status") == STATUS_DRIVER_OK
        && n("requests") > 0
        && n("bytes_to_guest") > 0
        && n("interrupts") > 0
}

#[test]
fn linux_virtio_rng_driver_probes_device_and_reads_entropy() {
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
    let mut command = CloisterVmmConfig::new(
        Path::new(env!("CARGO_BIN_EXE_cloister-vmm")),
        &image.vmlinux,
        Some(&image.initramfs),
    )
    .command();
    command
        .args(["--rng", "--metrics-interval", "1"])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = KillOnDrop(command.spawn().expect("cloister-vmm starts"));

    let console = Arc::new(Mutex::new(String::new()));
    let stdout = child.0.stdout.take().expect("stdout piped");
    let console_writer = console.clone();
    std::thread::spawn(move || {
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
                if let Some(rng) = rng_counters(&line) {
                    let done = driver_used_it(&rng);
                    last = Some(rng);
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
    let console = console.lock().unwrap().clone();
    let rng = last.unwrap_or_else(|| {
        panic!("no metrics line with an rng device on stderr:\n{log}\nconsole:\n{console}")
    });
    eprintln!("rng device after {:.1} s: {rng}", elapsed.as_secs_f64());
    assert!(
        driver_used_it(&rng),
        "the guest's virtio_rng driver did not use the device within {timeout:?}: {rng}\nconsole:\n{console}"
    );
    assert_eq!(rng["refused_register_accesses"], 0, "{rng}");
    assert_eq!(rng["needs_reset_events"], 0, "{rng}");
    assert_eq!(rng["errors"], 0, "{rng}");
    assert!(
        console.contains(
            "virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000-0xd0000fff, IRQ 5."
        ),
        "kernel did not register the device from virtio_mmio.device=:\n{console}"
    );
}
