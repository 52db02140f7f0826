//! Fuzzes the virtio-net device's frame handling: fuzzed tx chains (any
//! descriptor layout, headers split anywhere, short, oversize, writable or
//! outside guest memory) go through the device to a sink backend, and
//! fuzzed frames from the "tap" go into fuzzed rx buffers, with or without
//! mergeable buffers, event index and the modern header; resets in
//! between. Nothing may panic, every frame the sink gets must be a header
//! plus at most the largest frame, and no used rx entry may claim more
//! than a frame with its header.
//!
//! Input format (missing bytes read as zero):
//!   byte 0      bit 0 MRG_RXBUF, bit 1 EVENT_IDX, bit 2 VERSION_1 (else a
//!               legacy driver), bit 3 reset and renegotiate halfway
//!   per queue (tx, then rx):
//!     byte      available entries (mod 17), then that many head indexes
//!     16 x 16   descriptors (le64 addr, le32 len, le16 flags, le16 next);
//!               an address with bit 63 clear is taken modulo (guest
//!               memory + 4 KiB), so most land inside and some past the end
//!   byte        frames from the tap (mod 9), then per frame a le16 length
//!               (mod 70 000: runts, normal, oversize for the buffers)
//!   the rest    copied to guest memory at DATA (tx headers and frames)
//!
//! Seeds: `python3 make_net_seeds.py`. Run (see ../README.md):
//! `cd vmm/fuzz && mkdir -p corpus/net_frames && cargo +nightly fuzz run net_frames corpus/net_frames seeds/net_frames -- -max_total_time=60`.
#![no_main]

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use cloister_vmm::devices::virtio::device::{
    QueueContext, UsedNotifier, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use cloister_vmm::devices::virtio::net::{NetBackend, NetDevice, MAX_BUFFER_LEN, NET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: u64 = 0x4_0000;
const QUEUE_SIZE: u16 = 16;
/// Queue i's descriptor table, avail and used rings live at i * 0x1000.
const QUEUE_STRIDE: u64 = 0x1000;
const DATA: u64 = 0x4000;
const MRG_RXBUF: u64 = 1 << 15;

/// The tap's stand-in: frames written are kept, frames to read are queued.
#[derive(Default)]
struct Sink {
    written: Vec<usize>,
    to_read: VecDeque<Vec<u8>>,
}

struct SinkBackend {
    sink: Arc<Mutex<Sink>>,
    /// Something epoll accepts, for the device's rx epoll set.
    event: EventFd,
}

impl NetBackend for SinkBackend {
    fn name(&self) -> &str {
        "sink"
    }
    fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut sink = self.sink.lock().expect("sink lock");
        let frame = sink
            .to_read
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        // A tap truncates a frame longer than the read buffer.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        assert!(
            (NET_HDR_LEN..=MAX_BUFFER_LEN).contains(&frame.len()),
            "the tap got a {}-byte frame",
            frame.len()
        );
        self.sink.lock().expect("sink lock").written.push(frame.len());
        Ok(frame.len())
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// One device for the whole run, reset before each input (a fresh one
/// per input would spend most of the time allocating its frame buffers).
struct Fixture {
    dev: NetDevice,
    sink: Arc<Mutex<Sink>>,
}

fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let sink = Arc::new(Mutex::new(Sink::default()));
        let backend = SinkBackend {
            sink: sink.clone(),
            event: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        };
        let dev = NetDevice::new("net0", Box::new(backend), None).expect("net device");
        Mutex::new(Fixture { dev, sink })
    })
}

struct Notifier(Cell<u32>);

impl UsedNotifier for Notifier {
    fn notify_used(&self, _queue_index: usize) -> io::Result<()> {
        self.0.set(self.0.get() + 1);
        Ok(())
    }
}

/// Reads the input front to back; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }
}

/// Lays out queue `index`'s ring from the input; returns the queue.
fn ring(mem: &GuestMemoryMmap, input: &mut Input, index: u64, event_idx: bool) -> Queue {
    let base = index * QUEUE_STRIDE;
    let (desc_table, avail_ring, used_ring) = (base, base + 0x100, base + 0x200);
    let heads = usize::from(input.u8() % (QUEUE_SIZE as u8 + 1));
    let mut avail = vec![0u8; 6 + 2 * usize::from(QUEUE_SIZE)];
    for i in 0..heads {
        let head = u16::from(input.u8());
        avail[4 + 2 * i..6 + 2 * i].copy_from_slice(&head.to_le_bytes());
    }
    avail[2..4].copy_from_slice(&(heads as u16).to_le_bytes());
    mem.write_slice(&avail, GuestAddress(avail_ring)).expect("avail ring");
    for i in 0..u64::from(QUEUE_SIZE) {
        let mut desc: [u8; 16] = input.bytes();
        let addr = u64::from_le_bytes(desc[..8].try_into().expect("8 bytes"));
        let addr = if addr >> 63 == 0 { addr % (MEM_SIZE + 0x1000) } else { addr };
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(desc_table + 16 * i)).expect("descriptor");
    }
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(desc_table as u32), Some(0));
    queue.set_avail_ring_address(Some(avail_ring as u32), Some(0));
    queue.set_used_ring_address(Some(used_ring as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let event_idx = mode & 2 != 0;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mut tx = ring(&mem, &mut input, 0, event_idx);
    let mut rx = ring(&mem, &mut input, 1, event_idx);
    let mut fixture = fixture().lock().expect("fixture lock");
    let Fixture { dev, sink } = &mut *fixture;
    {
        let mut sink = sink.lock().expect("sink lock");
        sink.written.clear();
        sink.to_read.clear();
    }
    let frames = input.u8() % 9;
    for i in 0..frames {
        let len = usize::from(u16::from_le_bytes(input.bytes())) * 70_000 / 65_536;
        sink.lock().expect("sink lock").to_read.push_back(vec![i; len]);
    }
    let rest = &input.0[..input.0.len().min((MEM_SIZE - DATA) as usize)];
    mem.write_slice(rest, GuestAddress(DATA)).expect("tx bytes");

    dev.reset();
    let tx_before = dev.net_metrics().tx_frames;
    let rx_before = dev.net_metrics();
    let mut features = dev.features();
    if mode & 1 == 0 {
        features &= !MRG_RXBUF;
    }
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    if mode & 4 == 0 {
        features &= !VIRTIO_F_VERSION_1;
    }
    dev.ack_features(features);
    dev.activate().expect("activate");
    let notifier = Notifier(Cell::new(0));
    for round in 0..2 {
        if round == 1 && mode & 8 != 0 {
            dev.reset();
            dev.ack_features(features);
            dev.activate().expect("activate again");
        }
        let mut queues = [&mut rx, &mut tx];
        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut queues,
            notifier: &notifier,
        };
        // A broken ring may fail the device (the transport would mark it
        // NEEDS_RESET); it must not panic.
        let _ = dev.process_queue(1, &mut ctx);
        let _ = dev.process_host_event(&mut ctx);
        let _ = dev.process_queue(0, &mut ctx);
    }

    let used_idx: u16 = mem
        .read_obj(GuestAddress(QUEUE_STRIDE + 0x200 + 2))
        .expect("rx used idx");
    for i in 0..used_idx.min(QUEUE_SIZE) {
        let len: u32 = mem
            .read_obj(GuestAddress(QUEUE_STRIDE + 0x200 + 4 + 8 * u64::from(i) + 4))
            .expect("rx used len");
        assert!(len as usize <= MAX_BUFFER_LEN, "rx used entry claims {len} bytes");
    }
    let metrics = dev.net_metrics();
    let taken = (metrics.rx_frames - rx_before.rx_frames)
        + (metrics.rx_dropped_too_big - rx_before.rx_dropped_too_big)
        + (metrics.rx_dropped_runt - rx_before.rx_dropped_runt);
    assert!(
        taken <= u64::from(frames),
        "more rx frames than the tap had: {metrics:?}"
    );
    assert_eq!(
        sink.lock().expect("sink lock").written.len() as u64,
        metrics.tx_frames - tx_before,
        "tx frames counted differ from frames written"
    );
});
