//! `cloister-bench-boot`: boots the same kernel + initramfs several times in
//! `cloister-vmm` and in `qemu-system-x86_64 -M microvm -enable-kvm`
//! (one after the other, never at once) and prints, for both, the time from
//! process start to each console milestone, the VMM's peak RSS, and the
//! ratios qemu / cloister-vmm (above 1: cloister-vmm is faster or smaller).
//!
//! Usage: cloister-bench-boot [RUNS] (default 3). A benchmark, not a test:
//! nothing here passes or fails on a time.

use std::process::ExitCode;
use std::time::Duration;

use cloister_e2e::cloister_vmm::{find_cloister_vmm, CloisterVmmConfig};
use cloister_e2e::console::ConsoleRun;
use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::qemu::{
    boot_wait_policy, milestones, qemu_available, Accel, QemuConfig, QemuMicrovm, MILESTONES,
};
use cloister_guest_image::cmdline::host_is_nested_pvm;

const TIMEOUT: Duration = Duration::from_secs(900);

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

struct Samples {
    /// Per milestone: the seconds of each run that reached it.
    milestones: Vec<Vec<f64>>,
    rss_mib: Vec<f64>,
}

impl Samples {
    fn new() -> Self {
        Self {
            milestones: vec![Vec::new(); MILESTONES.len()],
            rss_mib: Vec::new(),
        }
    }

    fn add(&mut self, run: &ConsoleRun) {
        for (i, (_, at)) in milestones(&run.console).into_iter().enumerate() {
            if let Some(at) = at {
                self.milestones[i].push(at.as_secs_f64());
            }
        }
        if let Some(kib) = run.peak_rss_kib {
            self.rss_mib.push(kib as f64 / 1024.0);
        }
    }
}

/// How a run ended, and the last console line (where a stopped guest stood).
fn outcome(run: &ConsoleRun) -> String {
    let how = if run.went_idle {
        "console silent, stopped".to_string()
    } else if run.timed_out {
        "killed at the timeout".to_string()
    } else {
        match run.status {
            Some(status) => format!("exited ({status})"),
            None => "ended after a kernel panic".to_string(),
        }
    };
    let last = run.console.last().map_or("", |l| l.text.as_str());
    format!(
        "{how} after {:.1} s; last line: {last}",
        run.elapsed.as_secs_f64()
    )
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.3} {unit}"))
}

fn ratio(qemu: Option<f64>, ours: Option<f64>) -> String {
    match (qemu, ours) {
        (Some(q), Some(o)) if o > 0.0 => format!("{:.2}x", q / o),
        _ => "-".into(),
    }
}

fn run() -> Result<(), String> {
    let runs: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|_| format!("RUNS = {n}: not a number"))?,
        None => 3,
    };
    let image = GuestImage::locate().map_err(|e| e.to_string())?;
    let vmm = find_cloister_vmm().ok_or("cloister-vmm not found: build it or set CLOISTER_VMM")?;
    let qemu_config = QemuConfig::new(Accel::Kvm, &image.vmlinux, Some(&image.initramfs));
    if !qemu_available(&qemu_config.binary) {
        return Err(format!(
            "{} not found (Debian package qemu-system-x86)",
            qemu_config.binary.display()
        ));
    }
    let vmm_config = CloisterVmmConfig::new(&vmm, &image.vmlinux, Some(&image.initramfs));
    println!(
        "boot benchmark: {runs} run(s) each, 1 vCPU, {} MiB, kernel {}",
        vmm_config.memory_mib,
        image.vmlinux.display()
    );
    if host_is_nested_pvm() {
        println!("host KVM is nested paravirtualized (kvm_pvm): guest kernel mode is emulated, each boot takes minutes and stops at init's first system call");
    }
    let mut ours = Samples::new();
    let mut theirs = Samples::new();
    for i in 1..=runs {
        let policy = boot_wait_policy(TIMEOUT);
        let run = vmm_config
            .spawn()
            .map_err(|e| e.to_string())?
            .wait_until(&policy, |_| {});
        println!("run {i}: cloister-vmm {}", outcome(&run));
        ours.add(&run);
        let run = QemuMicrovm::spawn(&qemu_config)
            .map_err(|e| e.to_string())?
            .wait_until(&policy, |_| {});
        println!("run {i}: qemu         {}", outcome(&run));
        theirs.add(&run);
    }
    println!();
    println!(
        "{:<20} {:>14} {:>14} {:>12}",
        "median of runs", "cloister-vmm", "qemu -kvm", "qemu/ours"
    );
    for (i, m) in MILESTONES.iter().enumerate() {
        let o = median(ours.milestones[i].clone());
        let q = median(theirs.milestones[i].clone());
        println!(
            "{:<20} {:>14} {:>14} {:>12}",
            m.name,
            fmt(o, "s"),
            fmt(q, "s"),
            ratio(q, o)
        );
    }
    let o = median(ours.rss_mib.clone());
    let q = median(theirs.rss_mib.clone());
    println!(
        "{:<20} {:>14} {:>14} {:>12}",
        "peak RSS",
        fmt(o, "MiB"),
        fmt(q, "MiB"),
        ratio(q, o)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloister-bench-boot: {e}");
            ExitCode::from(2)
        }
    }
}
