//! Places virtio devices into the VM: one virtio-mmio window and one
//! interrupt line each, KVM irqfd for the interrupt, KVM ioeventfd for
//! queue notifications, and the kernel arguments that announce them.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::VirtioDevice;
use super::mmio::{reg, MmioError, MmioTransport, MmioWindow, MMIO_WINDOW_SIZE};
use crate::boot::cmdline::virtio_mmio_device_arg;
use crate::boot::layout::{
    MAX_VIRTIO_DEVICES, VIRTIO_IRQ_FIRST, VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW,
};
use crate::devices::bus::{lock, Bus, BusError};
use crate::metrics::DeviceReport;

// The layout's slots are exactly one transport register window each.
const _: () = assert!(VIRTIO_MMIO_WINDOW == MMIO_WINDOW_SIZE);

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{count} virtio devices requested, at most {MAX_VIRTIO_DEVICES} fit")]
    TooMany { count: usize },
    #[error("device {device}: cannot create its interrupt eventfd: {source}")]
    IrqEvent {
        device: String,
        source: std::io::Error,
    },
    #[error("device {device}: KVM_IRQFD on irq {irq} failed: {source}")]
    Irqfd {
        device: String,
        irq: u32,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Transport(#[from] MmioError),
    #[error("device {device}: {source}")]
    Bus { device: String, source: BusError },
}

/// How the VM's devices reach guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMemoryAccess {
    /// All guest RAM is readable by the VMM: the plain VM.
    Direct,
    /// A confidential VM: only the pages the guest shared are readable, so
    /// every transport offers and requires `VIRTIO_F_ACCESS_PLATFORM`
    /// ([`MmioTransport::require_access_platform`]).
    Platform,
}

/// Where a device's interrupt eventfd and queue-notify eventfds are
/// registered: the plain VM's fd, or a confidential VM's
/// (`crate::tee::kvm::KvmTeeVm::vm`); a recording fake in tests.
pub trait DeviceEventRegistrar {
    /// `KVM_IRQFD`: a write to `event` raises `gsi`.
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    /// `KVM_IOEVENTFD`: a guest write of `datamatch` at `addr` signals `event`.
    fn register_ioevent(
        &self,
        event: &EventFd,
        addr: &IoEventAddress,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl DeviceEventRegistrar for VmFd {
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, event, gsi)
    }

    fn register_ioevent(
        &self,
        event: &EventFd,
        addr: &IoEventAddress,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_ioevent(self, event, addr, datamatch)
    }
}

/// A device in its slot.
#[derive(Clone)]
pub struct AttachedDevice {
    /// The device's name, numbered when several share it (`block0`, `block1`).
    pub name: String,
    pub mmio_base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The VM's virtio devices, in slot order (clones share the devices).
#[derive(Clone, Default)]
pub struct VirtioDevices {
    devices: Vec<AttachedDevice>,
}

impl VirtioDevices {
    /// Gives each device the next slot: its window goes on `mmio_bus`, its
    /// irqfd and (where KVM takes them) queue ioeventfds on `vm`. Slot `n`
    /// is at `VIRTIO_MMIO_START + n * VIRTIO_MMIO_WINDOW` on IRQ
    /// `VIRTIO_IRQ_FIRST + n`, the layout a confidential guest's measured
    /// command line announces (`crate::tee::run::measured_cmdline`).
    pub fn attach(
        vm: &dyn DeviceEventRegistrar,
        mem: &GuestMemoryMmap,
        mmio_bus: &mut Bus,
        devices: Vec<Box<dyn VirtioDevice>>,
        access: DeviceMemoryAccess,
    ) -> Result<Self, AttachError> {
        if devices.len() > MAX_VIRTIO_DEVICES {
            return Err(AttachError::TooMany {
                count: devices.len(),
            });
        }
        let names = report_names(devices.iter().map(|d| d.name()));
        let mut attached = Vec::with_capacity(devices.len());
        // Slot numbers are below MAX_VIRTIO_DEVICES (19), so they fit u32.
        for ((slot, device), name) in (0u32..).zip(devices).zip(names) {
            let mmio_base = VIRTIO_MMIO_START + u64::from(slot) * VIRTIO_MMIO_WINDOW;
            let irq = VIRTIO_IRQ_FIRST + slot;
            let irq_event =
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| AttachError::IrqEvent {
                    device: name.clone(),
                    source,
                })?;
            vm.register_irqfd(&irq_event, irq)
                .map_err(|source| AttachError::Irqfd {
                    device: name.clone(),
                    irq,
                    source,
                })?;
            let transport = MmioTransport::new(device, mem.clone(), irq_event)?;
            let transport = match access {
                DeviceMemoryAccess::Direct => transport,
                DeviceMemoryAccess::Platform => transport.require_access_platform(),
            };
            register_ioeventfds(vm, &transport, mmio_base);
            let transport = Arc::new(Mutex::new(transport));
            let window = MmioWindow::new(transport.clone())?;
            mmio_bus
                .insert(mmio_base, VIRTIO_MMIO_WINDOW, Arc::new(Mutex::new(window)))
                .map_err(|source| AttachError::Bus {
                    device: name.clone(),
                    source,
                })?;
            tracing::debug!(device = name, "virtio-mmio at {mmio_base:#x}, irq {irq}");
            attached.push(AttachedDevice {
                name,
                mmio_base,
                irq,
                transport,
            });
        }
        Ok(Self { devices: attached })
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// `virtio_mmio.device=` for each device.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.devices
            .iter()
            .map(|d| virtio_mmio_device_arg(d.mmio_base, VIRTIO_MMIO_WINDOW, d.irq))
            .collect()
    }

    pub fn transports(&self) -> Vec<Arc<Mutex<MmioTransport>>> {
        self.devices.iter().map(|d| d.transport.clone()).collect()
    }

    /// Each device's counters now.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.devices
            .iter()
            .map(|d| {
                let transport = lock(&d.transport);
                DeviceReport {
                    name: d.name.clone(),
                    mmio_base: d.mmio_base,
                    irq: d.irq,
                    transport: transport.report(),
                }
            })
            .collect()
    }
}

/// Device names for logs and metrics: a name several devices share gets
/// each one's ordinal appended.
fn report_names<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let names: Vec<&str> = names.collect();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            if names.iter().filter(|n| *n == name).count() > 1 {
                let ordinal = names[..i].iter().filter(|n| *n == name).count();
                format!("{name}{ordinal}")
            } else {
                (*name).to_string()
            }
        })
        .collect()
}

/// Lets KVM signal queue `i`'s eventfd itself when the guest writes `i` to
/// `QueueNotify`, without an exit to the vCPU thread. Where KVM refuses,
/// the write reaches the transport as an MMIO exit, which signals the same
/// eventfd.
fn register_ioeventfds(vm: &dyn DeviceEventRegistrar, transport: &MmioTransport, mmio_base: u64) {
    let notify = IoEventAddress::Mmio(mmio_base + reg::QUEUE_NOTIFY);
    for (index, event) in (0u32..).zip(transport.queue_events()) {
        if let Err(e) = vm.register_ioevent(event, &notify, index) {
            tracing::info!(
                device = transport.name(),
                "KVM_IOEVENTFD for queue {index} refused ({e}): notifications go through MMIO exits"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_number_only_shared_names() {
        let names = report_names(["rng", "block", "vsock", "block", "block"].into_iter());
        assert_eq!(names, ["rng", "block0", "vsock", "block1", "block2"]);
    }
}
