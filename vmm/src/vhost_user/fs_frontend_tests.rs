//! The virtio-fs device served over vhost-user to rust-vmm's front end, as
//! QEMU's `vhost-user-fs-device` drives it: guest memory shared through a
//! file descriptor, two vrings (hiprio and one request queue), kick and
//! call eventfds, and real FUSE requests in the rings.

use std::mem::size_of;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, InitIn, InitOut, Opcode, OutHeader};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::serve;
use crate::devices::virtio::device::VIRTIO_RING_F_EVENT_IDX;
use crate::devices::virtio::fs::{FsConfig, FsDevice};
use crate::devices::virtio::test_utils::{readable, writable};

const MEM_SIZE: usize = 0x40_0000;
const HIPRIO_RINGS: u64 = 0x8000;
const REQUEST_RINGS: u64 = 0x0;
const QUEUE_SIZE: u16 = 128;
const REQUEST: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;

/// Waits until `call` is signalled (the back end used buffers).
fn wait_for_call(call: &EventFd) {
    let started = Instant::now();
    loop {
        if call.read().is_ok() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no used-buffer notification within 10 s"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Two descriptors chained with NEXT, placed at table index `at`.
fn linked(first: RawDescriptor, second: RawDescriptor, at: u16) -> Vec<RawDescriptor> {
    let first = SplitDescriptor::from(first);
    vec![
        RawDescriptor::from(SplitDescriptor::new(
            first.addr().0,
            first.len(),
            first.flags() | VRING_DESC_F_NEXT as u16,
            at + 1,
        )),
        second,
    ]
}

/// Puts `request` (header + args) at REQUEST as chain number `n` of the
/// request queue, kicks, waits, and returns the reply's header and body.
fn round_trip(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    n: u16,
    request: &[u8],
    kick: &EventFd,
    call: &EventFd,
) -> (OutHeader, Vec<u8>) {
    let reply_at = REPLY + u64::from(n) * 0x1000;
    let request_at = REQUEST + u64::from(n) * 0x1000;
    mem.write_slice(request, GuestAddress(request_at)).unwrap();
    let chain = linked(
        readable(request_at, request.len() as u32),
        writable(reply_at, 0x1000),
        2 * n,
    );
    vq.add_desc_chains(&chain, 2 * n).unwrap();
    kick.write(1).unwrap();
    wait_for_call(call);
    let used = vq.used().idx().load();
    assert_eq!(used, n + 1, "one more used entry");
    let elem = vq.used().ring().ref_at(usize::from(n)).unwrap().load();
    let out: OutHeader = mem.read_obj(GuestAddress(reply_at)).unwrap();
    assert_eq!(out.len, elem.len());
    let mut body = vec![0u8; out.len as usize - size_of::<OutHeader>()];
    mem.read_slice(&mut body, GuestAddress(reply_at + 16))
        .unwrap();
    (out, body)
}

fn request(opcode: Opcode, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (size_of::<InHeader>() + args.len()) as u32,
        opcode: opcode as u32,
        unique,
        nodeid,
        ..Default::default()
    };
    [header.as_slice(), args].concat()
}

#[test]
fn fuse_requests_round_trip_through_vhost_user_shared_memory() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), b"from the host").unwrap();
    let socket = dir.path().join("vhu-fs.sock");
    let device = FsDevice::new(FsConfig::new("myfs", &share)).unwrap();
    let (done, result) = mpsc::channel();
    let server_socket = socket.clone();
    thread::spawn(move || {
        let _ = done.send(serve(Box::new(device), &server_socket).map_err(|e| e.to_string()));
    });

    // Guest RAM in a file both sides map, as QEMU's memfd backend.
    let file = tempfile::tempfile().unwrap();
    file.set_len(MEM_SIZE as u64).unwrap();
    let region_fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(HIPRIO_RINGS), QUEUE_SIZE);
    let requests = MockSplitQueue::create(&mem, GuestAddress(REQUEST_RINGS), QUEUE_SIZE);

    let started = Instant::now();
    let mut frontend = loop {
        match Frontend::connect(&socket, 2) {
            Ok(frontend) => break frontend,
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                panic!("no vhost-user socket within 10 s: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    };
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    // Without EVENT_IDX: this driver does not move `used_event`, and
    // would get no second interrupt with it.
    assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
    frontend
        .set_features(features & !VIRTIO_RING_F_EVENT_IDX)
        .unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend
        .set_protocol_features(protocol & VhostUserProtocolFeatures::CONFIG.complement())
        .unwrap();
    assert_eq!(
        frontend.get_queue_num().unwrap(),
        2,
        "hiprio + 1 request queue"
    );
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: base,
            mmap_offset: 0,
            mmap_handle: region_fd,
        }])
        .unwrap();
    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    for (index, vq) in [&hiprio, &requests].into_iter().enumerate() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        frontend.set_vring_num(index, QUEUE_SIZE).unwrap();
        frontend
            .set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: base + vq.desc_table_addr().0,
                    used_ring_addr: base + vq.used_addr().0,
                    avail_ring_addr: base + vq.avail_addr().0,
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(index, 0).unwrap();
        frontend.set_vring_call(index, &call).unwrap();
        frontend.set_vring_kick(index, &kick).unwrap();
        frontend.set_vring_enable(index, true).unwrap();
        kicks.push(kick);
        calls.push(call);
    }

    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0x2_0000,
        flags: 0,
    };
    let (out, body) = round_trip(
        &mem,
        &requests,
        0,
        &request(Opcode::Init, 1, 0, init.as_slice()),
        &kicks[1],
        &calls[1],
    );
    assert_eq!((out.error, out.unique), (0, 1));
    let init_out = *InitOut::from_slice(&body[..size_of::<InitOut>()]).unwrap();
    assert_eq!(init_out.major, 7);

    let (out, body) = round_trip(
        &mem,
        &requests,
        1,
        &request(Opcode::Lookup, 2, 1, b"hello\0"),
        &kicks[1],
        &calls[1],
    );
    assert_eq!((out.error, out.unique), (0, 2));
    let entry = *EntryOut::from_slice(&body[..size_of::<EntryOut>()]).unwrap();
    assert_eq!(entry.attr.size, 13);
    assert_ne!(entry.nodeid, 1);

    drop(frontend);
    assert_eq!(
        result.recv_timeout(Duration::from_secs(10)),
        Ok(Ok(())),
        "serve returns Ok once the front end left"
    );
}
