//! `cloister-kbs`: a small self-hosted key broker speaking Trustee's KBS
//! protocol 0.4.0. See attestation/README.md.

use anyhow::{bail, Context as _};
use clap::Parser;
use cloister_attestation::kbs::audit::AuditLog;
use cloister_attestation::kbs::config::KbsPolicy;
use cloister_attestation::kbs::server::{KbsServer, KbsSettings};
use cloister_attestation::kbs::store::ResourceStore;
use cloister_attestation::kbs::tls;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Key broker for cloister confidential pods (KBS protocol 0.4.0)"
)]
struct Args {
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
    #[arg(long)]
    policy: PathBuf,
    /// Directory of resources: <dir>/<repo>/<type>/<tag>.
    #[arg(long)]
    resources: PathBuf,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
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
    let text = std::fs::read_to_string(&args.policy)
        .with_context(|| format!("reading policy file {}", args.policy.display()))?;
    let policy = KbsPolicy::parse(&text)
        .with_context(|| format!("in policy file {}", args.policy.display()))?;
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
        store: ResourceStore::new(&args.resources),
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
