//! The guest image: which Kconfig options the guest kernel needs, and the newc initramfs that carries `/init`.
//!
//! - [`kconfig`]: reads `guest.config` and a built `.config`, lists what differs.
//! - [`cpio`]: the `newc` initramfs writer ([`cpio::Initramfs`]) and a reader for tests.
//! - [`elf`]: refuses a dynamically linked `/init`.
//! - [`paths`]: where `build-kernel.sh` and `build-initramfs.sh` leave their output.
//! - [`cmdline`]: the kernel command-line pieces every VMM that boots this kernel uses.
//!
//! The kernel itself is built by `kernel-config/build-kernel.sh` (see the
//! README in this folder).

pub mod cmdline;
pub mod cpio;
pub mod elf;
pub mod kconfig;
pub mod paths;

/// The guest kernel's Kconfig fragment (`kernel-config/guest.config`).
pub const GUEST_FRAGMENT: &str = include_str!("../guest.config");
