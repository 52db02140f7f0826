//! `cloister-bench-vsock`: the same vsock probe guest (QEMU/TCG `-M
//! microvm`, `vhost-user-vsock-device`) against our back end
//! (`cloister-vmm vhost-user --device vsock`) and against rust-vmm's
//! `vhost-device-vsock`, one after the other in one run; prints, for both,
//! bulk throughput each way (MiB/s), echo round-trip latency (median, p99)
//! and 32-connection echo time, with ratios ours / peer.
//!
//! Usage: cloister-bench-vsock [--backend cloister|peer|both] [--mib N]
//!        [--rounds N] [--connections N] [--runs N] [--write-kib N]
//! Runs alternate between the back ends; each figure is the median of the
//! runs.
//! A benchmark, not a test: nothing here fails on a time. Under TCG the
//! guest's CPU is emulated, so absolute figures are far below KVM's; the
//! ratio between back ends on the same guest is the point.

use std::process::ExitCode;

use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::qemu::{qemu_available, QEMU_BINARY};
use cloister_e2e::vhost_user::{
    find_vhost_device_vsock, probe_initramfs, run_vsock_probe, ProbeFigures, ProbePlan,
    VsockBackend,
};

/// The guest's bulk write size for both back ends: the largest that
/// vhost-device-vsock 0.3.0 takes (measured: 32 KiB writes pass, 40 KiB
/// writes stall the stream).
const PEER_SAFE_WRITE_CHUNK: u32 = 32 * 1024;

struct Options {
    backends: Vec<&'static str>,
    mib: u32,
    rounds: usize,
    connections: u32,
    runs: usize,
    write_kib: u32,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        backends: vec!["cloister", "peer"],
        mib: 256,
        rounds: 1000,
        connections: 32,
        runs: 3,
        write_kib: PEER_SAFE_WRITE_CHUNK / 1024,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => {
                options.backends = match value()?.as_str() {
                    "cloister" => vec!["cloister"],
                    "peer" => vec!["peer"],
                    "both" => vec!["cloister", "peer"],
                    other => return Err(format!("--backend {other}: cloister, peer or both")),
                }
            }
            "--mib" => options.mib = value()?.parse().map_err(|_| "--mib: a number")?,
            "--rounds" => options.rounds = value()?.parse().map_err(|_| "--rounds: a number")?,
            "--write-kib" => {
                options.write_kib = value()?.parse().map_err(|_| "--write-kib: a number")?
            }
            "--runs" => options.runs = value()?.parse().map_err(|_| "--runs: a number")?,
            "--connections" => {
                options.connections = value()?.parse().map_err(|_| "--connections: a number")?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

fn backend(name: &str) -> Result<VsockBackend, String> {
    match name {
        "cloister" => find_cloister_vmm()
            .map(|binary| VsockBackend::Cloister { binary })
            .ok_or_else(|| {
                "cloister-vmm not found (cargo build -p cloister-vmm, or set CLOISTER_VMM)"
                    .to_string()
            }),
        _ => find_vhost_device_vsock()
            .map(|binary| VsockBackend::Peer { binary })
            .ok_or_else(|| {
                "vhost-device-vsock not found (scripts/install-peer-tool.sh vhost-device-vsock)"
                    .to_string()
            }),
    }
}

/// One boot against `backend`; the figures, or why the run failed (with
/// the console and the back end's log).
fn probe_once(backend: &VsockBackend, plan: &ProbePlan) -> Result<ProbeFigures, String> {
    let report = run_vsock_probe(backend, plan).map_err(|e| e.to_string())?;
    match (&report.outcome, report.guest_passed()) {
        (Ok(figures), true) => Ok(figures.clone()),
        (Ok(_), false) => Err(format!("the guest did not pass:\n{}", report.transcript())),
        (Err(e), _) => Err(format!("{e}\n{}", report.transcript())),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("cloister-bench-vsock: {e}");
            return ExitCode::from(2);
        }
    };
    if !qemu_available(std::path::Path::new(QEMU_BINARY)) {
        eprintln!(
            "cloister-bench-vsock: {QEMU_BINARY} not found (apt-get install qemu-system-x86)"
        );
        return ExitCode::from(2);
    }
    let image = match GuestImage::locate_in(
        &cloister_guest_image::paths::kernel_dir(),
        &probe_initramfs(),
    ) {
        Ok(image) => image,
        Err(e) => {
            eprintln!("cloister-bench-vsock: {e} (--package cloister-vsock-probe)");
            return ExitCode::from(2);
        }
    };
    let mut plan = ProbePlan::new(&image.vmlinux, &image.initramfs);
    plan.bulk_mib = options.mib;
    plan.echo_rounds = options.rounds;
    plan.connections = options.connections;
    // vhost-device-vsock 0.3.0 rejects packets whose data spans several
    // descriptors, which Linux 6.12 sends for writes over 32 KiB.
    plan.write_chunk = options.write_kib * 1024;

    let mut backends = Vec::new();
    for name in &options.backends {
        match backend(name) {
            Ok(backend) => backends.push(backend),
            Err(e) => {
                eprintln!("cloister-bench-vsock: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut results: Vec<(&str, Vec<ProbeFigures>)> =
        backends.iter().map(|b| (b.name(), Vec::new())).collect();
    for run in 1..=options.runs.max(1) {
        for (backend, (_, figures)) in backends.iter().zip(results.iter_mut()) {
            eprintln!(
                "cloister-bench-vsock: run {run}/{}: the probe guest against {}",
                options.runs,
                backend.name()
            );
            match probe_once(backend, &plan) {
                Ok(f) => figures.push(f),
                Err(e) => {
                    eprintln!("cloister-bench-vsock: {}: {e}", backend.name());
                    return ExitCode::from(1);
                }
            }
        }
    }
    print_table(&options, &backends, &results);
    ExitCode::SUCCESS
}

/// A table row: label, the figure, which way is better.
type Row = (&'static str, fn(&ProbeFigures) -> f64, &'static str);

fn print_table(
    options: &Options,
    backends: &[VsockBackend],
    results: &[(&str, Vec<ProbeFigures>)],
) {
    println!("medians of {} runs", options.runs);
    for backend in backends {
        println!("  {:<20} {}", backend.name(), backend.binary().display());
    }
    println!(
        "  (scripts/bench-vsock.sh builds cloister-vmm with the optimised bench-opt profile; \
         cargo install builds vhost-device-vsock in release; a .../debug/cloister-vmm is unoptimised)"
    );
    println!(
        "vsock over vhost-user, QEMU/TCG microvm guest; {} MiB each way ({} KiB guest writes), {} round trips of 64 B, {} connections",
        options.mib, options.write_kib, options.rounds, options.connections
    );
    let rows: [Row; 5] = [
        (
            "host→guest MiB/s",
            |f| f.bulk.host_to_guest_mib_s(),
            "higher is better",
        ),
        (
            "guest→host MiB/s",
            |f| f.bulk.guest_to_host_mib_s(),
            "higher is better",
        ),
        (
            "echo RTT median µs",
            |f| f.latency.median().as_secs_f64() * 1e6,
            "lower is better",
        ),
        (
            "echo RTT p99 µs",
            |f| f.latency.p99().as_secs_f64() * 1e6,
            "lower is better",
        ),
        (
            "concurrent echo ms",
            |f| f.concurrent_time.as_secs_f64() * 1e3,
            "lower is better",
        ),
    ];
    print!("{:<22}", "");
    for (name, _) in results {
        print!(" {name:>20}");
    }
    if results.len() == 2 {
        print!(" {:>14}", "ours / peer");
    }
    println!();
    for (label, value, better) in rows {
        print!("{label:<22}");
        let medians: Vec<f64> = results
            .iter()
            .map(|(_, runs)| median(runs.iter().map(value).collect()))
            .collect();
        for m in &medians {
            print!(" {m:>20.1}");
        }
        if let [ours, peer] = medians[..] {
            let ratio = ours / peer.max(1e-9);
            print!(" {ratio:>14.2}  ({better})");
        }
        println!();
    }
}
