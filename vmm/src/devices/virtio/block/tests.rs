//! Block device tests: real image files in a temp directory, requests put
//! through `MockSplitQueue` in real guest memory.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::device::{DeviceError, QueueContext, VirtioDevice};
use crate::devices::virtio::test_utils::{guest_memory, readable, writable, CountingNotifier};

const MEM_SIZE: usize = 0x100_0000;
/// Request buffers live from 1 MiB up; the mock queue's rings at 0.
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const IMAGE_SECTORS: u64 = 256;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

fn memory() -> GuestMemoryMmap {
    guest_memory(MEM_SIZE)
}

/// Writes a request header at `addr`.
fn put_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(addr)).unwrap();
}

/// Writes DISCARD / WRITE_ZEROES segments at `addr`; returns their length.
fn put_segments(mem: &GuestMemoryMmap, addr: u64, segments: &[(u64, u32, u32)]) -> u32 {
    let mut raw = Vec::new();
    for (sector, num_sectors, flags) in segments {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&num_sectors.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    raw.len() as u32
}

fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj::<u8>(GuestAddress(addr)).unwrap()
}

/// Runs the device once over `chains` (each a list of descriptors that gets
/// linked with NEXT); returns the used (head, len) pairs and the interrupts.
fn serve(
    dev: &mut BlockDevice,
    mem: &GuestMemoryMmap,
    chains: &[Vec<RawDescriptor>],
) -> (Vec<(u32, u32)>, u32) {
    serve_rounds(dev, mem, chains, 0)
}

/// As [`serve`], then `host_events` rounds of `process_host_event`, as the
/// event loop runs them while the device's resume eventfd is readable.
fn serve_rounds(
    dev: &mut BlockDevice,
    mem: &GuestMemoryMmap,
    chains: &[Vec<RawDescriptor>],
    host_events: usize,
) -> (Vec<(u32, u32)>, u32) {
    let vq = MockSplitQueue::new(mem, 64);
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
                    d.flags() | VRING_DESC_F_NEXT as u16
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
    {
        let mut queues = [&mut queue];
        let mut ctx = QueueContext {
            mem,
            queues: &mut queues,
            notifier: &notifier,
        };
        dev.process_queue(0, &mut ctx).unwrap();
        for _ in 0..host_events {
            dev.process_host_event(&mut ctx).unwrap();
        }
    }
    let used_idx = vq.used().idx().load();
    let used = (0..used_idx)
        .map(|i| {
            let elem = vq.used().ring().ref_at(i as usize).unwrap().load();
            (elem.id(), elem.len())
        })
        .collect();
    (used, notifier.0.get())
}

/// An image of `IMAGE_SECTORS` sectors where byte i holds `i % 251`.
fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let bytes: Vec<u8> = (0..IMAGE_SECTORS * 512).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open(path: &Path, read_only: bool, serial: Option<&str>) -> BlockDevice {
    let mut dev = BlockDevice::new(BlockConfig {
        path: path.to_owned(),
        read_only,
        serial: serial.map(str::to_owned),
    })
    .unwrap();
    dev.ack_features(dev.features());
    dev
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn write_then_read_across_several_data_descriptors_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut dev = open(&path, false, None);
    let mem = memory();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    put_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 8);
    // Three descriptors whose lengths are not sector multiples on their own.
    let write = vec![
        readable(HEADER, 16),
        readable(DATA, 700),
        readable(DATA + 700, 2900),
        readable(DATA + 3600, 496),
        writable(STATUS, 1),
    ];

    let (used, interrupts) = serve(&mut dev, &mem, &[write]);

    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(interrupts, 1);
    assert_eq!(status_at(&mem, STATUS), S_OK);
    assert_eq!(file_bytes(&path, 8 * 512, 4096), data);

    let back = DATA + 0x1_0000;
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 8);
    let read = vec![
        readable(HEADER, 16),
        writable(back, 1000),
        writable(back + 1000, 3096),
        writable(STATUS + 1, 1),
    ];
    let (used, _) = serve(&mut dev, &mem, &[read]);

    assert_eq!(used, vec![(0, 4097)]);
    assert_eq!(status_at(&mem, STATUS + 1), S_OK);
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, data);
    let m = dev.metrics().snapshot();
    assert_eq!(m.requests, 2);
    assert_eq!(m.bytes_from_guest, 4096);
    assert_eq!(m.bytes_to_guest, 1 + 4097);
    assert_eq!(m.errors, 0);
    let b = dev.block_metrics().snapshot();
    assert_eq!((b.reads, b.writes), (1, 1));
}

#[test]
fn read_of_last_sector_returns_image_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut dev = open(&path, false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(DATA, 512),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, file_bytes(&path, (IMAGE_SECTORS - 1) * 512, 512));
}

#[test]
fn header_split_across_descriptors_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut dev = open(&path, false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 3);

    // 5 + 11 header bytes in two descriptors, data and status sharing one.
    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 5),
            readable(HEADER + 5, 11),
            writable(DATA, 513),
        ]],
    );

    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status_at(&mem, DATA + 512), S_OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, file_bytes(&path, 3 * 512, 512));
}

#[test]
fn header_and_data_in_one_descriptor_are_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut dev = open(&path, false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 1);
    let data = vec![0xabu8; 1024];
    mem.write_slice(&data, GuestAddress(HEADER + 16)).unwrap();

    serve(
        &mut dev,
        &mem,
        &[vec![readable(HEADER, 16 + 1024), writable(STATUS, 1)]],
    );

    assert_eq!(status_at(&mem, STATUS), S_OK);
    assert_eq!(file_bytes(&path, 512, 1024), data);
}

#[test]
fn flush_returns_ok_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);

    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![readable(HEADER, 16), writable(STATUS, 1)]],
    );

    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(status_at(&mem, STATUS), S_OK);
    assert_eq!(dev.block_metrics().snapshot().flushes, 1);
    // What the VMM's metrics report carries for this disk.
    let reported = dev.device_specific_metrics().unwrap();
    assert_eq!(reported["flushes"], 1);
    assert_eq!(reported["writes"], 0);
}

#[test]
fn get_id_returns_serial_zero_padded_to_20_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, Some("cloister-disk-0"));
    let mem = memory();
    mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
    put_header(&mem, HEADER, VIRTIO_BLK_T_GET_ID, 0);

    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(DATA, 20),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(used, vec![(0, 21)]);
    assert_eq!(status_at(&mem, STATUS), S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let mut want = [0u8; 20];
    want[..15].copy_from_slice(b"cloister-disk-0");
    assert_eq!(id, want);
}

#[test]
fn get_id_without_serial_returns_empty_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
    put_header(&mem, HEADER, VIRTIO_BLK_T_GET_ID, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(DATA, 20),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_OK);
    let mut id = [0xffu8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id, [0u8; 20]);
}

#[test]
fn write_to_read_only_disk_returns_ioerr_and_leaves_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut dev = open(&path, true, None);
    assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mem = memory();
    mem.write_slice(&[0x55u8; 512], GuestAddress(DATA)).unwrap();
    put_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);

    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, 512),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(used, vec![(0, 1)]);
    assert_eq!(status_at(&mem, STATUS), S_IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dev.metrics().snapshot().errors, 1);
}

#[test]
fn read_with_sector_beyond_capacity_returns_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    // Starts inside the disk, ends one sector past it.
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1);
    put_header(&mem, HEADER + 16, VIRTIO_BLK_T_IN, u64::MAX);

    serve(
        &mut dev,
        &mem,
        &[
            vec![
                readable(HEADER, 16),
                writable(DATA, 1024),
                writable(STATUS, 1),
            ],
            vec![
                readable(HEADER + 16, 16),
                writable(DATA, 512),
                writable(STATUS + 1, 1),
            ],
        ],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
    assert_eq!(status_at(&mem, STATUS + 1), S_IOERR);
    assert_eq!(dev.metrics().snapshot().errors, 2);
}

#[test]
fn read_with_length_not_multiple_of_512_returns_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(DATA, 1000),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
}

#[test]
fn header_shorter_than_16_bytes_returns_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![readable(HEADER, 8), writable(STATUS, 1)]],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
}

#[test]
fn chain_with_no_writable_status_byte_is_returned_with_zero_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut dev = open(&path, false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);

    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![readable(HEADER, 16), readable(DATA, 512)]],
    );

    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(dev.metrics().snapshot().errors, 1);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn chain_ending_in_a_readable_descriptor_is_returned_with_zero_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);

    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(STATUS, 1),
            readable(DATA, 16),
        ]],
    );

    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(status_at(&mem, STATUS), 0xee);
}

#[test]
fn readable_descriptor_after_writable_one_returns_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![
            writable(DATA, 512),
            readable(HEADER, 16),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
}

#[test]
fn read_with_readable_data_returns_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, 512),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
}

#[test]
fn write_with_writable_data_returns_ioerr_and_leaves_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut dev = open(&path, false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(DATA, 512),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn data_descriptor_outside_guest_memory_returns_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(MEM_SIZE as u64 - 256, 512),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_IOERR);
}

#[test]
fn status_descriptor_outside_guest_memory_is_returned_with_zero_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);

    let (used, _) = serve(
        &mut dev,
        &mem,
        &[vec![readable(HEADER, 16), writable(MEM_SIZE as u64, 1)]],
    );

    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(dev.metrics().snapshot().errors, 1);
}

#[test]
fn unknown_request_type_returns_unsupp() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, 0x7777, 0);

    serve(
        &mut dev,
        &mem,
        &[vec![readable(HEADER, 16), writable(STATUS, 1)]],
    );

    assert_eq!(status_at(&mem, STATUS), S_UNSUPP);
}

#[test]
fn several_requests_in_one_kick_complete_in_order_with_one_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    for i in 0..4u64 {
        put_header(&mem, HEADER + 16 * i, VIRTIO_BLK_T_IN, i);
    }
    let chains: Vec<_> = (0..4u64)
        .map(|i| {
            vec![
                readable(HEADER + 16 * i, 16),
                writable(DATA + 512 * i, 512),
                writable(STATUS + i, 1),
            ]
        })
        .collect();

    let (used, interrupts) = serve(&mut dev, &mem, &chains);

    assert_eq!(used, vec![(0, 513), (3, 513), (6, 513), (9, 513)]);
    assert_eq!(interrupts, 1);
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn discard_punches_a_hole_that_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    // 4 MiB of non-zero data, so freed blocks show in st_blocks.
    std::fs::write(&path, vec![0x5au8; 4 << 20]).unwrap();
    let mut dev = open(&path, false, None);
    if dev.features() & (1 << VIRTIO_BLK_F_DISCARD) == 0 {
        eprintln!(
            "SKIP: the file system under {} cannot punch holes",
            path.display()
        );
        return;
    }
    let before = allocated_bytes(&path);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
    // 1 MiB at 1 MiB.
    let len = put_segments(&mem, DATA, &[(2048, 2048, 0)]);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, len),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_OK);
    assert!(
        allocated_bytes(&path) <= before - (1 << 20),
        "allocation {} -> {}",
        before,
        allocated_bytes(&path)
    );
    assert_eq!(file_bytes(&path, 1 << 20, 1 << 20), vec![0u8; 1 << 20]);
    assert_eq!(file_bytes(&path, (1 << 20) - 512, 512), vec![0x5au8; 512]);
    assert_eq!(file_bytes(&path, 2 << 20, 512), vec![0x5au8; 512]);
    assert_eq!(dev.block_metrics().snapshot().discards, 1);
}

#[test]
fn write_zeroes_zeroes_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut dev = open(&path, false, None);
    if dev.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES) == 0 {
        eprintln!(
            "SKIP: the file system under {} supports neither ZERO_RANGE nor PUNCH_HOLE",
            path.display()
        );
        return;
    }
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    // One segment with UNMAP allowed, one without.
    let len = put_segments(&mem, DATA, &[(4, 2, 1), (10, 1, 0)]);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, len),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_OK);
    assert_eq!(file_bytes(&path, 4 * 512, 1024), vec![0u8; 1024]);
    assert_eq!(file_bytes(&path, 10 * 512, 512), vec![0u8; 512]);
    assert_ne!(file_bytes(&path, 6 * 512, 512), vec![0u8; 512]);
    assert_ne!(file_bytes(&path, 11 * 512, 512), vec![0u8; 512]);
}

#[test]
fn discard_with_segment_beyond_capacity_returns_ioerr_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut dev = open(&path, false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_segments(&mem, DATA, &[(0, 8, 0), (IMAGE_SECTORS - 1, 2, 0)]);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, len),
            writable(STATUS, 1),
        ]],
    );

    // IOERR where discard is offered; UNSUPP where it is not.
    assert_ne!(status_at(&mem, STATUS), S_OK);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn discard_not_negotiated_returns_unsupp() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let before = std::fs::read(&path).unwrap();
    let mut dev = open(&path, false, None);
    dev.ack_features(dev.features() & !(1 << VIRTIO_BLK_F_DISCARD));
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_segments(&mem, DATA, &[(0, 8, 0)]);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, len),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_UNSUPP);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn discard_with_unmap_flag_returns_unsupp() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
    let len = put_segments(&mem, DATA, &[(0, 8, 1)]);

    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            readable(DATA, len),
            writable(STATUS, 1),
        ]],
    );

    assert_eq!(status_at(&mem, STATUS), S_UNSUPP);
}

#[test]
fn read_only_disk_offers_neither_discard_nor_write_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = open(&image(dir.path()), true, None);

    assert_eq!(
        dev.features() & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
}

#[test]
fn config_space_reports_capacity_in_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let dev = open(&image(dir.path()), false, None);
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    let mut blk_size = [0u8; 4];
    dev.read_config(20, &mut blk_size);
    let mut beyond = [0xffu8; 8];
    dev.read_config(CONFIG_LEN as u64 - 4, &mut beyond);

    assert_eq!(u64::from_le_bytes(capacity), IMAGE_SECTORS);
    assert_eq!(u32::from_le_bytes(blk_size), 512);
    assert_eq!(beyond[4..], [0u8; 4]);
}

#[test]
fn config_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);

    let err = dev.write_config(0, &[1, 2, 3, 4]).unwrap_err();

    assert!(err.to_string().contains("offset 0x0"), "{err}");
}

#[test]
fn new_with_missing_image_returns_open_error_naming_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.img");

    let err = BlockDevice::new(BlockConfig {
        path: path.clone(),
        read_only: false,
        serial: None,
    })
    .err()
    .unwrap();

    assert!(matches!(err, BlockError::Open { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn new_with_image_smaller_than_a_sector_returns_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.img");
    std::fs::write(&path, [0u8; 100]).unwrap();

    let err = BlockDevice::new(BlockConfig {
        path,
        read_only: false,
        serial: None,
    })
    .err()
    .unwrap();

    assert!(
        matches!(
            err,
            BlockError::TooSmall {
                size_bytes: 100,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn new_with_serial_longer_than_20_bytes_returns_serial_too_long() {
    let dir = tempfile::tempdir().unwrap();

    let err = BlockDevice::new(BlockConfig {
        path: image(dir.path()),
        read_only: false,
        serial: Some("a-serial-of-21-bytes!".to_owned()),
    })
    .err()
    .unwrap();

    assert!(
        matches!(err, BlockError::SerialTooLong { len: 21, .. }),
        "{err}"
    );
}

#[test]
fn second_writer_on_same_image_returns_lock_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let _first = open(&path, false, None);

    let err = BlockDevice::new(BlockConfig {
        path,
        read_only: false,
        serial: None,
    })
    .err()
    .unwrap();

    assert!(matches!(err, BlockError::Lock { .. }), "{err}");
}

#[test]
fn image_size_not_multiple_of_512_hides_the_partial_sector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    std::fs::write(&path, vec![1u8; 512 * 3 + 100]).unwrap();

    let dev = open(&path, false, None);

    assert_eq!(dev.capacity_sectors(), 3);
    // The partial sector is unreachable: a read of sector 3 is out of range.
    let mut dev = dev;
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_IN, 3);
    serve(
        &mut dev,
        &mem,
        &[vec![
            readable(HEADER, 16),
            writable(DATA, 512),
            writable(STATUS, 1),
        ]],
    );
    assert_eq!(status_at(&mem, STATUS), S_IOERR);
}

/// Whether the device asked the event loop to come back.
fn resume_pending(dev: &BlockDevice) -> bool {
    let fd = dev.host_event_fd().unwrap();
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call, no timeout.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[test]
fn kick_beyond_one_round_budget_yields_and_finishes_on_host_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut dev = open(&path, false, None);
    let mem = memory();
    // Three 4 MiB reads: the first two fill the 8 MiB round budget.
    let request = 4u32 << 20;
    let chains: Vec<_> = (0..3u64)
        .map(|i| {
            put_header(&mem, HEADER + 16 * i, VIRTIO_BLK_T_IN, i * 8192);
            vec![
                readable(HEADER + 16 * i, 16),
                writable(DATA + u64::from(request) * i, request),
                writable(HEADER + 0x100 + i, 1),
            ]
        })
        .collect();

    let (used, _) = serve_rounds(&mut dev, &mem, &chains, 0);

    assert_eq!(used.len(), 2);
    assert!(resume_pending(&dev));

    let (used, _) = serve_rounds(&mut dev, &mem, &chains, 1);

    assert_eq!(used.len(), 3);
    assert!(!resume_pending(&dev));
    for i in 0..3 {
        assert_eq!(status_at(&mem, HEADER + 0x100 + i), S_OK);
    }
}

#[test]
fn avail_index_beyond_queue_size_returns_queue_error_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    // 1000 requests "available" in a 16-entry ring.
    vq.avail().idx().store(1000);
    let notifier = CountingNotifier::default();
    let mut queues = [&mut queue];
    let mut ctx = QueueContext {
        mem: &mem,
        queues: &mut queues,
        notifier: &notifier,
    };

    let result = dev.process_queue(0, &mut ctx);

    assert!(
        matches!(result, Err(DeviceError::Queue { index: 0, .. })),
        "{result:?}"
    );
}

#[test]
fn flushes_beyond_a_round_budget_yield_after_four() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = open(&image(dir.path()), false, None);
    let mem = memory();
    put_header(&mem, HEADER, VIRTIO_BLK_T_FLUSH, 0);
    let chains: Vec<_> = (0..6u64)
        .map(|i| vec![readable(HEADER, 16), writable(STATUS + i, 1)])
        .collect();

    let (used, _) = serve_rounds(&mut dev, &mem, &chains, 0);

    assert_eq!(used.len(), 4);
    assert!(resume_pending(&dev));
    assert_eq!(dev.block_metrics().snapshot().flushes, 4);
}
