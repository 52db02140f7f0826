//! [`VsockDevice`]: moves packets between the virtqueues and the muxer.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::metrics::{VsockMetrics, VsockMetricsSnapshot};
use super::muxer::VsockMuxer;
use super::packet::{Op, PacketHeader, HDR_LEN};
use super::{VsockError, VsockTimeouts, MAX_PKT_PAYLOAD};
use crate::devices::virtio::device::{
    device_type, pop_chain, read_config_bytes, DeviceError, DeviceMetrics, QueueContext,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// The virtio-vsock device (type 19) in hybrid mode: guest streams bridged
/// to Unix sockets next to `uds_path` (see the module documentation).
pub struct VsockDevice {
    guest_cid: u64,
    acked_features: u64,
    muxer: VsockMuxer,
    /// One packet's payload on its way through the device.
    scratch: Vec<u8>,
    metrics: Arc<DeviceMetrics>,
    vsock_metrics: Arc<VsockMetrics>,
}

fn queue_error(index: usize) -> impl FnOnce(virtio_queue::Error) -> DeviceError {
    move |source| DeviceError::Queue { index, source }
}

fn queue_mut<'a>(queues: &'a mut [&mut Queue], index: usize) -> Result<&'a mut Queue, DeviceError> {
    queues
        .get_mut(index)
        .map(|q| &mut **q)
        .ok_or(DeviceError::NoSuchQueue(index))
}

impl VsockDevice {
    /// A device for the guest with CID `guest_cid`, listening on the Unix
    /// socket `uds_path` (which must not exist yet; it is removed when the
    /// device is dropped).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<VsockDevice, VsockError> {
        Self::with_timeouts(guest_cid, uds_path, VsockTimeouts::default())
    }

    /// [`Self::new`] with other timeouts than the defaults.
    pub fn with_timeouts(
        guest_cid: u64,
        uds_path: PathBuf,
        timeouts: VsockTimeouts,
    ) -> Result<VsockDevice, VsockError> {
        // 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY
        // and Linux keeps only 32 bits of the CID.
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::ReservedGuestCid(guest_cid));
        }
        let metrics = Arc::new(DeviceMetrics::default());
        let vsock_metrics = Arc::new(VsockMetrics::default());
        let muxer = VsockMuxer::new(
            guest_cid,
            uds_path,
            timeouts,
            metrics.clone(),
            vsock_metrics.clone(),
        )?;
        Ok(VsockDevice {
            guest_cid,
            acked_features: 0,
            muxer,
            scratch: vec![0; MAX_PKT_PAYLOAD],
            metrics,
            vsock_metrics,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Connection counters beyond [`DeviceMetrics`].
    pub fn vsock_metrics(&self) -> VsockMetricsSnapshot {
        self.vsock_metrics.snapshot()
    }

    fn event_idx(&self) -> bool {
        self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    /// Reads one tx chain into a header and `self.scratch`. Returns the
    /// header and payload length, or why the packet is dropped.
    fn read_tx_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(PacketHeader, usize), VsockError> {
        let mut reader = chain.reader(mem).map_err(VsockError::BadChain)?;
        let available = reader.available_bytes();
        if available < HDR_LEN {
            return Err(VsockError::ChainTooShort(available));
        }
        // The reader walks descriptors, so a header split across several
        // of them reads like a contiguous one.
        let mut raw = [0u8; HDR_LEN];
        reader
            .read_exact(&mut raw)
            .map_err(VsockError::GuestMemory)?;
        let hdr = PacketHeader::from_bytes(&raw);
        if let Err(e) = hdr.check_from_guest(self.guest_cid, reader.available_bytes()) {
            // Well-addressed packets of another type get RST (as Linux does);
            // misaddressed or oversized ones are only dropped.
            if matches!(e, VsockError::UnsupportedType(_)) && hdr.known_op() != Some(Op::Rst) {
                self.muxer.queue_reset(hdr.reset_reply());
            }
            return Err(e);
        }
        let len = hdr.len as usize;
        reader
            .read_exact(&mut self.scratch[..len])
            .map_err(VsockError::GuestMemory)?;
        Ok((hdr, len))
    }

    /// Consumes every tx chain. Returns whether any was used.
    fn process_tx(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<bool, DeviceError> {
        let mem = ctx.mem;
        let event_idx = self.event_idx();
        let mut used = false;
        loop {
            let queue = queue_mut(ctx.queues, TX_QUEUE)?;
            queue.set_event_idx(event_idx);
            queue
                .disable_notification(mem)
                .map_err(queue_error(TX_QUEUE))?;
            while let Some(chain) = pop_chain(queue_mut(ctx.queues, TX_QUEUE)?, mem, TX_QUEUE)? {
                let head = chain.head_index();
                match self.read_tx_packet(mem, chain) {
                    Ok((hdr, len)) => {
                        DeviceMetrics::add(&self.metrics.requests, 1);
                        DeviceMetrics::add(&self.metrics.bytes_from_guest, len as u64);
                        self.muxer.handle_guest_packet(&hdr, &self.scratch[..len]);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "vsock: dropped a tx packet");
                        DeviceMetrics::add(&self.metrics.errors, 1);
                    }
                }
                queue_mut(ctx.queues, TX_QUEUE)?
                    .add_used(mem, head, 0)
                    .map_err(queue_error(TX_QUEUE))?;
                used = true;
            }
            if !queue_mut(ctx.queues, TX_QUEUE)?
                .enable_notification(mem)
                .map_err(queue_error(TX_QUEUE))?
            {
                break;
            }
        }
        Ok(used)
    }

    /// Fills rx chains with what the muxer has for the guest. Returns
    /// whether any was used.
    fn process_rx(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<bool, DeviceError> {
        let mem = ctx.mem;
        let mut used = false;
        queue_mut(ctx.queues, RX_QUEUE)?.set_event_idx(self.event_idx());
        while self.muxer.has_pending_rx() {
            let queue = queue_mut(ctx.queues, RX_QUEUE)?;
            let Some(chain) = pop_chain(queue, mem, RX_QUEUE)? else {
                // Out of buffers: ask for a kick when the driver adds some,
                // unless it already did in the meantime.
                if queue
                    .enable_notification(mem)
                    .map_err(queue_error(RX_QUEUE))?
                {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            match self.fill_rx_chain(mem, chain) {
                Ok(Some(len)) => {
                    queue_mut(ctx.queues, RX_QUEUE)?
                        .add_used(mem, head, len)
                        .map_err(queue_error(RX_QUEUE))?;
                    used = true;
                }
                Ok(None) if self.muxer.has_pending_rx() => {
                    // Only data is pending and this buffer has no room for
                    // any: return it unused so the queue moves on.
                    tracing::debug!("vsock: rx buffer too small for data");
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    queue_mut(ctx.queues, RX_QUEUE)?
                        .add_used(mem, head, 0)
                        .map_err(queue_error(RX_QUEUE))?;
                    used = true;
                }
                Ok(None) => {
                    // Nothing was ready after all: leave the buffer for later.
                    queue_mut(ctx.queues, RX_QUEUE)?.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: dropped an rx buffer");
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    queue_mut(ctx.queues, RX_QUEUE)?
                        .add_used(mem, head, 0)
                        .map_err(queue_error(RX_QUEUE))?;
                    used = true;
                }
            }
        }
        Ok(used)
    }

    /// Writes the next packet into `chain`. `Ok(None)` if there was none.
    fn fill_rx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Option<u32>, VsockError> {
        if chain.clone().any(|d| !d.is_write_only()) {
            return Err(VsockError::RxChainNotWritable);
        }
        let mut writer = chain.writer(mem).map_err(VsockError::BadChain)?;
        let available = writer.available_bytes();
        if available < HDR_LEN {
            return Err(VsockError::RxChainTooShort(available));
        }
        let room = (available - HDR_LEN).min(MAX_PKT_PAYLOAD);
        let Some((hdr, len)) = self.muxer.next_rx_packet(&mut self.scratch[..room]) else {
            return Ok(None);
        };
        writer
            .write_all(&hdr.to_bytes())
            .and_then(|()| writer.write_all(&self.scratch[..len]))
            .map_err(VsockError::GuestMemory)?;
        DeviceMetrics::add(&self.metrics.requests, 1);
        DeviceMetrics::add(&self.metrics.bytes_to_guest, len as u64);
        // HDR_LEN + len <= 44 + 64 KiB.
        Ok(Some((HDR_LEN + len) as u32))
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn name(&self) -> &str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Backend(format!(
            "vsock configuration is read-only (write at offset {offset})"
        )))
    }

    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError> {
        match queue_index {
            RX_QUEUE => {}
            TX_QUEUE => {
                if self.process_tx(ctx)? {
                    ctx.signal_used_queue(TX_QUEUE)?;
                }
            }
            // We never send transport events; the driver's buffers stay.
            EVENT_QUEUE => return Ok(()),
            other => return Err(DeviceError::NoSuchQueue(other)),
        }
        if self.process_rx(ctx)? {
            ctx.signal_used_queue(RX_QUEUE)?;
        }
        // Guest packets and rx delivery both start and end deadlines.
        self.muxer.sync_timer();
        Ok(())
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_host_event(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<(), DeviceError> {
        self.muxer.process_host_events()?;
        if self.process_rx(ctx)? {
            ctx.signal_used_queue(RX_QUEUE)?;
        }
        // Guest packets and rx delivery both start and end deadlines.
        self.muxer.sync_timer();
        Ok(())
    }

    fn reset(&mut self) {
        self.muxer.reset();
        self.acked_features = 0;
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn device_specific_metrics(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.vsock_metrics()).ok()
    }
}
