//! `cloister-kbs`: a small self-hosted key broker speaking Trustee's KBS
//! protocol 0.4.0. See attestation/README.md.

use anyhow::{bail, Context as _};
use clap::Parser;
use cloister_attestation::initdata::InitData;
use cloister_attestation::kbs::audit::AuditLog;
use cloister_attestation::kbs::config::KbsPolicy;
use cloister_attestation::kbs::server::{KbsServer, KbsSettings};
use cloister_attestation::kbs::store::ResourceStore;
use cloister_attestation::kbs::tls;
use cloister_attestation::measure::kernel_hashes::KernelHashes;
use cloister_attestation::measure::ovmf::Ovmf;
use cloister_attestation::measure::vmsa::qemu_cpu_signature;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Key broker for cloister confidential pods (KBS protocol 0.4.0)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// Reference-value tools instead of serving.
    #[command(subcommand)]
    tool: Option<Tool>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Reference values and resource policy (TOML).
    #[arg(long, required = true)]
    policy: Option<PathBuf>,
    /// Directory of resources: <dir>/<repo>/<type>/<tag>.
    #[arg(long, required = true)]
    resources: Option<PathBuf>,
    /// Append audit lines (JSON) here instead of stdout.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Lifetime of an attested session and its token, in seconds.
    #[arg(long, default_value_t = 300)]
    session_ttl_secs: u64,
    /// Accept the `sample` TEE, which proves nothing. Tests only.
    #[arg(long)]
    insecure_allow_sample_tee: bool,
    /// Allow plain HTTP (no --tls-cert) on a non-loopback address.
    #[arg(long)]
    insecure_http: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Print the SEV-SNP launch measurement of a QEMU launch of OVMF (the
    /// value for `reference.snp.measurements`).
    SnpMeasurement {
        /// OVMF image (e.g. /usr/share/OVMF/OVMF_CODE.fd).
        #[arg(long)]
        ovmf: PathBuf,
        /// Number of vCPUs.
        #[arg(long)]
        vcpus: u32,
        /// QEMU CPU model (EPYC-v4, EPYC-Milan, EPYC-Genoa, ...).
        #[arg(long, default_value = "EPYC-v4")]
        vcpu_type: String,
        /// SEV_FEATURES of the guest, hex.
        #[arg(long, default_value = "0x1")]
        guest_features: String,
        /// Directly booted kernel (needs an OVMF with SNP_KERNEL_HASHES).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd for --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Command line for --kernel.
        #[arg(long, requires = "kernel")]
        append: Option<String>,
    },
    /// Print an init-data file's digest and the SNP HOST_DATA and TDX
    /// MRCONFIGID values that bind it.
    InitDataDigest {
        /// The init-data TOML file.
        file: PathBuf,
    },
}

fn run_tool(tool: Tool) -> anyhow::Result<()> {
    match tool {
        Tool::SnpMeasurement {
            ovmf,
            vcpus,
            vcpu_type,
            guest_features,
            kernel,
            initrd,
            append,
        } => {
            let signature = qemu_cpu_signature(&vcpu_type)
                .with_context(|| format!("unknown vcpu type {vcpu_type:?}"))?;
            let features = u64::from_str_radix(guest_features.trim_start_matches("0x"), 16)
                .with_context(|| format!("guest features {guest_features:?} are not hex"))?;
            let image =
                std::fs::read(&ovmf).with_context(|| format!("reading ovmf {}", ovmf.display()))?;
            let ovmf = Ovmf::parse(image).context("parsing ovmf")?;
            let hashes = match &kernel {
                Some(k) => {
                    let kernel = std::fs::read(k)
                        .with_context(|| format!("reading kernel {}", k.display()))?;
                    let initrd = match &initrd {
                        Some(i) => Some(
                            std::fs::read(i)
                                .with_context(|| format!("reading initrd {}", i.display()))?,
                        ),
                        None => None,
                    };
                    Some(KernelHashes::new(
                        &kernel,
                        initrd.as_deref(),
                        append.as_deref(),
                    ))
                }
                None => None,
            };
            let digest = ovmf.snp_launch_digest(vcpus, signature, features, hashes.as_ref())?;
            println!("{}", hex::encode(digest));
        }
        Tool::InitDataDigest { file } => {
            let raw =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let init = InitData::parse(&raw)?;
            println!("digest {}", hex::encode(init.digest()));
            println!("snp_host_data {}", hex::encode(init.snp_host_data()));
            println!("tdx_mr_config_id {}", hex::encode(init.tdx_mr_config_id()));
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(tool) = args.tool {
        return run_tool(tool);
    }
    let (Some(policy_path), Some(resources)) = (args.policy, args.resources) else {
        bail!("--policy and --resources are required to serve");
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(tls::server_config(cert, key).context("loading the tls certificate and key")?)
        }
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() && !args.insecure_http {
        bail!(
            "refusing plain http on non-loopback address {}: put a TLS proxy in front and pass --insecure-http",
            args.listen
        );
    }
    let text = std::fs::read_to_string(&policy_path)
        .with_context(|| format!("reading policy file {}", policy_path.display()))?;
    let policy = KbsPolicy::parse(&text)
        .with_context(|| format!("in policy file {}", policy_path.display()))?;
    let audit = match &args.audit_log {
        Some(path) => AuditLog::to_file(path)
            .with_context(|| format!("opening audit log {}", path.display()))?,
        None => AuditLog::to_stdout(),
    };
    if args.insecure_allow_sample_tee {
        tracing::warn!("the sample tee is accepted: this kbs releases secrets without attestation");
    }
    let server = KbsServer::new(KbsSettings {
        policy,
        store: ResourceStore::new(&resources),
        allow_sample: args.insecure_allow_sample_tee,
        session_ttl: Duration::from_secs(args.session_ttl_secs),
        audit,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    // Tests and scripts read the bound address (port 0 picks a free one).
    match tls {
        Some(config) => {
            eprintln!("cloister-kbs listening on https://{local}");
            let listener = tls::TlsListener::new(listener, config)?;
            server.serve_tls(listener).await.context("serving")?;
        }
        None => {
            eprintln!("cloister-kbs listening on http://{local}");
            server.serve(listener).await.context("serving")?;
        }
    }
    Ok(())
}
