//! The host (Unix) side of the device: the listener for host-initiated
//! connections, the connections themselves, and one epoll set over all of
//! their sockets plus a timer, whose fd is the device's `host_event_fd`.
//!
//! The muxer decides what goes to the guest next ([`VsockMuxer::next_rx_packet`]):
//! first `RST`s for packets that matched no connection (a bounded queue),
//! then connections with something pending, round-robin.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnState, KillCause, VsockConnection};
use super::handshake::{HandshakeStep, PendingHandshake};
use super::metrics::VsockMetrics;
use super::packet::{Op, PacketHeader};
use super::{
    VsockError, VsockTimeouts, MAX_CONNECTIONS, MAX_PENDING_HANDSHAKES, MAX_QUEUED_RESETS,
};
use crate::devices::virtio::device::DeviceMetrics;

/// Host ports we allocate for host-initiated connections start here, as in
/// Firecracker, far above the ports services listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll events handled per `process_host_events` call.
const EVENTS_PER_WAKE: usize = 64;
/// Clients accepted per listener wake-up.
const ACCEPTS_PER_WAKE: usize = 32;
/// Longest `_<port>` suffix of a guest-initiated connection's socket path.
const PORT_SUFFIX_MAX: usize = "_4294967295".len();

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Debug)]
struct ConnEntry {
    conn: VsockConnection,
    /// What the socket is registered for in the epoll set, if it is.
    registered: Option<EventSet>,
    in_rxq: bool,
}

pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    /// Accepting failed (e.g. out of file descriptors): the listener is out
    /// of the epoll set until the next timer tick, or its pending client
    /// would wake the loop forever.
    listener_paused: bool,
    timeouts: VsockTimeouts,
    conns: HashMap<ConnKey, ConnEntry>,
    conn_fds: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, PendingHandshake>,
    rxq: VecDeque<ConnKey>,
    resets: VecDeque<PacketHeader>,
    next_local_port: u32,
    metrics: Arc<DeviceMetrics>,
    vsock_metrics: Arc<VsockMetrics>,
}

fn epoll_event(fd: RawFd, events: EventSet) -> EpollEvent {
    // Fds are non-negative, so the cast round-trips.
    EpollEvent::new(events, fd as u64)
}

/// Connects to a Unix socket without blocking: if the listener's backlog
/// is full the connect fails (`EAGAIN`) instead of stalling the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data for which all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own exclusively.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un that lives across the
    // call and `len` does not exceed its size (checked above); `fd` is ours.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl VsockMuxer {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        timeouts: VsockTimeouts,
        metrics: Arc<DeviceMetrics>,
        vsock_metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        // sun_path is 108 bytes including the terminating NUL.
        if uds_path.as_os_str().len() + PORT_SUFFIX_MAX >= 108 {
            return Err(VsockError::SocketPathTooLong(uds_path));
        }
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Listen {
            path: uds_path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Listen {
                path: uds_path.clone(),
                source,
            })?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        for fd in [listener.as_raw_fd(), timer.as_raw_fd()] {
            epoll
                .ctl(ControlOperation::Add, fd, epoll_event(fd, EventSet::IN))
                .map_err(VsockError::Epoll)?;
        }
        Ok(Self {
            guest_cid,
            uds_path,
            epoll,
            listener,
            timer,
            timer_armed: false,
            listener_paused: false,
            timeouts,
            conns: HashMap::new(),
            conn_fds: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics,
            vsock_metrics,
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rxq.is_empty()
    }

    /// Drops every connection and pending handshake (closing their host
    /// sockets) and everything queued for the guest. The listener stays.
    pub fn reset(&mut self) {
        for (fd, _) in self.handshakes.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        for (_, entry) in self.conns.drain() {
            if entry.registered.is_some() {
                let fd = entry.conn.stream().as_raw_fd();
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        self.conn_fds.clear();
        self.rxq.clear();
        self.resets.clear();
        self.sync_timer();
        VsockMetrics::set(&self.vsock_metrics.open_connections, 0);
    }

    /// Queues an `RST` for a packet that matched no connection.
    pub fn queue_reset(&mut self, reply: PacketHeader) {
        if self.resets.len() >= MAX_QUEUED_RESETS {
            VsockMetrics::inc(&self.vsock_metrics.resets_dropped);
            return;
        }
        self.resets.push_back(reply);
    }

    /// A checked packet from the guest (`payload` is its `len` bytes).
    pub fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(entry) = self.conns.get_mut(&key) {
            let was_requesting = entry.conn.state() == ConnState::LocalInit;
            entry.conn.handle_guest_packet(hdr, payload);
            if was_requesting && entry.conn.state() == ConnState::Established {
                VsockMetrics::inc(&self.vsock_metrics.host_connections);
            }
            self.after_change(key);
            return;
        }
        match hdr.known_op() {
            Some(Op::Rst) => {}
            Some(Op::Request) => self.guest_connect(hdr, key),
            _ => self.queue_reset(hdr.reset_reply()),
        }
    }

    fn port_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    fn guest_connect(&mut self, hdr: &PacketHeader, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!(port = hdr.dst_port, "vsock: too many connections");
            VsockMetrics::inc(&self.vsock_metrics.guest_connects_refused);
            self.queue_reset(hdr.reset_reply());
            return;
        }
        let path = self.port_path(hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = VsockConnection::new_guest_initiated(stream, hdr, self.timeouts.close);
                VsockMetrics::inc(&self.vsock_metrics.guest_connections);
                self.insert(key, conn, None);
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "vsock: guest connect refused");
                VsockMetrics::inc(&self.vsock_metrics.guest_connects_refused);
                self.queue_reset(hdr.reset_reply());
            }
        }
    }

    fn insert(&mut self, key: ConnKey, conn: VsockConnection, registered: Option<EventSet>) {
        self.conn_fds.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(
            key,
            ConnEntry {
                conn,
                registered,
                in_rxq: false,
            },
        );
        VsockMetrics::set(
            &self.vsock_metrics.open_connections,
            self.conns.len() as u64,
        );
        self.after_change(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(entry) = self.conns.remove(&key) {
            let fd = entry.conn.stream().as_raw_fd();
            if entry.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.conn_fds.remove(&fd);
        }
        VsockMetrics::set(
            &self.vsock_metrics.open_connections,
            self.conns.len() as u64,
        );
    }

    /// Brings the epoll registration and the rx queue in line with what the
    /// connection now wants, and removes it once it is dead.
    fn after_change(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.is_dead() {
            self.remove(key);
            return;
        }
        let want = entry.conn.interest();
        if want != entry.registered {
            let fd = entry.conn.stream().as_raw_fd();
            let result = match (entry.registered, want) {
                (None, Some(ev)) => self
                    .epoll
                    .ctl(ControlOperation::Add, fd, epoll_event(fd, ev)),
                (Some(_), Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Modify, fd, epoll_event(fd, ev))
                }
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => entry.registered = want,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: cannot watch a host socket");
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    if entry.registered.is_some() {
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    }
                    entry.registered = None;
                    entry.conn.kill(KillCause::HostIo);
                }
            }
        }
        if entry.conn.has_pending_rx() && !entry.in_rxq {
            entry.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    /// The next packet for the guest: its header and how many payload bytes
    /// were put in `buf`. `None` if nothing is ready.
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if let Some(mut hdr) = self.resets.pop_front() {
            hdr.dst_cid = self.guest_cid;
            VsockMetrics::inc(&self.vsock_metrics.resets_sent);
            return Some((hdr, 0));
        }
        let now = Instant::now();
        // Bounded: a connection that stays pending without producing (no
        // room for data in `buf`) is requeued, not retried forever.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.in_rxq = false;
            let produced = entry.conn.produce_rx(buf, now);
            if let Some((mut hdr, len)) = produced {
                hdr.dst_cid = self.guest_cid;
                if hdr.known_op() == Some(Op::Rst) {
                    let cause = entry.conn.kill_cause();
                    self.count_reset(cause);
                }
                self.after_change(key);
                return Some((hdr, len));
            }
            self.after_change(key);
        }
        None
    }

    fn count_reset(&self, cause: Option<KillCause>) {
        VsockMetrics::inc(&self.vsock_metrics.resets_sent);
        match cause {
            Some(KillCause::CreditViolation) => {
                VsockMetrics::inc(&self.vsock_metrics.credit_violations);
                DeviceMetrics::add(&self.metrics.errors, 1);
            }
            Some(KillCause::Protocol | KillCause::HostIo) => {
                DeviceMetrics::add(&self.metrics.errors, 1);
            }
            _ => {}
        }
    }

    /// Handles whatever the epoll set reports (without blocking).
    pub fn process_host_events(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        for ev in &events[..n] {
            let fd = ev.fd();
            if fd == self.listener.as_raw_fd() {
                self.accept_clients(now);
            } else if fd == self.timer.as_raw_fd() {
                // Clears the readable state; the count itself is irrelevant.
                let _ = self.timer.wait();
                self.handle_timeouts(Instant::now());
            } else if self.handshakes.contains_key(&fd) {
                self.advance_handshake(fd, now);
            } else if let Some(&key) = self.conn_fds.get(&fd) {
                if let Some(entry) = self.conns.get_mut(&key) {
                    entry.conn.host_event(ev.event_set(), now);
                }
                self.after_change(key);
            }
            // Anything else was closed earlier in this batch.
        }
        Ok(())
    }

    /// Re-evaluates the timer after guest activity changed deadlines.
    pub fn sync_timer(&mut self) {
        let needed = self.listener_paused
            || !self.handshakes.is_empty()
            || self.conns.values().any(|e| e.conn.deadline().is_some());
        if needed == self.timer_armed {
            return;
        }
        let result = if needed {
            let tick = [
                self.timeouts.handshake,
                self.timeouts.request,
                self.timeouts.close,
            ]
            .into_iter()
            .min()
            .unwrap_or(Duration::from_secs(1))
                / 4;
            let tick = tick.clamp(Duration::from_millis(5), Duration::from_millis(250));
            self.timer.reset(tick, Some(tick))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.timer_armed = needed,
            Err(e) => {
                tracing::warn!(error = %e, "vsock: cannot arm the timeout timer");
                DeviceMetrics::add(&self.metrics.errors, 1);
            }
        }
    }

    fn accept_clients(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_WAKE {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed; retrying on the next tick");
                    DeviceMetrics::add(&self.metrics.errors, 1);
                    let fd = self.listener.as_raw_fd();
                    if self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                        .is_ok()
                    {
                        self.listener_paused = true;
                    }
                    return;
                }
            };
            if self.handshakes.len() >= MAX_PENDING_HANDSHAKES
                || self.conns.len() >= MAX_CONNECTIONS
            {
                VsockMetrics::inc(&self.vsock_metrics.handshakes_rejected);
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                DeviceMetrics::add(&self.metrics.errors, 1);
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, fd, epoll_event(fd, EventSet::IN))
            {
                tracing::warn!(error = %e, "vsock: cannot watch a host client");
                DeviceMetrics::add(&self.metrics.errors, 1);
                continue;
            }
            self.handshakes.insert(
                fd,
                PendingHandshake::new(stream, now + self.timeouts.handshake),
            );
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            VsockMetrics::inc(&self.vsock_metrics.handshakes_rejected);
        }
    }

    fn advance_handshake(&mut self, fd: RawFd, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let peer_port = match hs.read_line() {
            Ok(HandshakeStep::Pending) => return,
            Ok(HandshakeStep::Connect(port)) => port,
            Err(e) => {
                tracing::debug!(error = %e, "vsock: host client refused");
                self.drop_handshake(fd);
                return;
            }
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.drop_handshake(fd);
            return;
        }
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let local_port = self.allocate_local_port(peer_port);
        let conn = VsockConnection::new_host_initiated(
            hs.stream,
            local_port,
            peer_port,
            now + self.timeouts.request,
            self.timeouts.close,
        );
        self.insert(
            ConnKey {
                local_port,
                peer_port,
            },
            conn,
            Some(EventSet::IN),
        );
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        // Terminates: at most MAX_CONNECTIONS keys can be taken.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    fn handle_timeouts(&mut self, now: Instant) {
        if self.listener_paused {
            let fd = self.listener.as_raw_fd();
            match self
                .epoll
                .ctl(ControlOperation::Add, fd, epoll_event(fd, EventSet::IN))
            {
                Ok(()) => self.listener_paused = false,
                Err(e) => tracing::warn!(error = %e, "vsock: cannot watch the listener"),
            }
        }
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            tracing::debug!("vsock: host client sent no connect line in time");
            self.drop_handshake(fd);
        }
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(entry) = self.conns.get_mut(&key) {
                let was_requesting = entry.conn.state() == ConnState::LocalInit;
                if entry.conn.check_deadline(now) && was_requesting {
                    VsockMetrics::inc(&self.vsock_metrics.requests_timed_out);
                }
            }
            self.after_change(key);
        }
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // The socket file would otherwise outlive the device and make the
        // next bind on the same path fail.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
