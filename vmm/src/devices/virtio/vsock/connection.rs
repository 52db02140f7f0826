//! One vsock connection: the state machine between a guest stream socket
//! and a host Unix stream, with credit accounting in both directions.
//!
//! ```text
//!  host CONNECT ──► LocalInit ──guest RESPONSE──► Established ◄── guest REQUEST
//!                      │ RST / timeout / host gone      │ host closed (HUP) and drained
//!                      ▼                                ▼
//!                    Dead ◄──────── guest RST ──────── Closing (SHUTDOWN(RCV|SEND) sent)
//!                      ▲                                │ timeout
//!                      └── RST sent ◄── Killed ◄────────┘ (also: protocol violations,
//!                                                          host I/O errors, both sides done)
//! ```
//!
//! The connection never touches the queues: it says what it wants to send
//! ([`VsockConnection::produce_rx`]) and which host events it wants
//! ([`VsockConnection::interest`]); the muxer does the rest.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{Op, PacketHeader, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{CONN_TX_BUF_SIZE, VSOCK_HOST_CID};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: our `REQUEST` is queued or sent; waiting for the
    /// guest's `RESPONSE`.
    LocalInit,
    Established,
    /// The host socket is gone and drained; `SHUTDOWN(RCV|SEND)` is queued
    /// or sent and we wait for the guest's `RST`.
    Closing,
    /// Over: an `RST` to the guest is queued, then the connection is dead.
    Killed,
    /// Over and nothing left to send: the muxer removes it.
    Dead,
}

/// Why a connection was killed, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillCause {
    /// The guest broke the protocol (bad op for the state, data after
    /// `SHUTDOWN(SEND)`).
    Protocol,
    /// The guest sent more than its credit allowed.
    CreditViolation,
    /// Reading or writing the host socket failed.
    HostIo,
    /// The host client left before the guest accepted its connection.
    HostClosed,
    /// The guest did not answer in time.
    Timeout,
    /// Both directions are finished.
    Finished,
}

// What the connection owes the guest; several can be pending at once and
// are sent in this order of priority (lowest bit first).
const P_RST: u8 = 1;
const P_REQUEST: u8 = 1 << 1;
const P_RESPONSE: u8 = 1 << 2;
const P_RW: u8 = 1 << 3;
const P_SHUTDOWN: u8 = 1 << 4;
const P_CREDIT_UPDATE: u8 = 1 << 5;
const P_CREDIT_REQUEST: u8 = 1 << 6;

#[derive(Debug)]
pub struct VsockConnection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    pending: u8,
    /// Flags of the `SHUTDOWN` we owe or sent the guest.
    shutdown_flags: u32,
    deadline: Option<Instant>,
    close_timeout: Duration,
    kill_cause: Option<KillCause>,

    // Guest → host. `rx_cnt - fwd_cnt == tx_buf.len()` always.
    tx_buf: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    host_write_shut: bool,

    // Host → guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    host_eof: bool,
    host_hup: bool,
    credit_requested: bool,
}

impl VsockConnection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, close_timeout: Duration) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state: ConnState::Established,
            pending: 0,
            shutdown_flags: 0,
            deadline: None,
            close_timeout,
            kill_cause: None,
            tx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_eof: false,
            host_hup: false,
            credit_requested: false,
        }
    }

    /// A host client's `CONNECT <peer_port>`: a `REQUEST` goes to the guest,
    /// which must answer by `deadline`.
    pub fn new_host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
        close_timeout: Duration,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, close_timeout);
        c.state = ConnState::LocalInit;
        c.pending = P_REQUEST;
        c.deadline = Some(deadline);
        c
    }

    /// A guest `REQUEST` whose host listener accepted `stream`: a `RESPONSE`
    /// goes back and the connection is open.
    pub fn new_guest_initiated(
        stream: UnixStream,
        request: &PacketHeader,
        close_timeout: Duration,
    ) -> Self {
        let mut c = Self::new(stream, request.dst_port, request.src_port, close_timeout);
        c.pending = P_RESPONSE;
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn kill_cause(&self) -> Option<KillCause> {
        self.kill_cause
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    pub fn is_dead(&self) -> bool {
        self.state == ConnState::Dead
    }

    /// Bytes we may still send before the guest's buffer is full.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The host events the muxer should watch, `None` if the socket must
    /// leave the epoll set (it is closed, or hung up so that epoll would
    /// report it forever).
    pub fn interest(&self) -> Option<EventSet> {
        match self.state {
            ConnState::Dead | ConnState::Killed => None,
            _ if self.host_hup => None,
            ConnState::LocalInit => Some(EventSet::empty()),
            ConnState::Established | ConnState::Closing => {
                let mut ev = EventSet::empty();
                if !self.peer_shut_rcv
                    && !self.host_eof
                    && self.pending & P_RW == 0
                    && self.peer_credit() > 0
                {
                    ev |= EventSet::IN;
                }
                if !self.tx_buf.is_empty() {
                    ev |= EventSet::OUT;
                }
                Some(ev)
            }
        }
    }

    /// Ends the connection: the host socket is shut at once, the guest gets
    /// an `RST`.
    pub fn kill(&mut self, cause: KillCause) {
        if matches!(self.state, ConnState::Dead | ConnState::Killed) {
            return;
        }
        self.state = ConnState::Killed;
        self.kill_cause = Some(cause);
        self.pending = P_RST;
        self.deadline = None;
        self.tx_buf = VecDeque::new();
        // Errors mean the socket is already shut; nothing else to do.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Kills the connection if its deadline passed. Returns whether it did.
    pub fn check_deadline(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now => {
                self.kill(KillCause::Timeout);
                true
            }
            _ => false,
        }
    }

    /// A packet from the guest for this connection (header already checked
    /// by the device; `payload` is exactly `hdr.len` bytes).
    pub fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        if matches!(self.state, ConnState::Dead | ConnState::Killed) {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, hdr.known_op()) {
            (_, Some(Op::Rst)) => {
                self.state = ConnState::Dead;
                self.pending = 0;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            (ConnState::LocalInit, Some(Op::Response)) => self.accept_response(),
            (ConnState::LocalInit, _) => self.kill(KillCause::Protocol),
            (_, Some(Op::Rw)) => self.receive_data(payload),
            (_, Some(Op::CreditUpdate)) => self.credit_requested = false,
            (_, Some(Op::CreditRequest)) => self.pending |= P_CREDIT_UPDATE,
            (_, Some(Op::Shutdown)) => self.receive_shutdown(hdr.flags),
            (_, Some(Op::Request | Op::Response)) | (_, None) => self.kill(KillCause::Protocol),
        }
        // A hung-up socket is out of the epoll set, so new credit is the
        // only thing that resumes draining it.
        if self.host_hup
            && self.state == ConnState::Established
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
        {
            self.pending |= P_RW;
        }
        self.check_finished();
    }

    fn accept_response(&mut self) {
        self.state = ConnState::Established;
        self.deadline = None;
        // A fresh socket's send buffer holds far more than this line, so a
        // short write means the client is gone or misbehaving.
        let line = format!("OK {}\n", self.local_port);
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => self.kill(KillCause::HostIo),
        }
    }

    fn receive_data(&mut self, payload: &[u8]) {
        if self.peer_shut_send {
            self.kill(KillCause::Protocol);
            return;
        }
        if self.host_hup {
            // Hung up means our sending side is shut too: the bytes have
            // nowhere to go (and buffered ones never will).
            self.kill(KillCause::HostIo);
            return;
        }
        if self.tx_buf.len() + payload.len() > CONN_TX_BUF_SIZE as usize {
            self.kill(KillCause::CreditViolation);
            return;
        }
        self.rx_cnt += Wrapping(payload.len() as u32);
        let mut written = 0;
        if self.tx_buf.is_empty() {
            while written < payload.len() {
                match self.stream.write(&payload[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.kill(KillCause::HostIo);
                        return;
                    }
                }
            }
        }
        self.tx_buf.extend(&payload[written..]);
        self.fwd_cnt += Wrapping(written as u32);
        self.after_forward();
    }

    /// Writes buffered guest data to the host socket (it became writable).
    fn flush_tx(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.kill(KillCause::HostIo);
                    return;
                }
            }
        }
        self.after_forward();
    }

    /// After data left for the host: tell the guest about the freed space
    /// once its view of our buffer is half full, and pass its
    /// `SHUTDOWN(SEND)` on when nothing is buffered any more.
    fn after_forward(&mut self) {
        let guest_view_used = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = CONN_TX_BUF_SIZE.saturating_sub(guest_view_used);
        if self.fwd_cnt != self.last_fwd_cnt_sent && guest_view_free < CONN_TX_BUF_SIZE / 2 {
            self.pending |= P_CREDIT_UPDATE;
        }
        if self.peer_shut_send && self.tx_buf.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            // Fails only if the host already shut its end: nothing to do.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    fn receive_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_RCV != 0 && !self.peer_shut_rcv {
            self.peer_shut_rcv = true;
            self.pending &= !(P_RW | P_CREDIT_REQUEST);
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.peer_shut_send = true;
            self.after_forward();
        }
    }

    /// Both directions done: end the connection.
    fn check_finished(&mut self) {
        if !matches!(self.state, ConnState::Established | ConnState::Closing) {
            return;
        }
        let guest_to_host_done = self.peer_shut_send && self.tx_buf.is_empty();
        let host_to_guest_done = self.peer_shut_rcv || self.host_eof;
        if guest_to_host_done && host_to_guest_done {
            self.kill(KillCause::Finished);
        }
    }

    /// Events on the host socket (only those [`Self::interest`] asked for,
    /// plus `ERROR`/`HANG_UP`, which epoll always reports).
    pub fn host_event(&mut self, events: EventSet, now: Instant) {
        if events.contains(EventSet::ERROR) {
            self.kill(KillCause::HostIo);
            return;
        }
        if events.contains(EventSet::HANG_UP) && !self.host_hup {
            self.host_hup = true;
            if self.state == ConnState::LocalInit {
                self.kill(KillCause::HostClosed);
                return;
            }
            if self.host_eof {
                self.start_closing(now);
            } else if !self.peer_shut_rcv {
                // Deliver what the host wrote before it left; the read that
                // returns 0 then starts the close.
                self.pending |= P_RW;
            }
        }
        if events.contains(EventSet::IN) && !self.peer_shut_rcv && !self.host_eof {
            self.pending |= P_RW;
        }
        if events.contains(EventSet::OUT) {
            self.flush_tx();
        }
        self.check_finished();
    }

    fn start_closing(&mut self, now: Instant) {
        if self.state != ConnState::Established {
            return;
        }
        self.state = ConnState::Closing;
        self.shutdown_flags = SHUTDOWN_BOTH;
        self.pending |= P_SHUTDOWN;
        self.deadline = Some(now + self.close_timeout);
    }

    fn host_reached_eof(&mut self, now: Instant) {
        self.host_eof = true;
        self.pending &= !P_RW;
        if self.host_hup {
            self.start_closing(now);
        } else {
            self.shutdown_flags |= SHUTDOWN_SEND;
            self.pending |= P_SHUTDOWN;
        }
        self.check_finished();
    }

    fn header(&self, op: Op) -> PacketHeader {
        PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: 0,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, if any: its header (`dst_cid` left 0
    /// for the muxer to fill) and, for `OP_RW`, the number of payload bytes
    /// read from the host socket into `buf` (at most `buf.len()`).
    pub fn produce_rx(&mut self, buf: &mut [u8], now: Instant) -> Option<(PacketHeader, usize)> {
        let (hdr, len) = self.next_rx(buf, now)?;
        // Every packet carries our fwd_cnt, so it is a credit update too.
        self.last_fwd_cnt_sent = Wrapping(hdr.fwd_cnt);
        self.pending &= !P_CREDIT_UPDATE;
        Some((hdr, len))
    }

    fn next_rx(&mut self, buf: &mut [u8], now: Instant) -> Option<(PacketHeader, usize)> {
        if self.pending & P_RST != 0 {
            self.pending = 0;
            self.state = ConnState::Dead;
            return Some((self.header(Op::Rst), 0));
        }
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            return Some((self.header(Op::Request), 0));
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            return Some((self.header(Op::Response), 0));
        }
        if self.pending & P_RW != 0 && !buf.is_empty() {
            if let Some(n) = self.read_host(buf, now) {
                let mut hdr = self.header(Op::Rw);
                hdr.len = n as u32;
                return Some((hdr, n));
            }
            if self.pending & P_RST != 0 {
                return self.next_rx(buf, now);
            }
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            let mut hdr = self.header(Op::Shutdown);
            hdr.flags = self.shutdown_flags;
            return Some((hdr, 0));
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            return Some((self.header(Op::CreditUpdate), 0));
        }
        if self.pending & P_CREDIT_REQUEST != 0 {
            self.pending &= !P_CREDIT_REQUEST;
            return Some((self.header(Op::CreditRequest), 0));
        }
        None
    }

    /// Reads host data within the guest's credit. `None` when there is
    /// nothing to send now (no credit, nothing readable, end of stream).
    fn read_host(&mut self, buf: &mut [u8], now: Instant) -> Option<usize> {
        if self.state == ConnState::LocalInit || self.peer_shut_rcv || self.host_eof {
            self.pending &= !P_RW;
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            // The socket leaves the epoll set until credit comes back (see
            // `interest`); ask for it once.
            self.pending &= !P_RW;
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending |= P_CREDIT_REQUEST;
            }
            return None;
        }
        let want = buf.len().min(credit);
        loop {
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.host_reached_eof(now);
                    return None;
                }
                Ok(n) => {
                    // Stay pending: the next call reads on without waiting
                    // for epoll; a would-block read clears it.
                    self.tx_cnt += Wrapping(n as u32);
                    return Some(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending &= !P_RW;
                    return None;
                }
                Err(_) => {
                    self.kill(KillCause::HostIo);
                    return None;
                }
            }
        }
    }
}
