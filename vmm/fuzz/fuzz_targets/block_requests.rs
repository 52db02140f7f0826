//! Fuzzes virtio-blk request handling: the input lays out a 16-entry split
//! ring in a small guest memory (descriptor table, available ring, request
//! bytes), the block device serves it twice over a small image, and then:
//! nothing panicked, the image kept its size, and a read-only disk kept its
//! content.
//!
//! Input format (missing bytes read as zero):
//!   byte 0      bit 0 read-only disk, bit 1 driver acks DISCARD/WRITE_ZEROES,
//!               bit 2 EVENT_IDX
//!   byte 1      available entries (mod 17), then that many head indexes
//!   16 x 16     descriptors (le64 addr, le32 len, le16 flags, le16 next);
//!               an address with bit 63 clear is taken modulo (guest memory
//!               + 4 KiB), so most land inside and some just past the end
//!   the rest    copied to guest memory at DATA (headers, segments, data)
//!
//! Seeds: `python3 make_block_seeds.py` (one ring per request type); the
//! committed seeds (`seeds/block_requests`) are those merged with what 60 s
//! of fuzzing found. Run (see ../README.md):
//! `cd vmm/fuzz && mkdir -p corpus/block_requests && cargo +nightly fuzz run --dev block_requests corpus/block_requests seeds/block_requests -- -max_total_time=60`.
#![no_main]

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

use cloister_vmm::devices::virtio::block::{BlockConfig, BlockDevice, SECTOR_SIZE};
use cloister_vmm::devices::virtio::device::{
    QueueContext, UsedNotifier, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DATA: u64 = 0x1000;
const IMAGE_SECTORS: u64 = 64;
const FEATURE_DISCARD: u64 = 1 << 13;
const FEATURE_WRITE_ZEROES: u64 = 1 << 14;

struct Disks {
    read_write: BlockDevice,
    read_only: BlockDevice,
    /// Our own handles on the two images, whose names are gone (removed
    /// right after opening, so nothing is left behind when libFuzzer exits).
    read_write_file: File,
    read_only_file: File,
    read_only_content: Vec<u8>,
}

fn disks() -> &'static Mutex<Disks> {
    static DISKS: OnceLock<Mutex<Disks>> = OnceLock::new();
    DISKS.get_or_init(|| {
        // tmpfs where there is one: FLUSH (fdatasync) and DISCARD on a disk
        // file system cost milliseconds, which would dominate every run.
        let base = match std::path::Path::new("/dev/shm") {
            shm if shm.is_dir() => shm.to_path_buf(),
            _ => std::env::temp_dir(),
        };
        let dir = base.join(format!("cloister-fuzz-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create fuzz image directory");
        let content: Vec<u8> = (0..IMAGE_SECTORS * SECTOR_SIZE).map(|i| (i % 251) as u8).collect();
        let open = |name: &str, read_only: bool| {
            let path = dir.join(name);
            std::fs::write(&path, &content).expect("write fuzz image");
            let device = BlockDevice::new(BlockConfig {
                path: path.clone(),
                read_only,
                serial: Some("fuzz".into()),
            })
            .expect("open fuzz image");
            (device, File::open(&path).expect("reopen fuzz image"))
        };
        let (read_write, read_write_file) = open("rw.img", false);
        let (read_only, read_only_file) = open("ro.img", true);
        std::fs::remove_dir_all(&dir).expect("remove fuzz image directory");
        Mutex::new(Disks {
            read_write,
            read_only,
            read_write_file,
            read_only_file,
            read_only_content: content,
        })
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

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let read_only = mode & 1 != 0;
    let ack_holes = mode & 2 != 0;
    let event_idx = mode & 4 != 0;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let heads = usize::from(input.u8() % (QUEUE_SIZE as u8 + 1));
    let mut avail = vec![0u8; 4 + 2 * usize::from(QUEUE_SIZE)];
    for i in 0..heads {
        let head = u16::from(input.u8());
        avail[4 + 2 * i..6 + 2 * i].copy_from_slice(&head.to_le_bytes());
    }
    avail[2..4].copy_from_slice(&(heads as u16).to_le_bytes());
    mem.write_slice(&avail, GuestAddress(AVAIL_RING)).expect("avail ring");
    for i in 0..u64::from(QUEUE_SIZE) {
        let mut desc: [u8; 16] = input.bytes();
        let addr = u64::from_le_bytes(desc[..8].try_into().expect("8 bytes"));
        let addr = if addr >> 63 == 0 { addr % (MEM_SIZE + 0x1000) } else { addr };
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(DESC_TABLE + 16 * i)).expect("descriptor");
    }
    let rest = &input.0[..input.0.len().min((MEM_SIZE - DATA) as usize)];
    mem.write_slice(rest, GuestAddress(DATA)).expect("request bytes");

    let mut disks = disks().lock().expect("fuzz disks lock");
    let disks = &mut *disks;
    let dev = if read_only { &mut disks.read_only } else { &mut disks.read_write };
    let mut features = dev.features();
    if !ack_holes {
        features &= !(FEATURE_DISCARD | FEATURE_WRITE_ZEROES);
    }
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    dev.reset();
    dev.ack_features(features);

    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    let notifier = Notifier(Cell::new(0));
    for _ in 0..2 {
        let mut queues = [&mut queue];
        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut queues,
            notifier: &notifier,
        };
        // A bad ring may fail the device (the transport would mark it
        // NEEDS_RESET); it must not panic.
        let _ = dev.process_queue(0, &mut ctx);
    }

    let image = if read_only { &disks.read_only_file } else { &disks.read_write_file };
    let size = image.metadata().expect("image metadata").len();
    assert_eq!(size, IMAGE_SECTORS * SECTOR_SIZE, "image size changed");
    if read_only {
        let mut content = vec![0u8; disks.read_only_content.len()];
        image.read_exact_at(&mut content, 0).expect("read-only image");
        assert!(content == disks.read_only_content, "read-only image changed");
    }
});
