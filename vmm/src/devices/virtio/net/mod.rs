//! virtio-net (device type 1) on a Linux tap device.
//!
//! # Protocol primer
//!
//! Two queues: `rx` (0, device → driver frames) and `tx` (1, driver →
//! device frames); no control queue, no multiqueue. Every frame in either
//! direction starts with the 12-byte `virtio_net_hdr_v1` (all fields
//! little-endian; 12 bytes for a modern driver or with `MRG_RXBUF`, 10
//! bytes without `num_buffers` for a legacy driver without it, as QEMU's
//! legacy virtio-mmio hands out):
//!
//! ```text
//!  offset size field
//!       0    1 flags        1 = NEEDS_CSUM (checksum from csum_start, store
//!                           at csum_start + csum_offset), 2 = DATA_VALID
//!       1    1 gso_type     0 none, 1 TCPv4, 4 TCPv6, 0x80 ECN bit
//!       2    2 hdr_len      length of the headers of a GSO frame
//!       4    2 gso_size     segment size of a GSO frame
//!       6    2 csum_start
//!       8    2 csum_offset
//!      10    2 num_buffers  rx only: rx buffers this frame spans (MRG_RXBUF)
//! ```
//!
//! A tap opened with `IFF_VNET_HDR` and `TUNSETVNETHDRSZ` 12 reads and
//! writes exactly this header in front of each Ethernet frame (on a
//! little-endian host), so the device moves frames between the queues and
//! the tap unchanged; on rx it only fills in `num_buffers`, which the tap
//! leaves alone. A legacy 10-byte header is widened to 12 on tx and
//! narrowed on rx.
//!
//! Configuration space: `mac` (6 bytes), `status` (u16, bit 0 LINK_UP),
//! `max_virtqueue_pairs` (u16, 1).
//!
//! # Features
//!
//! - `MAC`: the configured address, or a random locally administered one.
//! - `STATUS`: the link is always up; offering it lets a later version
//!   report carrier changes without a new feature negotiation.
//! - `CSUM`, `HOST_TSO4/6` (the guest may send partially checksummed and
//!   TSO frames) and `GUEST_CSUM`, `GUEST_TSO4/6` (the tap may hand us
//!   such frames for the guest): offered only when the tap accepted the
//!   matching `TUNSETOFFLOAD` flags when the device was created. After
//!   negotiation the tap is set to exactly the guest-side offloads the
//!   driver accepted, so it never hands the guest a frame it cannot take.
//! - No UFO: Linux (the only guest) stopped producing UFO frames in 4.14
//!   and the tap ignores `TUN_F_UFO`, so it would be an untested path.
//! - `MRG_RXBUF`: with `GUEST_TSO` and without mergeable buffers, the Linux
//!   driver posts every rx buffer as a 64 KiB chain ("big packets"),
//!   pinning ~16 MiB of guest memory for a 256-entry queue whatever the
//!   traffic; with it, it posts page-sized buffers and a frame spans as
//!   many as it needs (`num_buffers`). It costs the device a gather step.
//! - `EVENT_IDX`: fewer kicks and interrupts under load.
//!
//! # Backpressure
//!
//! The device's host event fd is an epoll set of its own holding the tap.
//! When the guest has no rx buffers left, a frame already read from the tap
//! waits in the device and the tap leaves that epoll set, so the
//! (level-triggered) transport loop stops being woken for a readable tap
//! it cannot serve; the driver's next rx kick puts it back. Meanwhile the
//! kernel queues frames on the tap (up to its `txqueuelen`) and then drops
//! them, as a full NIC ring does.
//!
//! # Layout
//!
//! - [`tap`]: opening or adopting the tap, offloads.
//! - [`mac`]: MAC addresses.
//! - [`device`]: the [`VirtioDevice`](super::device::VirtioDevice), rx and tx.
//! - [`metrics`]: frame and drop counters.

mod device;
pub mod mac;
mod metrics;
pub mod tap;
#[cfg(test)]
mod tests;

use std::io;

pub use device::NetDevice;
pub use mac::MacAddress;
pub use metrics::{NetMetrics, NetMetricsSnapshot};
pub use tap::{NetBackend, Tap};

/// `sizeof(struct virtio_net_hdr_v1)`: the header in front of every frame
/// on the tap, and in the guest's buffers unless the driver is legacy.
pub const NET_HDR_LEN: usize = 12;
/// `sizeof(struct virtio_net_hdr)`: a legacy driver's header without
/// mergeable buffers (no `num_buffers`).
pub const LEGACY_NET_HDR_LEN: usize = 10;
/// Largest Ethernet frame (without the virtio header) either way: a 64 KiB
/// GSO frame plus its 14-byte Ethernet header, what Firecracker and the
/// Linux driver's "big packets" assume.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest frame with its header.
pub const MAX_BUFFER_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;
/// Entries per queue (QEMU's and Firecracker's default).
pub const NET_QUEUE_SIZE: u16 = 256;

/// Why a net device could not be created or set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap name {0:?} is empty, longer than 15 bytes, or contains '/' or NUL")]
    BadTapName(String),
    #[error("cannot open /dev/net/tun for tap {name}: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error("TUNSETIFF for tap {name} failed: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("fd {fd} is not an open file descriptor: {source}")]
    BadFd { fd: i32, source: io::Error },
    #[error("fd {fd} is not an attached tun/tap device (TUNGETIFF: {source})")]
    NotTap { fd: i32, source: io::Error },
    #[error(
        "fd {fd} is tap {name} with flags {flags:#x}, expected IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
    )]
    WrongTapFlags { fd: i32, name: String, flags: u16 },
    #[error("cannot set up tap {name}: {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot set up the rx epoll set: {0}")]
    Epoll(io::Error),
    #[error("cannot make a random mac address: {0}")]
    RandomMac(io::Error),
}
