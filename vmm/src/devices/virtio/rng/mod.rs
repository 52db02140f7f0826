//! virtio-rng (device type 4): the guest's hardware RNG, fed from the
//! host's `getrandom(2)`.
//!
//! One queue ("requestq"). The driver posts device-writable buffers; the
//! device fills them with random bytes and returns each with the number of
//! bytes written. No configuration space, no device-specific features.

mod device;

pub use device::{RngDevice, RNG_MAX_REQUEST_BYTES, RNG_QUEUE_SIZE};
