//! `cloister-bench-pod`: what a pod costs, cloister against its peers in one
//! run, through the same private containerd and the same locally built
//! busybox image:
//!
//! - latency of `ctr run --rm IMAGE ID true` (create, start, exit, delete;
//!   for cloister that includes booting and stopping the VM), median of
//!   `--runs`;
//! - memory of one idle pod (`sleep`): the proportional set size (PSS) of
//!   the pod's shim and everything under it — runc's container process;
//!   gVisor's sandbox and gofer; our VMM (QEMU here, on `kvm_pvm` hosts) with
//!   its vhost-user back ends, whose PSS includes the guest memory the guest
//!   touched.
//!
//! Peers: runc (containerd's runc shim) and runsc (Debian's gVisor, run by
//! the runc shim as its OCI binary, the way Docker runs it), in the order
//! runc, runsc, cloister. Ratios are cloister / peer (lower is better for
//! both figures). Run as root: `scripts/bench-pod.sh [--runs N]`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cloister_e2e::agent_guest::AgentGuestFixture;
use cloister_e2e::containerd::{
    busybox_rootfs, pids_mentioning, ContainerdBinaries, PrivateContainerd,
};
use cloister_e2e::oci_image::{write_image_archive, ImageSpec};
use cloister_e2e::runtime::{path_with, shim_dir, HostRuntimeConfig};

const IMAGE: &str = "docker.io/library/busybox:cloister-bench";
const BUSYBOX: &str = "/bin/busybox";
const RUNSC: &str = "/usr/bin/runsc";
/// How long an idle pod settles before its memory is read.
const SETTLE: Duration = Duration::from_secs(3);

/// One runtime as `ctr run` selects it.
struct Runtime {
    name: &'static str,
    args: Vec<String>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// PSS in KiB of `pid` (0 when it is gone).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Every process's parent, from /proc.
fn parents() -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The field after the command's closing parenthesis: state, ppid.
            let after = stat.rsplit_once(')')?.1;
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// The pid of the shim serving container `id`, and every descendant.
fn pod_processes(id: &str) -> Vec<u32> {
    // containerd starts a shim with `-id ID -address SOCKET`.
    let Some(shim) = pids_mentioning(&format!("-id {id} -address"))
        .into_iter()
        .next()
    else {
        return Vec::new();
    };
    let table = parents();
    let mut found = vec![shim];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(table.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        index += 1;
    }
    found
}

fn ctr_run(containerd: &PrivateContainerd, runtime: &Runtime, tail: &[&str]) -> Result<(), String> {
    let mut args = vec!["run".to_string()];
    args.extend(runtime.args.iter().cloned());
    args.extend(tail.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = containerd.ctr(&args);
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: ctr {}: {}",
            runtime.name,
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Median seconds of `ctr run --rm IMAGE ID true`.
fn latency(containerd: &PrivateContainerd, runtime: &Runtime, runs: usize) -> Result<f64, String> {
    let mut times = Vec::new();
    for run in 0..runs {
        let id = format!("bench-{}-{}-{run}", runtime.name, std::process::id());
        let started = Instant::now();
        ctr_run(containerd, runtime, &["--rm", IMAGE, &id, "true"])?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// The process's command name.
fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

/// MiB of PSS of one idle pod of `runtime`, and the processes it sums.
fn idle_pod_mib(
    containerd: &PrivateContainerd,
    runtime: &Runtime,
) -> Result<(f64, String), String> {
    let id = format!("bench-mem-{}-{}", runtime.name, std::process::id());
    ctr_run(containerd, runtime, &["-d", IMAGE, &id, "sleep", "3600"])?;
    std::thread::sleep(SETTLE);
    let processes = pod_processes(&id);
    let parts: Vec<(String, u64)> = processes
        .iter()
        .map(|&pid| (comm(pid), pss_kib(pid)))
        .collect();
    let kib: u64 = parts.iter().map(|(_, k)| k).sum();
    let breakdown = parts
        .iter()
        .map(|(name, k)| format!("{name} {:.1}", *k as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = containerd.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if containerd.ctr(&["task", "delete", &id]).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = containerd.ctr(&["containers", "delete", &id]);
    if processes.is_empty() {
        return Err(format!("{}: no shim process found for {id}", runtime.name));
    }
    Ok((kib as f64 / 1024.0, breakdown))
}

fn run(runs: usize) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root".into());
    }
    let fixture = AgentGuestFixture::locate()?;
    let shim_dir = shim_dir()?;
    let binaries = ContainerdBinaries::containerd2()
        .or_else(ContainerdBinaries::system)
        .ok_or("no containerd (apt-get install containerd)")?;
    let containerd_dir = binaries
        .containerd
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = HostRuntimeConfig::for_this_host(&fixture, 256)?;
    let config_path = dir.path().join("cloister.toml");
    std::fs::write(&config_path, &config.toml).map_err(|e| e.to_string())?;
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).map_err(|e| e.to_string())?;
    let archive = dir.path().join("busybox.tar");
    let spec = ImageSpec {
        name: IMAGE.into(),
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
    };
    write_image_archive(&rootfs, &spec, &archive).map_err(|e| e.to_string())?;
    // containerd finds both shims (ours, and its runc shim beside it) on
    // its PATH.
    let path = path_with([shim_dir, containerd_dir])?;
    let containerd = PrivateContainerd::start(
        &binaries,
        &[
            ("CLOISTER_CONFIG", config_path.as_path()),
            ("PATH", Path::new(&path)),
        ],
    )
    .map_err(|e| e.to_string())?;
    let import = containerd.ctr(&["images", "import", &archive.display().to_string()]);
    if !import.status.success() {
        return Err(format!(
            "import: {}",
            String::from_utf8_lossy(&import.stderr)
        ));
    }

    let mut runtimes = vec![Runtime {
        name: "runc",
        args: vec!["--runtime".into(), "io.containerd.runc.v2".into()],
    }];
    if Path::new(RUNSC).exists() {
        // runsc refuses to set up networking in the runtime's own (root)
        // network namespace, where the runc shim starts it; with
        // --network=none the container has loopback only, as the runc
        // container in its fresh namespace has.
        let wrapper = dir.path().join("runsc-no-network");
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec {RUNSC} --network=none \"$@\"\n"),
        )
        .map_err(|e| e.to_string())?;
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| e.to_string())?;
        runtimes.push(Runtime {
            name: "runsc",
            args: vec![
                "--runtime".into(),
                "io.containerd.runc.v2".into(),
                "--runc-binary".into(),
                wrapper.display().to_string(),
            ],
        });
    } else {
        println!("runsc: SKIP: {RUNSC} missing (apt-get install runsc)");
    }
    runtimes.push(Runtime {
        name: "cloister",
        args: vec!["--runtime".into(), "io.containerd.cloister.v2".into()],
    });
    println!(
        "{} (private), busybox image built here, {runs} runs each; cloister on {}",
        binaries.describe(),
        config.hypervisor
    );
    let mut results = Vec::new();
    for runtime in &runtimes {
        let seconds = latency(&containerd, runtime, runs)?;
        let (mib, breakdown) = idle_pod_mib(&containerd, runtime)?;
        println!(
            "  {:<9} ctr run --rm true: {:>7.3} s   idle pod PSS: {:>7.1} MiB ({breakdown})",
            runtime.name, seconds, mib
        );
        results.push((runtime.name, seconds, mib));
    }
    let Some(&(_, ours_s, ours_mib)) = results.iter().find(|r| r.0 == "cloister") else {
        return Err("no cloister result".into());
    };
    println!(
        "\n{:<9} {:>12} {:>14} {:>18} {:>18}",
        "runtime", "latency", "idle pod PSS", "cloister/peer lat", "cloister/peer mem"
    );
    for (name, seconds, mib) in &results {
        println!(
            "{name:<9} {:>10.3} s {:>10.1} MiB {:>18.2} {:>18.2}",
            seconds,
            mib,
            ours_s / seconds,
            ours_mib / mib
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut runs = 5;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--runs", Some(n)) if n > 0 => runs = n,
            _ => {
                eprintln!("usage: cloister-bench-pod [--runs N]");
                return ExitCode::from(2);
            }
        }
    }
    match run(runs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("cloister-bench-pod: {reason}");
            ExitCode::FAILURE
        }
    }
}
