//! The virtio-mmio transport, version 2 ("modern" only; virtio 1.2 §4.2).
//!
//! Primer. A virtio-mmio device is a 4 KiB window of 32-bit registers in
//! guest-physical address space, announced to Linux on the kernel command
//! line (`virtio_mmio.device=4K@<base>:<irq>`). The driver:
//!
//! 1. reads `MagicValue` ("virt"), `Version` (2) and `DeviceID`;
//! 2. writes `Status` = ACKNOWLEDGE, then ACKNOWLEDGE|DRIVER;
//! 3. reads the 64 feature bits 32 at a time (`DeviceFeaturesSel` picks the
//!    half), writes the ones it accepts (`DriverFeaturesSel`,
//!    `DriverFeatures`), sets FEATURES_OK and reads `Status` back: the
//!    device clears nothing, it refuses the write when it cannot work with
//!    the accepted set (here: without `VIRTIO_F_VERSION_1`);
//! 4. for each queue: `QueueSel`, reads `QueueNumMax`, writes `QueueNum`
//!    and the guest-physical addresses of the descriptor table, available
//!    ("driver") ring and used ("device") ring, then `QueueReady` = 1;
//! 5. sets DRIVER_OK. From then on it kicks a queue by writing its index
//!    to `QueueNotify` (KVM turns that write into an eventfd signal, see
//!    `super::attach`), and the device raises its interrupt
//!    line after setting bit 0 (used buffer) or bit 1 (configuration
//!    change) of `InterruptStatus`, which the driver acknowledges through
//!    `InterruptACK`;
//! 6. writes `Status` = 0 to reset the device, after which it starts over.
//!
//! Device-specific configuration space starts at offset 0x100.
//!
//! Everything here is written by the guest. Accesses with a bad offset or
//! width, writes out of order, bad queue sizes and queue addresses outside
//! guest memory are refused (logged, rate-limited) and never panic. When
//! the device cannot go on (bad queues at DRIVER_OK, a device error) the
//! transport sets DEVICE_NEEDS_RESET and raises a configuration-change
//! interrupt; the VMM keeps running.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    DeviceError, DeviceMetrics, DeviceMetricsSnapshot, QueueContext, UsedNotifier, VirtioDevice,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.0+) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "CLST": ours; Linux only shows it in sysfs.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"CLST");
/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Where device configuration space starts in the window.
pub const MMIO_CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets (virtio 1.2, table 4.1).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// `InterruptStatus` bits.
pub const INTERRUPT_USED_BUFFER: u32 = 0x1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error(
        "device {device}: queue {index} has maximum size {size}, not a power of two in 1..=32768"
    )]
    QueueMaxSize {
        device: String,
        index: usize,
        size: u16,
    },
    #[error("device {device}: cannot create the eventfd of queue {index}: {source}")]
    QueueEvent {
        device: String,
        index: usize,
        source: io::Error,
    },
    #[error("device {device}: cannot create its state eventfd: {source}")]
    StateEvent { device: String, source: io::Error },
}

/// The device's interrupt line: `InterruptStatus` plus an eventfd that KVM
/// turns into an interrupt on the device's GSI (irqfd). Shared between
/// the vCPU threads (which read and acknowledge the status) and the
/// virtio thread (which raises it).
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
    /// Interrupts raised since the transport last folded them into the
    /// device's metrics.
    raised: AtomicU64,
}

impl MmioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
            raised: AtomicU64::new(0),
        }
    }

    /// Sets `bit` in `InterruptStatus` and pulses the line.
    pub fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        self.irq.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    fn take_raised(&self) -> u64 {
        self.raised.swap(0, Ordering::Relaxed)
    }
}

/// The transport's side of [`UsedNotifier`]: the used-buffer bit and an
/// interrupt, whatever the queue (virtio-mmio has one line per device).
impl UsedNotifier for MmioInterrupt {
    fn notify_used(&self, _queue_index: usize) -> io::Result<()> {
        self.raise(INTERRUPT_USED_BUFFER)
    }
}

/// Logs the first few occurrences of a guest mistake, then only every
/// power of two, so a guest cannot flood the VMM's log.
#[derive(Debug, Default)]
struct LogLimiter {
    seen: u64,
}

impl LogLimiter {
    const ALWAYS: u64 = 16;

    fn allow(&mut self) -> bool {
        self.seen = self.seen.saturating_add(1);
        self.seen <= Self::ALWAYS || self.seen.is_power_of_two()
    }
}

/// What the transport reports about its device: the device's counters and
/// what the transport itself refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportReport {
    pub device_type: u32,
    #[serde(flatten)]
    pub counters: DeviceMetricsSnapshot,
    /// Register accesses with a bad offset or width, and writes refused
    /// because they came out of order or with bad values.
    pub refused_register_accesses: u64,
    /// Times the device was put into DEVICE_NEEDS_RESET.
    pub needs_reset_events: u64,
    /// FEATURES_OK refused because the driver did not accept a feature
    /// the transport requires (`VIRTIO_F_ACCESS_PLATFORM` in a
    /// confidential VM). Also counted in `refused_register_accesses`.
    #[serde(skip_serializing_if = "is_zero")]
    pub refused_feature_negotiations: u64,
    pub status: u32,
    /// The device's own counters ([`VirtioDevice::device_specific_metrics`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_specific: Option<serde_json::Value>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One virtio device behind the virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Signalled on each kick of queue `i`: by KVM (ioeventfd), or by the
    /// register window ([`MmioWindow`]) when KVM did not take the ioeventfd.
    queue_events: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    /// Signalled when the device was activated, reset or failed, so the
    /// event loop starts or stops watching its host-side fd.
    state_event: EventFd,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
    refused: u64,
    needs_reset_events: u64,
    /// Feature bits the transport offers on top of the device's and
    /// requires the driver to accept (see [`Self::require_access_platform`]).
    platform_features: u64,
    refused_feature_negotiations: u64,
    log_limiter: LogLimiter,
}

impl MmioTransport {
    /// Wraps `device`; `irq` must be registered as irqfd on the device's GSI.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let name = device.name().to_string();
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let queue = Queue::new(size).map_err(|_| MmioError::QueueMaxSize {
                device: name.clone(),
                index,
                size,
            })?;
            queues.push(queue);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                MmioError::QueueEvent {
                    device: name.clone(),
                    index,
                    source,
                }
            })?);
        }
        let state_event =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| MmioError::StateEvent {
                device: name,
                source,
            })?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_events,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
            state_event,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            refused: 0,
            needs_reset_events: 0,
            platform_features: 0,
            refused_feature_negotiations: 0,
            log_limiter: LogLimiter::default(),
        })
    }

    /// For a confidential VM: offers `VIRTIO_F_ACCESS_PLATFORM` and refuses
    /// FEATURES_OK to a driver that does not accept it. Without the bit a
    /// Linux guest places rings and buffers wherever it likes, in private
    /// (encrypted) memory the VMM reads as ciphertext; with it the guest's
    /// DMA API bounces everything through shared pages (swiotlb).
    pub fn require_access_platform(mut self) -> Self {
        self.platform_features = VIRTIO_F_ACCESS_PLATFORM;
        self
    }

    /// What the driver reads in `DeviceFeatures`: the device's bits plus
    /// the ones the transport adds.
    pub fn offered_features(&self) -> u64 {
        self.device.features() | self.platform_features
    }

    pub fn name(&self) -> &str {
        self.device.name()
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device's status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted (only offered bits).
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// One eventfd per queue, signalled when the driver kicks it.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn state_event(&self) -> &EventFd {
        &self.state_event
    }

    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    /// The device's host-side fd, worth watching only while [`Self::is_active`].
    pub fn host_event_fd(&self) -> Option<RawFd> {
        self.device.host_event_fd()
    }

    /// Activated by the driver and not failed: queue and host events are
    /// handed to the device.
    pub fn is_active(&self) -> bool {
        self.activated && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    pub fn report(&self) -> TransportReport {
        let mut counters = self.device.metrics().snapshot();
        // Raised but not yet folded in (the fold happens after each event).
        counters.interrupts += self.interrupt.raised.load(Ordering::Relaxed);
        TransportReport {
            device_type: self.device.device_type(),
            counters,
            refused_register_accesses: self.refused,
            needs_reset_events: self.needs_reset_events,
            refused_feature_negotiations: self.refused_feature_negotiations,
            status: self.status,
            device_specific: self.device.device_specific_metrics(),
        }
    }

    /// The driver kicked queue `index` (its eventfd is readable).
    pub fn handle_queue_event(&mut self, index: usize) {
        let Some(event) = self.queue_events.get(index) else {
            return;
        };
        let kicks = match event.read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(
                    device = self.device.name(),
                    "cannot read queue {index} eventfd: {e}"
                );
                return;
            }
        };
        DeviceMetrics::add(&self.device.metrics().notifications, kicks);
        if self.is_active() {
            self.run_device(|device, ctx| device.process_queue(index, ctx));
        }
    }

    /// The device's host-side fd is readable.
    pub fn handle_host_event(&mut self) {
        if self.is_active() {
            self.run_device(|device, ctx| device.process_host_event(ctx));
        }
    }

    /// Clears the state eventfd (the event loop reads the state itself).
    pub fn consume_state_event(&self) {
        // WouldBlock: a spurious wake-up; nothing else can fail on a
        // non-blocking eventfd we own.
        let _ = self.state_event.read();
    }

    /// Offers every queue to the device once, for buffers the driver made
    /// available before the device was activated.
    pub fn process_all_queues(&mut self) {
        for index in 0..self.queues.len() {
            if self.is_active() && self.queues[index].ready() {
                self.run_device(|device, ctx| device.process_queue(index, ctx));
            }
        }
    }

    fn run_device(
        &mut self,
        work: impl FnOnce(&mut dyn VirtioDevice, &mut QueueContext<'_, '_>) -> Result<(), DeviceError>,
    ) {
        let mut queues: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut queues,
            notifier: self.interrupt.as_ref(),
        };
        let result = work(self.device.as_mut(), &mut ctx);
        DeviceMetrics::add(
            &self.device.metrics().interrupts,
            self.interrupt.take_raised(),
        );
        if let Err(e) = result {
            DeviceMetrics::add(&self.device.metrics().errors, 1);
            self.set_needs_reset(&e.to_string());
        }
    }

    /// The device cannot go on until the driver resets it.
    fn set_needs_reset(&mut self, reason: &str) {
        tracing::warn!(device = self.device.name(), "device needs reset: {reason}");
        self.needs_reset_events += 1;
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.raise(INTERRUPT_CONFIG_CHANGE) {
            tracing::warn!(device = self.device.name(), "cannot raise interrupt: {e}");
        }
        DeviceMetrics::add(
            &self.device.metrics().interrupts,
            self.interrupt.take_raised(),
        );
        self.signal_state_change();
    }

    fn signal_state_change(&self) {
        if let Err(e) = self.state_event.write(1) {
            tracing::warn!(
                device = self.device.name(),
                "cannot signal state change: {e}"
            );
        }
    }

    /// A guest access that is refused: counted, logged at a limited rate.
    fn refuse(&mut self, what: std::fmt::Arguments<'_>) {
        self.refused += 1;
        if self.log_limiter.allow() {
            tracing::warn!(
                device = self.device.name(),
                "refused guest access ({} so far): {what}",
                self.refused
            );
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let value = match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a region that does not exist has
            // length and base -1 (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => return None,
        };
        Some(value)
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            // Any region the driver selects does not exist: nothing to keep.
            reg::SHM_SEL => {}
            _ => self.refuse(format_args!(
                "write of {value:#x} to {offset:#x}, not a writable register"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER
            && self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0;
        if !negotiating {
            let current = self.status;
            self.refuse(format_args!(
                "driver features {value:#x} written in status {current:#x}"
            ));
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                self.refuse(format_args!("driver features {value:#x} for bank {sel}"));
                return;
            }
        };
        let offered = self.offered_features();
        let bank = 0xffff_ffffu64 << shift;
        let accepted = (u64::from(value) << shift) & offered;
        if u64::from(value) << shift & !offered != 0 {
            tracing::debug!(
                device = self.device.name(),
                "driver accepted features {value:#x} (bank {}) beyond those offered; masked",
                self.driver_features_sel
            );
        }
        self.driver_features = (self.driver_features & !bank) | accepted;
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        let configuring = self.status & (status::FEATURES_OK | status::DRIVER_OK)
            == status::FEATURES_OK
            && self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0;
        let index = self.queue_sel as usize;
        if !configuring {
            let current = self.status;
            self.refuse(format_args!(
                "queue {index} register {offset:#x} = {value:#x} written in status {current:#x}"
            ));
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            self.refuse(format_args!(
                "queue register {offset:#x} = {value:#x} for queue {index}, which does not exist"
            ));
            return;
        };
        if offset == reg::QUEUE_READY {
            match value {
                0 | 1 => queue.set_ready(value == 1),
                _ => self.refuse(format_args!("queue {index} ready = {value:#x}")),
            }
            return;
        }
        if queue.ready() {
            self.refuse(format_args!(
                "queue {index} register {offset:#x} = {value:#x} written while the queue is ready"
            ));
            return;
        }
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let result = match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => queue.try_set_size(size),
                Err(_) => Err(virtio_queue::Error::InvalidSize),
            },
            reg::QUEUE_DESC_LOW => {
                queue.try_set_desc_table_address(GuestAddress(low(queue.desc_table())))
            }
            reg::QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(GuestAddress(high(queue.desc_table())))
            }
            reg::QUEUE_DRIVER_LOW => {
                queue.try_set_avail_ring_address(GuestAddress(low(queue.avail_ring())))
            }
            reg::QUEUE_DRIVER_HIGH => {
                queue.try_set_avail_ring_address(GuestAddress(high(queue.avail_ring())))
            }
            reg::QUEUE_DEVICE_LOW => {
                queue.try_set_used_ring_address(GuestAddress(low(queue.used_ring())))
            }
            reg::QUEUE_DEVICE_HIGH => {
                queue.try_set_used_ring_address(GuestAddress(high(queue.used_ring())))
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            let max = queue.max_size();
            self.refuse(format_args!(
                "queue {index} register {offset:#x} = {value:#x} (maximum size {max}): {e}"
            ));
        }
    }

    fn notify_queue(&mut self, value: u32) {
        // Reached only when KVM did not take the write through ioeventfd
        // (or the value matched no queue's datamatch).
        match self.queue_events.get(value as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    tracing::warn!(
                        device = self.device.name(),
                        "cannot signal queue {value}: {e}"
                    );
                }
            }
            None => self.refuse(format_args!(
                "notify of queue {value}, which does not exist"
            )),
        }
    }

    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let current = self.status;
        // The driver may give up at any time.
        if value == current | FAILED {
            self.status = value;
            return;
        }
        if current & (FAILED | DEVICE_NEEDS_RESET) != 0 {
            self.refuse(format_args!(
                "status {value:#x} written in status {current:#x} (needs a reset first)"
            ));
            return;
        }
        const ACK_DRIVER: u32 = ACKNOWLEDGE | DRIVER;
        const ACK_DRIVER_FEATURES: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        match (current, value) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, ACK_DRIVER) => self.status = value,
            (ACK_DRIVER, ACK_DRIVER_FEATURES) => {
                let accepted = self.driver_features;
                if accepted & VIRTIO_F_VERSION_1 == 0 {
                    self.refuse(format_args!(
                        "FEATURES_OK without VIRTIO_F_VERSION_1 (features {accepted:#x}): legacy drivers are not supported"
                    ));
                    return;
                }
                let missing = self.platform_features & !accepted;
                if missing != 0 {
                    self.refused_feature_negotiations += 1;
                    // The first is an error (the guest's probe of this
                    // device fails); repeats are the guest's to make and go
                    // through the rate limit of `refuse`, so a loop cannot
                    // fill the host's log.
                    if self.refused_feature_negotiations == 1 {
                        tracing::error!(
                        device = self.device.name(),
                        "FEATURES_OK refused: the driver did not accept VIRTIO_F_ACCESS_PLATFORM (features {accepted:#x}, missing {missing:#x}); in a confidential VM its rings would be in private memory the device cannot read"
                    );
                    }
                    self.refuse(format_args!(
                        "FEATURES_OK without VIRTIO_F_ACCESS_PLATFORM (features {accepted:#x})"
                    ));
                    return;
                }
                // The device sees only its own bits; the transport's are
                // the transport's business.
                self.device
                    .ack_features(self.driver_features & self.device.features());
                self.status = value;
            }
            (ACK_DRIVER_FEATURES, v) if v == ACK_DRIVER_FEATURES | DRIVER_OK => {
                self.activate(value)
            }
            _ => self.refuse(format_args!(
                "status {value:#x} written in status {current:#x}: not the next step"
            )),
        }
    }

    fn activate(&mut self, value: u32) {
        self.status = value;
        let bad_queue = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem));
        if let Some(index) = bad_queue {
            let q = &self.queues[index];
            let reason = format!(
                "queue {index} (size {}, descriptors {:#x}, driver ring {:#x}, device ring {:#x}) does not fit guest memory",
                q.size(),
                q.desc_table(),
                q.avail_ring(),
                q.used_ring()
            );
            self.set_needs_reset(&reason);
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        if let Err(e) = self.device.activate() {
            DeviceMetrics::add(&self.device.metrics().errors, 1);
            self.set_needs_reset(&format!("activation failed: {e}"));
            return;
        }
        self.activated = true;
        tracing::debug!(
            device = self.device.name(),
            features = format_args!("{:#x}", self.driver_features),
            "activated"
        );
        self.signal_state_change();
    }

    /// Status 0: the device and its queues return to their initial state.
    fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
        self.activated = false;
        self.signal_state_change();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_SPACE_OFFSET {
            self.device
                .read_config(offset - MMIO_CONFIG_SPACE_OFFSET, data);
            return;
        }
        let value = match (offset % 4, data.len()) {
            (0, 4) => self.read_register(offset),
            _ => None,
        };
        match value {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()),
            None => {
                data.fill(0);
                self.refuse(format_args!(
                    "read of {} bytes at {offset:#x}, not a readable register",
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_SPACE_OFFSET {
            if let Err(e) = self
                .device
                .write_config(offset - MMIO_CONFIG_SPACE_OFFSET, data)
            {
                self.refuse(format_args!("configuration write: {e}"));
            }
            return;
        }
        match (offset % 4, <[u8; 4]>::try_from(data)) {
            (0, Ok(bytes)) => self.write_register(offset, u32::from_le_bytes(bytes)),
            _ => self.refuse(format_args!(
                "write of {} bytes at {offset:#x}, registers take aligned 4-byte writes",
                data.len()
            )),
        }
    }
}

mod window;
pub use window::MmioWindow;

#[cfg(test)]
pub(crate) mod tests;
