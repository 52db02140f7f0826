//! virtio-fs (device type 26): a host directory shared with the guest,
//! which mounts it with `mount -t virtiofs TAG /mnt`.
//!
//! Protocol primer: virtio-fs carries FUSE. Every request is one descriptor
//! chain: device-readable buffers holding a `fuse_in_header` (length,
//! opcode, unique id, node id, caller's uid/gid/pid) and the opcode's
//! arguments, then device-writable buffers for the `fuse_out_header`
//! (length, `-errno`, the same unique id) and the reply. Queue 0 is the
//! *hiprio* queue (FORGET, BATCH_FORGET and INTERRUPT, which get no reply);
//! queues 1..=N are request queues, all equivalent. The configuration space
//! is the tag (36 bytes, NUL padded) and `num_request_queues` (le32). Node
//! ids are the server's own numbers: 1 is the root, every other is handed
//! out by LOOKUP (or CREATE, MKDIR ...) and given back by FORGET.
//!
//! The FUSE server is `fuse-backend-rs`'s `Server` over its passthrough file
//! system, wrapped in [`share::ShareFs`] (read-only mode, no device nodes,
//! no DAX, a private umask). It runs in process, synchronously on the
//! transport's device thread, like the block device; no separate
//! virtiofsd.
//!
//! Confinement of the guest to the shared directory rests on the
//! passthrough file system's design, which the tests in `tests.rs` prove
//! request by request: every inode is an `O_PATH` file descriptor opened
//! with `openat(parent, name, O_NOFOLLOW)` relative to its parent's, so
//! no path is ever resolved from the host's root; `..` at the root is the
//! root; names with `/`, and `.`/`..` where they are not lookups, are
//! EINVAL ([`request`] also refuses empty names and names with a NUL
//! inside, which the server would otherwise cut short); symlinks are never
//! followed on the host (READLINK returns the text, the guest resolves it
//! inside its own view); only regular files and directories are ever
//! opened for I/O, so a symlink or FIFO reached by inode is EBADF, never
//! its target or a blocked thread; node ids and file handles that were
//! not handed out are EBADF.
//!
//! Everything in a request comes from the guest: a chain that cannot be
//! parsed (truncated header, lengths that lie, buffers outside guest
//! memory) completes with 0 bytes and is counted in the device's metrics;
//! the device keeps serving.
//!
//! Hot-add (not implemented): a share is a self-contained device
//! ([`FsDevice::new`] needs only its [`FsConfig`]), so adding one to a
//! running VM needs only a free virtio-mmio slot, a config-change or
//! ACPI/hotplug notification the guest understands, and the device thread
//! taking a new transport, none of which this module has to change for.

mod device;
mod request;
pub mod share;

pub use device::{
    validate_tag, CacheMode, FsConfig, FsDevice, FsError, FsMetrics, FsMetricsSnapshot, CONFIG_LEN,
    FS_QUEUE_SIZE, MAX_REQUESTS_PER_ROUND, MAX_REQUEST_QUEUES, MAX_TAG_BYTES,
};

#[cfg(test)]
mod tests;
