//! The entropy device's queue handling.

use std::io::{self, Write};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::device::{
    device_type, pop_chain, DeviceError, DeviceMetrics, QueueContext, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Entries in the request queue (what Firecracker and QEMU offer).
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets: a driver that posts a 4 GiB buffer gets
/// this much, so a guest cannot make the VMM allocate without bound.
/// Linux asks for at most a page at a time.
pub const RNG_MAX_REQUEST_BYTES: usize = 64 * 1024;

const REQUEST_QUEUE: usize = 0;

/// virtio-rng backed by `getrandom(2)`.
pub struct RngDevice {
    acked_features: u64,
    /// Reused for every request; at most [`RNG_MAX_REQUEST_BYTES`].
    buffer: Vec<u8>,
    metrics: DeviceMetrics,
}

impl Default for RngDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl RngDevice {
    pub fn new() -> Self {
        Self {
            acked_features: 0,
            buffer: Vec::new(),
            metrics: DeviceMetrics::default(),
        }
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Serves every available request of the queue; returns whether any
    /// buffer was used.
    fn serve_requests(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let mut used_any = false;
        loop {
            let Some(chain) = pop_chain(queue, mem, REQUEST_QUEUE)? else {
                return Ok(used_any);
            };
            let head = chain.head_index();
            let written = match self.fill_chain(mem, chain) {
                Ok(n) => {
                    DeviceMetrics::add(&self.metrics.requests, 1);
                    DeviceMetrics::add(&self.metrics.bytes_to_guest, n as u64);
                    n
                }
                Err(e) => {
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    tracing::debug!("rng request {head} refused: {e}");
                    0
                }
            };
            // `written` is at most RNG_MAX_REQUEST_BYTES, far below u32::MAX.
            let len = u32::try_from(written).unwrap_or(u32::MAX);
            queue
                .add_used(mem, head, len)
                .map_err(|source| DeviceError::Queue {
                    index: REQUEST_QUEUE,
                    source,
                })?;
            used_any = true;
        }
    }

    /// Fills the chain's writable buffers with random bytes, up to
    /// [`RNG_MAX_REQUEST_BYTES`]; returns how many were written.
    fn fill_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, RngRequestError> {
        let mut writer = chain.writer(mem).map_err(RngRequestError::Chain)?;
        let want = writer.available_bytes().min(RNG_MAX_REQUEST_BYTES);
        if want == 0 {
            return Err(RngRequestError::NoWritableBuffer);
        }
        self.buffer.resize(want, 0);
        fill_random(&mut self.buffer[..want]).map_err(RngRequestError::Getrandom)?;
        writer
            .write_all(&self.buffer[..want])
            .map_err(RngRequestError::GuestMemory)?;
        Ok(want)
    }
}

/// Why one request got no bytes (the request fails, the device goes on).
#[derive(Debug, thiserror::Error)]
enum RngRequestError {
    #[error("descriptor chain is invalid: {0}")]
    Chain(virtio_queue::Error),
    #[error("descriptor chain has no device-writable buffer")]
    NoWritableBuffer,
    #[error("getrandom failed: {0}")]
    Getrandom(io::Error),
    #[error("cannot write to guest memory: {0}")]
    GuestMemory(io::Error),
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`, which blocks only
/// before the host's pool is initialised at boot).
pub(crate) fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call; getrandom writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // n >= 0 and at most rest.len().
        filled += n.unsigned_abs();
    }
    Ok(())
}

impl VirtioDevice for RngDevice {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn name(&self) -> &str {
        "rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Backend(format!(
            "rng has no configuration space: write of {} bytes at offset {offset:#x}",
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

    fn reset(&mut self) {
        self.acked_features = 0;
        self.buffer = Vec::new();
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, readable, writable, CountingNotifier};

    /// Buffers live from 1 MiB up; the mock queue's rings at 0.
    const BUFFERS: u64 = 0x10_0000;
    const MEM_SIZE: usize = 0x40_0000;

    fn memory() -> GuestMemoryMmap {
        guest_memory(MEM_SIZE)
    }

    /// Runs the device once over `chains` (each a list of descriptors
    /// linked with NEXT); returns the used (id, len) pairs, interrupts and
    /// the result.
    fn serve(
        dev: &mut RngDevice,
        mem: &GuestMemoryMmap,
        chains: &[Vec<RawDescriptor>],
    ) -> (Vec<(u32, u32)>, u32, Result<(), DeviceError>) {
        let vq = MockSplitQueue::new(mem, 16);
        let mut offset = 0u16;
        for chain in chains {
            let linked: Vec<RawDescriptor> = chain
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let d = SplitDescriptor::from(*d);
                    let last = i + 1 == chain.len();
                    let flags = if last {
                        d.flags()
                    } else {
                        d.flags() | virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16
                    };
                    let next = if last { 0 } else { offset + i as u16 + 1 };
                    RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
                })
                .collect();
            vq.add_desc_chains(&linked, offset).unwrap();
            offset += chain.len() as u16;
        }
        let mut queue: Queue = vq.create_queue().unwrap();
        let notifier = CountingNotifier::default();
        let result = {
            let mut queues = [&mut queue];
            let mut ctx = QueueContext {
                mem,
                queues: &mut queues,
                notifier: &notifier,
            };
            dev.process_queue(0, &mut ctx)
        };
        let used_idx = vq.used().idx().load();
        let used = (0..used_idx)
            .map(|i| {
                let elem = vq.used().ring().ref_at(i as usize).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect();
        (used, notifier.0.get(), result)
    }

    fn bytes_at(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn rng_with_one_writable_buffer_fills_it_and_notifies() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let (used, interrupts, result) = serve(&mut dev, &mem, &[vec![writable(BUFFERS, 64)]]);
        result.unwrap();
        assert_eq!(used, vec![(0, 64)]);
        assert_eq!(interrupts, 1);
        assert_ne!(bytes_at(&mem, BUFFERS, 64), vec![0u8; 64]);
        let m = dev.metrics().snapshot();
        assert_eq!((m.requests, m.bytes_to_guest, m.errors), (1, 64, 0));
    }

    #[test]
    fn rng_with_chain_of_three_buffers_fills_each() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let chain = vec![
            writable(BUFFERS, 16),
            writable(BUFFERS + 0x1000, 32),
            writable(BUFFERS + 0x2000, 8),
        ];
        let (used, _, result) = serve(&mut dev, &mem, &[chain]);
        result.unwrap();
        assert_eq!(used, vec![(0, 56)]);
        for (addr, len) in [(BUFFERS, 16), (BUFFERS + 0x1000, 32), (BUFFERS + 0x2000, 8)] {
            assert_ne!(bytes_at(&mem, addr, len), vec![0u8; len], "{addr:#x}");
        }
        // Bytes after each buffer were not touched.
        assert_eq!(bytes_at(&mem, BUFFERS + 16, 16), vec![0u8; 16]);
    }

    #[test]
    fn rng_with_readable_only_chain_returns_it_empty_and_counts_error() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let (used, _, result) = serve(
            &mut dev,
            &mem,
            &[
                vec![readable(BUFFERS, 64)],
                vec![writable(BUFFERS + 0x1000, 8)],
            ],
        );
        result.unwrap();
        assert_eq!(used, vec![(0, 0), (1, 8)]);
        assert_eq!(bytes_at(&mem, BUFFERS, 64), vec![0u8; 64]);
        let m = dev.metrics().snapshot();
        assert_eq!((m.requests, m.errors), (1, 1));
    }

    #[test]
    fn rng_with_huge_buffer_writes_at_most_the_cap() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let (used, _, result) = serve(&mut dev, &mem, &[vec![writable(BUFFERS, 0x20_0000)]]);
        result.unwrap();
        assert_eq!(used, vec![(0, RNG_MAX_REQUEST_BYTES as u32)]);
        let after = bytes_at(&mem, BUFFERS + RNG_MAX_REQUEST_BYTES as u64, 4096);
        assert_eq!(after, vec![0u8; 4096]);
    }

    #[test]
    fn rng_with_buffer_outside_memory_fails_request_and_serves_next() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let (used, _, result) = serve(
            &mut dev,
            &mem,
            &[
                vec![writable(MEM_SIZE as u64 - 8, 64)],
                vec![writable(u64::MAX - 4, 64)],
                vec![writable(BUFFERS, 8)],
            ],
        );
        result.unwrap();
        assert_eq!(used, vec![(0, 0), (1, 0), (2, 8)]);
        assert_eq!(dev.metrics().snapshot().errors, 2);
    }

    #[test]
    fn rng_with_avail_index_beyond_queue_size_is_a_device_error() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let vq = MockSplitQueue::new(&mem, 16);
        // The driver claims 100 new buffers in a queue of 16.
        vq.avail().idx().store(100);
        let mut queue: Queue = vq.create_queue().unwrap();
        let notifier = CountingNotifier::default();
        let mut queues = [&mut queue];
        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut queues,
            notifier: &notifier,
        };
        let err = dev.process_queue(0, &mut ctx).unwrap_err();
        assert!(matches!(err, DeviceError::Queue { index: 0, .. }), "{err}");
    }

    #[test]
    fn rng_with_unknown_queue_or_config_write_is_refused() {
        let mem = memory();
        let mut dev = RngDevice::new();
        let notifier = CountingNotifier::default();
        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut [],
            notifier: &notifier,
        };
        assert!(matches!(
            dev.process_queue(1, &mut ctx),
            Err(DeviceError::NoSuchQueue(1))
        ));
        let err = dev.write_config(0, &[1]).unwrap_err();
        assert!(err.to_string().contains("offset 0x0"), "{err}");
        let mut data = [0xffu8; 4];
        dev.read_config(0, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn fill_random_fills_large_buffers() {
        let mut buf = vec![0u8; 1 << 20];
        fill_random(&mut buf).unwrap();
        assert!(buf.iter().filter(|b| **b == 0).count() < 1 << 14);
    }
}
