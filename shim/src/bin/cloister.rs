//! `cloister`: the host CLI. `cloister check` tells whether this host can
//! run a pod, one line per check with the fix for each problem, and exits
//! non-zero when a pod could not start.

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
    }
}
