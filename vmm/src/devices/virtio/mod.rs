//! virtio devices: each a transport-independent backend
//! ([`device::VirtioDevice`]) served over virtio-mmio by `cloister-vmm` or
//! over vhost-user to QEMU.

pub mod attach;
pub mod block;
pub mod console;
pub mod device;
pub mod event_loop;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;
