//! From a [`VmConfig`] with a `"tee"` section to a measured, launched VM:
//! the reference value (`--print-launch-digest`, no KVM needed) and the
//! launch on a capable host, both from the same page list.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

use super::boot_image::BootImageError;
use super::config::{TeeConfigError, TeeSpec};
use super::exits::ConfidentialExits;
use super::host::{check_host, kvm_vm_types, HostRoot, TeeHostError};
use super::kvm::KvmTeeVm;
use super::snp::direct_boot::{snp_direct_boot, SnpBootInputs, SnpDirectBoot};
use super::snp::launch::{launch_snp, SnpLaunchError, SnpLaunchParams};
use super::tdx::direct_boot::{tdx_direct_boot, TdxDirectBoot};
use super::tdx::launch::{launch_tdx, tdx_guest_memory, TdxLaunchError, TdxLaunchParams};
use super::tdx::quote::{QgsClient, QuoteService, QuoteServiceAddr};
use crate::boot::cmdline::{build_cmdline, virtio_mmio_device_arg, CmdlineError};
use crate::boot::layout::{VIRTIO_IRQ_FIRST, VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW};
use crate::config::VmConfig;
use crate::cpuid::{cpuid_for_vcpu, CpuTemplate};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use crate::devices::bus::Bus;
use crate::devices::i8042::{I8042Device, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::exit::{ExitSignal, VmExit};
use crate::metrics::VmmMetrics;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{install_kick_handler, stop_vcpus, Vcpu};

/// Why a confidential VM could not be measured or launched.
#[derive(Debug, thiserror::Error)]
pub enum TeeRunError {
    #[error("no \"tee\" section: pass --tee snp|tdx or set it in the config")]
    NoTee,
    #[error(transparent)]
    Config(#[from] TeeConfigError),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    BootImage(#[from] BootImageError),
    #[error("tee.cpu_signature (or tee.vcpu_type) is needed to compute the SNP launch digest without the host: it is in every VMSA")]
    NoCpuSignature,
    #[error(transparent)]
    Host(#[from] TeeHostError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot open /dev/sev: {0}")]
    Sev(std::io::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot map TD memory: {0}")]
    TdMemory(String),
    #[error(transparent)]
    Snp(#[from] SnpLaunchError),
    #[error(transparent)]
    Tdx(#[from] TdxLaunchError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot place device: {0}")]
    Bus(String),
}

/// The command line the guest sees, measured: the configured one plus the
/// `virtio_mmio.device=` argument of each device in slot order (the
/// builder attaches them the same way). No host-dependent arguments.
pub fn measured_cmdline(cfg: &VmConfig) -> Result<String, CmdlineError> {
    let count = u32::try_from(cfg.devices().count()).unwrap_or(u32::MAX);
    let args: Vec<String> = (0..count)
        .map(|slot| {
            virtio_mmio_device_arg(
                VIRTIO_MMIO_START + u64::from(slot) * VIRTIO_MMIO_WINDOW,
                VIRTIO_MMIO_WINDOW,
                VIRTIO_IRQ_FIRST + slot,
            )
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let cmdline = build_cmdline(&cfg.cmdline, &refs)?;
    Ok(cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TeeRunError> {
    std::fs::read(path).map_err(|source| TeeRunError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

struct Files {
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    cmdline: String,
}

fn files(cfg: &VmConfig) -> Result<Files, TeeRunError> {
    Ok(Files {
        kernel: read("kernel", &cfg.kernel)?,
        initrd: cfg
            .initrd
            .as_deref()
            .map(|p| read("initramfs", p))
            .transpose()?,
        cmdline: measured_cmdline(cfg)?,
    })
}

fn snp_boot(
    cfg: &VmConfig,
    f: &Files,
    signature: u32,
    vmsa_features: u64,
) -> Result<SnpDirectBoot, TeeRunError> {
    Ok(snp_direct_boot(&SnpBootInputs {
        kernel: &f.kernel,
        initrd: f.initrd.as_deref(),
        cmdline: &f.cmdline,
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        cpu_signature: signature,
        vmsa_features,
    })?)
}

fn tdx_boot(cfg: &VmConfig, f: &Files) -> Result<TdxDirectBoot, TeeRunError> {
    Ok(tdx_direct_boot(
        &f.kernel,
        f.initrd.as_deref(),
        &f.cmdline,
        cfg.memory_mib,
    )?)
}

/// The SNP launch digest or TDX MRTD `cfg` will measure to.
pub fn launch_digest(cfg: &VmConfig) -> Result<[u8; 48], TeeRunError> {
    let spec = cfg.tee.as_ref().ok_or(TeeRunError::NoTee)?.validate()?;
    let f = files(cfg)?;
    match spec {
        TeeSpec::Snp {
            cpu_signature,
            vmsa_features,
            ..
        } => {
            let signature = cpu_signature.ok_or(TeeRunError::NoCpuSignature)?;
            Ok(snp_boot(cfg, &f, signature, vmsa_features)?.launch_digest())
        }
        TeeSpec::Tdx { .. } => Ok(tdx_boot(cfg, &f)?.mrtd()),
    }
}

/// A launched confidential VM, ready to run.
pub struct LaunchedVm {
    pub tee: KvmTeeVm,
    /// The shared mapping of guest memory (launch sources, shared pages).
    pub memory: GuestMemoryMmap,
    /// Guest-physical ranges the guest may convert.
    pub ram: Vec<(u64, u64)>,
    pub quote_service: Option<QuoteServiceAddr>,
}

/// Checks the host, then creates and launches the confidential VM: on
/// return its memory is private and measured and its vCPUs exist.
pub fn launch_on_host(cfg: &VmConfig) -> Result<LaunchedVm, TeeRunError> {
    let spec = cfg.tee.as_ref().ok_or(TeeRunError::NoTee)?.validate()?;
    // Before anything is created: the VM type, the module, the device.
    check_host(
        spec.kind(),
        &HostRoot::real(),
        kvm_vm_types(Path::new("/dev/kvm")),
    )?;
    let f = files(cfg)?;
    let kvm = Kvm::new().map_err(|source| TeeRunError::Kvm {
        what: "cannot open /dev/kvm",
        source,
    })?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| TeeRunError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let cpuid = cpuid_for_vcpu(&supported, CpuTemplate::Host, 0, cfg.vcpus);
    match spec {
        TeeSpec::Snp {
            policy,
            host_data,
            cpu_signature,
            vmsa_features,
        } => {
            let host_signature = cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == 1)
                .map_or(0, |e| e.eax);
            let signature = cpu_signature.unwrap_or(host_signature);
            let boot = snp_boot(cfg, &f, signature, vmsa_features)?;
            let vm = kvm
                .create_vm_with_type(u64::from(kvm_bindings::KVM_X86_SNP_VM))
                .map_err(|source| TeeRunError::Kvm {
                    what: "KVM_CREATE_VM (KVM_X86_SNP_VM)",
                    source,
                })?;
            let sev = File::options()
                .read(true)
                .write(true)
                .open("/dev/sev")
                .map_err(TeeRunError::Sev)?;
            let mut tee = KvmTeeVm::new(vm, Some(sev));
            let mem = create_guest_memory(cfg.memory_mib, false)?;
            launch_snp(
                &mut tee,
                &mem,
                &boot,
                cpuid.as_slice(),
                &SnpLaunchParams { policy, host_data },
            )?;
            tracing::info!(
                "SNP guest launched: policy {policy}, measurement {}",
                hex::encode(boot.launch_digest())
            );
            Ok(LaunchedVm {
                tee,
                memory: mem,
                ram: boot.image.ram.clone(),
                quote_service: None,
            })
        }
        TeeSpec::Tdx {
            attributes,
            xfam,
            mr_config_id,
            quote_service,
        } => {
            let boot = tdx_boot(cfg, &f)?;
            let vm = kvm
                .create_vm_with_type(u64::from(kvm_bindings::KVM_X86_TDX_VM))
                .map_err(|source| TeeRunError::Kvm {
                    what: "KVM_CREATE_VM (KVM_X86_TDX_VM)",
                    source,
                })?;
            let mut tee = KvmTeeVm::new(vm, None);
            let mem = tdx_guest_memory(cfg.memory_mib)
                .map_err(|e| TeeRunError::TdMemory(e.to_string()))?;
            launch_tdx(
                &mut tee,
                &mem,
                &boot,
                cfg.vcpus,
                cpuid.as_slice(),
                &TdxLaunchParams {
                    attributes,
                    xfam,
                    mr_config_id,
                },
            )?;
            tracing::info!("TD launched: MRTD {}", hex::encode(boot.mrtd()));
            Ok(LaunchedVm {
                tee,
                memory: mem,
                ram: boot.image.ram.clone(),
                quote_service,
            })
        }
    }
}

/// Runs a launched VM until the guest ends: serial console, i8042 reset
/// and boot timer on the port bus (no virtio devices yet: they must offer
/// VIRTIO_F_ACCESS_PLATFORM first), one thread per vCPU, the confidential
/// exits served through [`ConfidentialExits`].
pub fn run_launched(
    launched: LaunchedVm,
    serial_out: Box<dyn Write + Send>,
    vmm_start: Instant,
) -> Result<VmExit, TeeRunError> {
    let LaunchedVm {
        mut tee,
        memory,
        ram,
        quote_service,
    } = launched;
    let io = |what: &'static str| move |source| TeeRunError::Io { what, source };
    let vcpu_fds = tee.take_vcpus();
    let metrics = Arc::new(VmmMetrics::default());
    let exit = Arc::new(ExitSignal::new().map_err(io("cannot create exit eventfd"))?);
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(io("cannot create serial irq eventfd"))?;
    // With TDX's split irqchip there is no in-kernel IOAPIC pin to route:
    // the console still prints (Linux writes it polling), without input.
    if let Err(e) = tee.vm().register_irqfd(&serial_irq, COM1_IRQ) {
        tracing::warn!("serial interrupt not routed: {e}");
    }
    let mut bus = Bus::new();
    let placed = [
        bus.insert(
            COM1_PORT,
            COM1_PORT_LEN,
            Arc::new(Mutex::new(SerialDevice::new(
                serial_irq,
                serial_out,
                metrics.clone(),
            ))),
        ),
        bus.insert(
            I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042Device::new(exit.clone()))),
        ),
        bus.insert(
            BOOT_TIMER_PORT,
            1,
            Arc::new(Mutex::new(BootTimer::new(vmm_start, metrics.clone()))),
        ),
    ];
    for result in placed {
        result.map_err(|e| TeeRunError::Bus(e.to_string()))?;
    }
    let io_bus = Arc::new(bus);
    let mmio_bus = Arc::new(Bus::new());
    let quote: Option<Box<dyn QuoteService + Send>> =
        quote_service.map(|addr| Box::new(QgsClient::new(addr)) as Box<dyn QuoteService + Send>);
    let exits = Arc::new(ConfidentialExits::new(
        Box::new(tee),
        ram,
        memory.clone(),
        quote,
    ));
    install_kick_handler().map_err(|e| TeeRunError::Io {
        what: "cannot install the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (index, fd) in (0u8..).zip(vcpu_fds) {
        let vcpu = Vcpu {
            index,
            fd,
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
            runs: Arc::new(AtomicU64::new(0)),
            guest_memory: memory.clone(),
            confidential: Some(exits.clone()),
        };
        match vcpu.spawn() {
            Ok(t) => threads.push(t),
            Err(source) => {
                stop_vcpus(&stop, threads);
                return Err(TeeRunError::Io {
                    what: "cannot start vCPU thread",
                    source,
                });
            }
        }
    }
    let end = exit.wait();
    stop_vcpus(&stop, threads);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tee::boot_image::tests::fake_bzimage;
    use crate::tee::config::{SnpConfig, TeeConfig};
    use crate::tee::fake::RecordingKvm;

    #[test]
    fn measured_cmdline_has_device_args_in_slot_order_and_no_host_args() {
        let mut cfg = VmConfig::new("/k");
        cfg.cmdline = "console=hvc0".into();
        cfg.rng = true;
        cfg.vsock = Some("guest_cid=3,uds_path=/tmp/v.sock".parse().unwrap());
        assert_eq!(
            measured_cmdline(&cfg).unwrap(),
            "console=hvc0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    /// The digest `--print-launch-digest` prints is the one the recorded
    /// launch of the same config measures to.
    #[test]
    fn print_launch_digest_equals_the_recorded_launch() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(7 * 4096 + 5)).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![3u8; 10_000]).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.initrd = Some(initrd);
        cfg.memory_mib = 32;
        cfg.vcpus = 2;
        cfg.tee = Some(TeeConfig::Snp(SnpConfig {
            vcpu_type: Some("EPYC-Milan".into()),
            ..Default::default()
        }));

        let printed = launch_digest(&cfg).unwrap();

        let f = files(&cfg).unwrap();
        let boot = snp_boot(&cfg, &f, 0x00A0_0F11, 0).unwrap();
        let mem = create_guest_memory(32, false).unwrap();
        let mut kvm = RecordingKvm::with_memory(mem.clone());
        let params = SnpLaunchParams {
            policy: Default::default(),
            host_data: [0; 32],
        };
        launch_snp(&mut kvm, &mem, &boot, &[], &params).unwrap();
        assert_eq!(kvm.snp_measurement(), Some(printed));
    }

    #[test]
    fn snp_digest_without_a_cpu_signature_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(4096)).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.tee = Some(TeeConfig::Snp(SnpConfig::default()));
        let err = launch_digest(&cfg).unwrap_err().to_string();
        assert!(err.contains("tee.cpu_signature"), "{err}");
    }
}
