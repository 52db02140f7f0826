//! virtio devices: each a transport-independent backend
//! ([`device::VirtioDevice`]) served over virtio-mmio by `cloister-vmm` or
//! over vhost-user to QEMU.

pub mod block;
pub mod console;
pub mod device;
