//! [`NetDevice`]: frames between the virtqueues and a [`NetBackend`].

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::metrics::{NetMetrics, NetMetricsSnapshot};
use super::{
    MacAddress, NetBackend, NetError, LEGACY_NET_HDR_LEN, MAX_BUFFER_LEN, NET_HDR_LEN,
    NET_QUEUE_SIZE,
};
use crate::devices::virtio::device::{
    device_type, pop_chain, read_config_bytes, DeviceError, DeviceMetrics, QueueContext,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [NET_QUEUE_SIZE; 2];
/// Frames moved to the guest per event before the event loop gets a turn
/// (the same thread serves tx kicks); the tap stays readable, so the
/// level-triggered loop comes back at once.
const RX_BUDGET: usize = 256;
/// Byte offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Offloads whose frames the tap hands the guest, and the features that
/// announce them.
const GUEST_OFFLOADS: [(u64, u32); 3] = [
    (bit(VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM),
    (bit(VIRTIO_NET_F_GUEST_TSO4), libc::TUN_F_TSO4),
    (bit(VIRTIO_NET_F_GUEST_TSO6), libc::TUN_F_TSO6),
];
/// Checksum and TSO in both directions.
const ALL_OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6);
/// Checksum offload only.
const CSUM_OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// The `TUN_F_*` flags that let the tap hand over frames the driver
/// accepted (`features`) the offloads of.
pub fn tap_offloads(features: u64) -> u32 {
    // TSO frames need partial checksums too; a driver without GUEST_CSUM
    // gets neither.
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    GUEST_OFFLOADS
        .iter()
        .filter(|(feature, _)| features & feature != 0)
        .fold(0, |flags, (_, tun)| flags | tun)
}

/// The offload features `backend` can serve: all when it accepts checksum
/// and TSO offloads, checksum only when it accepts just that. Leaves the
/// backend with no offloads (until a driver negotiates some).
fn probe_offloads(backend: &mut dyn NetBackend) -> Result<u64, NetError> {
    let all = tap_offloads(ALL_OFFLOADS);
    let features = if backend.set_offload(all).is_ok() {
        ALL_OFFLOADS
    } else if backend.set_offload(libc::TUN_F_CSUM).is_ok() {
        CSUM_OFFLOADS
    } else {
        0
    };
    backend.set_offload(0).map_err(|source| NetError::Setup {
        name: backend.name().to_string(),
        what: "TUNSETOFFLOAD 0",
        source,
    })?;
    Ok(features)
}

/// What became of a frame offered to the rx queue.
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Not enough buffers: the frame waits, nothing was consumed; `seen`
    /// buffers were available (and too few).
    NoBuffers { seen: u16 },
    /// Dropped (counted); buffers the attempt consumed were returned.
    Dropped,
}

/// Why an rx chain cannot take a frame (it is returned unused).
#[derive(Debug, thiserror::Error)]
enum RxBufferError {
    #[error("descriptor chain is unusable: {0}")]
    Chain(virtio_queue::Error),
    #[error("chain has a device-readable descriptor")]
    NotWritable,
    #[error("chain has {0} writable bytes, less than the header")]
    TooShort(usize),
}

/// A device-writable chain of at least `hdr_len` bytes.
fn rx_writer<'m>(
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    hdr_len: usize,
) -> Result<Writer<'m>, RxBufferError> {
    if chain.clone().any(|d| !d.is_write_only()) {
        return Err(RxBufferError::NotWritable);
    }
    let writer = chain.writer(mem).map_err(RxBufferError::Chain)?;
    if writer.available_bytes() < hdr_len {
        return Err(RxBufferError::TooShort(writer.available_bytes()));
    }
    Ok(writer)
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

/// Whether the driver made buffers available that the device has not
/// taken yet.
fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(queue_error(RX_QUEUE))?;
    Ok(avail != Wrapping(queue.next_avail()))
}

/// The virtio-net device (type 1) on one tap (see the module documentation).
pub struct NetDevice {
    name: String,
    backend: Box<dyn NetBackend>,
    mac: MacAddress,
    offered_features: u64,
    acked_features: u64,
    /// The device's host event fd: holds the backend's fd while rx polls
    /// it (see "Backpressure" in the module documentation).
    rx_epoll: Epoll,
    backend_polled: bool,
    /// One frame from the backend, header first; `rx_pending` bytes of it
    /// wait for rx buffers.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    /// One frame from the guest on its way to the backend.
    tx_frame: Vec<u8>,
    metrics: DeviceMetrics,
    net_metrics: Arc<NetMetrics>,
}

impl NetDevice {
    /// A device named `name` on `backend`, with `mac` or a random
    /// locally administered address.
    pub fn new(
        name: impl Into<String>,
        mut backend: Box<dyn NetBackend>,
        mac: Option<MacAddress>,
    ) -> Result<Self, NetError> {
        let mac = match mac {
            Some(mac) => mac,
            None => MacAddress::random().map_err(NetError::RandomMac)?,
        };
        let offloads = probe_offloads(backend.as_mut())?;
        Ok(Self {
            name: name.into(),
            backend,
            mac,
            offered_features: BASE_FEATURES | offloads,
            acked_features: 0,
            rx_epoll: Epoll::new().map_err(NetError::Epoll)?,
            backend_polled: false,
            rx_frame: vec![0; MAX_BUFFER_LEN],
            rx_pending: None,
            tx_frame: vec![0; MAX_BUFFER_LEN],
            metrics: DeviceMetrics::default(),
            net_metrics: Arc::new(NetMetrics::default()),
        })
    }

    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    /// The interface (or test backend) the device sends to.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    pub fn net_metrics(&self) -> NetMetricsSnapshot {
        self.net_metrics.snapshot()
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// The header length the driver uses: 12 bytes for a modern driver or
    /// with mergeable buffers, 10 for a legacy driver without them (QEMU's
    /// `microvm` offers legacy virtio-mmio unless told otherwise). The tap
    /// always carries 12.
    fn guest_hdr_len(&self) -> usize {
        if self.acked_features & VIRTIO_F_VERSION_1 != 0 || self.acked(VIRTIO_NET_F_MRG_RXBUF) {
            NET_HDR_LEN
        } else {
            LEGACY_NET_HDR_LEN
        }
    }

    /// Turns the `len`-byte frame from the backend in `rx_frame` into the
    /// guest's layout; returns its new length.
    fn narrow_rx_header(&mut self, len: usize) -> usize {
        let hdr_len = self.guest_hdr_len();
        if hdr_len < NET_HDR_LEN {
            self.rx_frame.copy_within(NET_HDR_LEN..len, hdr_len);
        }
        len - (NET_HDR_LEN - hdr_len)
    }

    /// Puts the backend into the rx epoll set or takes it out.
    fn set_backend_polled(&mut self, polled: bool) -> io::Result<()> {
        if polled == self.backend_polled {
            return Ok(());
        }
        let op = if polled {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.rx_epoll
            .ctl(op, self.backend.fd(), EpollEvent::new(EventSet::IN, 0))?;
        self.backend_polled = polled;
        Ok(())
    }

    /// Out of rx buffers (`seen` are available but too few for the waiting
    /// frame): asks the driver for a kick when it adds more and stops
    /// polling the backend. Returns `true` (nothing parked) if more
    /// arrived in the meantime.
    fn park_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        seen: u16,
    ) -> Result<bool, DeviceError> {
        // enable_notification asks for a kick past `next_avail` (the event
        // index) and reports buffers beyond it: both must count from after
        // the `seen` ones, or a driver adding one more buffer would not
        // kick (and `seen` would look new).
        let next = queue.next_avail();
        queue.set_next_avail(next.wrapping_add(seen));
        let more = queue.enable_notification(mem);
        queue.set_next_avail(next);
        if more.map_err(queue_error(RX_QUEUE))? {
            return Ok(true);
        }
        self.set_backend_polled(false)?;
        NetMetrics::inc(&self.net_metrics.rx_parked);
        Ok(false)
    }

    /// Reads the next frame from the backend into `rx_frame`. `None` when
    /// none waits, or reading failed (then the backend is not polled until
    /// the next rx kick, so a broken tap cannot spin the loop).
    fn read_backend_frame(&mut self) -> Result<Option<usize>, DeviceError> {
        loop {
            match self.backend.read_frame(&mut self.rx_frame) {
                Ok(len) if len < NET_HDR_LEN => {
                    NetMetrics::inc(&self.net_metrics.rx_dropped_runt);
                    DeviceMetrics::add(&self.metrics.errors, 1);
                }
                Ok(len) => return Ok(Some(len)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(
                        "{}: reading from {} failed, rx waits for the next kick: {e}",
                        self.name,
                        self.backend.name()
                    );
                    NetMetrics::inc(&self.net_metrics.rx_tap_errors);
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    self.set_backend_polled(false)?;
                    return Ok(None);
                }
            }
        }
    }

    /// Moves frames from the backend into rx buffers until the backend has
    /// none, the guest has no buffers, or the budget is spent.
    fn process_rx(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<(), DeviceError> {
        let mem = ctx.mem;
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        queue_mut(ctx.queues, RX_QUEUE)?.set_event_idx(event_idx);
        let mut used = false;
        for _ in 0..RX_BUDGET {
            let queue = queue_mut(ctx.queues, RX_QUEUE)?;
            let len = match self.rx_pending {
                Some(len) => len,
                // Read only what the guest may have room for.
                None if !has_available(queue, mem)? => {
                    if self.park_rx(queue, mem, 0)? {
                        continue;
                    }
                    break;
                }
                None => match self.read_backend_frame()? {
                    Some(len) => self.narrow_rx_header(len),
                    None => break,
                },
            };
            self.rx_pending = Some(len);
            let queue = queue_mut(ctx.queues, RX_QUEUE)?;
            let (delivery, used_some) = self.deliver(mem, queue, len)?;
            used |= used_some;
            match delivery {
                Delivery::Delivered | Delivery::Dropped => self.rx_pending = None,
                Delivery::NoBuffers { seen } => {
                    if !self.park_rx(queue, mem, seen)? {
                        break;
                    }
                }
            }
        }
        if used {
            ctx.signal_used_queue(RX_QUEUE)?;
        }
        Ok(())
    }

    /// Puts the `len`-byte frame in `rx_frame` into rx buffers: one chain,
    /// or with `MRG_RXBUF` as many as it needs. Returns what happened and
    /// whether any buffer was used.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        len: usize,
    ) -> Result<(Delivery, bool), DeviceError> {
        let mergeable = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let hdr_len = self.guest_hdr_len();
        let mut used = false;
        let mut chains: Vec<(u16, Writer<'_>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = pop_chain(queue, mem, RX_QUEUE)? else {
                // Give back what was taken for this frame; it waits. A frame
                // that a whole ring of buffers cannot hold never fits.
                let taken = chains.len();
                for _ in 0..taken {
                    queue.go_to_previous_position();
                }
                if taken > 0 && taken >= usize::from(queue.size()) {
                    self.count_rx_drop(&self.net_metrics.rx_dropped_too_big);
                    return Ok((Delivery::Dropped, used));
                }
                // Fewer than the queue size (<= 1024).
                let seen = u16::try_from(taken).unwrap_or(u16::MAX);
                return Ok((Delivery::NoBuffers { seen }, used));
            };
            let head = chain.head_index();
            let writer = match rx_writer(mem, chain, hdr_len) {
                Ok(writer) => writer,
                Err(e) => {
                    tracing::debug!("{}: rx buffer {head} returned unused: {e}", self.name);
                    NetMetrics::inc(&self.net_metrics.rx_bad_buffers);
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    // Buffers already taken for this frame go back empty
                    // with it (they were popped, so they cannot be put back
                    // behind this one).
                    for (taken, _) in chains.drain(..) {
                        queue
                            .add_used(mem, taken, 0)
                            .map_err(queue_error(RX_QUEUE))?;
                    }
                    queue
                        .add_used(mem, head, 0)
                        .map_err(queue_error(RX_QUEUE))?;
                    used = true;
                    if room > 0 {
                        // Counted with the buffer above.
                        return Ok((Delivery::Dropped, used));
                    }
                    continue;
                }
            };
            if !mergeable && writer.available_bytes() < len {
                // The chain stays for a smaller frame.
                queue.go_to_previous_position();
                self.count_rx_drop(&self.net_metrics.rx_dropped_too_big);
                return Ok((Delivery::Dropped, used));
            }
            room += writer.available_bytes();
            chains.push((head, writer));
        }
        // At most a queue's worth of chains (<= 1024).
        let buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        if hdr_len == NET_HDR_LEN {
            self.rx_frame[NUM_BUFFERS_OFFSET..NET_HDR_LEN].copy_from_slice(&buffers.to_le_bytes());
        }
        let mut offset = 0;
        for (head, mut writer) in chains {
            let n = writer.available_bytes().min(len - offset);
            writer
                .write_all(&self.rx_frame[offset..offset + n])
                .map_err(|e| {
                    // The writer's slices were checked against guest memory
                    // when it was made; a failure here is the host's.
                    DeviceError::Backend(format!("{}: rx write to guest memory: {e}", self.name))
                })?;
            // n <= MAX_BUFFER_LEN.
            queue
                .add_used(mem, head, n as u32)
                .map_err(queue_error(RX_QUEUE))?;
            offset += n;
        }
        let frame_bytes = (len - hdr_len) as u64;
        NetMetrics::inc(&self.net_metrics.rx_frames);
        NetMetrics::add(&self.net_metrics.rx_bytes, frame_bytes);
        DeviceMetrics::add(&self.metrics.requests, 1);
        DeviceMetrics::add(&self.metrics.bytes_to_guest, len as u64);
        Ok((Delivery::Delivered, true))
    }

    fn count_rx_drop(&self, counter: &std::sync::atomic::AtomicU64) {
        tracing::debug!("{}: dropped a frame for the guest", self.name);
        NetMetrics::inc(counter);
        DeviceMetrics::add(&self.metrics.errors, 1);
    }

    /// Sends every available tx chain to the backend. Returns whether any
    /// was used.
    fn process_tx(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<bool, DeviceError> {
        let mem = ctx.mem;
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut used = false;
        loop {
            let queue = queue_mut(ctx.queues, TX_QUEUE)?;
            queue.set_event_idx(event_idx);
            queue
                .disable_notification(mem)
                .map_err(queue_error(TX_QUEUE))?;
            while let Some(chain) = pop_chain(queue_mut(ctx.queues, TX_QUEUE)?, mem, TX_QUEUE)? {
                let head = chain.head_index();
                self.send_tx_chain(mem, chain);
                queue_mut(ctx.queues, TX_QUEUE)?
                    .add_used(mem, head, 0)
                    .map_err(queue_error(TX_QUEUE))?;
                used = true;
            }
            if !queue_mut(ctx.queues, TX_QUEUE)?
                .enable_notification(mem)
                .map_err(queue_error(TX_QUEUE))?
            {
                return Ok(used);
            }
        }
    }

    /// Writes one tx chain (header and frame) to the backend, or drops and
    /// counts it.
    fn send_tx_chain(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let net = &self.net_metrics;
        let dropped = |counter: &std::sync::atomic::AtomicU64, why: &dyn std::fmt::Display| {
            tracing::debug!("{}: dropped a frame from the guest: {why}", self.name);
            NetMetrics::inc(counter);
            DeviceMetrics::add(&self.metrics.errors, 1);
        };
        if chain.clone().any(|d| d.is_write_only()) {
            return dropped(&net.tx_dropped_bad_chain, &"device-writable descriptor");
        }
        let mut reader = match chain.reader(mem) {
            Ok(reader) => reader,
            Err(e) => return dropped(&net.tx_dropped_bad_chain, &e),
        };
        let len = reader.available_bytes();
        let hdr_len = self.guest_hdr_len();
        if len < hdr_len {
            return dropped(&net.tx_dropped_bad_header, &format!("{len}-byte chain"));
        }
        // What goes to the tap: with its 12-byte header.
        let tap_len = len - hdr_len + NET_HDR_LEN;
        if tap_len > MAX_BUFFER_LEN {
            return dropped(&net.tx_dropped_oversize, &format!("{len}-byte chain"));
        }
        if let Err(e) = reader.read_exact(&mut self.tx_frame[..len]) {
            return dropped(&net.tx_dropped_bad_chain, &e);
        }
        if hdr_len < NET_HDR_LEN {
            // A legacy header: num_buffers (unused on tx) goes in as 0.
            self.tx_frame.copy_within(hdr_len..len, NET_HDR_LEN);
            self.tx_frame[hdr_len..NET_HDR_LEN].fill(0);
        }
        let written = loop {
            match self.backend.write_frame(&self.tx_frame[..tap_len]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match written {
            Ok(_) => {
                NetMetrics::inc(&net.tx_frames);
                NetMetrics::add(&net.tx_bytes, (len - hdr_len) as u64);
                DeviceMetrics::add(&self.metrics.requests, 1);
                DeviceMetrics::add(&self.metrics.bytes_from_guest, len as u64);
            }
            Err(e) => dropped(&net.tx_dropped_tap_error, &e),
        }
    }

    /// The configuration space: mac, status, max_virtqueue_pairs.
    fn config_bytes(&self) -> [u8; 10] {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac.bytes());
        // LINK_UP is bit 0 of a 16-bit field.
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.offered_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
        // Only legacy drivers write the mac there.
        Err(DeviceError::Backend(format!(
            "net configuration is read-only (write at offset {offset})"
        )))
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        let offloads = tap_offloads(self.acked_features);
        self.backend.set_offload(offloads).map_err(|e| {
            DeviceError::Backend(format!(
                "{}: TUNSETOFFLOAD {offloads:#x} on {}: {e}",
                self.name,
                self.backend.name()
            ))
        })?;
        self.set_backend_polled(true)?;
        tracing::debug!(
            "{}: activated on {} with features {:#x}, tap offloads {offloads:#x}",
            self.name,
            self.backend.name(),
            self.acked_features
        );
        Ok(())
    }

    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError> {
        match queue_index {
            RX_QUEUE => {
                // New buffers: poll the backend again if rx was parked.
                self.set_backend_polled(true)?;
                self.process_rx(ctx)
            }
            TX_QUEUE => {
                if self.process_tx(ctx)? {
                    ctx.signal_used_queue(TX_QUEUE)?;
                }
                Ok(())
            }
            other => Err(DeviceError::NoSuchQueue(other)),
        }
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.rx_epoll.as_raw_fd())
    }

    fn process_host_event(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<(), DeviceError> {
        self.process_rx(ctx)
    }

    fn reset(&mut self) {
        if let Err(e) = self.set_backend_polled(false) {
            tracing::error!(
                "{}: cannot stop polling {}: {e}",
                self.name,
                self.backend.name()
            );
        }
        if let Err(e) = self.backend.set_offload(0) {
            tracing::warn!(
                "{}: cannot clear offloads of {}: {e}",
                self.name,
                self.backend.name()
            );
        }
        self.rx_pending = None;
        self.acked_features = 0;
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn device_specific_metrics(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.net_metrics()).ok()
    }
}
