//! `cloister-agent`: PID 1 of the guest, or a host test server with
//! `--listen unix:PATH`. Also re-executed as `__container-init` to become
//! a container's init helper.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use cloister_agent::container::manager::{ContainerManager, ManagerConfig};
use cloister_agent::policy::AgentPolicy;
use cloister_agent::process::{Reaper, HELPER_ARG};
use cloister_agent::server::AgentServer;
use cloister_protocol::ports::{AGENT_VSOCK_PORT, STDIO_VSOCK_PORT};

enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

struct Args {
    listen: Listen,
    stdio_listen: Listen,
    log_level: tracing::Level,
    cgroup_root: Option<PathBuf>,
}

fn parse_listen(value: &str) -> anyhow::Result<Listen> {
    if let Some(path) = value.strip_prefix("unix:") {
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = value.strip_prefix("vsock://") {
        let port = rest.rsplit(':').next().unwrap_or_default();
        return Ok(Listen::Vsock(
            port.parse()
                .with_context(|| format!("vsock port in {value:?}"))?,
        ));
    }
    bail!("listen address {value:?} must be unix:PATH or vsock://-1:PORT")
}

fn parse_args(is_pid1: bool) -> anyhow::Result<Args> {
    let mut listen = None;
    let mut stdio_listen = None;
    let mut log_level = tracing::Level::INFO;
    let mut cgroup_root = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(parse_listen(&value("--listen")?)?),
            "--stdio-listen" => stdio_listen = Some(parse_listen(&value("--stdio-listen")?)?),
            "--log-level" => log_level = value("--log-level")?.parse().context("--log-level")?,
            "--cgroup-root" => cgroup_root = Some(PathBuf::from(value("--cgroup-root")?)),
            // The kernel passes unknown command line words to init.
            _ if is_pid1 => {}
            other => bail!("unknown argument {other:?} (expected --listen, --stdio-listen, --log-level, --cgroup-root)"),
        }
    }
    let listen = listen.unwrap_or(Listen::Vsock(AGENT_VSOCK_PORT));
    let stdio_listen = match (stdio_listen, &listen) {
        (Some(s), _) => s,
        (None, Listen::Unix(path)) => {
            Listen::Unix(PathBuf::from(format!("{}.stdio", path.display())))
        }
        (None, Listen::Vsock(_)) => Listen::Vsock(STDIO_VSOCK_PORT),
    };
    Ok(Args {
        listen,
        stdio_listen,
        log_level,
        cgroup_root,
    })
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(HELPER_ARG) {
        let code = cloister_agent::container::helper::run();
        #[allow(clippy::exit)]
        std::process::exit(code);
    }
    let is_pid1 = std::process::id() == 1;
    let result = run(is_pid1);
    if let Err(err) = result {
        eprintln!("cloister-agent: fatal: {err:#}");
        if is_pid1 {
            cloister_agent::init::power_off();
        }
        #[allow(clippy::exit)]
        std::process::exit(1);
    }
    if is_pid1 {
        cloister_agent::init::power_off();
    }
}

fn run(is_pid1: bool) -> anyhow::Result<()> {
    let args = parse_args(is_pid1)?;
    let mut log_level = args.log_level;
    if is_pid1 {
        // Not fatal: containers then use the MS_MOVE + chroot fallback.
        if let Err(e) = cloister_agent::init::leave_initramfs_root() {
            eprintln!("cloister-agent: staying on the initramfs root: {e}");
        }
        cloister_agent::init::early_mounts().context("early mounts")?;
        // The kernel keeps dotted parameters from init: read them here.
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Some(level) = cloister_agent::init::log_level_from_cmdline(&cmdline) {
            log_level = level;
        }
        cloister_agent::init::protect_from_oom_killer();
    }
    // In the guest stderr is the console.
    tracing_subscriber::fmt()
        .with_max_level(log_level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
    if is_pid1 {
        if let Some(bits) = cloister_agent::init::entropy_available() {
            if bits < 256 {
                tracing::warn!(bits, "low entropy: is a virtio-rng device attached?");
            }
        }
    } else {
        // Orphans of container processes come back to us, as to PID 1.
        // SAFETY: prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            bail!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let cgroup_root = match args.cgroup_root {
        Some(root) => Some(root),
        None => cloister_agent::cgroups::detect_root(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(serve(args.listen, args.stdio_listen, cgroup_root, is_pid1))
}

async fn serve(
    listen: Listen,
    stdio_listen: Listen,
    cgroup_root: Option<PathBuf>,
    is_pid1: bool,
) -> anyhow::Result<()> {
    let reaper = Arc::new(Reaper::default());
    tokio::spawn(reaper.clone().run());
    tracing::info!(cgroup_root = ?cgroup_root, "cloister-agent {} starting", env!("CARGO_PKG_VERSION"));
    let manager = ContainerManager::new(
        ManagerConfig {
            cgroup_root,
            run_dir: PathBuf::from("/run/cloister"),
        },
        reaper,
    );
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let policy = Arc::new(AgentPolicy::built_in().context("built-in agent policy")?);
    let confidential = if is_pid1 {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        // init-data's policy.rego replaces the built-in policy and locks
        // it, before SetupSandbox answers.
        let installer: cloister_agent::attest::PolicyInstaller = {
            let policy = policy.clone();
            Arc::new(move |rego: &str| {
                policy
                    .install_from_init_data(rego)
                    .map_err(|e| e.to_string())
            })
        };
        cloister_agent::attest::ConfidentialGuest::from_cmdline(&cmdline, Some(installer))
            .context("confidential guest parameters")?
            .map(Arc::new)
    } else {
        None
    };
    if let Some(guest) = &confidential {
        tracing::info!(
            tee = guest.tee().name(),
            "confidential guest: containers wait for attestation"
        );
    }
    let service = Arc::new(AgentServer {
        manager: manager.clone(),
        is_guest_init: is_pid1,
        shutdown: shutdown.clone(),
        policy: policy.clone(),
        confidential,
    });

    match stdio_listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("bind stdio socket {}", path.display()))?;
            tokio::spawn(cloister_agent::stdio_listener::serve_unix(
                manager.clone(),
                policy.clone(),
                listener,
            ));
        }
        Listen::Vsock(port) => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                libc::VMADDR_CID_ANY,
                port,
            ))
            .with_context(|| format!("bind stdio vsock port {port}"))?;
            tokio::spawn(cloister_agent::stdio_listener::serve_vsock(
                manager.clone(),
                policy.clone(),
                listener,
            ));
        }
    }

    let address = match &listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            format!("unix://{}", path.display())
        }
        Listen::Vsock(port) => format!("vsock://-1:{port}"),
    };
    let mut server = ttrpc::r#async::Server::new()
        .bind(&address)
        .with_context(|| format!("bind {address}"))?
        .register_service(cloister_protocol::agent_ttrpc::create_agent_service(
            service,
        ));
    server
        .start()
        .await
        .with_context(|| format!("start ttrpc server on {address}"))?;
    tracing::info!(%address, "serving");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = shutdown.notified() => tracing::info!("shutdown requested"),
        _ = sigterm.recv() => tracing::info!("SIGTERM"),
    }
    let _ = server.shutdown().await;
    Ok(())
}
