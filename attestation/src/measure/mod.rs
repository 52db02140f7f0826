//! Launch-measurement calculation (reference values out of the box).
//!
//! - [`snp`]: the SEV-SNP launch digest over an ordered page list; the same
//!   API that `cloister-vmm`'s confidential launch feeds, so the VMM and the
//!   verifier share one implementation.
//! - [`vmsa`]: the initial VMSA page of each vCPU as KVM/QEMU set it up.
//! - [`ovmf`]: the OVMF front end (firmware pages, SEV metadata sections,
//!   kernel-hashes table) as QEMU and Kata launch it.
//! - [`tdx`]: the TDX MRTD calculator (TDH.MEM.PAGE.ADD / TDH.MR.EXTEND replay).

pub mod kernel_hashes;
pub mod ovmf;
pub mod snp;
pub mod tdx;
pub mod vmsa;

/// Parses a GUID string into its on-disk (mixed-endian) byte form, as EDK2
/// and the Linux kernel store them.
pub(crate) fn guid_le(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut be = [0u8; 16];
    for (i, byte) in be.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    let mut le = be;
    le[0..4].reverse();
    le[4..6].reverse();
    le[6..8].reverse();
    le
}

#[cfg(test)]
mod tests {
    #[test]
    fn guid_le_swaps_first_three_fields() {
        assert_eq!(
            hex::encode(super::guid_le("96b582de-1fb2-45f7-baea-a366c55a082d")),
            "de82b596b21ff745baeaa366c55a082d"
        );
    }
}
