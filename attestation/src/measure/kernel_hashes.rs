//! The SEV hashes table through which OVMF checks a directly booted kernel,
//! initrd and command line (QEMU `kernel-hashes=on`, as Kata launches SNP
//! guests). QEMU writes it into the page OVMF reserves (`SNP_KERNEL_HASHES`),
//! so the launch digest covers the three SHA-256 values.
//!
//! ```text
//! table:  guid (9438d606-...) [16] | length u16 = 168 | cmdline | initrd | kernel | pad to 176
//! entry:  guid [16] | length u16 = 50 | sha256 [32]
//! ```

use super::guid_le;
use super::snp::PAGE_SIZE;
use sha2::{Digest, Sha256};

const TABLE_GUID: &str = "9438d606-4f22-4cc9-b479-a793d411fd21";
const KERNEL_GUID: &str = "4de79437-abd2-427f-b835-d5b172d2045b";
const INITRD_GUID: &str = "44baf731-3a2f-4bd7-9af1-41e29169781d";
const CMDLINE_GUID: &str = "97d02dd8-bd20-4c94-aa78-e7714d36ab2a";
const ENTRY_LEN: usize = 16 + 2 + 32;
const TABLE_LEN: usize = 16 + 2 + 3 * ENTRY_LEN;

/// SHA-256 of the kernel, initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelHashes {
    /// SHA-256 of the kernel image.
    pub kernel: [u8; 32],
    /// SHA-256 of the initrd (of nothing when there is none).
    pub initrd: [u8; 32],
    /// SHA-256 of the command line with its NUL terminator.
    pub cmdline: [u8; 32],
}

impl KernelHashes {
    /// Hashes the boot inputs as QEMU does.
    pub fn new(kernel: &[u8], initrd: Option<&[u8]>, cmdline: Option<&str>) -> Self {
        let mut cmd = cmdline.unwrap_or("").as_bytes().to_vec();
        cmd.push(0);
        Self {
            kernel: Sha256::digest(kernel).into(),
            initrd: Sha256::digest(initrd.unwrap_or(&[])).into(),
            cmdline: Sha256::digest(&cmd).into(),
        }
    }

    /// The padded table.
    pub fn table(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(TABLE_LEN.next_multiple_of(16));
        t.extend_from_slice(&guid_le(TABLE_GUID));
        t.extend_from_slice(&(TABLE_LEN as u16).to_le_bytes());
        for (guid, hash) in [
            (CMDLINE_GUID, &self.cmdline),
            (INITRD_GUID, &self.initrd),
            (KERNEL_GUID, &self.kernel),
        ] {
            t.extend_from_slice(&guid_le(guid));
            t.extend_from_slice(&(ENTRY_LEN as u16).to_le_bytes());
            t.extend_from_slice(hash);
        }
        t.resize(TABLE_LEN.next_multiple_of(16), 0);
        t
    }

    /// The page holding the table at `offset`, or `None` when it does not fit.
    pub fn page(&self, offset: usize) -> Option<Vec<u8>> {
        let table = self.table();
        if offset + table.len() > PAGE_SIZE {
            return None;
        }
        let mut page = vec![0u8; PAGE_SIZE];
        page[offset..offset + table.len()].copy_from_slice(&table);
        Some(page)
    }
}
