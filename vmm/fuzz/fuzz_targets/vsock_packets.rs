//! Fuzzes the vsock device's packet handling: the input is a program of
//! tx packets (well-formed headers with fuzzed fields, scattered over
//! descriptors so headers split anywhere), raw descriptor chains (any
//! address, length, flags, next), rx buffers of odd sizes and directions,
//! host-side activity on real Unix sockets (CONNECT lines and garbage,
//! writes, half-closes, closes, accepts), broken ring indices, feature
//! changes and resets. Nothing may panic or hang, and every used-ring entry
//! must fit the largest packet.
#![no_main]

use std::cell::RefCell;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use cloister_vmm::devices::virtio::device::{
    QueueContext, UsedNotifier, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use cloister_vmm::devices::virtio::vsock::{VsockDevice, VsockTimeouts, MAX_PKT_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 0x4_0000;
const QSIZE: u16 = 16;
/// Queue i's descriptor table, avail and used rings live at i * 0x1000.
const QUEUE_STRIDE: u64 = 0x1000;
const DATA_AREA: u64 = 0x4000;
const HDR_LEN: usize = 44;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// Reads the input front to back; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

struct NullNotifier;

impl UsedNotifier for NullNotifier {
    fn notify_used(&self, _queue_index: usize) -> std::io::Result<()> {
        Ok(())
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    next_desc: [u16; 3],
    last_used: [u16; 3],
    next_data: u64,
    dev: VsockDevice,
    dir: PathBuf,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
}

fn unique_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vsock-fuzz-{}-{n}", std::process::id()))
}

impl Rig {
    fn new() -> Option<Rig> {
        let dir = unique_dir();
        std::fs::create_dir_all(&dir).ok()?;
        let timeouts = VsockTimeouts {
            handshake: std::time::Duration::from_millis(1),
            request: std::time::Duration::from_millis(1),
            close: std::time::Duration::from_millis(1),
        };
        let dev = VsockDevice::with_timeouts(GUEST_CID, dir.join("v"), timeouts).ok()?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).ok()?;
        // Two host ports with listeners; others refuse.
        let listeners = [1u32, 2]
            .iter()
            .filter_map(|p| UnixListener::bind(dir.join(format!("v_{p}"))).ok())
            .collect::<Vec<_>>();
        for l in &listeners {
            l.set_nonblocking(true).ok()?;
        }
        let mut rig = Rig {
            mem,
            queues: Vec::new(),
            next_desc: [0; 3],
            last_used: [0; 3],
            next_data: DATA_AREA,
            dev,
            dir,
            listeners,
            streams: Vec::new(),
        };
        rig.restart()?;
        Some(rig)
    }

    /// What a transport does on a driver reset and re-activation: the device
    /// is reused across inputs, so every input also checks that a reset
    /// leaves nothing behind.
    fn restart(&mut self) -> Option<()> {
        self.dev.reset();
        self.streams.clear();
        for l in &self.listeners {
            while l.accept().is_ok() {}
        }
        let zeros = vec![0u8; DATA_AREA as usize];
        self.mem.write_slice(&zeros, GuestAddress(0)).ok()?;
        self.queues.clear();
        for i in 0..3u64 {
            let base = i * QUEUE_STRIDE;
            let mut q = Queue::new(QSIZE).ok()?;
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
            q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
            q.set_ready(true);
            self.queues.push(q);
        }
        self.next_desc = [0; 3];
        self.last_used = [0; 3];
        self.next_data = DATA_AREA;
        self.dev.ack_features(VIRTIO_F_VERSION_1);
        self.dev.activate().ok()?;
        // Clients of the previous input still in the listener's backlog
        // are accepted and, being closed, dropped here.
        self.host_event();
        self.dev.reset();
        self.dev.ack_features(VIRTIO_F_VERSION_1);
        self.dev.activate().ok()
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.clamp(1, MEM_SIZE - DATA_AREA);
        if self.next_data + len > MEM_SIZE {
            self.next_data = DATA_AREA;
        }
        let at = self.next_data;
        self.next_data += len;
        at
    }

    fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = q as u64 * QUEUE_STRIDE + 16 * u64::from(index % QSIZE);
        let _ = self.mem.write_obj(addr, GuestAddress(at));
        let _ = self.mem.write_obj(len, GuestAddress(at + 8));
        let _ = self.mem.write_obj(flags, GuestAddress(at + 12));
        let _ = self.mem.write_obj(next, GuestAddress(at + 14));
    }

    fn push_avail(&self, q: usize, head: u16) {
        let avail = q as u64 * QUEUE_STRIDE + 0x100;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let _ = self
            .mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % QSIZE)));
        let _ = self.mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
    }

    /// Puts `bytes` into a chain of `pieces` descriptors (split at fuzzed
    /// points) followed by `extra_write` writable ones.
    fn add_chain(&mut self, q: usize, bytes: &[u8], cuts: &[usize], write: bool) {
        let mut parts = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, bytes.len());
            parts.push(&bytes[start..cut]);
            start = cut;
        }
        parts.push(&bytes[start..]);
        let first = self.next_desc[q];
        let n = parts.len() as u16;
        for (i, part) in parts.iter().enumerate() {
            let addr = self.alloc(part.len() as u64);
            let _ = self.mem.write_slice(part, GuestAddress(addr));
            let index = (first + i as u16) % QSIZE;
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < parts.len() {
                flags |= DESC_F_NEXT;
                next = (index + 1) % QSIZE;
            }
            self.write_desc(q, index, addr, part.len() as u32, flags, next);
        }
        self.next_desc[q] = (first + n) % QSIZE;
        self.push_avail(q, first);
    }

    /// Returns false once the device refused to go on (it needs a reset).
    fn kick(&mut self, q: usize) -> bool {
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut refs,
            notifier: &NullNotifier,
        };
        self.dev.process_queue(q, &mut ctx).is_ok()
    }

    fn host_event(&mut self) -> bool {
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut refs,
            notifier: &NullNotifier,
        };
        self.dev.process_host_event(&mut ctx).is_ok()
    }

    /// Checks the used entries added since the last call.
    fn check_used(&mut self) {
        for q in 0..3usize {
            let used = q as u64 * QUEUE_STRIDE + 0x200;
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap_or(0);
            let new = idx.wrapping_sub(self.last_used[q]).min(QSIZE);
            for k in 0..new {
                let slot = u64::from(idx.wrapping_sub(k + 1) % QSIZE);
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 4 + 8 * slot + 4))
                    .unwrap_or(0);
                assert!(
                    len as usize <= HDR_LEN + MAX_PKT_PAYLOAD,
                    "used length {len} on queue {q}"
                );
            }
            self.last_used[q] = idx;
        }
    }

    fn tx_packet(&mut self, input: &mut Input<'_>) -> bool {
        let sel = input.u8();
        let src_cid = if sel & 1 == 0 { GUEST_CID } else { input.u64() };
        let dst_cid = if sel & 2 == 0 { 2 } else { input.u64() };
        let type_: u16 = if sel & 4 == 0 { 1 } else { input.u16() };
        let op = u16::from(input.u8() % 9);
        // Either a guest-initiated connection (guest ports 1000.., host
        // ports 0..4) or an answer to a host CONNECT (guest ports 0..4,
        // host ports allocated from 2^30).
        let (src_port, dst_port) = if sel & 64 == 0 {
            (1000 + u32::from(input.u8() % 4), u32::from(input.u8() % 4))
        } else {
            (u32::from(input.u8() % 4), (1 << 30) + u32::from(input.u8() % 4))
        };
        let flags = u32::from(input.u8() % 4);
        let buf_alloc = input.u32();
        let fwd_cnt = input.u32();
        let payload: Vec<u8> = if sel & 8 == 0 {
            let n = input.u8() as usize;
            input.bytes(n).to_vec()
        } else {
            // Large, up to just above the 64 KiB limit.
            vec![input.u8(); (input.u16() as usize) + 1024]
        };
        let len = if sel & 16 == 0 {
            payload.len() as u32
        } else {
            input.u32()
        };
        let mut bytes = Vec::with_capacity(HDR_LEN + payload.len());
        bytes.extend_from_slice(&src_cid.to_le_bytes());
        bytes.extend_from_slice(&dst_cid.to_le_bytes());
        bytes.extend_from_slice(&src_port.to_le_bytes());
        bytes.extend_from_slice(&dst_port.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&type_.to_le_bytes());
        bytes.extend_from_slice(&op.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&buf_alloc.to_le_bytes());
        bytes.extend_from_slice(&fwd_cnt.to_le_bytes());
        bytes.extend_from_slice(&payload);
        let pieces = input.u8() % 4;
        let mut cuts: Vec<usize> = (0..pieces).map(|_| input.u8() as usize).collect();
        cuts.sort_unstable();
        let write = sel & 32 != 0;
        self.add_chain(1, &bytes, &cuts, write);
        self.kick(1)
    }

    fn rx_buffers(&mut self, input: &mut Input<'_>) -> bool {
        const SIZES: [usize; 7] = [0, 20, 44, 45, 100, 4140, 65580];
        let n = input.u8() % 6;
        for _ in 0..n {
            let sel = input.u8();
            let size = SIZES[usize::from(sel) % SIZES.len()];
            let zeros = vec![0u8; size];
            // Mostly writable, sometimes readable (wrong direction).
            let write = sel & 0x80 == 0;
            let cuts = if sel & 0x40 != 0 { vec![size / 2] } else { vec![] };
            self.add_chain(0, &zeros, &cuts, write);
        }
        self.kick(0)
    }

    fn raw_chain(&mut self, input: &mut Input<'_>) -> bool {
        let q = if input.u8() & 1 == 0 { 1 } else { 0 };
        let n = input.u8() % 4 + 1;
        let first = self.next_desc[q];
        for i in 0..u16::from(n) {
            let addr = match input.u8() % 4 {
                0 => input.u64(),
                1 => MEM_SIZE - u64::from(input.u8()),
                _ => DATA_AREA + u64::from(input.u16()),
            };
            let len = match input.u8() % 3 {
                0 => input.u32(),
                _ => u32::from(input.u16()),
            };
            let flags = input.u16() & (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT);
            let next = input.u16();
            self.write_desc(q, first.wrapping_add(i), addr, len, flags, next);
        }
        self.next_desc[q] = (first + u16::from(n)) % QSIZE;
        self.push_avail(q, first);
        self.kick(q)
    }

    fn host_connect(&mut self, input: &mut Input<'_>) {
        let Ok(mut s) = UnixStream::connect(self.dir.join("v")) else {
            return;
        };
        let _ = s.set_nonblocking(true);
        let line = match input.u8() % 3 {
            0 => format!("CONNECT {}\n", input.u8() % 4).into_bytes(),
            1 => {
                let n = input.u8() as usize % 48;
                input.bytes(n).to_vec()
            }
            _ => b"CONNECT 1\nearly data".to_vec(),
        };
        let _ = s.write_all(&line);
        self.streams.push(s);
    }

    fn pick_stream(&mut self, input: &mut Input<'_>) -> Option<usize> {
        if self.streams.is_empty() {
            return None;
        }
        Some(input.u8() as usize % self.streams.len())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

thread_local! {
    // Creating the device (socket, epoll, timer, guest memory) per input
    // costs more than running most inputs.
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    RIG.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Rig::new();
        }
        let Some(rig) = slot.as_mut() else {
            return;
        };
        if rig.restart().is_none() {
            return;
        }
        run(rig, data);
    });
});

fn run(rig: &mut Rig, data: &[u8]) {
    let mut input = Input(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let alive = match input.u8() % 12 {
            0..=3 => rig.tx_packet(&mut input),
            4 => rig.rx_buffers(&mut input),
            5 => rig.raw_chain(&mut input),
            6 => rig.host_event(),
            7 => {
                rig.host_connect(&mut input);
                rig.host_event()
            }
            8 => {
                if let Some(i) = rig.pick_stream(&mut input) {
                    let n = input.u8() as usize * 16;
                    let _ = rig.streams[i].write(&vec![0x42; n]);
                }
                rig.host_event()
            }
            9 => {
                if let Some(i) = rig.pick_stream(&mut input) {
                    match input.u8() % 3 {
                        0 => drop(rig.streams.swap_remove(i)),
                        1 => {
                            let _ = rig.streams[i].shutdown(Shutdown::Write);
                        }
                        _ => {
                            let _ = rig.streams[i].shutdown(Shutdown::Read);
                        }
                    }
                }
                for l in &rig.listeners {
                    if let Ok((s, _)) = l.accept() {
                        let _ = s.set_nonblocking(true);
                        rig.streams.push(s);
                    }
                }
                rig.host_event()
            }
            10 => {
                // A driver that breaks its avail index.
                let q = usize::from(input.u8() % 3);
                let avail = q as u64 * QUEUE_STRIDE + 0x100;
                let _ = rig.mem.write_obj(input.u16(), GuestAddress(avail + 2));
                rig.kick(q)
            }
            _ => {
                match input.u8() % 4 {
                    0 => rig.dev.reset(),
                    1 => rig
                        .dev
                        .ack_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX),
                    2 => {
                        let mut cfg = [0u8; 8];
                        rig.dev.read_config(u64::from(input.u8()), &mut cfg);
                    }
                    _ => {
                        let _ = rig.kick(usize::from(input.u8() % 5));
                    }
                }
                true
            }
        };
        rig.check_used();
        if !alive {
            // The device asked for a reset: the transport would stop here.
            break;
        }
    }
}
