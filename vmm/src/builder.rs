//! Builds a microVM from a [`VmSpec`] and runs it to its end: KVM checks,
//! guest memory, boot payload, legacy devices, virtio devices and their
//! thread, vCPU threads.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::cmdline::{build_cmdline, CmdlineError};
use crate::boot::loader::{load_initrd, load_kernel, write_boot_info, LoaderError};
use crate::boot::mptable::{write_mptable, MptableError};
use crate::boot::regs::{setup_boot_vcpu, setup_lapic_lints, setup_msrs, BootEntry, RegsError};
use crate::config::{
    validate_resources, ConfigError, NetConfig, TapSource, VirtioConsoleOutput,
    VirtioDevicesConfig, VmConfig,
};
use crate::cpuid::{cpuid_for_vcpu, CpuTemplate};
use crate::devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042Device, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::devices::virtio::attach::{
    AttachError, DeviceEventRegistrar, DeviceMemoryAccess, VirtioDevices,
};
use crate::devices::virtio::block::{self, BlockDevice, BlockError};
use crate::devices::virtio::console::{ConsoleDevice, ConsoleError, ConsoleOutput};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::event_loop::{EventLoopError, VirtioThread};
use crate::devices::virtio::fs::{self, FsDevice, FsError};
use crate::devices::virtio::net::{NetDevice, NetError, Tap};
use crate::devices::virtio::rng::RngDevice;
use crate::devices::virtio::vsock::{VsockDevice, VsockError};
use crate::exit::{ExitSignal, VmExit};
use crate::metrics::{DeviceReport, PeriodicMetrics, VmmMetrics};
use crate::signals::watch_termination_signals;
use crate::vstate::kvm::{HostKvmKind, KvmContext, KvmError};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{install_kick_handler, stop_vcpus, Vcpu, VcpuNudger};
use crate::vstate::vm::{Vm, VmError};

/// How often vCPUs are kicked on a `kvm_pvm` host (see [`VcpuNudger`]).
pub const NESTED_PVM_NUDGE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Stack bytes per vCPU of a raw payload, below the boot stack pointer.
const RAW_PAYLOAD_STACK_SIZE: u64 = 0x200;

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A Linux kernel with optional initramfs.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// Raw 64-bit machine code copied to `load_addr` and entered there by
    /// every vCPU at once (no INIT/SIPI), for tests of the VMM itself.
    /// The code tells vCPUs apart by their CPUID APIC id.
    RawLongMode { code: Vec<u8>, load_addr: u64 },
}

/// Everything needed to build one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub boot: BootSource,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub hugepages: bool,
    /// `None`: chosen for the host.
    pub cpu_template: Option<CpuTemplate>,
    pub devices: VirtioDevicesConfig,
    /// Print the counters as a JSON line on stderr this often while the
    /// VM runs.
    pub metrics_interval: Option<Duration>,
    /// End the VM with [`VmExit::Terminated`] on SIGTERM, SIGINT or SIGHUP.
    /// Only for a process that runs one VM: the caller must have blocked
    /// those signals first ([`crate::signals::block_termination_signals`]).
    pub stop_on_termination_signals: bool,
}

impl From<&VmConfig> for VmSpec {
    fn from(cfg: &VmConfig) -> Self {
        VmSpec {
            boot: BootSource::Linux {
                kernel: cfg.kernel.clone(),
                initrd: cfg.initrd.clone(),
                cmdline: cfg.cmdline.clone(),
            },
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            hugepages: cfg.hugepages,
            cpu_template: cfg.cpu_template,
            devices: cfg.devices(),
            metrics_interval: None,
            stop_on_termination_signals: false,
        }
    }
}

/// How a run ended, with what was counted on the way.
#[derive(Debug)]
pub struct VmRun {
    pub exit: VmExit,
    pub cpu_template: CpuTemplate,
    pub metrics: Arc<VmmMetrics>,
    /// Each virtio device's counters when the VM ended.
    pub devices: Vec<DeviceReport>,
}

impl VmRun {
    /// The VMM's and the devices' counters.
    pub fn metrics_json(&self) -> serde_json::Value {
        self.metrics.to_json_with_devices(&self.devices)
    }
}

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("vcpus = {requested}: this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error("cannot place device: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("raw payload of {len} bytes at {addr:#x} does not fit guest memory: {source}")]
    Payload {
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Ioctl { what, source }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

/// Builds the VM described by `spec`, runs it until the guest ends, and
/// tears it down. `serial_out` receives the guest's console; `vmm_start`
/// is the instant the boot timer measures from.
pub fn run_vm(
    spec: &VmSpec,
    serial_out: Box<dyn Write + Send>,
    vmm_start: Instant,
) -> Result<VmRun, BuildError> {
    validate_resources(spec.vcpus, spec.memory_mib, spec.hugepages)?;

    let kvm = KvmContext::open()?;
    if usize::from(spec.vcpus) > kvm.max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: spec.vcpus,
            max: kvm.max_vcpus,
        });
    }
    let template = spec.cpu_template.unwrap_or_else(|| {
        let template = CpuTemplate::for_host(kvm.host_kind);
        if kvm.host_kind == HostKvmKind::NestedPvm {
            tracing::info!(
                "host KVM is nested paravirtualized (kvm_pvm): CPU template {template} hides POPCNT, SMAP/SMEP, XSAVE and CMPXCHG16B, which its instruction emulator cannot run"
            );
        }
        template
    });

    let mem = create_guest_memory(spec.memory_mib, spec.hugepages)?;
    let vm = Vm::new(&kvm, &mem)?;
    let mut mmio_bus = Bus::new();
    let virtio = attach_virtio_devices(
        vm.fd(),
        &mem,
        &mut mmio_bus,
        &spec.devices,
        DeviceMemoryAccess::Direct,
    )?;
    let (entry, all_vcpus_start) =
        load_payload(&mem, &spec.boot, template, &virtio.cmdline_args())?;
    write_mptable(&mem, spec.vcpus)?;

    let metrics = Arc::new(VmmMetrics::default());
    let exit = Arc::new(ExitSignal::new().map_err(io("cannot create exit eventfd"))?);
    if spec.stop_on_termination_signals {
        watch_termination_signals(exit.clone()).map_err(io("cannot start the signal thread"))?;
    }
    let io_bus = Arc::new(legacy_io_bus(&vm, serial_out, &exit, &metrics, vmm_start)?);
    let mmio_bus = Arc::new(mmio_bus);
    let virtio_thread = start_virtio_thread(&virtio)?;
    let periodic_metrics = match spec.metrics_interval {
        Some(interval) => {
            let (vmm, devices) = (metrics.clone(), virtio.clone());
            Some(
                PeriodicMetrics::start(interval, Box::new(std::io::stderr()), move || {
                    vmm.to_json_with_devices(&devices.reports())
                })
                .map_err(io("cannot start the metrics thread"))?,
            )
        }
        None => None,
    };

    let supported = kvm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut vcpus = Vec::with_capacity(usize::from(spec.vcpus));
    for index in 0..spec.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid_for_vcpu(&supported, template, index, spec.vcpus))
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        setup_msrs(&fd)?;
        setup_lapic_lints(&fd)?;
        if index == 0 || all_vcpus_start {
            setup_boot_vcpu(&fd, &mem, entry)?;
        }
        if index > 0 && all_vcpus_start {
            // A stack of its own for each vCPU of a raw payload.
            let mut regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
            regs.rsp -= u64::from(index) * RAW_PAYLOAD_STACK_SIZE;
            regs.rbp = regs.rsp;
            fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
        }
        if index > 0 && all_vcpus_start {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        }
        vcpus.push(Vcpu {
            index,
            fd,
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            metrics: metrics.clone(),
            runs: Arc::new(AtomicU64::new(0)),
            guest_memory: mem.clone(),
            confidential: None,
        });
    }

    install_kick_handler().map_err(|e| BuildError::Io {
        what: "cannot install the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let mut threads = Vec::with_capacity(vcpus.len());
    let run_counters: Vec<Arc<AtomicU64>> = vcpus.iter().map(|v| v.runs.clone()).collect();
    for vcpu in vcpus {
        match vcpu.spawn() {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop_vcpus(&stop, threads);
                return Err(BuildError::Io {
                    what: "cannot start vCPU thread",
                    source: e,
                });
            }
        }
    }
    let nudger = if kvm.host_kind == HostKvmKind::NestedPvm {
        tracing::info!(
            "host KVM is nested paravirtualized (kvm_pvm): kicking vCPUs that stay in KVM_RUN for {} ms so the guest keeps making progress",
            NESTED_PVM_NUDGE_INTERVAL.as_millis()
        );
        let watched: Vec<_> = threads.iter().zip(run_counters).collect();
        match VcpuNudger::start(&watched, NESTED_PVM_NUDGE_INTERVAL) {
            Ok(n) => Some(n),
            Err(e) => {
                stop_vcpus(&stop, threads);
                return Err(BuildError::Io {
                    what: "cannot start the vCPU nudger thread",
                    source: e,
                });
            }
        }
    } else {
        None
    };
    // Every other thread runs: the main thread's filter stacks on no one's.
    crate::jail::seccomp::apply_to_this_thread_or_abort(crate::jail::seccomp::ThreadKind::Main);
    let end = exit.wait();
    // The nudger signals the vCPU threads: it ends before they are joined.
    drop(nudger);
    stop_vcpus(&stop, threads);
    drop(periodic_metrics);
    // Devices stop after the vCPUs: no register access can race the end.
    drop(virtio_thread);
    let devices = virtio.reports();
    drop(vm);
    Ok(VmRun {
        exit: end,
        cpu_template: template,
        metrics,
        devices,
    })
}

/// Loads the boot payload; returns its entry and whether every vCPU
/// starts there (raw payloads) or only the boot vCPU (Linux).
fn load_payload(
    mem: &GuestMemoryMmap,
    boot: &BootSource,
    template: CpuTemplate,
    device_args: &[String],
) -> Result<(BootEntry, bool), BuildError> {
    match boot {
        BootSource::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            let extra: Vec<&str> = template
                .kernel_args()
                .iter()
                .copied()
                .chain(device_args.iter().map(String::as_str))
                .collect();
            let cmdline = build_cmdline(cmdline, &extra)?;
            let loaded = load_kernel(mem, kernel)?;
            let initrd = initrd
                .as_deref()
                .map(|path| load_initrd(mem, path, loaded.kernel_end))
                .transpose()?;
            write_boot_info(mem, &loaded, &cmdline, initrd)?;
            tracing::debug!(?loaded.entry, ?initrd, "guest loaded");
            Ok((loaded.entry, false))
        }
        BootSource::RawLongMode { code, load_addr } => {
            mem.write_slice(code, GuestAddress(*load_addr))
                .map_err(|source| BuildError::Payload {
                    addr: *load_addr,
                    len: code.len(),
                    source,
                })?;
            Ok((BootEntry::LongMode { entry: *load_addr }, true))
        }
    }
}

/// Creates the virtio devices `config` asks for and attaches them in slot
/// order (see [`VirtioDevices::attach`] for the layout). The one place both
/// the plain VM and the confidential one (`crate::tee::run`, with
/// [`DeviceMemoryAccess::Platform`]) get their devices from.
pub fn attach_virtio_devices(
    vm: &dyn DeviceEventRegistrar,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    config: &VirtioDevicesConfig,
    access: DeviceMemoryAccess,
) -> Result<VirtioDevices, BuildError> {
    Ok(VirtioDevices::attach(
        vm,
        mem,
        mmio_bus,
        create_virtio_devices(config)?,
        access,
    )?)
}

/// The thread that serves the devices' queues, if there are any devices.
pub fn start_virtio_thread(virtio: &VirtioDevices) -> Result<Option<VirtioThread>, BuildError> {
    if virtio.is_empty() {
        return Ok(None);
    }
    Ok(Some(VirtioThread::start(&virtio.transports())?))
}

/// The virtio devices `config` asks for, in slot order.
fn create_virtio_devices(
    config: &VirtioDevicesConfig,
) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if config.rng {
        devices.push(Box::new(RngDevice::new()));
    }
    if let Some(vsock) = &config.vsock {
        devices.push(Box::new(VsockDevice::new(
            vsock.guest_cid,
            vsock.uds_path.clone(),
        )?));
    }
    if let Some(console) = &config.console {
        let output = match &console.output {
            VirtioConsoleOutput::Stdout => ConsoleOutput::Stdout,
            VirtioConsoleOutput::File(path) => ConsoleOutput::File(path.clone()),
            VirtioConsoleOutput::None => ConsoleOutput::Sink,
        };
        devices.push(Box::new(ConsoleDevice::new(output)?));
    }
    for (index, disk) in config.block.iter().enumerate() {
        let device = BlockDevice::new(block::BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            serial: disk.serial.clone(),
        })?;
        devices.push(Box::new(device.with_name(format!("block{index}"))));
    }
    for (index, share) in config.fs.iter().enumerate() {
        let device = FsDevice::new(fs::FsConfig {
            tag: share.tag.clone(),
            shared_dir: share.shared_dir.clone(),
            read_only: share.read_only,
            cache: share.cache,
            request_queues: share.request_queues,
        })?;
        devices.push(Box::new(device.with_name(format!("fs{index}"))));
    }
    for device in create_net_devices(&config.net)? {
        devices.push(Box::new(device));
    }
    Ok(devices)
}

/// One virtio-net device per NIC, named `net0`, `net1`, ...
fn create_net_devices(nics: &[NetConfig]) -> Result<Vec<NetDevice>, BuildError> {
    // Inherited fds are adopted before any tap is opened by name, so an fd
    // number can never be one of this process's own taps (adopting that
    // would close it twice).
    let mut taps = Vec::with_capacity(nics.len());
    for nic in nics {
        taps.push(match nic.source()? {
            TapSource::Fd(fd) => Some(Tap::adopt_fd(fd)?),
            TapSource::Name(_) => None,
        });
    }
    let mut devices = Vec::with_capacity(nics.len());
    for (index, (nic, adopted)) in nics.iter().zip(taps).enumerate() {
        let tap = match (adopted, nic.source()?) {
            (Some(tap), _) => tap,
            (None, TapSource::Name(name)) => Tap::open(name)?,
            (None, TapSource::Fd(fd)) => Tap::adopt_fd(fd)?,
        };
        let device = NetDevice::new(format!("net{index}"), Box::new(tap), nic.mac)?;
        tracing::info!(
            "net{index}: tap {} with mac {}",
            device.backend_name(),
            device.mac()
        );
        devices.push(device);
    }
    Ok(devices)
}

/// COM1, the i8042 (reset only) and the boot timer on the port I/O bus.
fn legacy_io_bus(
    vm: &Vm,
    serial_out: Box<dyn Write + Send>,
    exit: &Arc<ExitSignal>,
    metrics: &Arc<VmmMetrics>,
    vmm_start: Instant,
) -> Result<Bus, BuildError> {
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(io("cannot create serial irq eventfd"))?;
    vm.fd()
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(ioctl("KVM_IRQFD (serial)"))?;
    let mut bus = Bus::new();
    bus.insert(
        COM1_PORT,
        COM1_PORT_LEN,
        Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            serial_out,
            metrics.clone(),
        ))),
    )?;
    bus.insert(
        I8042_PORT,
        I8042_PORT_LEN,
        Arc::new(Mutex::new(I8042Device::new(exit.clone()))),
    )?;
    bus.insert(
        BOOT_TIMER_PORT,
        1,
        Arc::new(Mutex::new(BootTimer::new(vmm_start, metrics.clone()))),
    )?;
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheMode, FsConfig};

    fn share(tag: &str, dir: &std::path::Path) -> FsConfig {
        FsConfig {
            tag: tag.into(),
            shared_dir: dir.to_path_buf(),
            read_only: false,
            cache: CacheMode::Auto,
            request_queues: 1,
        }
    }

    #[test]
    fn fs_shares_become_fs_devices_with_their_tags() {
        let dir = tempfile::tempdir().unwrap();
        let config = VirtioDevicesConfig {
            rng: true,
            fs: vec![share("rootfs", dir.path()), share("data", dir.path())],
            ..Default::default()
        };

        let devices = create_virtio_devices(&config).unwrap();

        let names: Vec<&str> = devices.iter().map(|d| d.name()).collect();
        assert_eq!(names, ["rng", "fs0", "fs1"]);
        let mut tag = [0u8; 6];
        devices[1].read_config(0, &mut tag);
        assert_eq!(&tag, b"rootfs");
        assert_eq!(devices[2].device_type(), 26);
    }

    #[test]
    fn fs_share_with_missing_directory_fails_the_build_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let config = VirtioDevicesConfig {
            fs: vec![share("t", &missing)],
            ..Default::default()
        };

        let err = create_virtio_devices(&config).err().unwrap().to_string();

        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
