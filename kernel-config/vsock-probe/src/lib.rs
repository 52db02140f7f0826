//! What the vsock probe (`/init` of a test guest) and the host side of the
//! test agree on: the kernel command-line keys that choose its modes, the
//! console markers, the bulk-transfer data and its checksum.
//!
//! The probe runs its modes in this order, each only if its key is given:
//!
//! 0. **rng** (`vsock_probe.rng_bytes=N`) and **block**
//!    (`vsock_probe.blk_read_mib=M vsock_probe.blk_write_kib=K`): for the
//!    other devices served over vhost-user. Reads N bytes from
//!    `/dev/hwrng` and prints how many distinct byte values came; reads M
//!    MiB of `/dev/vda` and prints their [`StreamHash`]
//!    ([`BLOCK_READ_MARKER`]), then writes K KiB of [`Pattern`] from
//!    [`BLOCK_WRITE_SEED`] at its start and syncs.
//! 1. **echo** (`vsock_probe.echo_port=P`): connects to the host (CID 2)
//!    port P and echoes everything until the host shuts its side down.
//!    With `vsock_probe.rebind=1` it then unbinds and rebinds the vsock
//!    driver (the device is reset and set up again, as on a reboot) and
//!    echoes on a second connection to P.
//! 2. **accept** (`vsock_probe.listen_port=L vsock_probe.connections=N`):
//!    listens on port L, echoes on N host-initiated connections at once
//!    (one thread each), and goes on when all N have ended.
//! 3. **bulk** (`vsock_probe.bulk_port=P vsock_probe.bulk_mib=M`): connects
//!    to host port P, receives M MiB, sends the [`StreamHash`] of them (8
//!    bytes, little endian), sends M MiB of [`Pattern`] data
//!    ([`GUEST_PATTERN_SEED`]) and then their hash.
//!
//! Then it prints [`DONE_MARKER`] (or a line starting with [`FAIL_PREFIX`])
//! and reboots, which ends the VM.

pub mod cmdline;
pub mod stream;

pub use cmdline::ProbeConfig;
pub use stream::{Pattern, StreamHash};

/// Printed first, once the probe runs as `/init`.
pub const START_MARKER: &str = "vsock-probe: started";
/// Printed when the accept mode listens (host CONNECTs can start).
pub const LISTENING_MARKER: &str = "vsock-probe: listening";
/// Printed once the vsock driver was unbound and bound again.
pub const REBIND_MARKER: &str = "vsock-probe: rebind: vsock driver reset";
/// Printed after every mode succeeded.
pub const DONE_MARKER: &str = "vsock-probe: all modes passed";
/// Starts the line describing the first failure.
pub const FAIL_PREFIX: &str = "vsock-probe: FAIL";
/// The well-known CID of the host.
pub const HOST_CID: u32 = 2;
/// Seed of the data the guest sends in bulk mode.
pub const GUEST_PATTERN_SEED: u64 = 0x6775_6573_745f_7478;
/// Seed of the data the host sends in bulk mode.
pub const HOST_PATTERN_SEED: u64 = 0x686f_7374_5f74_7800;
/// Precedes the rng result: `<prefix><bytes> bytes, <n> distinct values`.
pub const RNG_MARKER: &str = "vsock-probe: rng: ";
/// Precedes the block checksum: `<prefix><hash as 16 hex digits>`.
pub const BLOCK_READ_MARKER: &str = "vsock-probe: blk: read checksum ";
/// Printed once the block writes are synced.
pub const BLOCK_WRITTEN_MARKER: &str = "vsock-probe: blk: written and synced";
/// Seed of the data the guest writes to the disk in block mode.
pub const BLOCK_WRITE_SEED: u64 = 0x626c_6b5f_7772_6974;
/// Read and write size in bulk mode.
pub const BULK_CHUNK: usize = 64 * 1024;
