//! `cloister`: the host CLI. `cloister check` tells whether this host can
//! run a pod, one line per check with the fix for each problem, and exits
//! non-zero when a pod could not start. `cloister inspect SPEC.json` prints
//! the least-privilege findings for a container's OCI spec: exit 0 without
//! high findings, 1 with, 2 when the file cannot be inspected.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cloister", version, about = "cloister host tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run cloister pods.
    Check,
    /// Report where a container's OCI runtime spec (config.json) asks for
    /// more privilege than the baseline.
    Inspect {
        /// The OCI runtime spec, as containerd writes it.
        spec: std::path::PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check => {
            let checks = cloister_shim::check::run_checks();
            for check in &checks {
                println!("{check}");
            }
            if cloister_shim::check::pod_can_start(&checks) {
                println!("this host can run cloister pods");
                std::process::ExitCode::SUCCESS
            } else {
                println!("a pod could not start on this host: apply the fixes above");
                std::process::ExitCode::FAILURE
            }
        }
        Command::Inspect { spec, json } => inspect(&spec, json),
    }
}

/// Exit status 0: no high finding; 1: some; 2: the file cannot be inspected.
fn inspect(path: &std::path::Path, json: bool) -> std::process::ExitCode {
    use cloister_shim::inspect;
    let spec = match inspect::load_spec(path) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("cloister inspect: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let report = inspect::inspect_spec(&spec, &inspect::spec_annotations(&spec));
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("cloister inspect: cannot encode the report: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    } else if report.findings.is_empty() {
        println!(
            "no findings: {} asks for no more than the baseline",
            path.display()
        );
    } else {
        print!("{report}");
        println!(
            "{} findings, {} high",
            report.findings.len(),
            report.high_count()
        );
    }
    if report.high_count() == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
