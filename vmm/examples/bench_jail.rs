//! The jail's cost on VM start: `cloister-vmm` boots a tiny payload to its
//! first exit (it prints, signals the boot timer, resets) RUNS times
//! jailed and RUNS times not, interleaved, and prints the medians of the
//! time from spawn to the process's end and of the boot timer's "guest
//! init reached" (measured by the VMM from its own start, jail setup
//! included), with the ratio jailed / unjailed. A benchmark, not a test:
//! nothing passes or fails on a time. Needs root and /dev/kvm.
//!
//! `cargo run -p cloister-vmm --example bench_jail -- [RUNS]` (default 15),
//! or `scripts/bench-jail.sh [RUNS]`.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

#[path = "../tests/support/payload_elf.rs"]
#[allow(dead_code)] // the example boots only one of the payloads
mod payload_elf;

const JAIL_ID: &str = "64000";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// One boot: (ms from spawn to exit, ms the VMM reports to guest init).
fn boot(vmm: &Path, kernel: &Path, jail: Option<&Path>) -> Result<(f64, f64), String> {
    let mut command = Command::new(vmm);
    command
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "32", "--serial", "none"])
        .env("CLOISTER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(root) = jail {
        command
            .arg("--jail-root")
            .arg(root)
            .args(["--jail-uid", JAIL_ID, "--jail-gid", JAIL_ID]);
    }
    let started = Instant::now();
    let output = command.output().map_err(|e| format!("spawn: {e}"))?;
    let total = started.elapsed().as_secs_f64() * 1000.0;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{}: {stderr}", output.status));
    }
    let init = stderr
        .lines()
        .find_map(|l| {
            let rest = l.split("guest init reached: ").nth(1)?;
            rest.split(" ms").next()?.trim().parse::<f64>().ok()
        })
        .ok_or_else(|| format!("no boot timer line: {stderr}"))?;
    Ok((total, init))
}

fn main() -> ExitCode {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(15);
    let Some(vmm) = std::env::var_os("CLOISTER_VMM")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("cloister-vmm"))
        })
    else {
        eprintln!("cannot find cloister-vmm: set CLOISTER_VMM");
        return ExitCode::from(2);
    };
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("temporary folder: {e}");
            return ExitCode::from(2);
        }
    };
    let kernel = dir.path().join("hello.elf");
    if let Err(e) = std::fs::write(
        &kernel,
        payload_elf::elf_kernel(payload_elf::HELLO_THEN_RESET),
    ) {
        eprintln!("{}: {e}", kernel.display());
        return ExitCode::from(2);
    }
    let root = dir.path().join("jail");
    let mut plain = (Vec::new(), Vec::new());
    let mut jailed = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (jail, samples) in [(None, &mut plain), (Some(root.as_path()), &mut jailed)] {
            match boot(&vmm, &kernel, jail) {
                Ok((total, init)) => {
                    samples.0.push(total);
                    samples.1.push(init);
                }
                Err(e) => {
                    eprintln!(
                        "{} run failed: {e}",
                        if jail.is_some() { "jailed" } else { "unjailed" }
                    );
                    return ExitCode::from(1);
                }
            }
        }
    }
    println!(
        "cloister-vmm {} , {runs} runs each, interleaved, medians:",
        vmm.display()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "", "unjailed", "jailed", "ratio"
    );
    for (what, a, b) in [
        ("spawn to exit (payload resets)", &plain.0, &jailed.0),
        ("VMM start to guest init (timer)", &plain.1, &jailed.1),
    ] {
        let (a, b) = (median(a.clone()), median(b.clone()));
        println!("{what:<34} {a:>8.2}ms {b:>8.2}ms {:>7.2}x", b / a);
    }
    ExitCode::SUCCESS
}
