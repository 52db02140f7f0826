//! The SEV-SNP launch digest (SEV-SNP ABI spec, 8.17.2 `SNP_LAUNCH_UPDATE`).
//!
//! The firmware folds every page the host adds before `SNP_LAUNCH_FINISH` into
//! a running SHA-384 over a 0x70-byte `PAGE_INFO`:
//!
//! ```text
//! 0x00 digest_cur [48]   0x30 contents [48]   0x60 length u16 = 0x70
//! 0x62 page_type u8      0x63 imi_page u8     0x64 vmpl3/2/1 perms u8 x3, reserved u8
//! 0x68 gpa u64
//! ```
//!
//! `contents` is SHA-384 of the page for normal and VMSA pages and zero for the
//! others. VMSA pages are measured at the fixed GPA 0xFFFFFFFFF000.

use sha2::{Digest, Sha384};

/// Page size.
pub const PAGE_SIZE: usize = 4096;
/// GPA at which VMSA pages are measured.
pub const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;

/// `SNP_LAUNCH_UPDATE` page types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageType {
    /// Measured data page.
    Normal = 1,
    /// vCPU save area.
    Vmsa = 2,
    /// Zero page.
    Zero = 3,
    /// Unmeasured page.
    Unmeasured = 4,
    /// Secrets page (filled by the firmware).
    Secrets = 5,
    /// CPUID page (checked by the firmware).
    Cpuid = 6,
}

/// One entry of a launch page list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchPage {
    /// Data pages starting at `gpa`; `data` is a whole number of pages.
    Normal {
        /// First GPA.
        gpa: u64,
        /// Contents.
        data: Vec<u8>,
    },
    /// One VMSA (4096 bytes).
    Vmsa(Box<[u8; PAGE_SIZE]>),
    /// Zero pages covering `len` bytes from `gpa`.
    Zero {
        /// First GPA.
        gpa: u64,
        /// Length in bytes (multiple of 4096).
        len: u64,
    },
    /// Unmeasured pages covering `len` bytes from `gpa`.
    Unmeasured {
        /// First GPA.
        gpa: u64,
        /// Length in bytes (multiple of 4096).
        len: u64,
    },
    /// The secrets page.
    Secrets {
        /// GPA.
        gpa: u64,
    },
    /// The CPUID page.
    Cpuid {
        /// GPA.
        gpa: u64,
    },
}

/// Running launch digest.
#[derive(Debug, Clone)]
pub struct SnpLaunchDigest {
    ld: [u8; 48],
}

impl Default for SnpLaunchDigest {
    fn default() -> Self {
        Self { ld: [0u8; 48] }
    }
}

impl SnpLaunchDigest {
    /// Starts from a given digest (e.g. a precomputed firmware digest).
    pub fn with_seed(seed: [u8; 48]) -> Self {
        Self { ld: seed }
    }

    /// Folds one `PAGE_INFO` in.
    pub fn update(&mut self, page_type: PageType, gpa: u64, contents: &[u8; 48]) {
        let mut info = [0u8; 0x70];
        info[..48].copy_from_slice(&self.ld);
        info[48..96].copy_from_slice(contents);
        info[0x60..0x62].copy_from_slice(&0x70u16.to_le_bytes());
        info[0x62] = page_type as u8;
        info[0x68..0x70].copy_from_slice(&gpa.to_le_bytes());
        self.ld.copy_from_slice(&Sha384::digest(info));
    }

    /// Adds data pages; a trailing partial page is zero-filled as the VMM
    /// would map it.
    pub fn add_normal(&mut self, gpa: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(PAGE_SIZE).enumerate() {
            let mut page = [0u8; PAGE_SIZE];
            page[..chunk.len()].copy_from_slice(chunk);
            let digest: [u8; 48] = Sha384::digest(page).into();
            self.update(PageType::Normal, gpa + (i * PAGE_SIZE) as u64, &digest);
        }
    }

    fn add_empty(&mut self, page_type: PageType, gpa: u64, len: u64) {
        let pages = len.div_ceil(PAGE_SIZE as u64);
        for i in 0..pages {
            self.update(page_type, gpa + i * PAGE_SIZE as u64, &[0u8; 48]);
        }
    }

    /// Adds one entry of a page list.
    pub fn add(&mut self, page: &LaunchPage) {
        match page {
            LaunchPage::Normal { gpa, data } => self.add_normal(*gpa, data),
            LaunchPage::Vmsa(vmsa) => {
                let digest: [u8; 48] = Sha384::digest(&vmsa[..]).into();
                self.update(PageType::Vmsa, VMSA_GPA, &digest);
            }
            LaunchPage::Zero { gpa, len } => self.add_empty(PageType::Zero, *gpa, *len),
            LaunchPage::Unmeasured { gpa, len } => self.add_empty(PageType::Unmeasured, *gpa, *len),
            LaunchPage::Secrets { gpa } => self.update(PageType::Secrets, *gpa, &[0u8; 48]),
            LaunchPage::Cpuid { gpa } => self.update(PageType::Cpuid, *gpa, &[0u8; 48]),
        }
    }

    /// The digest so far (the `MEASUREMENT` after the last page).
    pub fn digest(&self) -> [u8; 48] {
        self.ld
    }
}

/// Launch digest of a complete page list.
pub fn launch_digest<'a>(pages: impl IntoIterator<Item = &'a LaunchPage>) -> [u8; 48] {
    let mut ld = SnpLaunchDigest::default();
    for page in pages {
        ld.add(page);
    }
    ld.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_info_chain_matches_hand_computation() {
        // One zero page at GPA 0x1000: SHA-384 of the 0x70-byte PAGE_INFO.
        let mut info = [0u8; 0x70];
        info[0x60] = 0x70;
        info[0x62] = 3;
        info[0x69] = 0x10;
        let expected: [u8; 48] = Sha384::digest(info).into();
        let got = launch_digest(&[LaunchPage::Zero {
            gpa: 0x1000,
            len: 4096,
        }]);
        assert_eq!(got, expected);
    }

    #[test]
    fn order_and_type_change_the_digest() {
        let a = LaunchPage::Secrets { gpa: 0x1000 };
        let b = LaunchPage::Cpuid { gpa: 0x2000 };
        assert_ne!(
            launch_digest(&[a.clone(), b.clone()]),
            launch_digest(&[b.clone(), a.clone()])
        );
        assert_ne!(
            launch_digest(&[LaunchPage::Secrets { gpa: 0x1000 }]),
            launch_digest(&[LaunchPage::Cpuid { gpa: 0x1000 }])
        );
    }

    #[test]
    fn partial_page_is_zero_filled() {
        let mut padded = vec![0xAAu8; 100];
        padded.resize(PAGE_SIZE, 0);
        assert_eq!(
            launch_digest(&[LaunchPage::Normal {
                gpa: 0,
                data: vec![0xAA; 100]
            }]),
            launch_digest(&[LaunchPage::Normal {
                gpa: 0,
                data: padded
            }])
        );
    }
}
