//! The SNP CPUID page: the vCPU's CPUID in the firmware's table format
//! (SEV-SNP ABI "CPUID Reporting", Linux `struct snp_cpuid_table`). The
//! firmware checks each entry against what the hardware allows during
//! `SNP_LAUNCH_UPDATE`; the guest then trusts the table instead of asking
//! the hypervisor. The page is measured with zero contents, so the launch
//! digest does not depend on it.
//!
//! ```text
//! 0x00 count u32, reserved u32, reserved u64
//! 0x10 64 x { eax_in u32, ecx_in u32, xcr0_in u64, xss_in u64,
//!             eax u32, ebx u32, ecx u32, edx u32, reserved u64 }   (48 bytes)
//! ```

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Entries the table holds.
pub const SNP_CPUID_COUNT_MAX: usize = 64;
const ENTRY_SIZE: usize = 48;
const HEADER_SIZE: usize = 16;

/// Why the CPUID page could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuidPageError {
    #[error(
        "the vCPU has {0} CPUID entries; the SNP CPUID page holds at most {SNP_CPUID_COUNT_MAX}"
    )]
    TooManyEntries(usize),
}

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpCpuidFn {
    pub eax_in: u32,
    pub ecx_in: u32,
    pub xcr0_in: u64,
    pub xss_in: u64,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl SnpCpuidFn {
    /// Converts a KVM entry as QEMU does: the subleaf counts only where
    /// KVM says it is significant, and leaf 0xD subleaves 0 and 1 are
    /// given for XCR0 = x87 (the guest computes larger XSAVE sizes itself).
    pub fn from_kvm(e: &kvm_cpuid_entry2) -> Self {
        let mut f = Self {
            eax_in: e.function,
            ecx_in: if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 {
                e.index
            } else {
                0
            },
            xcr0_in: 0,
            xss_in: 0,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        };
        if f.eax_in == 0xD && (f.ecx_in == 0 || f.ecx_in == 1) {
            f.ebx = 0x240;
            f.xcr0_in = 1;
        }
        f
    }

    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.eax_in.to_le_bytes());
        out[4..8].copy_from_slice(&self.ecx_in.to_le_bytes());
        out[8..16].copy_from_slice(&self.xcr0_in.to_le_bytes());
        out[16..24].copy_from_slice(&self.xss_in.to_le_bytes());
        out[24..28].copy_from_slice(&self.eax.to_le_bytes());
        out[28..32].copy_from_slice(&self.ebx.to_le_bytes());
        out[32..36].copy_from_slice(&self.ecx.to_le_bytes());
        out[36..40].copy_from_slice(&self.edx.to_le_bytes());
    }

    fn read(raw: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        Self {
            eax_in: u32_at(0),
            ecx_in: u32_at(4),
            xcr0_in: u64_at(8),
            xss_in: u64_at(16),
            eax: u32_at(24),
            ebx: u32_at(28),
            ecx: u32_at(32),
            edx: u32_at(36),
        }
    }
}

/// The CPUID page for `entries` (one vCPU's `KVM_SET_CPUID2` list).
pub fn build_cpuid_page(entries: &[kvm_cpuid_entry2]) -> Result<[u8; 4096], CpuidPageError> {
    if entries.len() > SNP_CPUID_COUNT_MAX {
        return Err(CpuidPageError::TooManyEntries(entries.len()));
    }
    let mut page = [0u8; 4096];
    page[0..4].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = HEADER_SIZE + i * ENTRY_SIZE;
        SnpCpuidFn::from_kvm(e).write(&mut page[at..at + ENTRY_SIZE]);
    }
    Ok(page)
}

/// The entries of a CPUID page (e.g. the one the firmware corrected and
/// KVM copied back after a refused `SNP_LAUNCH_UPDATE`).
pub fn parse_cpuid_page(page: &[u8; 4096]) -> Vec<SnpCpuidFn> {
    let count = (u32::from_le_bytes([page[0], page[1], page[2], page[3]]) as usize)
        .min(SNP_CPUID_COUNT_MAX);
    (0..count)
        .map(|i| {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            SnpCpuidFn::read(&page[at..at + ENTRY_SIZE])
        })
        .collect()
}

/// Human-readable differences between what we asked for and what the
/// firmware allows: `leaf 0x7/0x0: ebx 0x... -> 0x...`.
pub fn describe_corrections(ours: &[u8; 4096], firmware: &[u8; 4096]) -> Vec<String> {
    let theirs = parse_cpuid_page(firmware);
    parse_cpuid_page(ours)
        .iter()
        .zip(theirs.iter())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            let mut parts = Vec::new();
            for (name, x, y) in [
                ("eax", a.eax, b.eax),
                ("ebx", a.ebx, b.ebx),
                ("ecx", a.ecx, b.ecx),
                ("edx", a.edx, b.edx),
            ] {
                if x != y {
                    parts.push(format!("{name} {x:#x} -> {y:#x}"));
                }
            }
            format!("leaf {:#x}/{:#x}: {}", a.eax_in, a.ecx_in, parts.join(", "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, flags: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax,
            ebx: 0x1111,
            ecx: 0x2222,
            edx: 0x3333,
            ..Default::default()
        }
    }

    #[test]
    fn table_has_count_and_entries_at_their_offsets() {
        let page = build_cpuid_page(&[
            entry(0, 0, 0, 0x10),
            entry(7, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0x20),
            entry(0x8000_0001, 5, 0, 0x30),
        ])
        .unwrap();
        assert_eq!(&page[0..4], &3u32.to_le_bytes());
        // Second entry at 16 + 48: subleaf 1 kept (significant).
        assert_eq!(&page[64..68], &7u32.to_le_bytes());
        assert_eq!(&page[68..72], &1u32.to_le_bytes());
        assert_eq!(&page[64 + 24..64 + 28], &0x20u32.to_le_bytes());
        // Third: index not significant → ecx_in 0.
        assert_eq!(&page[112 + 4..112 + 8], &0u32.to_le_bytes());
        assert_eq!(parse_cpuid_page(&page).len(), 3);
    }

    #[test]
    fn xsave_leaf_is_given_for_x87_only() {
        let f = SnpCpuidFn::from_kvm(&entry(0xD, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 7));
        assert_eq!((f.ebx, f.xcr0_in), (0x240, 1));
        let f = SnpCpuidFn::from_kvm(&entry(0xD, 2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 7));
        assert_eq!((f.ebx, f.xcr0_in), (0x1111, 0));
    }

    #[test]
    fn too_many_entries_is_refused_with_the_count() {
        let many = vec![entry(1, 0, 0, 0); 65];
        let err = build_cpuid_page(&many).unwrap_err().to_string();
        assert!(err.contains("65 CPUID entries"), "{err}");
    }

    #[test]
    fn firmware_corrections_are_named_by_leaf_and_register() {
        let ours = build_cpuid_page(&[entry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 1)]).unwrap();
        let mut fixed = ours;
        fixed[16 + 28..16 + 32].copy_from_slice(&0x1011u32.to_le_bytes());
        assert_eq!(
            describe_corrections(&ours, &fixed),
            ["leaf 0x7/0x0: ebx 0x1111 -> 0x1011"]
        );
    }
}
