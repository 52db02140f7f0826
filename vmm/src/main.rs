//! `cloister-vmm`: parse arguments, build the VM, run it, exit with its
//! outcome (0 when the guest reset or powered off cleanly).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cloister_vmm::builder::{run_vm, VmSpec};
use cloister_vmm::config::{
    BlockConfig, ConsoleConfig, FsConfig, NetConfig, SerialOutput, VirtioConsoleOutput, VmConfig,
    VsockConfig,
};
use cloister_vmm::cpuid::CpuTemplate;
use cloister_vmm::devices::log_file::{BoundedLog, GUEST_LOG_FILE_LIMIT};
use cloister_vmm::exit::VmExit;
use cloister_vmm::jail::config::JailArgs;
use cloister_vmm::jail::seccomp::{DeviceKinds, TeeThreads, ThreadFilters};
use cloister_vmm::jail::{Entered, JailPlan, NO_JAIL_WARNING};
use cloister_vmm::signals::block_termination_signals;
use cloister_vmm::tee::{self, config::TeeConfig, TeeKind};

/// Runs one KVM microVM.
#[derive(Debug, Parser)]
#[command(name = "cloister-vmm", version)]
struct Args {
    /// Guest kernel: vmlinux (PVH entry) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs (1-32).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long = "memory")]
    memory_mib: Option<u32>,
    /// Where the serial console goes: stdout, none or file:PATH.
    #[arg(long)]
    serial: Option<SerialOutput>,
    /// CPU template (host, nested-pvm); chosen for the host when absent.
    #[arg(long)]
    cpu_template: Option<CpuTemplate>,
    /// Back guest memory with hugepages.
    #[arg(long)]
    hugepages: bool,
    /// Add a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// Add a virtio-vsock device: guest_cid=CID,uds_path=PATH.
    #[arg(long)]
    vsock: Option<VsockConfig>,
    /// Add a virtio-blk disk: path=IMAGE[,read_only=true][,serial=ID];
    /// repeat for more disks (replaces the config file's list).
    #[arg(long)]
    block: Vec<BlockConfig>,
    /// Share a host directory over virtio-fs:
    /// tag=TAG,path=DIR[,readonly][,cache=none|auto|always][,queues=N];
    /// repeat for more shares (replaces the config file's list).
    #[arg(long)]
    fs: Vec<FsConfig>,
    /// Add a virtio-net NIC on a tap: tap=NAME or fd=N (an inherited tap
    /// fd), optionally ,mac=02:xx:xx:xx:xx:xx; repeat for more NICs
    /// (replaces the config file's list).
    #[arg(long)]
    net: Vec<NetConfig>,
    /// Add a virtio console (hvc0) writing to stdout, none or file:PATH.
    #[arg(long)]
    console: Option<VirtioConsoleOutput>,
    /// JSON config with the same fields; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the VMM's and each device's counters as JSON on stderr when
    /// the VM ends.
    #[arg(long)]
    print_metrics: bool,
    /// Also print them every SECONDS while the VM runs.
    #[arg(long, value_name = "SECONDS")]
    metrics_interval: Option<u64>,
    /// Launch as a confidential guest: snp or tdx (or "tee" in the config).
    #[arg(long)]
    tee: Option<TeeKind>,
    /// SEV-SNP guest policy, hex (default 0x30000).
    #[arg(long, value_name = "HEX")]
    tee_policy: Option<String>,
    /// Init-data TOML whose digest goes into HOST_DATA (SNP) or
    /// MRCONFIGID (TDX).
    #[arg(long, value_name = "FILE")]
    init_data: Option<PathBuf>,
    /// Print the SNP launch digest / TDX MRTD (hex, 48 bytes) this config
    /// measures to, and exit; needs no KVM.
    #[arg(long)]
    print_launch_digest: bool,
    #[command(flatten)]
    jail: JailArgs,
}

/// What main does besides building the VM.
struct RunOptions {
    print_metrics: bool,
    metrics_interval: Option<Duration>,
    print_launch_digest: bool,
}

impl Args {
    fn into_config(self) -> anyhow::Result<(VmConfig, RunOptions)> {
        let mut cfg = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_file(path)?,
            (None, Some(kernel)) => VmConfig::new(kernel),
            (None, None) => return Err(cloister_vmm::config::ConfigError::NoKernel.into()),
        };
        if let Some(kernel) = self.kernel {
            cfg.kernel = kernel;
        }
        if let Some(initrd) = self.initrd {
            cfg.initrd = Some(initrd);
        }
        if let Some(cmdline) = self.cmdline {
            cfg.cmdline = cmdline;
        }
        if let Some(vcpus) = self.vcpus {
            cfg.vcpus = vcpus;
        }
        if let Some(memory) = self.memory_mib {
            cfg.memory_mib = memory;
        }
        if let Some(serial) = self.serial {
            cfg.serial = serial;
        }
        if let Some(template) = self.cpu_template {
            cfg.cpu_template = Some(template);
        }
        cfg.hugepages |= self.hugepages;
        cfg.rng |= self.rng;
        if let Some(vsock) = self.vsock {
            cfg.vsock = Some(vsock);
        }
        if !self.block.is_empty() {
            cfg.block = self.block;
        }
        if !self.fs.is_empty() {
            cfg.fs = self.fs;
        }
        if !self.net.is_empty() {
            cfg.net = self.net;
        }
        if let Some(output) = self.console {
            cfg.console = Some(ConsoleConfig { output });
        }
        if let Some(kind) = self.tee {
            if cfg.tee.as_ref().map(TeeConfig::kind) != Some(kind) {
                cfg.tee = Some(TeeConfig::of_kind(kind));
            }
        }
        if let Some(policy) = self.tee_policy {
            let tee = cfg.tee.as_mut().context("--tee-policy needs --tee snp")?;
            tee.set_policy(policy)?;
        }
        if let Some(path) = &self.init_data {
            let tee = cfg
                .tee
                .as_mut()
                .context("--init-data needs --tee snp|tdx")?;
            tee.bind_init_data(path)?;
        }
        if self.print_launch_digest && cfg.tee.is_none() {
            anyhow::bail!("--print-launch-digest needs --tee snp|tdx (or \"tee\" in the config)");
        }
        if let Some(jail) = self.jail.jail()? {
            cfg.jail = Some(jail);
        }
        if self.jail.no_jail {
            eprintln!("{NO_JAIL_WARNING}");
            cfg.jail = None;
        }
        cfg.validate()?;
        if cfg.tee.is_some() {
            // What the confidential boot cannot do (TDX with vcpus > 1 or
            // any device, SNP with more devices than the 8259 has lines),
            // named before anything is measured or launched.
            tee::run::tee_spec_for_vm(&cfg)?;
        }
        if self.metrics_interval == Some(0) {
            anyhow::bail!("metrics_interval = 0: must be at least 1 second");
        }
        Ok((
            cfg,
            RunOptions {
                print_metrics: self.print_metrics,
                metrics_interval: self.metrics_interval.map(Duration::from_secs),
                print_launch_digest: self.print_launch_digest,
            },
        ))
    }
}

fn serial_writer(serial: &SerialOutput) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        // The guest decides how much it prints: bounded, so it cannot fill
        // the host's disk.
        SerialOutput::File(path) => Box::new(BoundedLog::new(
            File::create(path).with_context(|| format!("serial = file:{}", path.display()))?,
            GUEST_LOG_FILE_LIMIT,
        )),
    })
}

fn device_kinds(cfg: &VmConfig) -> DeviceKinds {
    DeviceKinds {
        vsock: cfg.vsock.is_some(),
        block: !cfg.block.is_empty(),
        fs: !cfg.fs.is_empty(),
        net: !cfg.net.is_empty(),
        rng: cfg.rng,
        console: cfg.console.is_some(),
    }
}

/// What the vCPU threads of `cfg`'s VM do besides a plain VM's.
fn tee_threads(cfg: &VmConfig) -> TeeThreads {
    match &cfg.tee {
        None => TeeThreads::None,
        Some(TeeConfig::Tdx(tdx)) if tdx.quote_service.is_some() => {
            TeeThreads::ConfidentialWithQuoteService
        }
        Some(_) => TeeThreads::Confidential,
    }
}

/// Enters the jail `cfg` asks for, rewriting its paths; `Some(code)` in
/// the supervisor once the jailed VMM ended.
fn enter_jail(cfg: &mut VmConfig) -> anyhow::Result<Option<ExitCode>> {
    let Some(jail) = cfg.jail.clone() else {
        return Ok(None);
    };
    // /sys stays outside the jail: the answer is kept for the builder.
    cloister_vmm::vstate::kvm::HostKvmKind::detect();
    let plan = JailPlan::for_vm(cfg)?;
    // Built with the VMM, installed by each thread later.
    let filters = ThreadFilters::for_tee_vm(device_kinds(cfg), tee_threads(cfg));
    let inherited: Vec<i32> = cfg.net.iter().filter_map(|nic| nic.fd).collect();
    let nics = &mut cfg.net;
    match cloister_vmm::jail::enter(&jail, &plan, &inherited, || {
        cloister_vmm::jail::taps::open_named_taps(nics)
    })? {
        Entered::Supervisor(code) => Ok(Some(code)),
        Entered::Jailed => {
            filters.enable()?;
            tracing::info!(
                "jailed in {} as {}:{}",
                jail.root.display(),
                jail.uid,
                jail.gid
            );
            #[cfg(feature = "jail-selftest")]
            cloister_vmm::jail::selftest::run_from_env()?;
            Ok(None)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let (mut cfg, options) = Args::parse().into_config()?;
    if options.print_launch_digest {
        println!("{}", hex::encode(tee::run::launch_digest(&cfg)?));
        return Ok(ExitCode::SUCCESS);
    }
    if cfg.tee.is_some() {
        // The host first (it reads /sys, which the jail does not have):
        // the same message jailed or not, before anything is created.
        tee::run::check_before_launch(&cfg)?;
        // Opened before the jail: its folder stays outside.
        let serial = serial_writer(&cfg.serial)?;
        if let Some(code) = enter_jail(&mut cfg)? {
            return Ok(code);
        }
        // Again from the config as the jail rewrote it (paths moved).
        let spec = tee::run::tee_spec_for_vm(&cfg)?;
        let launched = tee::run::launch_checked(&cfg, spec)?;
        // Watched, not left to the default action: a jailed VMM is its PID
        // namespace's init, which the kernel does not kill for a signal it
        // has no handler for. Blocked before any thread starts.
        block_termination_signals().context("cannot block SIGTERM/SIGINT/SIGHUP")?;
        let exit = tee::run::run_launched(
            launched,
            &cfg.devices(),
            serial,
            start,
            tee::run::RunOptions {
                stop_on_termination_signals: true,
            },
        )?;
        let _ = std::io::stdout().flush();
        eprintln!("cloister-vmm: confidential guest ended: {exit}");
        return Ok(exit_code(&exit));
    }
    // Opened before the jail: its folder stays outside.
    let serial = serial_writer(&cfg.serial)?;
    if let Some(code) = enter_jail(&mut cfg)? {
        return Ok(code);
    }
    let spec = VmSpec {
        metrics_interval: options.metrics_interval,
        stop_on_termination_signals: true,
        ..VmSpec::from(&cfg)
    };
    // Before any thread starts, so all of them inherit the mask.
    block_termination_signals().context("cannot block SIGTERM/SIGINT/SIGHUP")?;
    let run = run_vm(&spec, serial, start)?;
    let _ = std::io::stdout().flush();
    tracing::info!(
        "VM ended after {} ms: {} (CPU template {})",
        start.elapsed().as_millis(),
        run.exit,
        run.cpu_template
    );
    if options.print_metrics {
        eprintln!("{}", run.metrics_json());
    }
    if !run.exit.is_clean() {
        eprintln!("cloister-vmm: {}", run.exit);
    }
    Ok(exit_code(&run.exit))
}

fn exit_code(exit: &VmExit) -> ExitCode {
    match exit {
        _ if exit.is_clean() => ExitCode::SUCCESS,
        // As a shell reports a process killed by the signal.
        VmExit::Terminated { signal } => ExitCode::from(128 + (signal & 0x7f) as u8),
        _ => ExitCode::from(1),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOISTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Both modes serve virtio-fs (a descriptor per inode the guest holds)
    // and vsock (a socket per connection). A jail sets its own limit.
    match cloister_vmm::limits::raise_open_file_limit() {
        Ok(limit) => tracing::debug!("open file limit {limit}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
    // `cloister-vmm vhost-user …` serves one device to QEMU instead.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "vhost-user")
    {
        return cloister_vmm::vhost_user::cli::main(std::env::args_os().skip(1));
    }
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cloister-vmm: {e:#}");
            ExitCode::from(2)
        }
    }
}
