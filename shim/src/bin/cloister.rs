//! `cloister`: the host CLI. `cloister check` tells whether this host can
//! run a pod, one line per check with the fix for each problem, and exits
//! non-zero when a pod could not start. `cloister inspect SPEC.json` prints
//! the least-privilege findings for a container's OCI spec: exit 0 without
//! high findings, 1 with, 2 when the file cannot be inspected.
//! `cloister audit` prints the audit trail's records that match its
//! filters (exit 0; 2 when the file or a flag cannot be read; malformed
//! lines are reported on stderr with their number and skipped).
//! `cloister measure --config FILE` prints the launch digest and HOST_DATA
//! / MRCONFIGID of an SNP/TDX runtime class's pods, for the KBS (exit 0;
//! 2 when the pod cannot be planned or measured).

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
    /// Print audit records (task API calls, agent requests, security
    /// events) from the audit file, filtered.
    Audit(AuditArgs),
    /// Agent API policies (Rego, evaluated by the guest agent).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print the reference values of an SNP/TDX runtime class's pod: the
    /// launch digest (SNP MEASUREMENT / TDX MRTD) of the VM the shim would
    /// launch, and HOST_DATA / MRCONFIGID (the init-data digest).
    Measure(MeasureArgs),
}

#[derive(clap::Args)]
struct MeasureArgs {
    /// The runtime class's config (its containerd ConfigPath).
    #[arg(long)]
    config: std::path::PathBuf,
    /// The pod's init-data file, instead of [confidential] init_data.
    #[arg(long, conflicts_with = "annotation")]
    init_data: Option<std::path::PathBuf>,
    /// The pod's io.cloister.init-data annotation (base64 of TOML or gzip'd TOML).
    #[arg(long)]
    annotation: Option<String>,
    /// Another pod annotation that sizes the VM, KEY=VALUE (e.g.
    /// io.kubernetes.cri.sandbox-memory=1073741824); repeatable.
    #[arg(long = "pod-annotation", value_name = "KEY=VALUE")]
    pod_annotations: Vec<String>,
    /// The pod's network interfaces (each is a measured virtio device):
    /// 1 under Kubernetes, 0 for `ctr run` without CNI.
    #[arg(long, default_value_t = 1)]
    nics: u32,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print a policy allowing exactly what a pod's manifest describes.
    /// Each FILE is a Kubernetes manifest (Pod, Deployment, …; YAML or
    /// JSON) or an OCI config.json (recognised by its `ociVersion`).
    Generate {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        /// A command `exec` may run, as words or a JSON array; repeatable.
        /// Without any, exec is refused.
        #[arg(long = "exec", value_name = "COMMAND")]
        exec: Vec<String>,
        /// A user exec may run as in any container, besides the
        /// container's own; the gid defaults to the uid; repeatable.
        #[arg(long = "exec-user", value_name = "UID[:GID]")]
        exec_user: Vec<cloister_shim::policy_gen::data::ExecUser>,
        /// Another environment variable name the containers (and exec)
        /// may have, e.g. the image's own: a regular expression the whole
        /// name must match (`LANG|LC_.*`); repeatable.
        #[arg(long = "allow-env", value_name = "REGEX")]
        allow_env: Vec<String>,
        /// Refuse the host reading stdout/stderr.
        #[arg(long)]
        deny_stdio_read: bool,
        /// Refuse the host writing stdin.
        #[arg(long)]
        deny_stdin: bool,
        /// Print base64, the value of the io.cloister.policy annotation.
        #[arg(long)]
        base64: bool,
        /// The pod sandbox (pause) container's command, as words or a JSON
        /// array: containerd's sandbox_image decides it.
        #[arg(long, value_name = "COMMAND", default_value = "/pause")]
        pause_command: String,
    },
}

#[derive(clap::Args)]
struct AuditArgs {
    /// The audit file (default: `[audit] path` of the runtime config
    /// `CLOISTER_CONFIG` or /etc/cloister/config.toml names).
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Only this pod (its sandbox container's id).
    #[arg(long)]
    pod: Option<String>,
    /// Only this container.
    #[arg(long)]
    container: Option<String>,
    /// Only this operation (Create, ExecProcess, guest-panic, …; any case).
    #[arg(long)]
    operation: Option<String>,
    /// allowed, denied or failed.
    #[arg(long)]
    decision: Option<String>,
    /// task, agent or security.
    #[arg(long)]
    kind: Option<String>,
    /// From this time on: RFC 3339 (2026-11-24T04:30:00Z) or back from now (10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Up to this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Print the records as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
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
        Command::Audit(args) => audit(&args),
        Command::Measure(args) => measure(args),
        Command::Policy {
            command:
                PolicyCommand::Generate {
                    files,
                    exec,
                    exec_user,
                    allow_env,
                    deny_stdio_read,
                    deny_stdin,
                    base64,
                    pause_command,
                },
        } => {
            let options = cloister_shim::policy_gen::GenerateOptions {
                exec_commands: exec
                    .iter()
                    .map(|c| cloister_shim::policy_gen::parse_exec_command(c))
                    .collect(),
                exec_users: exec_user,
                allow_env,
                allow_stdio_read: !deny_stdio_read,
                allow_stdin: !deny_stdin,
                pause_command: cloister_shim::policy_gen::parse_exec_command(&pause_command),
            };
            policy_generate(&files, &options, base64)
        }
    }
}

fn policy_generate(
    files: &[std::path::PathBuf],
    options: &cloister_shim::policy_gen::GenerateOptions,
    base64: bool,
) -> std::process::ExitCode {
    use cloister_shim::policy_gen;
    let mut sources = policy_gen::Sources::default();
    for path in files {
        match policy_gen::load_manifest(path) {
            Ok(doc) if doc.get("ociVersion").is_some() => sources.oci.push(doc),
            Ok(doc) => sources.kubernetes.push(doc),
            Err(e) => {
                eprintln!("cloister policy generate: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    match policy_gen::generate(&sources, options) {
        Ok(generated) => {
            for warning in &generated.warnings {
                eprintln!("warning: {warning}");
            }
            if base64 {
                println!("{}", generated.base64());
            } else {
                print!("{}", generated.rego);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cloister policy generate: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Exit status 0: records printed (maybe none); 2: the file or a flag
/// cannot be read.
fn audit(args: &AuditArgs) -> std::process::ExitCode {
    use cloister_shim::audit::filter::{select_file, table, AuditFilter, FilterArgs};
    let fail = |message: String| {
        eprintln!("cloister audit: {message}");
        std::process::ExitCode::from(2)
    };
    let flags = FilterArgs {
        pod: args.pod.as_deref(),
        container: args.container.as_deref(),
        operation: args.operation.as_deref(),
        decision: args.decision.as_deref(),
        kind: args.kind.as_deref(),
        since: args.since.as_deref(),
        until: args.until.as_deref(),
    };
    let filter = match AuditFilter::parse(&flags, std::time::SystemTime::now()) {
        Ok(filter) => filter,
        Err(e) => return fail(e.to_string()),
    };
    let path = match &args.file {
        Some(path) => path.clone(),
        None => match configured_audit_file() {
            Ok(path) => path,
            Err(e) => return fail(e),
        },
    };
    let selection = match select_file(&path, &filter) {
        Ok(selection) => selection,
        Err(e) => return fail(e.to_string()),
    };
    for bad in &selection.bad_lines {
        eprintln!(
            "cloister audit: {} line {}: not an audit record, skipped: {}",
            path.display(),
            bad.number,
            bad.error
        );
    }
    if args.json {
        for record in &selection.records {
            print!("{}", record.to_line());
        }
    } else {
        print!("{}", table(&selection.records));
    }
    std::process::ExitCode::SUCCESS
}

/// The audit file the runtime config names.
fn configured_audit_file() -> Result<std::path::PathBuf, String> {
    use cloister_shim::config::{ConfigSource, RuntimeConfig, CONFIG_ENV};
    let env = std::env::var(CONFIG_ENV).ok();
    let config = RuntimeConfig::load(&ConfigSource::resolve(None, env.as_deref()))
        .map_err(|e| format!("{e} (name the audit file with --file)"))?;
    Ok(config.audit.path)
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

fn measure(args: MeasureArgs) -> std::process::ExitCode {
    use cloister_shim::confidential::measure;
    let pod_annotations: Result<Vec<_>, _> = args
        .pod_annotations
        .iter()
        .map(|a| measure::parse_pod_annotation(a))
        .collect();
    let request = pod_annotations.map(|pod_annotations| measure::MeasureRequest {
        config: args.config,
        init_data: args.init_data,
        annotation: args.annotation,
        pod_annotations,
        nics: args.nics,
    });
    match request.and_then(|r| measure::measure(&r)) {
        Ok(measurement) => {
            println!("{measurement}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cloister measure: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
