//! The guest kernel and initramfs that `kernel-config/build-kernel.sh` and
//! `kernel-config/build-initramfs.sh` build, found where they leave them
//! (see `cloister_guest_image::paths`).

use std::path::{Path, PathBuf};

use cloister_guest_image::paths;

/// What the boot-test init (`kernel-config/test-init`) prints once it runs;
/// keep in sync with its `MARKER` (a test below checks).
pub const TEST_INIT_MARKER: &str = "cloister-test-init: reached /init";
/// What it prints just before it reboots (its `POWER_OFF_MARKER`).
pub const TEST_INIT_POWER_OFF: &str = "cloister-test-init: powering off";

/// Errors locating the guest image.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    #[error("{what} not built: {path} is missing (run {hint})")]
    NotBuilt {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
}

/// A built guest: kernel files from one `build-kernel.sh` output folder
/// plus an initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The folder holding the kernel files.
    pub kernel_dir: PathBuf,
    /// Uncompressed ELF kernel, booted through its PVH entry point.
    pub vmlinux: PathBuf,
    /// Compressed kernel for the Linux boot protocol.
    pub bz_image: PathBuf,
    /// The kernel's `.config`.
    pub config: PathBuf,
    /// Raw `newc` initramfs.
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The kernel from `$CLOISTER_KERNEL_DIR` (else `<cache>/kernel/current`)
    /// with the boot-test initramfs from `$CLOISTER_INITRAMFS` (else
    /// `<cache>/initramfs/test-init.cpio`).
    pub fn locate() -> Result<Self, GuestImageError> {
        Self::locate_in(&paths::kernel_dir(), &paths::test_initramfs())
    }

    /// The kernel files in `kernel_dir` with the initramfs `initramfs`;
    /// fails naming the first file that is missing.
    pub fn locate_in(kernel_dir: &Path, initramfs: &Path) -> Result<Self, GuestImageError> {
        let image = Self {
            kernel_dir: kernel_dir.to_path_buf(),
            vmlinux: kernel_dir.join("vmlinux"),
            bz_image: kernel_dir.join("bzImage"),
            config: kernel_dir.join("config"),
            initramfs: initramfs.to_path_buf(),
        };
        for (what, path) in [
            ("guest kernel", &image.vmlinux),
            ("guest kernel", &image.bz_image),
            ("guest kernel", &image.config),
        ] {
            require(what, path, "kernel-config/build-kernel.sh")?;
        }
        require(
            "guest initramfs",
            &image.initramfs,
            "kernel-config/build-initramfs.sh",
        )?;
        Ok(image)
    }
}

fn require(what: &'static str, path: &Path, hint: &'static str) -> Result<(), GuestImageError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(GuestImageError::NotBuilt {
            what,
            path: path.to_path_buf(),
            hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_in_empty_dir_names_missing_vmlinux_and_the_build_script() {
        let dir = tempfile::tempdir().unwrap();
        let err = GuestImage::locate_in(dir.path(), &dir.path().join("i.cpio")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("vmlinux"), "{message}");
        assert!(
            message.contains("kernel-config/build-kernel.sh"),
            "{message}"
        );
    }

    #[test]
    fn locate_in_without_initramfs_names_the_initramfs_script() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["vmlinux", "bzImage", "config"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let err = GuestImage::locate_in(dir.path(), &dir.path().join("i.cpio")).unwrap_err();
        assert!(err.to_string().contains("build-initramfs.sh"), "{err}");
        std::fs::write(dir.path().join("i.cpio"), b"x").unwrap();
        let image = GuestImage::locate_in(dir.path(), &dir.path().join("i.cpio")).unwrap();
        assert_eq!(image.vmlinux, dir.path().join("vmlinux"));
    }

    #[test]
    fn markers_match_the_test_init_source() {
        let source = include_str!("../../kernel-config/test-init/src/main.rs");
        assert!(source.contains(&format!("MARKER: &str = \"{TEST_INIT_MARKER}\"")));
        assert!(source.contains(&format!(
            "POWER_OFF_MARKER: &str = \"{TEST_INIT_POWER_OFF}\""
        )));
    }
}
