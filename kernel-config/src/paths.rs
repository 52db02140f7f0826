//! Where the build scripts leave the guest image, and how tests find it.
//!
//! Everything lives under one cache folder outside the clone, so CI runs on
//! one machine reuse the kernel (a 6.12 build takes 8-25 minutes on 2 cores):
//!
//! ```text
//! ${CLOISTER_CACHE:-$HOME/.cache/cloister}/
//!   kernel/<debian-version>-<inputs-hash>/{vmlinux,bzImage,config,VERSION}
//!   kernel/current -> <debian-version>-<inputs-hash>     (last build)
//!   initramfs/test-init.cpio                              (boot-test /init)
//! ```
//!
//! `CLOISTER_KERNEL_DIR` and `CLOISTER_INITRAMFS` override the two lookups.

use std::env;
use std::path::PathBuf;

/// Overrides the cache root.
pub const CACHE_ENV: &str = "CLOISTER_CACHE";
/// Overrides the kernel folder (one holding `vmlinux`, `bzImage`, `config`).
pub const KERNEL_DIR_ENV: &str = "CLOISTER_KERNEL_DIR";
/// Overrides the boot-test initramfs file.
pub const INITRAMFS_ENV: &str = "CLOISTER_INITRAMFS";

/// `${CLOISTER_CACHE:-$HOME/.cache/cloister}` (`/tmp/cloister-cache` when
/// neither is set, e.g. in a stripped CI environment).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    match env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("cloister"),
        None => PathBuf::from("/tmp/cloister-cache"),
    }
}

/// The kernel folder: `$CLOISTER_KERNEL_DIR`, else `<cache>/kernel/current`.
pub fn kernel_dir() -> PathBuf {
    env::var_os(KERNEL_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| cache_dir().join("kernel").join("current"), PathBuf::from)
}

/// The boot-test initramfs: `$CLOISTER_INITRAMFS`, else
/// `<cache>/initramfs/test-init.cpio`.
pub fn test_initramfs() -> PathBuf {
    env::var_os(INITRAMFS_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(
            || cache_dir().join("initramfs").join("test-init.cpio"),
            PathBuf::from,
        )
}
