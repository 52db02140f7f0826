//! Net device tests: frames through `MockSplitQueue` rx and tx queues in
//! real guest memory, with a Unix datagram socket pair standing in for
//! the tap (same message boundaries, non-blocking, truncating reads).
//! `real_tap` repeats the main paths on a real tap in a private network
//! namespace.

mod real_tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::device::{
    QueueContext, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::virtio::test_utils::{guest_memory, readable, writable, CountingNotifier};

const MEM_SIZE: usize = 0x100_0000;
const QUEUE_SIZE: u16 = 16;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
/// Buffers are handed out from here up.
const BUFFERS: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

fn bit(feature: u32) -> u64 {
    1 << feature
}

/// What the socket-pair backend was told.
#[derive(Default)]
struct OffloadLog {
    /// Flags TUNSETOFFLOAD accepts (a superset test).
    accepted: u32,
    calls: Vec<u32>,
}

/// One end of a datagram socket pair as the device's backend.
struct PairBackend {
    socket: UnixDatagram,
    offloads: Arc<Mutex<OffloadLog>>,
}

impl NetBackend for PairBackend {
    fn name(&self) -> &str {
        "pair"
    }
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.socket.send(frame)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        let mut log = self.offloads.lock().unwrap();
        log.calls.push(flags);
        if flags & !log.accepted != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

/// A device with its two queues, the peer end of its backend, and a bump
/// allocator for buffers.
struct Fixture<'m> {
    mem: &'m GuestMemoryMmap,
    dev: NetDevice,
    /// The other end of the socket-pair backend.
    peer: Option<UnixDatagram>,
    offloads: Arc<Mutex<OffloadLog>>,
    rx_mock: MockSplitQueue<'m, GuestMemoryMmap>,
    tx_mock: MockSplitQueue<'m, GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    /// Next free descriptor index per queue.
    next_desc: [u16; 2],
    next_buffer: u64,
    notifier: CountingNotifier,
}

fn device_with(accepted: u32) -> (NetDevice, UnixDatagram, Arc<Mutex<OffloadLog>>) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let offloads = Arc::new(Mutex::new(OffloadLog {
        accepted,
        calls: Vec::new(),
    }));
    let backend = PairBackend {
        socket: ours,
        offloads: offloads.clone(),
    };
    let dev = NetDevice::new(
        "net0",
        Box::new(backend),
        Some(MacAddress::new(MAC).unwrap()),
    )
    .unwrap();
    (dev, peer, offloads)
}

const ALL_TUN: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

impl<'m> Fixture<'m> {
    /// A device negotiated with `features` (masked by what it offers) and
    /// activated.
    fn new(mem: &'m GuestMemoryMmap, features: u64) -> Self {
        let (dev, peer, offloads) = device_with(ALL_TUN);
        let mut fixture = Self::on(mem, dev, features);
        fixture.peer = Some(peer);
        fixture.offloads = offloads;
        fixture
    }

    /// `dev` negotiated with `features` and activated, without a peer.
    fn on(mem: &'m GuestMemoryMmap, mut dev: NetDevice, features: u64) -> Self {
        dev.ack_features(features);
        dev.activate().unwrap();
        let rx_mock = MockSplitQueue::create(mem, GuestAddress(RX_RING), QUEUE_SIZE);
        let tx_mock = MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_SIZE);
        let rx = rx_mock.create_queue().unwrap();
        let tx = tx_mock.create_queue().unwrap();
        Self {
            mem,
            dev,
            peer: None,
            offloads: Arc::default(),
            rx_mock,
            tx_mock,
            rx,
            tx,
            next_desc: [0; 2],
            next_buffer: BUFFERS,
            notifier: CountingNotifier::default(),
        }
    }

    fn buffer(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += u64::from(len).next_multiple_of(0x1000);
        addr
    }

    /// Makes `descs` available as one chain on queue `index`.
    fn add_chain(&mut self, index: usize, descs: &[RawDescriptor]) {
        let first = self.next_desc[index];
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = d.flags() | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        let mock = if index == 0 {
            &self.rx_mock
        } else {
            &self.tx_mock
        };
        mock.add_desc_chains(&linked, first).unwrap();
        self.next_desc[index] = (first + descs.len() as u16) % QUEUE_SIZE;
    }

    /// One single-descriptor rx buffer of `len` bytes; returns its address.
    fn add_rx_buffer(&mut self, len: u32) -> u64 {
        let addr = self.buffer(len);
        self.add_chain(0, &[writable(addr, len)]);
        addr
    }

    /// A tx chain holding `bytes` split into descriptors of the given
    /// sizes (the last takes the rest).
    fn add_tx_frame(&mut self, bytes: &[u8], split: &[usize]) {
        let mut descs = Vec::new();
        let mut rest = bytes;
        for &size in split {
            let (part, tail) = rest.split_at(size.min(rest.len()));
            descs.push(self.put(part));
            rest = tail;
        }
        if !rest.is_empty() || descs.is_empty() {
            descs.push(self.put(rest));
        }
        self.add_chain(1, &descs);
    }

    fn put(&mut self, part: &[u8]) -> RawDescriptor {
        let addr = self.buffer(part.len() as u32);
        self.mem.write_slice(part, GuestAddress(addr)).unwrap();
        readable(addr, part.len() as u32)
    }

    fn with_ctx<T>(&mut self, f: impl FnOnce(&mut NetDevice, &mut QueueContext) -> T) -> T {
        let mut queues = [&mut self.rx, &mut self.tx];
        let mut ctx = QueueContext {
            mem: self.mem,
            queues: &mut queues,
            notifier: &self.notifier,
        };
        f(&mut self.dev, &mut ctx)
    }

    fn kick(&mut self, index: usize) {
        self.with_ctx(|dev, ctx| dev.process_queue(index, ctx))
            .unwrap();
    }

    fn host_event(&mut self) {
        self.with_ctx(|dev, ctx| dev.process_host_event(ctx))
            .unwrap();
    }

    /// (descriptor id, length) of each used entry of queue `index`.
    fn used(&self, index: usize) -> Vec<(u32, u32)> {
        let mock = if index == 0 {
            &self.rx_mock
        } else {
            &self.tx_mock
        };
        let idx = mock.used().idx().load();
        (0..idx)
            .map(|i| {
                let elem = mock.used().ring().ref_at(usize::from(i)).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// `avail_event` of the rx queue: the index the driver kicks at (after
    /// the used ring's entries).
    fn avail_event(&self) -> u16 {
        let addr = self.rx_mock.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Whether the device's host event fd would wake the event loop now.
    fn host_event_readable(&self) -> bool {
        readable_now(self.dev.host_event_fd().unwrap())
    }

    fn peer(&self) -> &UnixDatagram {
        self.peer.as_ref().expect("a socket-pair fixture")
    }

    fn peer_frames(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0; MAX_BUFFER_LEN + 100];
        while let Ok(n) = self.peer().recv(&mut buf) {
            frames.push(buf[..n].to_vec());
        }
        frames
    }
}

fn readable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert!(n >= 0, "poll: {}", io::Error::last_os_error());
    n == 1
}

/// A header (with `flags`) and `len` payload bytes with a recognisable
/// pattern.
fn frame(flags: u8, len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes[0] = flags;
    bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    bytes
}

/// `frame` as the guest must see it: `num_buffers` filled in.
fn with_num_buffers(mut frame: Vec<u8>, n: u16) -> Vec<u8> {
    frame[10..12].copy_from_slice(&n.to_le_bytes());
    frame
}

const BASIC: u64 = VIRTIO_F_VERSION_1;

#[test]
fn features_with_offloading_tap_offer_checksum_and_tso_and_leave_tap_without_offloads() {
    let (dev, _peer, offloads) = device_with(ALL_TUN | libc::TUN_F_TSO_ECN);

    let features = dev.features();

    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
    ] {
        assert_ne!(features & bit(feature), 0, "feature {feature}");
    }
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_eq!(offloads.lock().unwrap().calls, [ALL_TUN, 0]);
}

#[test]
fn features_with_tap_refusing_tso_offer_only_checksum_and_without_csum_nothing() {
    let (dev, _peer, offloads) = device_with(libc::TUN_F_CSUM);
    let features = dev.features();
    assert_ne!(features & bit(VIRTIO_NET_F_CSUM), 0);
    assert_ne!(features & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
    assert_eq!(features & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(features & bit(VIRTIO_NET_F_HOST_TSO4), 0);
    assert_eq!(
        offloads.lock().unwrap().calls,
        [ALL_TUN, libc::TUN_F_CSUM, 0]
    );

    let (dev, _peer, _) = device_with(0);
    let offload_bits = bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_HOST_TSO4);
    assert_eq!(dev.features() & offload_bits, 0);
}

#[test]
fn activate_sets_tap_offloads_to_the_guest_offloads_the_driver_accepted() {
    let (mut dev, _peer, offloads) = device_with(ALL_TUN);
    dev.ack_features(
        BASIC
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_CSUM),
    );
    dev.activate().unwrap();
    assert_eq!(
        offloads.lock().unwrap().calls.last(),
        Some(&(libc::TUN_F_CSUM | libc::TUN_F_TSO4))
    );

    // TSO without GUEST_CSUM is not a valid combination: nothing.
    dev.reset();
    dev.ack_features(BASIC | bit(VIRTIO_NET_F_GUEST_TSO4));
    dev.activate().unwrap();
    assert_eq!(offloads.lock().unwrap().calls.last(), Some(&0));
}

#[test]
fn config_space_holds_mac_link_up_and_one_queue_pair_and_is_read_only() {
    let (mut dev, _peer, _) = device_with(0);
    let mut config = [0xffu8; 12];
    dev.read_config(0, &mut config);
    assert_eq!(config, [0x02, 0, 0, 0, 0, 0x42, 1, 0, 1, 0, 0, 0]);
    let mut status = [0u8; 2];
    dev.read_config(6, &mut status);
    assert_eq!(status, [1, 0]);

    let err = dev.write_config(0, &[0x02]).unwrap_err();
    assert!(err.to_string().contains("offset 0"), "{err}");
}

#[test]
fn device_without_mac_gets_a_random_locally_administered_one() {
    let (ours, _peer) = UnixDatagram::pair().unwrap();
    let backend = PairBackend {
        socket: ours,
        offloads: Arc::default(),
    };
    let dev = NetDevice::new("net0", Box::new(backend), None).unwrap();
    assert_eq!(dev.mac().bytes()[0] & 0x03, 0x02);
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, dev.mac().bytes());
}

#[test]
fn tx_frame_split_over_descriptors_reaches_the_tap_byte_for_byte() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    let first = frame(0, 1500, 1);
    let second = frame(1, 60, 2);
    // Header split in the middle, as a driver may lay it out.
    f.add_tx_frame(&first, &[5, 7, 700]);
    f.add_tx_frame(&second, &[]);

    f.kick(1);

    assert_eq!(f.peer_frames(), [first, second]);
    assert_eq!(f.used(1), [(0, 0), (4, 0)]);
    assert_eq!(f.notifier.0.get(), 1);
    let m = f.dev.net_metrics();
    assert_eq!((m.tx_frames, m.tx_bytes), (2, 1560));
    assert_eq!(f.dev.metrics().snapshot().bytes_from_guest, 1584);
}

#[test]
fn tx_chain_shorter_than_the_header_is_dropped_and_counted() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    f.add_tx_frame(&[0u8; 11], &[]);
    f.add_tx_frame(&frame(0, 0, 0), &[]);

    f.kick(1);

    // The 12-byte one (an empty frame) is the tap's to judge.
    assert_eq!(f.peer_frames(), [frame(0, 0, 0)]);
    assert_eq!(f.used(1).len(), 2);
    let m = f.dev.net_metrics();
    assert_eq!(m.tx_dropped_bad_header, 1);
    assert_eq!(f.dev.metrics().snapshot().errors, 1);
}

#[test]
fn tx_chain_longer_than_the_largest_frame_is_dropped_and_counted() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    let largest = frame(0, MAX_FRAME_LEN, 3);
    let oversize = frame(0, MAX_FRAME_LEN + 1, 4);
    f.add_tx_frame(&oversize, &[40_000]);
    f.add_tx_frame(&largest, &[40_000]);

    f.kick(1);

    let frames = f.peer_frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].len(), MAX_BUFFER_LEN);
    assert_eq!(frames[0], largest);
    assert_eq!(f.dev.net_metrics().tx_dropped_oversize, 1);
    assert_eq!(f.used(1).len(), 2);
}

#[test]
fn tx_chain_with_writable_descriptor_or_outside_memory_is_dropped() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    let hdr = f.put(&[0u8; NET_HDR_LEN]);
    let out = f.buffer(64);
    f.add_chain(1, &[hdr, writable(out, 64)]);
    f.add_chain(1, &[readable(MEM_SIZE as u64 - 8, 64)]);
    f.add_chain(1, &[readable(u64::MAX - 4, 64)]);

    f.kick(1);

    assert!(f.peer_frames().is_empty());
    assert_eq!(f.used(1).len(), 3);
    assert_eq!(f.dev.net_metrics().tx_dropped_bad_chain, 3);
}

#[test]
fn tx_frame_the_tap_refuses_is_counted_as_a_tap_error() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    // A datagram socket whose peer is gone refuses every send.
    drop(f.peer.take());
    f.add_tx_frame(&frame(0, 100, 0), &[]);

    f.kick(1);

    assert_eq!(f.dev.net_metrics().tx_dropped_tap_error, 1);
    assert_eq!(f.used(1).len(), 1);
}

#[test]
fn rx_frame_from_the_tap_lands_in_a_guest_buffer_with_num_buffers_one() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    let addr = f.add_rx_buffer(2048);
    let sent = frame(2, 1000, 7);
    f.peer().send(&sent).unwrap();
    assert!(f.host_event_readable());

    f.host_event();

    assert_eq!(f.used(0), [(0, 1012)]);
    assert_eq!(f.read(addr, 1012), with_num_buffers(sent, 1));
    assert_eq!(f.notifier.0.get(), 1);
    let m = f.dev.net_metrics();
    assert_eq!((m.rx_frames, m.rx_bytes), (1, 1000));
    assert!(!f.host_event_readable(), "tap drained");
}

#[test]
fn rx_frame_spans_several_mergeable_buffers() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC | bit(VIRTIO_NET_F_MRG_RXBUF));
    let addrs: Vec<u64> = (0..4).map(|_| f.add_rx_buffer(1500)).collect();
    let sent = frame(0, 3000, 9);
    f.peer().send(&sent).unwrap();

    f.host_event();

    assert_eq!(f.used(0), [(0, 1500), (1, 1500), (2, 12)]);
    let mut got = f.read(addrs[0], 1500);
    got.extend(f.read(addrs[1], 1500));
    got.extend(f.read(addrs[2], 12));
    assert_eq!(got, with_num_buffers(sent, 3));
    // The fourth buffer is still the driver's.
    assert_eq!(f.rx.next_avail(), 3);
}

#[test]
fn rx_without_guest_buffers_parks_the_tap_until_the_next_rx_kick() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC | VIRTIO_RING_F_EVENT_IDX);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(0, 100 + i, i as u8)).collect();
    for sent in &frames {
        f.peer().send(sent).unwrap();
    }
    assert!(f.host_event_readable());

    f.host_event();

    // Nothing read (no buffers), and the loop is no longer woken although
    // the tap is still readable.
    assert!(f.used(0).is_empty());
    assert!(!f.host_event_readable(), "parked: no busy loop");
    assert_eq!(f.dev.net_metrics().rx_parked, 1);
    // The driver is asked to kick once it adds buffers (event index).
    assert_eq!(f.avail_event(), 0);

    let first = f.add_rx_buffer(2048);
    f.kick(0);

    assert_eq!(f.used(0), [(0, 112)]);
    assert_eq!(f.read(first, 112), with_num_buffers(frames[0].clone(), 1));
    assert!(!f.host_event_readable(), "parked again after one buffer");
    assert_eq!(f.dev.net_metrics().rx_parked, 2);
    assert_eq!(f.avail_event(), 1);

    let second = f.add_rx_buffer(2048);
    let third = f.add_rx_buffer(2048);
    f.kick(0);

    assert_eq!(f.used(0).len(), 3);
    assert_eq!(f.read(second, 113), with_num_buffers(frames[1].clone(), 1));
    assert_eq!(f.read(third, 114), with_num_buffers(frames[2].clone(), 1));
    assert_eq!(f.dev.net_metrics().rx_frames, 3);
}

#[test]
fn rx_frame_waiting_for_mergeable_buffers_takes_none_until_it_fits() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(
        &mem,
        BASIC | bit(VIRTIO_NET_F_MRG_RXBUF) | VIRTIO_RING_F_EVENT_IDX,
    );
    f.add_rx_buffer(1500);
    let sent = frame(0, 2000, 5);
    f.peer().send(&sent).unwrap();

    f.host_event();

    assert!(f.used(0).is_empty());
    assert_eq!(f.rx.next_avail(), 0, "the partial buffer was given back");
    assert!(!f.host_event_readable());
    // The driver kicks when it adds a buffer after the one it gave.
    assert_eq!(f.avail_event(), 1);
    assert_eq!(f.dev.net_metrics().rx_parked, 1);

    f.add_rx_buffer(1500);
    f.kick(0);

    assert_eq!(f.used(0), [(0, 1500), (1, 512)]);
}

#[test]
fn rx_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    let addr = f.add_rx_buffer(1024);
    f.peer().send(&frame(0, 2000, 1)).unwrap();
    let small = frame(0, 500, 2);
    f.peer().send(&small).unwrap();

    f.host_event();

    assert_eq!(f.used(0), [(0, 512)]);
    assert_eq!(f.read(addr, 512), with_num_buffers(small, 1));
    let m = f.dev.net_metrics();
    assert_eq!((m.rx_dropped_too_big, m.rx_frames), (1, 1));
}

#[test]
fn rx_buffer_that_is_readable_or_tiny_is_returned_unused() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC | bit(VIRTIO_NET_F_MRG_RXBUF));
    let bad = f.buffer(2048);
    f.add_chain(0, &[readable(bad, 2048)]);
    let tiny = f.buffer(8);
    f.add_chain(0, &[writable(tiny, 8)]);
    let good = f.add_rx_buffer(2048);
    let sent = frame(0, 64, 3);
    f.peer().send(&sent).unwrap();

    f.host_event();

    assert_eq!(f.used(0), [(0, 0), (1, 0), (2, 76)]);
    assert_eq!(f.read(good, 76), with_num_buffers(sent, 1));
    assert_eq!(f.dev.net_metrics().rx_bad_buffers, 2);
}

#[test]
fn rx_runt_from_the_tap_is_dropped_and_counted() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    f.add_rx_buffer(2048);
    f.peer().send(&[0u8; 5]).unwrap();

    f.host_event();

    assert!(f.used(0).is_empty());
    assert_eq!(f.dev.net_metrics().rx_dropped_runt, 1);
}

#[test]
fn rx_fills_every_buffer_then_parks_with_frames_left_in_the_tap() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, BASIC);
    // A socket pair queues at most 10 datagrams (net.unix.max_dgram_qlen).
    for i in 0..6 {
        f.add_rx_buffer(128);
        f.peer().send(&frame(0, 10, i)).unwrap();
    }
    f.peer().send(&frame(0, 10, 99)).unwrap();

    f.host_event();

    assert_eq!(f.used(0).len(), 6);
    assert!(!f.host_event_readable(), "out of buffers: parked");
    f.add_rx_buffer(128);
    f.kick(0);
    assert_eq!(f.used(0).len(), 7);
}

#[test]
fn reset_stops_polling_the_tap_and_drops_a_waiting_frame() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(
        &mem,
        BASIC | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_MRG_RXBUF),
    );
    f.add_rx_buffer(1500);
    // Waits for a second buffer, parked.
    f.peer().send(&frame(0, 2000, 1)).unwrap();
    let next = frame(0, 10, 2);
    f.peer().send(&next).unwrap();
    f.host_event();
    assert!(f.used(0).is_empty());
    assert!(!f.host_event_readable());

    f.dev.reset();

    assert!(!f.host_event_readable());
    assert_eq!(f.offloads.lock().unwrap().calls.last(), Some(&0));
    f.dev.ack_features(BASIC);
    f.dev.activate().unwrap();
    assert!(f.host_event_readable(), "the second frame waits in the tap");
    f.host_event();
    // The waiting frame is gone; the next one takes the buffer.
    assert_eq!(f.used(0), [(0, 22)]);
}

/// A legacy driver (no VERSION_1, no MRG_RXBUF) uses the 10-byte header.
const LEGACY: u64 = 0;

#[test]
fn legacy_tx_frame_gets_a_zero_num_buffers_on_its_way_to_the_tap() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, LEGACY);
    let mut legacy = vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    legacy.extend_from_slice(b"payload");
    f.add_tx_frame(&legacy, &[4]);
    f.add_tx_frame(&[0u8; 9], &[]);

    f.kick(1);

    let mut expected = legacy[..10].to_vec();
    expected.extend_from_slice(&[0, 0]);
    expected.extend_from_slice(b"payload");
    assert_eq!(f.peer_frames(), [expected]);
    let m = f.dev.net_metrics();
    assert_eq!((m.tx_bytes, m.tx_dropped_bad_header), (7, 1));
}

#[test]
fn legacy_rx_frame_loses_num_buffers_on_its_way_to_the_guest() {
    let mem = guest_memory(MEM_SIZE);
    let mut f = Fixture::new(&mem, LEGACY);
    let addr = f.add_rx_buffer(1514);
    let sent = frame(1, 1500, 4);
    f.peer().send(&sent).unwrap();

    f.host_event();

    // 1500 + 10 fits the 1514-byte buffer; 12 would too, but the driver
    // reads the frame right after 10 bytes.
    assert_eq!(f.used(0), [(0, 1510)]);
    let mut expected = sent[..10].to_vec();
    expected.extend_from_slice(&sent[12..]);
    assert_eq!(f.read(addr, 1510), expected);
    assert_eq!(f.dev.net_metrics().rx_bytes, 1500);
}
