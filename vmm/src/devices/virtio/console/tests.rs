//! Console tests: transmit requests through `MockSplitQueue` in real guest
//! memory, output to a real file.

use std::path::Path;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::device::{DeviceError, QueueContext, VirtioDevice};
use crate::devices::virtio::test_utils::{guest_memory, readable, writable, CountingNotifier};

const MEM_SIZE: usize = 0x40_0000;
/// Buffers live from 1 MiB up; the mock queue's rings at 0.
const BUFFERS: u64 = 0x10_0000;

fn memory() -> GuestMemoryMmap {
    guest_memory(MEM_SIZE)
}

/// Puts `chains` into a queue, kicks queue `queue_index` with that queue
/// in place of both, and returns the used (head, len) pairs, the interrupts
/// and the device's result.
fn kick(
    dev: &mut ConsoleDevice,
    mem: &GuestMemoryMmap,
    queue_index: usize,
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
    let mut other: Queue = vq.create_queue().unwrap();
    let notifier = CountingNotifier::default();
    let result = {
        let mut queues = if queue_index == 0 {
            [&mut queue, &mut other]
        } else {
            [&mut other, &mut queue]
        };
        let mut ctx = QueueContext {
            mem,
            queues: &mut queues,
            notifier: &notifier,
        };
        dev.process_queue(queue_index, &mut ctx)
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

fn file_console(path: &Path) -> ConsoleDevice {
    let mut dev = ConsoleDevice::new(ConsoleOutput::File(path.to_owned())).unwrap();
    dev.ack_features(dev.features());
    dev
}

#[test]
fn transmit_writes_exactly_the_guest_bytes_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let mut dev = file_console(&path);
    let mem = memory();
    mem.write_slice(b"hello, ", GuestAddress(BUFFERS)).unwrap();
    mem.write_slice(b"world\n", GuestAddress(BUFFERS + 0x100))
        .unwrap();
    mem.write_slice(b"\x00\xffbinary\r\n", GuestAddress(BUFFERS + 0x200))
        .unwrap();

    // One request spanning two descriptors, then a second request.
    let (used, interrupts, result) = kick(
        &mut dev,
        &mem,
        1,
        &[
            vec![readable(BUFFERS, 7), readable(BUFFERS + 0x100, 6)],
            vec![readable(BUFFERS + 0x200, 10)],
        ],
    );

    result.unwrap();
    assert_eq!(used, vec![(0, 0), (2, 0)]);
    assert_eq!(interrupts, 1);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"hello, world\n\x00\xffbinary\r\n"
    );
    let m = dev.metrics().snapshot();
    assert_eq!((m.requests, m.bytes_from_guest, m.errors), (2, 23, 0));
}

#[test]
fn transmit_request_over_the_bound_writes_the_bound_and_counts_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let mut dev = file_console(&path);
    let mem = memory();
    let len = MAX_TX_BYTES_PER_REQUEST + 4096;
    mem.write_slice(&vec![b'x'; len], GuestAddress(BUFFERS))
        .unwrap();

    let (used, _, result) = kick(&mut dev, &mem, 1, &[vec![readable(BUFFERS, len as u32)]]);

    result.unwrap();
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(
        std::fs::read(&path).unwrap().len(),
        MAX_TX_BYTES_PER_REQUEST
    );
    assert_eq!(dev.metrics().snapshot().errors, 1);
}

#[test]
fn transmit_with_only_writable_buffers_writes_nothing_and_counts_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let mut dev = file_console(&path);
    let mem = memory();

    let (used, _, result) = kick(&mut dev, &mem, 1, &[vec![writable(BUFFERS, 64)]]);

    result.unwrap();
    assert_eq!(used, vec![(0, 0)]);
    assert!(std::fs::read(&path).unwrap().is_empty());
    assert_eq!(dev.metrics().snapshot().errors, 1);
}

#[test]
fn transmit_outside_guest_memory_writes_nothing_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let mut dev = file_console(&path);
    let mem = memory();
    mem.write_slice(b"ok", GuestAddress(BUFFERS)).unwrap();

    let (used, _, result) = kick(
        &mut dev,
        &mem,
        1,
        &[
            vec![readable(MEM_SIZE as u64 - 8, 64)],
            vec![readable(BUFFERS, 2)],
        ],
    );

    result.unwrap();
    assert_eq!(used.len(), 2);
    assert_eq!(std::fs::read(&path).unwrap(), b"ok");
    assert_eq!(dev.metrics().snapshot().errors, 1);
}

#[test]
fn receive_queue_kick_leaves_guest_buffers_posted() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = file_console(&dir.path().join("console.log"));
    let mem = memory();

    let (used, interrupts, result) = kick(&mut dev, &mem, 0, &[vec![writable(BUFFERS, 64)]]);

    result.unwrap();
    assert!(used.is_empty());
    assert_eq!(interrupts, 0);
}

#[test]
fn kick_of_queue_2_returns_no_such_queue() {
    let mut dev = ConsoleDevice::new(ConsoleOutput::Sink).unwrap();
    let mem = memory();

    let (_, _, result) = kick(&mut dev, &mem, 2, &[]);

    assert!(matches!(result, Err(DeviceError::NoSuchQueue(2))));
}

#[test]
fn emergency_write_appends_one_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    let mut dev = file_console(&path);

    dev.write_config(8, &u32::from(b'!').to_le_bytes()).unwrap();

    assert_eq!(std::fs::read(&path).unwrap(), b"!");
}

#[test]
fn config_write_outside_emerg_wr_returns_error_naming_offset() {
    let mut dev = ConsoleDevice::new(ConsoleOutput::Sink).unwrap();

    let err = dev.write_config(0, &[1, 0]).unwrap_err();

    assert!(err.to_string().contains("offset 0x0"), "{err}");
}

#[test]
fn config_reports_80_by_25() {
    let dev = ConsoleDevice::new(ConsoleOutput::Sink).unwrap();
    let mut config = [0xffu8; 16];

    dev.read_config(0, &mut config);

    assert_eq!(u16::from_le_bytes([config[0], config[1]]), 80);
    assert_eq!(u16::from_le_bytes([config[2], config[3]]), 25);
    assert_eq!(config[4..], [0u8; 12]);
}

#[test]
fn new_with_file_in_missing_directory_returns_open_error_naming_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/console.log");

    let err = ConsoleDevice::new(ConsoleOutput::File(path.clone()))
        .err()
        .unwrap();

    assert!(matches!(err, ConsoleError::Open { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn file_output_appends_to_existing_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    std::fs::write(&path, b"earlier\n").unwrap();
    let mut dev = file_console(&path);
    let mem = memory();
    mem.write_slice(b"later\n", GuestAddress(BUFFERS)).unwrap();

    kick(&mut dev, &mem, 1, &[vec![readable(BUFFERS, 6)]])
        .2
        .unwrap();

    assert_eq!(std::fs::read(&path).unwrap(), b"earlier\nlater\n");
}

#[test]
fn transmit_with_avail_index_beyond_queue_size_returns_queue_error_instead_of_spinning() {
    let mut dev = ConsoleDevice::new(ConsoleOutput::Sink).unwrap();
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut rx: Queue = vq.create_queue().unwrap();
    let mut tx: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(1000);
    let notifier = CountingNotifier::default();
    let mut queues = [&mut rx, &mut tx];
    let mut ctx = QueueContext {
        mem: &mem,
        queues: &mut queues,
        notifier: &notifier,
    };

    let result = dev.process_queue(1, &mut ctx);

    assert!(
        matches!(result, Err(DeviceError::Queue { index: 1, .. })),
        "{result:?}"
    );
}
