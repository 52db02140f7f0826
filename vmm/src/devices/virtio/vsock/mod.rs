//! virtio-vsock, bridged to host Unix sockets ("hybrid vsock", the scheme
//! Firecracker and Cloud Hypervisor use, so their tools work unchanged).
//!
//! # Protocol primer
//!
//! The device has three queues: `rx` (0, device → driver packets), `tx`
//! (1, driver → device packets) and `event` (2, transport events; we never
//! send any, so its buffers stay unused). Configuration space is the guest's
//! CID as a little-endian `u64`. The host is always CID 2.
//!
//! Every packet starts with a 44-byte little-endian header, followed by
//! `len` payload bytes (only for `OP_RW`):
//!
//! ```text
//!  offset size field
//!       0    8 src_cid     sender's CID (the guest's CID on tx, 2 on rx)
//!       8    8 dst_cid     receiver's CID
//!      16    4 src_port
//!      20    4 dst_port
//!      24    4 len         payload length (we refuse more than 64 KiB)
//!      28    2 type        1 = STREAM (the only type we support)
//!      30    2 op          see below
//!      32    4 flags       OP_SHUTDOWN: 1 = RCV (no more receiving), 2 = SEND
//!      36    4 buf_alloc   sender's receive buffer size for this connection
//!      40    4 fwd_cnt     bytes the sender has consumed from that buffer
//! ```
//!
//! A connection is the pair (host port, guest port). Ops: `REQUEST` (1)
//! opens it, `RESPONSE` (2) accepts, `RST` (3) aborts (also the answer to
//! anything addressed to a connection or port that does not exist),
//! `SHUTDOWN` (4) closes one or both directions, `RW` (5) carries data,
//! `CREDIT_UPDATE` (6) announces `buf_alloc`/`fwd_cnt`, `CREDIT_REQUEST` (7)
//! asks the peer for a `CREDIT_UPDATE`.
//!
//! Credit: a sender may have at most `peer.buf_alloc - (sent - peer.fwd_cnt)`
//! bytes in flight (all counters wrap at 2^32). Every packet carries the
//! sender's current `buf_alloc` and `fwd_cnt`, so credit also travels on
//! data and control packets. We advertise [`CONN_TX_BUF_SIZE`] per
//! connection and never buffer more than that towards the host socket; a
//! guest that sends beyond its credit loses the connection (RST). Towards
//! the guest we read from the host socket only as much as the guest's credit
//! allows, and stop watching the socket while the credit is zero (asking
//! with `CREDIT_REQUEST`).
//!
//! Shutdown: the host half-closing its socket (EOF on read) becomes
//! `SHUTDOWN(SEND)` to the guest; a full close (`EPOLLHUP`) becomes
//! `SHUTDOWN(RCV|SEND)` once pending data is delivered, and the guest
//! answers with `RST`. The guest's `SHUTDOWN(SEND)` half-closes the host
//! socket once buffered data is written; `SHUTDOWN(RCV|SEND)` ends the
//! connection (host socket closed, `RST` to the guest).
//!
//! # Hybrid vsock (host side)
//!
//! The device listens on the Unix socket `uds_path`:
//!
//! - host → guest: a client connects to `uds_path` and writes
//!   `CONNECT <port>\n` (decimal, at most [`MAX_CONNECT_LINE`] bytes). The
//!   device sends `REQUEST` to guest port `<port>` from a freshly allocated
//!   host port; on the guest's `RESPONSE` it writes `OK <host_port>\n` to the
//!   client, and from then on the socket is the connection's byte stream.
//!   A malformed line, or no line within the handshake timeout, closes the
//!   socket; a guest `RST` or no answer within the request timeout closes it
//!   too.
//! - guest → host: a guest `REQUEST` to host port `P` connects to the Unix
//!   socket `<uds_path>_<P>`; if nothing listens there the guest gets `RST`.
//!
//! # Layout
//!
//! - [`packet`]: the header, its encoding and checks.
//! - [`handshake`]: the `CONNECT <port>\n` line.
//! - [`connection`]: one connection's state machine and credit accounting.
//! - [`muxer`]: the Unix side: listener, connections, the internal epoll
//!   whose fd is the device's one host event fd, timers.
//! - [`device`]: the [`VirtioDevice`](super::device::VirtioDevice)
//!   implementation that moves packets between the queues and the muxer.

mod connection;
mod device;
mod handshake;
mod metrics;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use device::VsockDevice;
pub use metrics::{VsockMetrics, VsockMetricsSnapshot};

/// The host's CID: the only destination the guest may address.
pub const VSOCK_HOST_CID: u64 = 2;
/// Largest payload of one packet we accept from the guest or send to it.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Receive buffer we advertise per connection (`buf_alloc`): the most we
/// ever hold for one connection while the host socket is not writable.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line accepted from a host client.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most connections (both directions) open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that connected but have not finished their `CONNECT`
/// line yet.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Most `RST` packets for unknown connections queued for the guest; more
/// are dropped (the guest times out instead).
pub const MAX_QUEUED_RESETS: usize = 1024;

/// How long the device waits for the various parties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockTimeouts {
    /// A host client's `CONNECT` line.
    pub handshake: Duration,
    /// The guest's `RESPONSE` to a host-initiated `REQUEST`.
    pub request: Duration,
    /// The guest's `RST` after we sent `SHUTDOWN(RCV|SEND)`.
    pub close: Duration,
}

impl Default for VsockTimeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            request: Duration::from_secs(2),
            close: Duration::from_secs(8),
        }
    }
}

/// Why the vsock device could not be created, or why a packet from the
/// guest was refused.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest cid {0} is reserved (valid: 3..=4294967294)")]
    ReservedGuestCid(u64),
    #[error("unix socket path {0:?} is too long for sockaddr_un (with the _<port> suffix)")]
    SocketPathTooLong(PathBuf),
    #[error("cannot listen on unix socket {path:?}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot set up the host event epoll: {0}")]
    Epoll(io::Error),
    #[error("cannot set up the timeout timer: {0}")]
    Timer(io::Error),
    #[error("descriptor chain is unusable: {0}")]
    BadChain(virtio_queue::Error),
    #[error("tx chain has {0} readable bytes, less than the 44-byte header")]
    ChainTooShort(usize),
    #[error("rx chain has {0} writable bytes, less than the 44-byte header")]
    RxChainTooShort(usize),
    #[error("rx chain has a device-readable descriptor")]
    RxChainNotWritable,
    #[error("payload length {0} exceeds the 65536-byte maximum")]
    PayloadTooLong(u32),
    #[error("payload length {len} exceeds the {available} bytes in the chain")]
    PayloadBeyondChain { len: u32, available: usize },
    #[error("source cid {0} is not the guest's cid")]
    BadSourceCid(u64),
    #[error("destination cid {0} is not the host (2)")]
    BadDestinationCid(u64),
    #[error("socket type {0} is not STREAM (1)")]
    UnsupportedType(u16),
    #[error("cannot read the packet from guest memory: {0}")]
    GuestMemory(io::Error),
}
