//! virtio-blk (device type 2): a raw disk image as the guest's `/dev/vdX`.
//!
//! One request queue. Each request is a descriptor chain of a 16-byte header
//! (type, sector), data, and a status byte (`request.rs` documents the layout
//! and its checks). IN and OUT move data with `preadv`/`pwritev` straight
//! between the image and guest memory; FLUSH is `fdatasync`; GET_ID returns
//! the configured serial; DISCARD and WRITE_ZEROES map to `fallocate`
//! (`PUNCH_HOLE` / `ZERO_RANGE`) and are offered only when a probe at open
//! shows the host file system supports them. Requests run synchronously on
//! the transport's device thread, never on a vCPU.
//!
//! Everything in a request comes from the guest: malformed chains complete
//! with IOERR or UNSUPP and are counted in the device's metrics; the device
//! itself keeps serving.

mod device;
mod disk;
mod request;

pub use device::{
    BlockConfig, BlockDevice, BlockError, BlockMetrics, BlockMetricsSnapshot, BLOCK_QUEUE_SIZE,
    CONFIG_LEN, MAX_DISCARD_SEGMENTS,
};
pub use disk::SECTOR_SIZE;

#[cfg(test)]
mod tests;
