//! The transport-independent face of a virtio device.
//!
//! A device is a backend that works on its virtqueues over guest memory. It
//! does not know whether it sits behind virtio-mmio in `cloister-vmm`
//! (`super::mmio`) or behind vhost-user for QEMU (`crate::vhost_user`): the
//! transport owns register state, queue setup and interrupt delivery, and
//! calls the device with a [`QueueContext`] for each event.
//!
//! Lifecycle, driven by the transport:
//!
//! ```text
//!   new() ──► features() / read_config() ──► ack_features()
//!                                                │ driver writes DRIVER_OK
//!                                                ▼
//!                                           activate()
//!                                                │
//!          ┌─────────────────────────────────────┤
//!          │ guest kicks queue i                 │ host_event_fd() readable
//!          ▼                                     ▼
//!   process_queue(i, ctx)               process_host_event(ctx)
//!          │                                     │
//!          └──────────────► Err(_) ──► transport sets DEVICE_NEEDS_RESET
//!                                                │ driver writes status 0
//!                                                ▼
//!                                            reset() ──► back to features()
//! ```
//!
//! Everything a device reads from a queue is written by the guest, which is
//! the adversary: devices parse descriptor chains through
//! `virtio_queue::{Reader, Writer}` (bounds-checked against guest memory) and
//! fail the request, never the VMM, on bad input.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: every device we offer is a modern (1.0+) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM` (bit 33): the device reaches guest memory
/// only the way the platform allows (DMA API, IOMMU). A confidential
/// guest's driver then places rings and buffers in shared (decrypted)
/// pages, the only ones the VMM can read. The transport offers it, not the
/// devices: see `super::mmio::MmioTransport::require_access_platform`.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_RING_F_EVENT_IDX`: used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device ids from the virtio 1.2 specification, section 5.
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// Tells the driver that a queue has new used buffers. The transport
/// implements it: an irqfd plus the interrupt status register for
/// virtio-mmio, the vring's call eventfd for vhost-user.
pub trait UsedNotifier {
    fn notify_used(&self, queue_index: usize) -> io::Result<()>;
}

/// What a device works with while it handles one event.
pub struct QueueContext<'q, 'r> {
    /// All guest RAM.
    pub mem: &'r GuestMemoryMmap,
    /// The device's queues, indexed as in the device's specification.
    pub queues: &'r mut [&'q mut Queue],
    pub notifier: &'r dyn UsedNotifier,
}

impl QueueContext<'_, '_> {
    /// Runs `serve` on queue `index` and signals the driver when it
    /// reports used buffers (returns `true`): the shape of every
    /// request/response device's `process_queue`.
    pub fn serve_queue(
        &mut self,
        index: usize,
        serve: impl FnOnce(&GuestMemoryMmap, &mut Queue) -> Result<bool, DeviceError>,
    ) -> Result<(), DeviceError> {
        let mem = self.mem;
        let queue = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoSuchQueue(index))?;
        if serve(mem, queue)? {
            self.signal_used_queue(index)?;
        }
        Ok(())
    }

    /// Signals the driver about queue `index` unless the driver suppressed
    /// notifications (`VIRTIO_RING_F_EVENT_IDX` / `VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn signal_used_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let queue = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoSuchQueue(index))?;
        if queue
            .needs_notification(self.mem)
            .map_err(|e| DeviceError::Queue { index, source: e })?
        {
            self.notifier
                .notify_used(index)
                .map_err(|e| DeviceError::Notify { index, source: e })?;
        }
        Ok(())
    }
}

/// The next available chain of queue `index`. Unlike
/// `Queue::pop_descriptor_chain`, an available index more than a queue size
/// ahead (a broken or hostile driver) is an error, so the device goes
/// NEEDS_RESET instead of being told "more available" forever while getting
/// nothing.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    index: usize,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DeviceError> {
    Ok(queue
        .iter(mem)
        .map_err(|source| DeviceError::Queue { index, source })?
        .next())
}

/// Reads `data.len()` bytes of a configuration space held as bytes, from
/// `offset`; what lies outside it reads as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(rest) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = data.len().min(rest.len());
    data[..n].copy_from_slice(&rest[..n]);
}

/// Why a device stopped serving its queues. The transport reports it and
/// marks the device `DEVICE_NEEDS_RESET`; the VMM keeps running.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {0} does not exist on this device")]
    NoSuchQueue(usize),
    #[error("queue {index}: {source}")]
    Queue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("cannot notify the driver about queue {index}: {source}")]
    Notify { index: usize, source: io::Error },
    #[error("{0}")]
    Backend(String),
    #[error("host I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Counters every device keeps, readable from any thread while the device
/// runs (the VMM prints them on request and at exit).
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Requests (descriptor chains) the device completed.
    pub requests: AtomicU64,
    /// Bytes the device read from guest buffers.
    pub bytes_from_guest: AtomicU64,
    /// Bytes the device wrote into guest buffers.
    pub bytes_to_guest: AtomicU64,
    /// Requests or packets rejected because the guest's input was bad, and
    /// host-side failures.
    pub errors: AtomicU64,
    /// Queue notifications (kicks) from the driver.
    pub notifications: AtomicU64,
    /// Interrupts sent to the driver.
    pub interrupts: AtomicU64,
}

/// A point-in-time copy of [`DeviceMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMetricsSnapshot {
    pub requests: u64,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    pub errors: u64,
    pub notifications: u64,
    pub interrupts: u64,
}

impl DeviceMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DeviceMetricsSnapshot {
        DeviceMetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_from_guest: self.bytes_from_guest.load(Ordering::Relaxed),
            bytes_to_guest: self.bytes_to_guest.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            notifications: self.notifications.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
        }
    }
}

/// One virtio device's behaviour, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (see [`device_type`]).
    fn device_type(&self) -> u32;

    /// A short name for logs and metrics (`vsock`, `block0`).
    fn name(&self) -> &str;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;

    /// The features the driver accepted: a subset of [`Self::features`]
    /// (the transport masks anything else out).
    fn ack_features(&mut self, features: u64);

    /// Reads device configuration space at `offset`. Bytes outside the
    /// configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space. Devices whose configuration is
    /// read-only, and writes out of range, are refused with a message naming
    /// the offset.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// The driver set DRIVER_OK: its queues are configured and valid.
    /// Devices with nothing to start keep the default.
    fn activate(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The driver made buffers available in queue `queue_index`.
    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError>;

    /// A file descriptor that becomes readable when the device has host-side
    /// work (a connection to accept, data to deliver), if it has any. The
    /// transport's event loop watches it and then calls
    /// [`Self::process_host_event`].
    fn host_event_fd(&self) -> Option<RawFd> {
        None
    }

    /// Host-side work is pending (see [`Self::host_event_fd`]).
    fn process_host_event(&mut self, _ctx: &mut QueueContext<'_, '_>) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The driver reset the device: drop all per-activation state (open
    /// connections, in-flight requests) so it can be activated again.
    fn reset(&mut self);

    fn metrics(&self) -> &DeviceMetrics;

    /// Counters only this kind of device has (vsock connections, block
    /// flushes), reported next to [`Self::metrics`].
    fn device_specific_metrics(&self) -> Option<serde_json::Value> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_bytes_with_offset_past_the_end_reads_zeroes() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];

        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
