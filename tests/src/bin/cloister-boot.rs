//! `cloister-boot`: boots the guest image (kernel from `kernel-config/`,
//! boot-test init) in `cloister-vmm` and prints each boot milestone as the
//! console reaches it. What `scripts/demo.sh` runs.
//!
//! On nested paravirtualized KVM (`kvm_pvm`) guest kernel mode is emulated
//! (minutes to `/init`) and guest user mode cannot make system calls, so
//! the init marker cannot appear there; the same image is then also booted
//! under QEMU/TCG to show that it does reach init.

use std::process::ExitCode;
use std::time::Duration;

use cloister_e2e::cloister_vmm::{find_cloister_vmm, CloisterVmmConfig};
use cloister_e2e::console::{ConsoleLine, ConsoleRun};
use cloister_e2e::guest_image::{GuestImage, TEST_INIT_MARKER};
use cloister_e2e::qemu::{
    boot_wait_policy, qemu_available, Accel, QemuConfig, QemuMicrovm, KERNEL_PANIC, MILESTONES,
};
use cloister_guest_image::cmdline::host_is_nested_pvm;

const VMM_TIMEOUT: Duration = Duration::from_secs(900);
const TCG_TIMEOUT: Duration = Duration::from_secs(120);

/// Prints `line` when it is the first to reach one of [`MILESTONES`].
fn print_milestone(who: &str, line: &ConsoleLine, seen: &mut Vec<&'static str>) {
    let found = MILESTONES
        .iter()
        .find(|m| line.text.contains(m.needle) && !seen.contains(&m.name));
    if let Some(m) = found {
        seen.push(m.name);
        println!(
            "  {who:<13} {:>9.3} s  {:<18} | {}",
            line.at.as_secs_f64(),
            m.name,
            line.text.trim()
        );
    }
}

fn summary(who: &str, run: &ConsoleRun) {
    let status = match (&run.status, run.timed_out) {
        (_, true) => "killed at the timeout".to_string(),
        (Some(s), _) => format!("exited with {s}"),
        (None, false) => "ended".to_string(),
    };
    println!("  {who}: {status} after {:.1} s", run.elapsed.as_secs_f64());
    if let Some(kib) = run.peak_rss_kib {
        println!("  {who}: peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
}

fn run() -> Result<bool, String> {
    let image = GuestImage::locate().map_err(|e| e.to_string())?;
    let vmm = find_cloister_vmm().ok_or(
        "cloister-vmm not found: build it (cargo build -p cloister-vmm) or set CLOISTER_VMM",
    )?;
    let nested = host_is_nested_pvm();
    println!("guest kernel: {}", image.vmlinux.display());
    println!("initramfs:    {}", image.initramfs.display());
    if nested {
        println!(
            "host KVM is nested and paravirtualized (kvm_pvm): the guest kernel runs emulated, expect minutes to /init;\n\
             its init cannot make system calls on such a host, so the boot ends there (init is killed, the kernel panics and resets)."
        );
    }
    println!("booting in cloister-vmm ({}):", vmm.display());
    let config = CloisterVmmConfig::new(&vmm, &image.vmlinux, Some(&image.initramfs));
    let mut seen = Vec::new();
    let ours = config.spawn().map_err(|e| e.to_string())?.wait_until(
        &boot_wait_policy(VMM_TIMEOUT),
        |line| {
            print_milestone("cloister-vmm", line, &mut seen);
            if line.text.contains(KERNEL_PANIC) {
                println!(
                    "  {:<13} {:>9.3} s  {}",
                    "cloister-vmm",
                    line.at.as_secs_f64(),
                    line.text.trim()
                );
            }
        },
    );
    for line in ours
        .stderr
        .lines()
        .filter(|l| l.contains("guest init reached"))
    {
        println!(
            "  boot timer: {}",
            line.split("INFO").last().unwrap_or(line).trim()
        );
    }
    summary("cloister-vmm", &ours);
    let reached_init = ours.find(TEST_INIT_MARKER).is_some();
    if reached_init {
        println!("the guest reached /init in cloister-vmm");
        return Ok(ours.status.is_some_and(|s| s.success()));
    }
    if !nested {
        println!("the guest did not reach /init:\n{}", ours.transcript());
        return Ok(false);
    }
    let qemu = QemuConfig::new(Accel::Tcg, &image.vmlinux, Some(&image.initramfs));
    if !qemu_available(&qemu.binary) {
        return Ok(ours.find("Run /init").is_some());
    }
    println!("the same image under QEMU/TCG (software emulation, for comparison):");
    let mut seen = Vec::new();
    let tcg = QemuMicrovm::spawn(&qemu)
        .map_err(|e| e.to_string())?
        .wait_with(TCG_TIMEOUT, |line| {
            print_milestone("qemu-tcg", line, &mut seen)
        });
    summary("qemu-tcg", &tcg);
    Ok(ours.find("Run /init").is_some() && tcg.find(TEST_INIT_MARKER).is_some())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cloister-boot: {e}");
            ExitCode::from(2)
        }
    }
}
