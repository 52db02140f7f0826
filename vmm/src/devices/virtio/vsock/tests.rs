//! Device tests: a tiny in-test virtio driver over `MockSplitQueue`-laid-out
//! queues in real guest memory, and real Unix sockets in a temporary
//! directory on the host side.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packet::{Op, PacketHeader, HDR_LEN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::{VsockDevice, VsockError, VsockTimeouts, CONN_TX_BUF_SIZE, MAX_CONNECT_LINE};
use crate::devices::virtio::device::{
    DeviceError, QueueContext, UsedNotifier, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const MEM_SIZE: u64 = 64 << 20;
const BUF_AREA: u64 = 1 << 20;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;

#[derive(Default)]
struct CountingNotifier([AtomicU64; 3]);

impl UsedNotifier for CountingNotifier {
    fn notify_used(&self, queue_index: usize) -> std::io::Result<()> {
        self.0[queue_index].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The driver's view of one split queue.
struct DriverQueue {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    last_used: u16,
}

/// One descriptor a test puts in a chain.
#[derive(Clone)]
struct Desc {
    data: Vec<u8>,
    len: u32,
    write: bool,
    /// Overrides the address (to point outside guest memory).
    addr: Option<u64>,
}

fn readable(data: &[u8]) -> Desc {
    Desc {
        data: data.to_vec(),
        len: data.len() as u32,
        write: false,
        addr: None,
    }
}

fn writable(len: u32) -> Desc {
    Desc {
        data: Vec::new(),
        len,
        write: true,
        addr: None,
    }
}

fn guest_hdr(op: Op, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len: 0,
        type_: 1,
        op: op.to_wire(),
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    driver: Vec<DriverQueue>,
    next_buf: u64,
    notifier: CountingNotifier,
    dev: VsockDevice,
    /// Packets the device put in the rx queue, oldest first.
    received: Vec<(PacketHeader, Vec<u8>)>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with_timeouts(VsockTimeouts::default())
    }

    fn with_timeouts(timeouts: VsockTimeouts) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let dev = VsockDevice::with_timeouts(GUEST_CID, path, timeouts).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut queues = Vec::new();
        let mut driver = Vec::new();
        for i in 0..3u64 {
            // MockSplitQueue (virtio-queue 0.17) ends its avail ring `len`
            // bytes after the ring start instead of `2 * len + 2`, so its
            // used ring overlaps the avail ring once more than half the
            // queue is in flight. Its queue setup is fine; the rings are
            // placed 4 KiB apart here instead.
            let base = i * 0x10000;
            let mock = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
            let mut queue = mock.create_queue::<Queue>().unwrap();
            let (avail, used) = (base + 0x1000, base + 0x2000);
            queue.set_avail_ring_address(Some(avail as u32), Some(0));
            queue.set_used_ring_address(Some(used as u32), Some(0));
            mem.write_obj(0u32, GuestAddress(avail)).unwrap();
            mem.write_obj(0u32, GuestAddress(used)).unwrap();
            queues.push(queue);
            driver.push(DriverQueue {
                desc: mock.desc_table_addr(),
                avail: GuestAddress(avail),
                used: GuestAddress(used),
                next_desc: 0,
                last_used: 0,
            });
        }
        let mut h = Harness {
            mem,
            queues,
            driver,
            next_buf: BUF_AREA,
            notifier: CountingNotifier::default(),
            dev,
            received: Vec::new(),
            dir,
        };
        h.dev.ack_features(VIRTIO_F_VERSION_1);
        h.dev.activate().unwrap();
        h
    }

    fn uds_path(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    fn port_path(&self, port: u32) -> PathBuf {
        self.dir.path().join(format!("v.sock_{port}"))
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).max(1).next_multiple_of(64);
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_AREA;
        }
        let at = self.next_buf;
        self.next_buf += len;
        at
    }

    /// Writes a chain into queue `q` and makes it available.
    fn add_chain(&mut self, q: usize, descs: &[Desc]) {
        let n = descs.len() as u16;
        let first = self.driver[q].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (first + i as u16) % QSIZE;
            let addr = match d.addr {
                Some(a) => a,
                None => {
                    let a = self.alloc(d.len);
                    self.mem.write_slice(&d.data, GuestAddress(a)).unwrap();
                    a
                }
            };
            let mut flags = if d.write { DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < descs.len() {
                flags |= DESC_F_NEXT;
                next = (index + 1) % QSIZE;
            }
            let at = self.driver[q].desc.0 + 16 * u64::from(index);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.driver[q].next_desc = (first + n) % QSIZE;
        let avail = self.driver[q].avail;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail.0 + 2)).unwrap();
        let slot = avail.0 + 4 + 2 * u64::from(idx % QSIZE);
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail.0 + 2))
            .unwrap();
    }

    fn try_kick(&mut self, q: usize) -> Result<(), DeviceError> {
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut refs,
            notifier: &self.notifier,
        };
        self.dev.process_queue(q, &mut ctx)
    }

    fn kick(&mut self, q: usize) {
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut refs,
            notifier: &self.notifier,
        };
        self.dev.process_queue(q, &mut ctx).unwrap();
        self.collect_rx();
    }

    fn host_event(&mut self) {
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut refs,
            notifier: &self.notifier,
        };
        self.dev.process_host_event(&mut ctx).unwrap();
        self.collect_rx();
    }

    /// Used entries of queue `q` since the last call: (head, len).
    fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = self.driver[q].used;
        let idx: u16 = self.mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
        let mut out = Vec::new();
        while self.driver[q].last_used != idx {
            let slot = used.0 + 4 + 8 * u64::from(self.driver[q].last_used % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap();
            out.push((id as u16, len));
            self.driver[q].last_used = self.driver[q].last_used.wrapping_add(1);
        }
        out
    }

    fn collect_rx(&mut self) {
        for (head, len) in self.take_used(0) {
            if len == 0 {
                continue;
            }
            let at = self.driver[0].desc.0 + 16 * u64::from(head);
            let addr: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = PacketHeader::from_bytes(&raw);
            let mut payload = vec![0u8; len as usize - HDR_LEN];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            assert_eq!(
                hdr.len as usize,
                payload.len(),
                "{hdr:?} head {head} len {len}"
            );
            self.received.push((hdr, payload));
        }
    }

    fn provide_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            self.add_chain(0, &[writable(size)]);
        }
        self.kick(0);
    }

    /// The guest sends one packet (header and payload in one descriptor).
    fn send(&mut self, hdr: PacketHeader, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_chain(&[readable(&bytes)]);
    }

    fn send_chain(&mut self, descs: &[Desc]) {
        self.add_chain(1, descs);
        self.kick(1);
    }

    fn take_received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        std::mem::take(&mut self.received)
    }

    /// Processes host events until `pred` holds for the packets received
    /// so far (or two seconds pass).
    fn pump_until(&mut self, pred: impl Fn(&[(PacketHeader, Vec<u8>)]) -> bool) -> bool {
        let start = Instant::now();
        loop {
            self.host_event();
            if pred(&self.received) {
                return true;
            }
            if start.elapsed() > Duration::from_secs(2) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Processes host events for a while, to give the device a chance to
    /// do what a test asserts it does not do.
    fn pump_briefly(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            self.host_event();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn errors(&self) -> u64 {
        self.dev.metrics().snapshot().errors
    }

    /// Opens a guest-initiated connection from guest port `src` to a
    /// listener on host port `dst`; returns the accepted host stream.
    fn guest_connect(&mut self, listener: &UnixListener, src: u32, dst: u32) -> UnixStream {
        self.send(guest_hdr(Op::Request, src, dst), &[]);
        let got = self.take_received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.known_op(), Some(Op::Response));
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (dst, src));
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream
    }

    /// A host client's `CONNECT <port>` answered by the guest; returns the
    /// client and the host port the device allocated.
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(self.uds_path()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client
            .write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        assert!(self.pump_until(|r| r
            .iter()
            .any(|(h, _)| h.known_op() == Some(Op::Request) && h.dst_port == guest_port)));
        let req = self
            .take_received()
            .into_iter()
            .find(|(h, _)| h.known_op() == Some(Op::Request))
            .unwrap()
            .0;
        assert_eq!((req.src_cid, req.dst_cid), (2, GUEST_CID));
        self.send(guest_hdr(Op::Response, guest_port, req.src_port), &[]);
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            client.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        assert_eq!(line, format!("OK {}\n", req.src_port).into_bytes());
        (client, req.src_port)
    }

    fn ops(&self) -> Vec<Op> {
        self.received
            .iter()
            .filter_map(|(h, _)| h.known_op())
            .collect()
    }
}

fn read_to_eof(stream: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    out
}

fn payload_of(packets: &[(PacketHeader, Vec<u8>)]) -> Vec<u8> {
    packets
        .iter()
        .filter(|(h, _)| h.known_op() == Some(Op::Rw))
        .flat_map(|(_, p)| p.clone())
        .collect()
}

#[test]
fn guest_connect_to_listening_port_echoes_data() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1234)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 5000, 1234);

    h.send(guest_hdr(Op::Rw, 5000, 1234), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    assert!(h.pump_until(|r| payload_of(r) == b"world"));
    let (hdr, _) = &h.received[0];
    assert_eq!((hdr.src_cid, hdr.dst_cid), (2, GUEST_CID));
    assert_eq!((hdr.src_port, hdr.dst_port), (1234, 5000));
    assert_eq!(hdr.fwd_cnt, 5, "credit must count the forwarded bytes");
    let m = h.dev.metrics().snapshot();
    assert_eq!((m.bytes_from_guest, m.bytes_to_guest), (5, 5));
    assert_eq!(m.errors, 0);
    assert_eq!(h.dev.vsock_metrics().guest_connections, 1);
}

#[test]
fn guest_connect_with_event_idx_still_delivers_and_notifies() {
    let mut h = Harness::new();
    h.dev.reset();
    h.dev
        .ack_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let listener = UnixListener::bind(h.port_path(7)).unwrap();
    h.provide_rx(2, RX_BUF);
    let mut host = h.guest_connect(&listener, 9, 7);
    for i in 0..20u8 {
        host.write_all(&[i; 100]).unwrap();
        assert!(h.pump_until(|r| payload_of(r).len() == 100));
        h.take_received();
        // The driver refills one buffer per packet, as Linux does.
        h.provide_rx(1, RX_BUF);
    }
    assert!(h.notifier.0[0].load(Ordering::Relaxed) > 0);
}

#[test]
fn guest_connect_with_no_listener_returns_rst() {
    let mut h = Harness::new();
    h.provide_rx(1, RX_BUF);
    h.send(guest_hdr(Op::Request, 5000, 4321), &[]);
    let got = h.take_received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.known_op(), Some(Op::Rst));
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (4321, 5000));
    assert_eq!(h.dev.vsock_metrics().guest_connects_refused, 1);
}

#[test]
fn host_connect_with_guest_response_returns_ok_line_then_streams_both_ways() {
    let mut h = Harness::new();
    h.provide_rx(8, RX_BUF);
    let (mut client, host_port) = h.host_connect(1024);
    assert_eq!(host_port, 1 << 30);

    client.write_all(b"ping").unwrap();
    assert!(h.pump_until(|r| payload_of(r) == b"ping"));
    let (hdr, _) = &h.received[0];
    assert_eq!((hdr.src_port, hdr.dst_port), (host_port, 1024));

    h.send(guest_hdr(Op::Rw, 1024, host_port), b"pong");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(h.dev.vsock_metrics().host_connections, 1);
}

#[test]
fn host_connect_with_data_after_line_delivers_that_data() {
    let mut h = Harness::new();
    h.provide_rx(8, RX_BUF);
    let mut client = UnixStream::connect(h.uds_path()).unwrap();
    client.write_all(b"CONNECT 80\nearly").unwrap();
    assert!(h.pump_until(|r| r.iter().any(|(h, _)| h.known_op() == Some(Op::Request))));
    let req = h.take_received()[0].0;
    h.send(guest_hdr(Op::Response, 80, req.src_port), &[]);
    assert!(h.pump_until(|r| payload_of(r) == b"early"));
}

#[test]
fn host_connect_with_guest_rst_closes_host_socket() {
    let mut h = Harness::new();
    h.provide_rx(4, RX_BUF);
    let mut client = UnixStream::connect(h.uds_path()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    assert!(h.pump_until(|r| !r.is_empty()));
    let req = h.take_received()[0].0;
    h.send(guest_hdr(Op::Rst, 99, req.src_port), &[]);
    assert_eq!(read_to_eof(&mut client), b"");
    assert!(h.take_received().is_empty(), "no answer to an RST");
}

#[test]
fn host_connect_without_guest_answer_times_out_with_rst() {
    let mut h = Harness::with_timeouts(VsockTimeouts {
        request: Duration::from_millis(50),
        ..VsockTimeouts::default()
    });
    h.provide_rx(4, RX_BUF);
    let mut client = UnixStream::connect(h.uds_path()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    assert!(h.pump_until(|r| r.iter().any(|(h, _)| h.known_op() == Some(Op::Rst))));
    assert_eq!(h.ops(), vec![Op::Request, Op::Rst]);
    assert_eq!(read_to_eof(&mut client), b"");
    assert_eq!(h.dev.vsock_metrics().requests_timed_out, 1);
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
}

#[test]
fn host_connect_with_bad_lines_closes_socket() {
    let mut h = Harness::new();
    h.provide_rx(4, RX_BUF);
    let too_long = vec![b'1'; MAX_CONNECT_LINE + 5];
    for bad in [
        &b"CONNECT abc\n"[..],
        b"HELLO 5\n",
        b"CONNECT 99999999999\n",
        &too_long,
    ] {
        let mut client = UnixStream::connect(h.uds_path()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.write_all(bad).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let closed = loop {
            h.host_event();
            client.set_nonblocking(true).unwrap();
            match client.read(&mut buf) {
                Ok(0) => break true,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("{other:?}"),
            }
            if start.elapsed() > Duration::from_secs(2) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(closed, "{:?}", String::from_utf8_lossy(bad));
    }
    assert!(
        h.take_received().is_empty(),
        "the guest never hears of them"
    );
    assert_eq!(h.dev.vsock_metrics().handshakes_rejected, 4);
}

#[test]
fn host_connect_without_line_times_out() {
    let mut h = Harness::with_timeouts(VsockTimeouts {
        handshake: Duration::from_millis(30),
        ..VsockTimeouts::default()
    });
    let mut client = UnixStream::connect(h.uds_path()).unwrap();
    client.write_all(b"CONN").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4];
    loop {
        h.host_event();
        match client.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2), "never closed");
    }
    assert_eq!(h.dev.vsock_metrics().handshakes_rejected, 1);
}

#[test]
fn guest_shutdown_send_gives_host_eof_and_host_can_still_send() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    h.send(guest_hdr(Op::Rw, 2, 1), b"last words");
    let mut shut = guest_hdr(Op::Shutdown, 2, 1);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(read_to_eof(&mut host), b"last words");

    host.write_all(b"reply").unwrap();
    assert!(h.pump_until(|r| payload_of(r) == b"reply"));
}

#[test]
fn guest_shutdown_both_closes_host_socket_with_rst() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    let mut shut = guest_hdr(Op::Shutdown, 2, 1);
    shut.flags = SHUTDOWN_BOTH;
    h.send(shut, &[]);
    assert_eq!(read_to_eof(&mut host), b"");
    assert_eq!(h.ops(), vec![Op::Rst]);
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
}

#[test]
fn host_close_gives_guest_data_then_shutdown_both() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    host.write_all(b"bye").unwrap();
    drop(host);
    assert!(h.pump_until(|r| r.iter().any(|(h, _)| h.known_op() == Some(Op::Shutdown))));
    assert_eq!(payload_of(&h.received), b"bye");
    let (shut, _) = *h.received.last().unwrap();
    assert_eq!(shut.flags, SHUTDOWN_BOTH);
    // Linux answers with RST; the connection is then gone.
    h.send(guest_hdr(Op::Rst, 2, 1), &[]);
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
}

#[test]
fn host_close_without_guest_rst_times_out_with_rst() {
    let mut h = Harness::with_timeouts(VsockTimeouts {
        close: Duration::from_millis(50),
        ..VsockTimeouts::default()
    });
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let host = h.guest_connect(&listener, 2, 1);
    drop(host);
    assert!(h.pump_until(|r| r.iter().any(|(h, _)| h.known_op() == Some(Op::Rst))));
    assert_eq!(h.ops(), vec![Op::Shutdown, Op::Rst]);
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
}

#[test]
fn guest_data_after_host_close_returns_rst() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let host = h.guest_connect(&listener, 2, 1);
    drop(host);
    assert!(h.pump_until(|r| r.iter().any(|(h, _)| h.known_op() == Some(Op::Shutdown))));
    h.send(guest_hdr(Op::Rw, 2, 1), b"too late");
    assert_eq!(h.ops(), vec![Op::Shutdown, Op::Rst]);
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
}

#[test]
fn host_half_close_gives_guest_shutdown_send_and_guest_can_still_write() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(h.pump_until(|r| !r.is_empty()));
    let got = h.take_received();
    assert_eq!(got[0].0.known_op(), Some(Op::Shutdown));
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);
    h.send(guest_hdr(Op::Rw, 2, 1), b"still here");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

#[test]
fn guest_shutdown_rcv_stops_delivery() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    let mut shut = guest_hdr(Op::Shutdown, 2, 1);
    shut.flags = SHUTDOWN_RCV;
    h.send(shut, &[]);
    // The guest will not read: host writes fail instead of piling up.
    let err = host.write_all(b"x").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    h.pump_briefly();
    assert!(payload_of(&h.received).is_empty());
}

#[test]
fn host_data_beyond_guest_buf_alloc_waits_for_credit_update() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(16, RX_BUF);
    let mut req = guest_hdr(Op::Request, 2, 1);
    req.buf_alloc = 100;
    h.send(req, &[]);
    h.take_received();
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 300]).unwrap();
    assert!(h.pump_until(|r| r
        .iter()
        .any(|(h, _)| h.known_op() == Some(Op::CreditRequest))));
    // Give the loop a chance to (wrongly) deliver more.
    h.pump_briefly();
    assert_eq!(payload_of(&h.received).len(), 100);
    h.take_received();

    let mut update = guest_hdr(Op::CreditUpdate, 2, 1);
    update.buf_alloc = 100;
    update.fwd_cnt = 100;
    h.send(update, &[]);
    assert!(h.pump_until(|r| payload_of(r).len() == 100));
    h.pump_briefly();
    assert_eq!(
        payload_of(&h.received).len(),
        100,
        "still bounded by credit"
    );
}

#[test]
fn guest_data_while_host_not_reading_is_buffered_then_credited() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(32, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    // Fill the host socket buffer and beyond, within our credit.
    let chunk = vec![0x5au8; 60 * 1024];
    let mut sent = 0usize;
    while sent + chunk.len() <= CONN_TX_BUF_SIZE as usize {
        h.send(guest_hdr(Op::Rw, 2, 1), &chunk);
        sent += chunk.len();
    }
    assert_eq!(h.errors(), 0);
    let mut got = vec![0u8; sent];
    host.read_exact(&mut got[..chunk.len()]).unwrap();
    // Reading made room: the buffered rest flows on EPOLLOUT.
    let reader = std::thread::spawn(move || {
        let mut rest = vec![0u8; sent - 60 * 1024];
        host.read_exact(&mut rest).unwrap();
        rest.len()
    });
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(5) {
        h.host_event();
        std::thread::sleep(Duration::from_millis(1));
    }
    let total = reader.join().unwrap() + 60 * 1024;
    assert_eq!(total, sent);
    let (update, _) = *h
        .received
        .iter()
        .rev()
        .find(|(h, _)| h.known_op() == Some(Op::CreditUpdate))
        .unwrap();
    assert!(update.fwd_cnt as usize > CONN_TX_BUF_SIZE as usize / 2);
}

#[test]
fn guest_data_beyond_credit_resets_connection() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    let chunk = vec![1u8; 64 * 1024];
    // Nobody reads the host socket: its buffer fills, then our bounded
    // buffer, then the guest is over its credit.
    for _ in 0..64 {
        h.send(guest_hdr(Op::Rw, 2, 1), &chunk);
        if h.ops().contains(&Op::Rst) {
            break;
        }
    }
    let ops = h.ops();
    assert_eq!(ops.last(), Some(&Op::Rst), "{ops:?}");
    assert!(
        ops[..ops.len() - 1]
            .iter()
            .all(|op| *op == Op::CreditUpdate),
        "{ops:?}"
    );
    assert_eq!(h.dev.vsock_metrics().credit_violations, 1);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    host.read_to_end(&mut sink).unwrap();
    assert!(sink.len() <= 64 * 64 * 1024);
}

#[test]
fn many_connections_echo_concurrently() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1024)).unwrap();
    h.provide_rx(200, RX_BUF);
    let mut hosts = Vec::new();
    for port in 0..100u32 {
        hosts.push(h.guest_connect(&listener, 10_000 + port, 1024));
    }
    for (i, host) in hosts.iter_mut().enumerate() {
        host.write_all(format!("conn {i}").as_bytes()).unwrap();
    }
    assert!(h.pump_until(|r| r.len() == 100));
    for (hdr, payload) in h.take_received() {
        let i = hdr.dst_port - 10_000;
        assert_eq!(payload, format!("conn {i}").into_bytes());
        h.send(guest_hdr(Op::Rw, hdr.dst_port, 1024), &payload);
    }
    for (i, host) in hosts.iter_mut().enumerate() {
        let want = format!("conn {i}").into_bytes();
        let mut buf = vec![0u8; want.len()];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(buf, want);
    }
    assert_eq!(h.dev.vsock_metrics().open_connections, 100);
}

#[test]
fn many_host_connections_get_distinct_ports() {
    let mut h = Harness::new();
    h.provide_rx(100, RX_BUF);
    let mut ports = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (c, p) = h.host_connect(1024);
        clients.push(c);
        ports.push(p);
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 20);
}

#[test]
fn tx_with_header_split_across_descriptors_is_handled() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(4, RX_BUF);
    let mut host = h.guest_connect(&listener, 2, 1);
    let mut hdr = guest_hdr(Op::Rw, 2, 1);
    hdr.len = 6;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(b"abcdef");
    h.send_chain(&[
        readable(&bytes[..10]),
        readable(&bytes[10..30]),
        readable(&bytes[30..47]),
        readable(&bytes[47..]),
    ]);
    let mut buf = [0u8; 6];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abcdef");
    assert_eq!(h.errors(), 0);
}

/// A well-formed packet's bytes with `len` set to the payload's length.
fn packet_bytes(hdr: PacketHeader, payload: &[u8]) -> Vec<u8> {
    let mut hdr = hdr;
    hdr.len = payload.len() as u32;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn tx_with_chain_shorter_than_header_is_dropped_and_counted() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let bytes = packet_bytes(guest_hdr(Op::Request, 1, 2), &[]);
    h.send_chain(&[readable(&bytes[..43])]);
    assert_eq!(h.errors(), 1);
    assert_eq!(h.take_used(1), vec![(0, 0)], "the chain is returned");
    assert!(h.take_received().is_empty());
}

#[test]
fn tx_with_write_only_chain_is_dropped_and_counted() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let mut desc = readable(&packet_bytes(guest_hdr(Op::Request, 1, 2), &[]));
    desc.write = true;
    h.send_chain(&[desc]);
    assert_eq!(h.errors(), 1);
    assert!(h.take_received().is_empty());
}

#[test]
fn tx_with_len_beyond_chain_is_dropped_without_reply() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let mut hdr = guest_hdr(Op::Rw, 1, 2);
    hdr.len = 100;
    let mut bytes = hdr.to_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 10]);
    h.send_chain(&[readable(&bytes)]);
    assert_eq!(h.errors(), 1);
    assert!(h.take_received().is_empty());
}

#[test]
fn tx_with_len_above_max_is_dropped_without_reply() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let bytes = packet_bytes(guest_hdr(Op::Rw, 1, 2), &vec![0u8; 70_000]);
    h.send_chain(&[readable(&bytes)]);
    assert_eq!(h.errors(), 1);
    assert!(h.take_received().is_empty());
}

#[test]
fn tx_with_wrong_cids_is_dropped_without_reply() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let mut spoofed = guest_hdr(Op::Request, 1, 2);
    spoofed.src_cid = 4;
    h.send(spoofed, &[]);
    let mut elsewhere = guest_hdr(Op::Request, 1, 2);
    elsewhere.dst_cid = 5;
    h.send(elsewhere, &[]);
    assert_eq!(h.errors(), 2);
    assert!(h.take_received().is_empty());
}

#[test]
fn tx_with_non_stream_type_returns_rst() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let mut dgram = guest_hdr(Op::Request, 1, 2);
    dgram.type_ = 3;
    h.send(dgram, &[]);
    assert_eq!(h.errors(), 1);
    assert_eq!(h.ops(), vec![Op::Rst]);
}

#[test]
fn tx_with_unknown_op_for_unknown_connection_returns_rst() {
    let mut h = Harness::new();
    h.provide_rx(4, RX_BUF);
    let mut bogus = guest_hdr(Op::Rw, 1, 2);
    bogus.op = 99;
    h.send(bogus, &[]);
    h.send(guest_hdr(Op::Rw, 1, 2), b"data");
    h.send(guest_hdr(Op::Shutdown, 1, 2), &[]);
    assert_eq!(h.ops(), vec![Op::Rst, Op::Rst, Op::Rst]);
    // RST is never answered.
    h.send(guest_hdr(Op::Rst, 1, 2), &[]);
    assert_eq!(h.received.len(), 3);
}

#[test]
fn tx_with_unknown_op_on_connection_resets_it() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(2)).unwrap();
    h.provide_rx(4, RX_BUF);
    let mut host = h.guest_connect(&listener, 1, 2);
    let mut bogus = guest_hdr(Op::Rw, 1, 2);
    bogus.op = 0;
    h.send(bogus, &[]);
    assert_eq!(h.ops(), vec![Op::Rst]);
    assert_eq!(read_to_eof(&mut host), b"");
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
}

#[test]
fn tx_with_response_on_open_connection_resets_it() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(2)).unwrap();
    h.provide_rx(4, RX_BUF);
    let mut host = h.guest_connect(&listener, 1, 2);
    h.send(guest_hdr(Op::Response, 1, 2), &[]);
    assert_eq!(h.ops(), vec![Op::Rst]);
    assert_eq!(read_to_eof(&mut host), b"");
}

#[test]
fn tx_with_data_after_shutdown_send_resets_connection() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(2)).unwrap();
    h.provide_rx(4, RX_BUF);
    let _host = h.guest_connect(&listener, 1, 2);
    let mut shut = guest_hdr(Op::Shutdown, 1, 2);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    h.send(guest_hdr(Op::Rw, 1, 2), b"late");
    assert_eq!(h.ops(), vec![Op::Rst]);
    assert_eq!(h.errors(), 1);
}

#[test]
fn tx_with_descriptor_outside_memory_is_dropped_and_counted() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let outside = Desc {
        data: Vec::new(),
        len: 64,
        write: false,
        addr: Some(MEM_SIZE + 4096),
    };
    h.send_chain(&[outside]);
    let straddling = Desc {
        data: Vec::new(),
        len: 4096,
        write: false,
        addr: Some(MEM_SIZE - 100),
    };
    h.send_chain(&[straddling]);
    let huge = Desc {
        data: Vec::new(),
        len: u32::MAX,
        write: false,
        addr: Some(BUF_AREA),
    };
    h.send_chain(&[huge]);
    assert_eq!(h.errors(), 3);
    assert_eq!(h.take_used(1).len(), 3);
}

#[test]
fn tx_with_looping_chain_ends_and_is_returned() {
    let mut h = Harness::new();
    h.provide_rx(2, RX_BUF);
    let bytes = packet_bytes(guest_hdr(Op::Request, 1, 2), &[]);
    let addr = h.alloc(64);
    h.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    let slot = h.driver[1].next_desc;
    let at = h.driver[1].desc.0 + 16 * u64::from(slot);
    h.mem.write_obj(addr, GuestAddress(at)).unwrap();
    h.mem.write_obj(44u32, GuestAddress(at + 8)).unwrap();
    h.mem.write_obj(DESC_F_NEXT, GuestAddress(at + 12)).unwrap();
    h.mem.write_obj(slot, GuestAddress(at + 14)).unwrap();
    let avail = h.driver[1].avail.0;
    h.mem.write_obj(slot, GuestAddress(avail + 4)).unwrap();
    h.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    h.kick(1);
    assert_eq!(h.take_used(1).len(), 1);
    // The header is read from the first pass through the loop; nobody
    // listens on port 2, so the answer is RST.
    assert_eq!(h.ops(), vec![Op::Rst]);
}

#[test]
fn tx_with_avail_index_far_ahead_returns_error_instead_of_spinning() {
    let mut h = Harness::new();
    let avail = h.driver[1].avail.0;
    h.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    let err = h.try_kick(1).unwrap_err();
    assert!(matches!(err, DeviceError::Queue { index: 1, .. }), "{err}");
}

#[test]
fn rx_with_readable_or_short_chain_is_dropped_and_next_buffer_used() {
    let mut h = Harness::new();
    h.add_chain(0, &[readable(&[0u8; 64]), writable(RX_BUF)]);
    h.add_chain(0, &[writable(20)]);
    h.add_chain(0, &[writable(RX_BUF)]);
    h.kick(0);
    h.send(guest_hdr(Op::Request, 1, 2), &[]);
    assert_eq!(h.errors(), 2);
    assert_eq!(h.ops(), vec![Op::Rst]);
}

#[test]
fn rx_with_header_only_buffers_while_data_waits_returns_them_unused() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(2)).unwrap();
    h.provide_rx(1, RX_BUF);
    let mut host = h.guest_connect(&listener, 1, 2);
    h.provide_rx(2, HDR_LEN as u32);
    host.write_all(b"xyz").unwrap();
    h.pump_briefly();
    assert!(h.received.is_empty());
    assert_eq!(h.errors(), 2);
    h.provide_rx(1, RX_BUF);
    assert!(h.pump_until(|r| payload_of(r) == b"xyz"));
}

#[test]
fn rx_with_header_only_buffer_carries_control_packets() {
    let mut h = Harness::new();
    h.provide_rx(1, HDR_LEN as u32);
    h.send(guest_hdr(Op::Request, 1, 2), &[]);
    assert_eq!(h.ops(), vec![Op::Rst]);
    assert_eq!(h.errors(), 0);
}

#[test]
fn reset_drops_connections_and_sends_nothing() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(2)).unwrap();
    h.provide_rx(8, RX_BUF);
    let mut host = h.guest_connect(&listener, 1, 2);
    let (mut client, _) = h.host_connect(5);
    h.dev.reset();
    assert_eq!(read_to_eof(&mut host), b"");
    assert_eq!(read_to_eof(&mut client), b"");
    h.pump_briefly();
    assert!(h.take_received().is_empty());
    assert_eq!(h.dev.vsock_metrics().open_connections, 0);
    // The listener survives a reset.
    h.dev.ack_features(VIRTIO_F_VERSION_1);
    h.dev.activate().unwrap();
    let (_client, _) = h.host_connect(5);
}

#[test]
fn config_space_holds_guest_cid_and_is_read_only() {
    let mut h = Harness::new();
    let mut cid = [0xffu8; 8];
    h.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut tail = [0xffu8; 8];
    h.dev.read_config(4, &mut tail);
    assert_eq!(tail, [0; 8]);
    h.dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 8]);
    let err = h.dev.write_config(2, &[1]).unwrap_err();
    assert!(err.to_string().contains("offset 2"), "{err}");
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes().len(), 3);
}

#[test]
fn new_with_bad_arguments_returns_error_naming_value() {
    let dir = tempfile::tempdir().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let err = VsockDevice::new(cid, dir.path().join("a")).err().unwrap();
        assert!(matches!(err, VsockError::ReservedGuestCid(c) if c == cid));
        assert!(err.to_string().contains(&cid.to_string()), "{err}");
    }
    let long = dir.path().join("x".repeat(100));
    let err = VsockDevice::new(3, long).err().unwrap();
    assert!(matches!(err, VsockError::SocketPathTooLong(_)), "{err}");
    let taken = dir.path().join("taken");
    std::fs::write(&taken, b"").unwrap();
    let err = VsockDevice::new(3, taken).err().unwrap();
    assert!(err.to_string().contains("taken"), "{err}");
}

#[test]
fn drop_removes_the_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let dev = VsockDevice::new(3, path.clone()).unwrap();
    assert!(path.exists());
    drop(dev);
    assert!(!path.exists());
}

/// A byte stream that is easy to check: byte i is `(i * 7 + i / 251) as u8`.
fn pattern(start: usize, len: usize) -> Vec<u8> {
    (start..start + len)
        .map(|i| (i.wrapping_mul(7) + i / 251) as u8)
        .collect()
}

/// How long the one-MiB stream test may take.
const STREAM_DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn guest_and_host_stream_one_mib_each_way_within_credit() {
    const TOTAL: usize = 1 << 20;
    const GUEST_BUF: u32 = 64 * 1024;
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(1)).unwrap();
    h.provide_rx(64, RX_BUF);
    let mut req = guest_hdr(Op::Request, 2, 1);
    req.buf_alloc = GUEST_BUF;
    h.send(req, &[]);
    let response = h.take_received().remove(0).0;
    let (host, _) = listener.accept().unwrap();
    // As long as the guest loop below may run: a loaded 2-core CI machine
    // can leave the reader without data for many seconds.
    host.set_read_timeout(Some(STREAM_DEADLINE)).unwrap();
    let mut host_reader = host.try_clone().unwrap();
    let mut host_writer = host;
    let writer = std::thread::spawn(move || {
        for start in (0..TOTAL).step_by(10_000) {
            let n = 10_000.min(TOTAL - start);
            host_writer.write_all(&pattern(start, n)).unwrap();
        }
        host_writer
    });
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; TOTAL];
        host_reader.read_exact(&mut got).unwrap();
        got == pattern(0, TOTAL)
    });

    // The guest side, as Linux does it: send within the device's credit,
    // consume what arrives, and announce freed space when it runs low.
    let (mut sent, mut received) = (0usize, Vec::with_capacity(TOTAL));
    let (mut peer_buf_alloc, mut peer_fwd_cnt) = (response.buf_alloc, response.fwd_cnt);
    let (mut fwd_cnt, mut last_announced) = (0u32, 0u32);
    let start = Instant::now();
    while (sent < TOTAL || received.len() < TOTAL) && start.elapsed() < STREAM_DEADLINE {
        let credit = peer_buf_alloc - (sent as u32).wrapping_sub(peer_fwd_cnt);
        if sent < TOTAL && credit > 0 {
            let n = (credit as usize).min(MAX_CHUNK).min(TOTAL - sent);
            let mut hdr = guest_hdr(Op::Rw, 2, 1);
            hdr.buf_alloc = GUEST_BUF;
            hdr.fwd_cnt = fwd_cnt;
            last_announced = fwd_cnt;
            h.send(hdr, &pattern(sent, n));
            sent += n;
        }
        h.host_event();
        for (hdr, payload) in h.take_received() {
            assert_eq!(hdr.dst_port, 2);
            // The device only knows the fwd_cnt we last told it.
            assert!(
                (received.len() + payload.len()) as u32 - last_announced <= GUEST_BUF,
                "device sent beyond the guest's credit"
            );
            received.extend_from_slice(&payload);
            // The application reads everything at once.
            fwd_cnt = received.len() as u32;
            peer_buf_alloc = hdr.buf_alloc;
            peer_fwd_cnt = hdr.fwd_cnt;
            h.add_chain(0, &[writable(RX_BUF)]);
        }
        h.kick(0);
        if fwd_cnt.wrapping_sub(last_announced) > GUEST_BUF / 2 {
            let mut update = guest_hdr(Op::CreditUpdate, 2, 1);
            update.buf_alloc = GUEST_BUF;
            update.fwd_cnt = fwd_cnt;
            last_announced = fwd_cnt;
            h.send(update, &[]);
        }
    }
    assert_eq!(sent, TOTAL);
    assert_eq!(received.len(), TOTAL);
    assert!(received == pattern(0, TOTAL), "host-to-guest bytes differ");
    assert!(reader.join().unwrap(), "guest-to-host bytes differ");
    drop(writer.join().unwrap());
    assert_eq!(h.errors(), 0);
    assert_eq!(h.dev.vsock_metrics().credit_violations, 0);
}

const MAX_CHUNK: usize = 16 * 1024;
