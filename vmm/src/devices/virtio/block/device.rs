//! The block device: feature negotiation, configuration space and the
//! request queue, on top of [`super::disk::DiskImage`] and
//! [`super::request`].

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{DiskImage, HoleSupport, SECTOR_SIZE};
use super::request::{
    Limits, Piece, Request, RequestChain, RequestError, Segment, Status, ID_BYTES,
};
use crate::devices::virtio::device::{
    device_type, pop_chain, read_config_bytes, DeviceError, DeviceMetrics, QueueContext,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Entries in the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// `VIRTIO_RING_F_INDIRECT_DESC`: the queue follows indirect tables, which
/// lets Linux keep many large requests in flight in a small ring.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Most segments in one DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Bytes of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and
/// its padding: everything the features we offer describe.
pub const CONFIG_LEN: usize = 60;

/// Requests and bytes served in one round before the device yields the
/// thread it shares with the other devices (vsock, console): a guest that
/// queues gigabytes or a storm of flushes cannot stall the agent's
/// connection for long. FLUSH and DISCARD / WRITE_ZEROES segments count as
/// fixed amounts of bytes.
pub const MAX_REQUESTS_PER_ROUND: u64 = 64;
pub const MAX_BYTES_PER_ROUND: u64 = 8 << 20;
/// What a FLUSH counts against [`MAX_BYTES_PER_ROUND`]: an `fdatasync` can
/// take milliseconds on a real disk, so at most four run per round.
const FLUSH_COST: u64 = MAX_BYTES_PER_ROUND / 4;
/// What each DISCARD / WRITE_ZEROES segment (one `fallocate`) counts.
const SEGMENT_COST: u64 = 256 << 10;

const REQUEST_QUEUE: usize = 0;

/// What to attach as a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// A raw image file, or a host block device.
    pub path: PathBuf,
    /// Opened `O_RDONLY`; the guest sees `VIRTIO_BLK_F_RO` and writes fail.
    pub read_only: bool,
    /// Returned by GET_ID (at most 20 bytes); none reads as an empty serial.
    pub serial: Option<String>,
}

/// Why a disk cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another process (flock): {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is {size_bytes} bytes, smaller than one 512-byte sector")]
    TooSmall { path: PathBuf, size_bytes: u64 },
    #[error("disk serial {serial:?} is {len} bytes, at most 20 are allowed")]
    SerialTooLong { serial: String, len: usize },
    #[error("cannot create the block device's resume eventfd: {0}")]
    ResumeEvent(std::io::Error),
}

/// Block-specific counters, next to the common [`DeviceMetrics`].
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
}

/// A point-in-time copy of [`BlockMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockMetricsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
}

impl BlockMetrics {
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        BlockMetricsSnapshot {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            discards: self.discards.load(Ordering::Relaxed),
            write_zeroes: self.write_zeroes.load(Ordering::Relaxed),
        }
    }
}

/// virtio-blk over a raw image. Requests are served synchronously on the
/// thread that calls [`VirtioDevice::process_queue`] (the transport's device
/// thread, never a vCPU).
pub struct BlockDevice {
    name: String,
    disk: DiskImage,
    read_only: bool,
    serial: Vec<u8>,
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    metrics: DeviceMetrics,
    block_metrics: BlockMetrics,
    /// The current request's descriptors; kept to reuse its allocation.
    pieces: Vec<Piece>,
    /// Written when a round ends with requests left over, so the event loop
    /// comes back (through [`VirtioDevice::process_host_event`]) after
    /// serving the other devices.
    resume: EventFd,
}

impl BlockDevice {
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let serial = config.serial.unwrap_or_default();
        if serial.len() > ID_BYTES {
            let len = serial.len();
            return Err(BlockError::SerialTooLong { serial, len });
        }
        let disk = DiskImage::open(&config.path, config.read_only)?;
        let resume = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::ResumeEvent)?;
        let features = offered_features(config.read_only, disk.holes());
        let config_space = config_space(&disk, features);
        tracing::debug!(
            path = %disk.path().display(),
            capacity_sectors = disk.capacity_sectors(),
            read_only = config.read_only,
            holes = ?disk.holes(),
            "block device opened"
        );
        Ok(Self {
            name: "block".to_owned(),
            disk,
            read_only: config.read_only,
            serial: serial.into_bytes(),
            features,
            acked_features: 0,
            config: config_space,
            metrics: DeviceMetrics::default(),
            block_metrics: BlockMetrics::default(),
            pieces: Vec::with_capacity(usize::from(BLOCK_QUEUE_SIZE)),
            resume,
        })
    }

    /// Names the device in logs and metrics (`block0`, `block1`, ...);
    /// `block` by default.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sectors of 512 bytes the guest sees.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    pub fn block_metrics(&self) -> &BlockMetrics {
        &self.block_metrics
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Serves available requests, at most one round's budget; returns
    /// whether any was completed. With requests left over it signals
    /// `resume` instead of re-enabling notifications.
    fn serve_requests(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let queue_err = |source| DeviceError::Queue {
            index: REQUEST_QUEUE,
            source,
        };
        let mut used_any = false;
        let (mut requests, mut budget_used) = (0u64, 0u64);
        // Each pass normally serves at least one request; the bound is for
        // a driver that keeps moving its index without adding requests.
        for _ in 0..MAX_REQUESTS_PER_ROUND {
            // Suppress kicks while draining; re-enabling reports whether the
            // driver added more in the meantime.
            queue.disable_notification(mem).map_err(queue_err)?;
            while let Some(chain) = pop_chain(queue, mem, REQUEST_QUEUE)? {
                let head = chain.head_index();
                let (used_len, cost) = self.handle_chain(mem, chain);
                queue.add_used(mem, head, used_len).map_err(queue_err)?;
                used_any = true;
                requests += 1;
                budget_used += cost;
                if requests >= MAX_REQUESTS_PER_ROUND || budget_used >= MAX_BYTES_PER_ROUND {
                    self.resume.write(1).map_err(DeviceError::Io)?;
                    return Ok(used_any);
                }
            }
            if !queue.enable_notification(mem).map_err(queue_err)? {
                return Ok(used_any);
            }
        }
        self.resume.write(1).map_err(DeviceError::Io)?;
        Ok(used_any)
    }

    /// Runs one request; returns the used length (bytes written into the
    /// chain, status included) and what it counts against the round's
    /// budget. Never fails: a bad request gets a bad status.
    fn handle_chain<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
    ) -> (u32, u64) {
        DeviceMetrics::add(&self.metrics.requests, 1);
        let mut pieces = std::mem::take(&mut self.pieces);
        let done = self.run_request(mem, chain, &mut pieces);
        self.pieces = pieces;
        done
    }

    fn run_request<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        chain: DescriptorChain<&'m GuestMemoryMmap>,
        pieces: &mut Vec<Piece>,
    ) -> (u32, u64) {
        let request = match RequestChain::new(mem, chain, pieces) {
            Ok(request) => request,
            Err(e) => {
                DeviceMetrics::add(&self.metrics.errors, 1);
                tracing::debug!("virtio-blk request dropped: {e}");
                return (0, 0);
            }
        };
        let (status, done) = match self.execute(&request) {
            Ok(done) => (Status::Ok, done),
            Err(e) => {
                DeviceMetrics::add(&self.metrics.errors, 1);
                tracing::debug!("virtio-blk request failed: {e}");
                (e.status(), Done::default())
            }
        };
        let used_len = request.finish(status, done.written);
        DeviceMetrics::add(&self.metrics.bytes_to_guest, u64::from(used_len));
        (used_len, done.cost)
    }

    /// Parses and performs the request.
    fn execute(&mut self, request: &RequestChain<'_, '_>) -> Result<Done, RequestError> {
        let limits = Limits {
            capacity_sectors: self.disk.capacity_sectors(),
            max_segments: MAX_DISCARD_SEGMENTS as usize,
        };
        let parsed = request.parse(limits)?;
        let name = parsed.name();
        match parsed {
            Request::In { sector, len } => {
                let slices = request.data_slices(true)?;
                self.disk
                    .read_to_guest(sector * SECTOR_SIZE, &slices)
                    .map_err(|source| io_error(name, sector, len as u64, source))?;
                DeviceMetrics::add(&self.block_metrics.reads, 1);
                Ok(Done {
                    written: len,
                    cost: len as u64,
                })
            }
            Request::Out { sector, len } => {
                self.refuse_if_read_only(name, sector)?;
                let slices = request.data_slices(false)?;
                self.disk
                    .write_from_guest(sector * SECTOR_SIZE, &slices)
                    .map_err(|source| io_error(name, sector, len as u64, source))?;
                DeviceMetrics::add(&self.metrics.bytes_from_guest, len as u64);
                DeviceMetrics::add(&self.block_metrics.writes, 1);
                Ok(Done {
                    written: 0,
                    cost: len as u64,
                })
            }
            Request::Flush => {
                self.disk
                    .flush()
                    .map_err(|source| io_error(name, 0, 0, source))?;
                DeviceMetrics::add(&self.block_metrics.flushes, 1);
                Ok(Done {
                    written: 0,
                    cost: FLUSH_COST,
                })
            }
            Request::GetId => Ok(Done {
                written: request.write_id(&self.serial)?,
                cost: 0,
            }),
            Request::Discard(segments) => {
                self.refuse_unless_acked(VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_T_DISCARD)?;
                self.refuse_segments_if_read_only(name, &segments)?;
                for s in &segments {
                    self.disk
                        .punch_hole(s.offset(), s.len())
                        .map_err(|source| io_error(name, s.sector, s.len(), source))?;
                }
                DeviceMetrics::add(&self.block_metrics.discards, 1);
                Ok(Done {
                    written: 0,
                    cost: SEGMENT_COST * segments.len() as u64,
                })
            }
            Request::WriteZeroes(segments) => {
                self.refuse_unless_acked(VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_WRITE_ZEROES)?;
                self.refuse_segments_if_read_only(name, &segments)?;
                for s in &segments {
                    self.write_zeroes(s)
                        .map_err(|source| io_error(name, s.sector, s.len(), source))?;
                }
                DeviceMetrics::add(&self.block_metrics.write_zeroes, 1);
                Ok(Done {
                    written: 0,
                    cost: SEGMENT_COST * segments.len() as u64,
                })
            }
        }
    }

    /// ZERO_RANGE keeps the blocks allocated, as a write of zeros would;
    /// PUNCH_HOLE is used when the guest allows unmapping, or when it is all
    /// the file system offers (a hole reads as zeros just the same).
    fn write_zeroes(&self, segment: &Segment) -> std::io::Result<()> {
        let holes = self.disk.holes();
        let unmap = segment.flags & super::request::SEGMENT_FLAG_UNMAP != 0;
        if holes.zero_range && !(unmap && holes.punch_hole) {
            self.disk.zero_range(segment.offset(), segment.len())
        } else {
            self.disk.punch_hole(segment.offset(), segment.len())
        }
    }

    fn refuse_if_read_only(&self, request: &'static str, sector: u64) -> Result<(), RequestError> {
        if self.read_only {
            Err(RequestError::ReadOnly { request, sector })
        } else {
            Ok(())
        }
    }

    fn refuse_segments_if_read_only(
        &self,
        request: &'static str,
        segments: &[Segment],
    ) -> Result<(), RequestError> {
        match segments.first() {
            Some(s) => self.refuse_if_read_only(request, s.sector),
            None => self.refuse_if_read_only(request, 0),
        }
    }

    /// DISCARD and WRITE_ZEROES exist only when negotiated; a driver that
    /// sends them anyway gets UNSUPP.
    fn refuse_unless_acked(&self, feature_bit: u32, request_type: u32) -> Result<(), RequestError> {
        if self.acked_features & (1 << feature_bit) != 0 {
            Ok(())
        } else {
            Err(RequestError::UnsupportedType(request_type))
        }
    }
}

/// What a completed request did.
#[derive(Debug, Default, Clone, Copy)]
struct Done {
    /// Data bytes written into guest memory (status byte excluded).
    written: usize,
    /// What it counts against the round's [`MAX_BYTES_PER_ROUND`].
    cost: u64,
}

fn io_error(request: &'static str, sector: u64, len: u64, source: std::io::Error) -> RequestError {
    RequestError::Io {
        request,
        sector,
        len,
        source,
    }
}

fn offered_features(read_only: bool, holes: HoleSupport) -> u64 {
    let mut features = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH;
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        if holes.punch_hole {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if holes.punch_hole || holes.zero_range {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    features
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), little-endian.
fn config_space(disk: &DiskImage, features: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &disk.capacity_sectors().to_le_bytes());
    // seg_max: the header and status take two of the ring's descriptors.
    put(12, &u32::from(BLOCK_QUEUE_SIZE - 2).to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    // Discard granularity: the file system block, where holes really free.
    let alignment = u32::try_from(disk.block_size() / SECTOR_SIZE).unwrap_or(1);
    if features & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
        put(36, &u32::MAX.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &alignment.to_le_bytes());
    }
    if features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0 {
        put(48, &u32::MAX.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[u8::from(disk.holes().punch_hole)]);
    }
    config
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLOCK_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        // CONFIG_WCE is not offered, so `writeback` is read-only too.
        Err(DeviceError::Backend(format!(
            "block configuration is read-only: write of {} bytes at offset {offset:#x}",
            data.len()
        )))
    }

    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError> {
        if queue_index != REQUEST_QUEUE {
            return Err(DeviceError::NoSuchQueue(queue_index));
        }
        ctx.serve_queue(REQUEST_QUEUE, |mem, queue| self.serve_requests(mem, queue))
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.resume.as_raw_fd())
    }

    /// The previous round left requests in the ring.
    fn process_host_event(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<(), DeviceError> {
        // WouldBlock: nothing pending (a reset drained it); still safe to
        // look at the ring.
        let _ = self.resume.read();
        self.process_queue(REQUEST_QUEUE, ctx)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        let _ = self.resume.read();
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn device_specific_metrics(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.block_metrics().snapshot()).ok()
    }
}
