//! What device unit tests share: guest memory, descriptors for
//! `MockSplitQueue` chains, and a notifier that counts interrupts.

use std::cell::Cell;
use std::io;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::device::UsedNotifier;

/// Counts `notify_used` calls (interrupts the driver would get).
#[derive(Default)]
pub struct CountingNotifier(pub Cell<u32>);

impl UsedNotifier for CountingNotifier {
    fn notify_used(&self, _queue_index: usize) -> io::Result<()> {
        self.0.set(self.0.get() + 1);
        Ok(())
    }
}

/// `size` bytes of guest RAM from address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A descriptor the device reads (driver → device).
pub fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A descriptor the device writes (device → driver).
pub fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}
