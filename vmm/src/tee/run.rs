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
use super::TeeKind;
use crate::boot::acpi::VirtioMmioWindow;
use crate::boot::cmdline::{build_cmdline, CmdlineError};
use crate::boot::layout::{VIRTIO_IRQ_FIRST, VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW};
use crate::builder::{attach_virtio_devices, start_virtio_thread, BuildError};
use crate::config::{VirtioDevicesConfig, VmConfig};
use crate::cpuid::{cpuid_for_vcpu, CpuTemplate};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use crate::devices::bus::Bus;
use crate::devices::i8042::{I8042Device, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::devices::virtio::attach::{DeviceEventRegistrar, DeviceMemoryAccess, VirtioDevices};
use crate::exit::{ExitSignal, VmExit};
use crate::metrics::VmmMetrics;
use crate::signals::watch_termination_signals;
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
    #[error("vcpus = {0}: a TDX guest boots one vCPU (the firmware-less boot builds no ACPI MP-wakeup mailbox for the APs): set vcpus to 1")]
    TdxVcpus(u8),
    #[error("a TDX guest cannot have virtio devices ({0}) yet: TDX allows only KVM's split irqchip, which has no in-kernel IOAPIC, so a virtio-mmio interrupt line could reach the TD only through a userspace IOAPIC that cloister-vmm does not emulate; use the qemu backend for TDX pods")]
    TdxDevices(String),
    #[error("virtio devices of the confidential guest: {0}")]
    Devices(Box<BuildError>),
}

/// The validated `"tee"` section of `cfg`, with what the confidential
/// boot cannot do refused by field and value: `--print-launch-digest`,
/// config validation in `main` and the launch all call this.
pub fn tee_spec_for_vm(cfg: &VmConfig) -> Result<TeeSpec, TeeRunError> {
    let spec = cfg.tee.as_ref().ok_or(TeeRunError::NoTee)?.validate()?;
    if spec.kind() == TeeKind::Tdx && cfg.vcpus != 1 {
        return Err(TeeRunError::TdxVcpus(cfg.vcpus));
    }
    // Here rather than at launch only: a reference value for a VM that
    // can never launch would mislead whoever configures the KBS.
    refuse_unroutable_devices(spec.kind(), &cfg.devices())?;
    Ok(spec)
}

/// The device kinds `devices` asks for, named as in the config.
fn device_names(devices: &VirtioDevicesConfig) -> Vec<&'static str> {
    let mut names = Vec::new();
    for (present, name) in [
        (devices.rng, "rng"),
        (devices.vsock.is_some(), "vsock"),
        (devices.console.is_some(), "console"),
        (!devices.block.is_empty(), "block"),
        (!devices.fs.is_empty(), "fs"),
        (!devices.net.is_empty(), "net"),
    ] {
        if present {
            names.push(name);
        }
    }
    names
}

/// Everything that must hold before a confidential VM is created, in
/// order: the config ([`tee_spec_for_vm`], with what the TEE's interrupt
/// model allows) and the host (`check_host`: the VM type, the module
/// parameter, `/dev/sev`; it reads `/sys`, so a jailed VMM calls this
/// before entering its jail and gets the same message).
pub fn check_before_launch(cfg: &VmConfig) -> Result<TeeSpec, TeeRunError> {
    let spec = tee_spec_for_vm(cfg)?;
    check_host(
        spec.kind(),
        &HostRoot::real(),
        kvm_vm_types(Path::new("/dev/kvm")),
    )?;
    Ok(spec)
}

/// SNP has the full in-kernel irqchip (`KVM_CREATE_IRQCHIP`): a device's
/// irqfd on its GSI raises its I/O APIC pin as in a plain VM, and the
/// measured ACPI tables tell the guest which pin each device has (as many
/// devices as a plain VM may have). TDX has only the split irqchip: KVM's
/// GSI routing table is empty there, so an irqfd on a pin would be
/// accepted and never deliver anything (only MSI routes work, and
/// virtio-mmio has no MSI). Refused rather than a guest whose driver
/// waits forever.
fn refuse_unroutable_devices(
    kind: TeeKind,
    devices: &VirtioDevicesConfig,
) -> Result<(), TeeRunError> {
    match kind {
        TeeKind::Tdx if devices.count() > 0 => {
            Err(TeeRunError::TdxDevices(device_names(devices).join(", ")))
        }
        _ => Ok(()),
    }
}

/// The command line the guest sees, measured: the configured one, checked
/// as the plain boot checks it. No host-dependent arguments, and no
/// devices: an SNP guest finds them in its measured ACPI tables
/// ([`virtio_windows`]), a TDX guest has none.
pub fn measured_cmdline(cfg: &VmConfig) -> Result<String, CmdlineError> {
    let cmdline = build_cmdline(&cfg.cmdline, &[])?;
    Ok(cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// Where the confidential guest's virtio devices are, in slot order: the
/// windows and pins the builder's own attachment gives them
/// ([`attach_confidential_devices`]), which the ACPI tables announce.
pub fn virtio_windows(cfg: &VmConfig) -> Vec<VirtioMmioWindow> {
    let count = u32::try_from(cfg.devices().count()).unwrap_or(u32::MAX);
    (0..count)
        .map(|slot| VirtioMmioWindow {
            base: VIRTIO_MMIO_START + u64::from(slot) * VIRTIO_MMIO_WINDOW,
            len: VIRTIO_MMIO_WINDOW,
            irq: VIRTIO_IRQ_FIRST + slot,
        })
        .collect()
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
        virtio_devices: &virtio_windows(cfg),
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
    let spec = tee_spec_for_vm(cfg)?;
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
    pub kind: TeeKind,
    pub tee: KvmTeeVm,
    /// The shared mapping of guest memory (launch sources, shared pages).
    pub memory: GuestMemoryMmap,
    /// Guest-physical ranges the guest may convert.
    pub ram: Vec<(u64, u64)>,
    pub quote_service: Option<QuoteServiceAddr>,
}

/// Creates and launches the confidential VM `spec` describes, once
/// [`check_before_launch`] passed (a jailed VMM: outside the jail, then
/// this inside it): on return its memory is private and measured and its
/// vCPUs exist.
pub fn launch_checked(cfg: &VmConfig, spec: TeeSpec) -> Result<LaunchedVm, TeeRunError> {
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
                kind: TeeKind::Snp,
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
                kind: TeeKind::Tdx,
                tee,
                memory: mem,
                ram: boot.image.ram.clone(),
                quote_service,
            })
        }
    }
}

/// The confidential VM's virtio devices: the builder's own attachment
/// ([`attach_virtio_devices`]), so they take the slots, windows and IRQs
/// [`virtio_windows`] (the measured ACPI tables) announced, each transport requiring
/// `VIRTIO_F_ACCESS_PLATFORM`.
///
/// `memory` is the shared mapping (the `userspace_addr` of every memslot),
/// which is where a page the guest converted to shared lives: KVM serves
/// shared GPAs from it and private ones from guest_memfd. The exits
/// (`super::exits`) keep that true: a conversion to private drops the
/// mapping's pages with `MADV_DONTNEED` (on this private anonymous mapping
/// the range stays mapped and reads back as zeros until the guest shares
/// it again and writes it), a conversion to shared punches the hole in
/// guest_memfd only. Neither unmaps or moves the mapping, so the
/// `GuestMemoryMmap` the transports hold stays valid for the VM's life,
/// and a device that follows a descriptor into a page the guest did not
/// share reads zeros or stale bytes, never the guest's plaintext.
pub fn attach_confidential_devices(
    vm: &dyn DeviceEventRegistrar,
    kind: TeeKind,
    memory: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    devices: &VirtioDevicesConfig,
) -> Result<VirtioDevices, TeeRunError> {
    refuse_unroutable_devices(kind, devices)?;
    attach_virtio_devices(vm, memory, mmio_bus, devices, DeviceMemoryAccess::Platform)
        .map_err(|e| TeeRunError::Devices(Box::new(e)))
}

/// How [`run_launched`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// End the VM with [`VmExit::Terminated`] on SIGTERM, SIGINT or
    /// SIGHUP; the caller must have blocked them first
    /// (`crate::signals::block_termination_signals`).
    pub stop_on_termination_signals: bool,
}

/// Runs a launched VM until the guest ends: serial console, i8042 reset
/// and boot timer on the port bus, the config's virtio devices on the MMIO
/// bus ([`attach_confidential_devices`]), one thread per vCPU, the
/// confidential exits served through [`ConfidentialExits`].
pub fn run_launched(
    launched: LaunchedVm,
    devices: &VirtioDevicesConfig,
    serial_out: Box<dyn Write + Send>,
    vmm_start: Instant,
    options: RunOptions,
) -> Result<VmExit, TeeRunError> {
    let LaunchedVm {
        kind,
        mut tee,
        memory,
        ram,
        quote_service,
    } = launched;
    let io = |what: &'static str| move |source| TeeRunError::Io { what, source };
    let vcpu_fds = tee.take_vcpus();
    let metrics = Arc::new(VmmMetrics::default());
    let exit = Arc::new(ExitSignal::new().map_err(io("cannot create exit eventfd"))?);
    if options.stop_on_termination_signals {
        watch_termination_signals(exit.clone()).map_err(io("cannot start the signal thread"))?;
    }
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
    // Registered on the TEE VM's fd (irqfd, ioeventfd) before the VM
    // handle moves into the exit handler.
    let mut mmio_bus = Bus::new();
    let virtio = attach_confidential_devices(tee.vm(), kind, &memory, &mut mmio_bus, devices)?;
    let mmio_bus = Arc::new(mmio_bus);
    let virtio_thread =
        start_virtio_thread(&virtio).map_err(|e| TeeRunError::Devices(Box::new(e)))?;
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
    // Every other thread runs: the main thread's filter stacks on no one's.
    crate::jail::seccomp::apply_to_this_thread_or_abort(crate::jail::seccomp::ThreadKind::Main);
    let end = exit.wait();
    stop_vcpus(&stop, threads);
    // Devices stop after the vCPUs: no register access can race the end.
    drop(virtio_thread);
    for report in virtio.reports() {
        if report.transport.refused_feature_negotiations > 0 {
            tracing::warn!(
                device = report.name,
                "the guest's driver never accepted VIRTIO_F_ACCESS_PLATFORM ({} refusals)",
                report.transport.refused_feature_negotiations
            );
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tee::boot_image::tests::fake_bzimage;
    use crate::tee::config::{SnpConfig, TeeConfig};
    use crate::tee::fake::RecordingKvm;

    use std::cell::RefCell;

    use kvm_ioctls::IoEventAddress;

    use crate::devices::virtio::device::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
    use crate::devices::virtio::mmio::{reg, status};

    /// Records what the attachment registers instead of issuing KVM_IRQFD
    /// and KVM_IOEVENTFD.
    #[derive(Default)]
    struct RecordingRegistrar {
        irqfds: RefCell<Vec<u32>>,
        ioevents: RefCell<Vec<(u64, u32)>>,
    }

    impl DeviceEventRegistrar for RecordingRegistrar {
        fn register_irqfd(&self, _event: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.irqfds.borrow_mut().push(gsi);
            Ok(())
        }
        fn register_ioevent(
            &self,
            _event: &EventFd,
            addr: &IoEventAddress,
            datamatch: u32,
        ) -> Result<(), kvm_ioctls::Error> {
            let IoEventAddress::Mmio(addr) = addr else {
                panic!("virtio-mmio notifies by MMIO");
            };
            self.ioevents.borrow_mut().push((*addr, datamatch));
            Ok(())
        }
    }

    fn rd(bus: &Bus, addr: u64) -> u32 {
        let mut data = [0u8; 4];
        assert!(bus.read(addr, &mut data), "nothing at {addr:#x}");
        u32::from_le_bytes(data)
    }

    fn wr(bus: &Bus, addr: u64, value: u32) {
        assert!(
            bus.write(addr, &value.to_le_bytes()),
            "nothing at {addr:#x}"
        );
    }

    fn offered(bus: &Bus, base: u64) -> u64 {
        wr(bus, base + reg::DEVICE_FEATURES_SEL, 1);
        let high = rd(bus, base + reg::DEVICE_FEATURES);
        wr(bus, base + reg::DEVICE_FEATURES_SEL, 0);
        (u64::from(high) << 32) | u64::from(rd(bus, base + reg::DEVICE_FEATURES))
    }

    /// What Linux's virtio_mmio does up to FEATURES_OK; the status read back.
    fn negotiate(bus: &Bus, base: u64, accept: u64) -> u32 {
        wr(bus, base + reg::STATUS, status::ACKNOWLEDGE);
        wr(
            bus,
            base + reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        for sel in 0..2u32 {
            wr(bus, base + reg::DRIVER_FEATURES_SEL, sel);
            wr(
                bus,
                base + reg::DRIVER_FEATURES,
                (accept >> (32 * sel)) as u32,
            );
        }
        wr(
            bus,
            base + reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        rd(bus, base + reg::STATUS)
    }

    fn rng_and_vsock(dir: &Path) -> VmConfig {
        let mut cfg = VmConfig::new("/k");
        cfg.cmdline = "console=ttyS0".into();
        cfg.rng = true;
        cfg.vsock = Some(
            format!("guest_cid=3,uds_path={}", dir.join("v.sock").display())
                .parse()
                .unwrap(),
        );
        cfg
    }

    /// The devices sit exactly where the measured command line says, with
    /// their interrupt and notify eventfds registered through the VM handle
    /// given, and every one of them requires ACCESS_PLATFORM.
    #[test]
    fn confidential_devices_take_the_measured_slots_and_require_access_platform() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = rng_and_vsock(dir.path());
        let mem = create_guest_memory(4, false).unwrap();
        let registrar = RecordingRegistrar::default();
        let mut bus = Bus::new();

        let virtio =
            attach_confidential_devices(&registrar, TeeKind::Snp, &mem, &mut bus, &cfg.devices())
                .unwrap();

        let reports = virtio.reports();
        let attached: Vec<(u64, u32)> = reports.iter().map(|r| (r.mmio_base, r.irq)).collect();
        let announced: Vec<(u64, u32)> = virtio_windows(&cfg)
            .iter()
            .map(|w| (w.base, w.irq))
            .collect();
        assert_eq!(attached, announced);
        let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["rng", "vsock"]);
        let irqs: Vec<u32> = reports.iter().map(|r| r.irq).collect();
        assert_eq!(*registrar.irqfds.borrow(), irqs);
        assert_eq!(irqs, [VIRTIO_IRQ_FIRST, VIRTIO_IRQ_FIRST + 1]);
        let vsock_base = VIRTIO_MMIO_START + VIRTIO_MMIO_WINDOW;
        assert!(registrar
            .ioevents
            .borrow()
            .contains(&(vsock_base + reg::QUEUE_NOTIFY, 0)));

        for report in &reports {
            let base = report.mmio_base;
            assert_ne!(
                offered(&bus, base) & VIRTIO_F_ACCESS_PLATFORM,
                0,
                "{}",
                report.name
            );
            // A driver without it (it would put its rings in private
            // memory) does not get FEATURES_OK.
            let after = negotiate(&bus, base, VIRTIO_F_VERSION_1);
            assert_eq!(after & status::FEATURES_OK, 0, "{}", report.name);
            wr(&bus, base + reg::STATUS, 0);
            let after = negotiate(&bus, base, VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
            assert_ne!(after & status::FEATURES_OK, 0, "{}", report.name);
        }
        let refused: Vec<(String, u64)> = virtio
            .reports()
            .into_iter()
            .map(|r| (r.name, r.transport.refused_feature_negotiations))
            .collect();
        assert_eq!(refused, [("rng".into(), 1), ("vsock".into(), 1)]);
    }

    /// The regression guard: the plain builder's devices (same shared
    /// attachment, direct access) do not offer the bit, and a driver that
    /// does not know it is served.
    #[test]
    fn plain_devices_do_not_offer_access_platform() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = rng_and_vsock(dir.path());
        let mem = create_guest_memory(4, false).unwrap();
        let mut bus = Bus::new();

        let virtio = attach_virtio_devices(
            &RecordingRegistrar::default(),
            &mem,
            &mut bus,
            &cfg.devices(),
            DeviceMemoryAccess::Direct,
        )
        .unwrap();

        for report in virtio.reports() {
            assert_eq!(
                offered(&bus, report.mmio_base) & VIRTIO_F_ACCESS_PLATFORM,
                0
            );
            let after = negotiate(&bus, report.mmio_base, VIRTIO_F_VERSION_1);
            assert_ne!(after & status::FEATURES_OK, 0, "{}", report.name);
        }
    }

    #[test]
    fn tdx_refuses_devices_naming_them_and_the_irqchip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = rng_and_vsock(dir.path());
        let mem = create_guest_memory(4, false).unwrap();
        let registrar = RecordingRegistrar::default();
        let err = attach_confidential_devices(
            &registrar,
            TeeKind::Tdx,
            &mem,
            &mut Bus::new(),
            &cfg.devices(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("rng, vsock"), "{err}");
        assert!(err.contains("split irqchip"), "{err}");
        assert!(registrar.irqfds.borrow().is_empty());
        // No devices: nothing to refuse.
        assert!(refuse_unroutable_devices(TeeKind::Tdx, &VirtioDevicesConfig::default()).is_ok());
    }

    #[test]
    fn snp_takes_as_many_devices_as_a_plain_vm_and_measures_each() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(4096)).unwrap();
        let with_disks = |n: usize| {
            let mut cfg = VmConfig::new(&kernel);
            cfg.memory_mib = 32;
            cfg.tee = Some(TeeConfig::Snp(SnpConfig {
                vcpu_type: Some("EPYC-Milan".into()),
                ..Default::default()
            }));
            cfg.block = (0..n)
                .map(|i| crate::config::BlockConfig {
                    path: dir.path().join(format!("d{i}")),
                    read_only: false,
                    serial: None,
                })
                .collect();
            cfg
        };
        let most = crate::boot::layout::MAX_VIRTIO_DEVICES;
        assert!(refuse_unroutable_devices(TeeKind::Snp, &with_disks(most).devices()).is_ok());
        let windows = virtio_windows(&with_disks(most));
        assert_eq!(windows.last().map(|w| w.irq), Some(23));
        // Each device is in the measured ACPI tables.
        let digest = |n| launch_digest(&with_disks(n)).unwrap();
        assert_ne!(digest(most), digest(most - 1));
        assert_ne!(digest(1), digest(0));
    }

    #[test]
    fn tdx_with_more_than_one_vcpu_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, fake_bzimage(4096)).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.memory_mib = 32;
        cfg.vcpus = 2;
        cfg.tee = Some(TeeConfig::of_kind(TeeKind::Tdx));
        let err = tee_spec_for_vm(&cfg).unwrap_err().to_string();
        assert!(err.contains("vcpus = 2"), "{err}");
        let err = launch_digest(&cfg).unwrap_err().to_string();
        assert!(err.contains("vcpus = 2"), "{err}");
        cfg.vcpus = 1;
        assert_eq!(launch_digest(&cfg).unwrap().len(), 48);
        // SNP boots its APs from their VMSAs: more vCPUs are fine.
        cfg.vcpus = 2;
        cfg.tee = Some(TeeConfig::Snp(SnpConfig {
            vcpu_type: Some("EPYC-Milan".into()),
            ..Default::default()
        }));
        assert!(launch_digest(&cfg).is_ok());
    }

    #[test]
    fn measured_cmdline_is_the_configured_one_and_devices_are_in_slot_order() {
        let mut cfg = VmConfig::new("/k");
        cfg.cmdline = "console=hvc0".into();
        cfg.rng = true;
        cfg.vsock = Some("guest_cid=3,uds_path=/tmp/v.sock".parse().unwrap());
        assert_eq!(measured_cmdline(&cfg).unwrap(), "console=hvc0");
        let window = |base, irq| VirtioMmioWindow {
            base,
            len: 0x1000,
            irq,
        };
        assert_eq!(
            virtio_windows(&cfg),
            [window(0xd000_0000, 5), window(0xd000_1000, 6)]
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

    /// `--print-launch-digest` gives no reference value for a VM the
    /// launch would refuse.
    #[test]
    fn no_reference_value_for_a_tdx_vm_with_devices() {
        let mut cfg = VmConfig::new("/nonexistent/bzImage");
        cfg.vsock = Some("guest_cid=3,uds_path=/tmp/v.sock".parse().unwrap());
        cfg.tee = Some(TeeConfig::Tdx(Default::default()));
        let err = launch_digest(&cfg).unwrap_err();
        assert!(matches!(err, TeeRunError::TdxDevices(_)), "{err}");
        assert!(err.to_string().contains("vsock"), "{err}");
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
