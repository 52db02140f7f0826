//! `cloister-bench-net`: the same busybox guest (QEMU/TCG `-M microvm`) on
//! a tap, once with our virtio-net (`cloister-vmm vhost-user --device
//! net`) and once with QEMU's own virtio-net on the tap (`vhost=off`),
//! alternating, in one run; prints guest→host TCP throughput (the host
//! times the first to the last byte of N MiB) and ping round trips, with
//! the ratio ours / QEMU's.
//!
//! Usage: cloister-bench-net [--mib N] [--runs N]
//! Each figure is the median of the runs. A benchmark, not a test: nothing
//! fails on a time. Under TCG the guest's CPU is emulated and is the
//! bottleneck for both; the ratio on the same guest is the point.

use std::process::ExitCode;
use std::time::Duration;

use cloister_e2e::net_guest::{
    run_in_fresh_netns, GuestSends, NetGuestFixture, NetGuestPlan, NicBackend,
};

struct Options {
    mib: u32,
    runs: usize,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options { mib: 64, runs: 3 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        let number = |v: &str| v.parse::<u32>().map_err(|e| format!("{arg} {v}: {e}"));
        match arg.as_str() {
            "--mib" => options.mib = number(&value)?.max(1),
            "--runs" => options.runs = number(&value)?.max(1) as usize,
            other => return Err(format!("unknown argument {other} (--mib N, --runs N)")),
        }
    }
    Ok(options)
}

/// Throughput (MiB/s) and the ping line of one run.
fn one_run(
    fixture: &NetGuestFixture,
    backend: &NicBackend,
    mib: u32,
) -> Result<(f64, String), String> {
    let plan = NetGuestPlan {
        backend: backend.clone(),
        pings: 5,
        guest_sends: GuestSends::ZeroMib(mib),
        host_answer: b"ok\n".to_vec(),
        mergeable_rx: true,
    };
    let outcome = run_in_fresh_netns(fixture, &plan)?;
    let tcp = outcome
        .tcp
        .as_ref()
        .map_err(|e| format!("{}: {e}\n{}", backend.name(), outcome.context()))?;
    let seconds = tcp.receive_time.max(Duration::from_micros(1)).as_secs_f64();
    let rtt = outcome
        .guest_lines()
        .iter()
        .find(|l| l.contains("round-trip"))
        .map(|l| l.trim_start_matches("ping: ").to_string())
        .unwrap_or_default();
    Ok((f64::from(mib) / seconds, rtt))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("cloister-bench-net: {e}");
            return ExitCode::from(2);
        }
    };
    let found = NetGuestFixture::locate()
        .and_then(|fixture| NetGuestFixture::cloister_backend().map(|ours| (fixture, ours)));
    let (fixture, ours) = match found {
        Ok(found) => found,
        Err(e) => {
            eprintln!("cloister-bench-net: cannot run: {e}");
            return ExitCode::from(2);
        }
    };
    let backends = [ours, NicBackend::QemuTap];
    let mut throughput: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut rtts: [String; 2] = [String::new(), String::new()];
    for run in 0..options.runs {
        for (i, backend) in backends.iter().enumerate() {
            match one_run(&fixture, backend, options.mib) {
                Ok((mib_s, rtt)) => {
                    eprintln!(
                        "run {}: {}: {mib_s:.1} MiB/s; {rtt}",
                        run + 1,
                        backend.name()
                    );
                    throughput[i].push(mib_s);
                    rtts[i] = rtt;
                }
                Err(e) => {
                    eprintln!("cloister-bench-net: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let [ours_runs, qemu_runs] = throughput;
    let (ours_mib_s, qemu_mib_s) = (median(ours_runs), median(qemu_runs));
    println!(
        "guest→host TCP, {} MiB, median of {} runs (QEMU/TCG guest):",
        options.mib, options.runs
    );
    for (i, (backend, mib_s)) in backends.iter().zip([ours_mib_s, qemu_mib_s]).enumerate() {
        println!(
            "  {:<36} {mib_s:8.1} MiB/s   ping {}",
            backend.name(),
            rtts[i]
        );
    }
    println!("  ratio ours / QEMU's: {:.2}", ours_mib_s / qemu_mib_s);
    ExitCode::SUCCESS
}
