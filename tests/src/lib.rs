//! End-to-end tests: real containerd with ctr and a CRI client, the RuntimeClass handler, and real microVMs where the host can run them.
//!
//! - [`guest_image`]: finds the built guest kernel and initramfs.
//! - [`qemu`]: boots them in QEMU `-M microvm` (TCG or KVM) and times the
//!   console milestones.

pub mod guest_image;
pub mod qemu;
