//! Initial VMSA (SEV-ES save area) of a vCPU as KVM sets it up for a QEMU
//! launch: real-mode reset state, CS base from the reset EIP, RDX holding the
//! CPUID signature, and the guest's `SEV_FEATURES`.
//!
//! Field offsets follow Linux's `struct sev_es_save_area`.

use super::snp::PAGE_SIZE;

/// EIP of the boot processor at reset.
pub const BSP_EIP: u32 = 0xFFFF_FFF0;

/// CPUID Fn0000_0001 EAX for a family/model/stepping (AMD pub. 25481).
pub fn cpu_signature(family: u32, model: u32, stepping: u32) -> u32 {
    let (family_low, family_high) = if family > 0xF {
        (0xF, (family - 0xF) & 0xFF)
    } else {
        (family, 0)
    };
    (family_high << 20)
        | (((model >> 4) & 0xF) << 16)
        | (family_low << 8)
        | ((model & 0xF) << 4)
        | (stepping & 0xF)
}

/// Signature of a QEMU CPU model name (the EPYC family QEMU defines).
pub fn qemu_cpu_signature(name: &str) -> Option<u32> {
    let (family, model, stepping) = match name {
        "EPYC" | "EPYC-v1" | "EPYC-v2" | "EPYC-IBPB" | "EPYC-v3" | "EPYC-v4" => (23, 1, 2),
        "EPYC-Rome" | "EPYC-Rome-v1" | "EPYC-Rome-v2" | "EPYC-Rome-v3" => (23, 49, 0),
        "EPYC-Milan" | "EPYC-Milan-v1" | "EPYC-Milan-v2" => (25, 1, 1),
        "EPYC-Genoa" | "EPYC-Genoa-v1" => (25, 17, 0),
        _ => return None,
    };
    Some(cpu_signature(family, model, stepping))
}

fn put_seg(page: &mut [u8], off: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
    page[off..off + 2].copy_from_slice(&selector.to_le_bytes());
    page[off + 2..off + 4].copy_from_slice(&attrib.to_le_bytes());
    page[off + 4..off + 8].copy_from_slice(&limit.to_le_bytes());
    page[off + 8..off + 16].copy_from_slice(&base.to_le_bytes());
}

fn put_u64(page: &mut [u8], off: usize, v: u64) {
    page[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Builds the VMSA page of a vCPU starting at `eip`.
pub fn build_vmsa(eip: u32, sev_features: u64, vcpu_signature: u32) -> Box<[u8; PAGE_SIZE]> {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    let p = &mut page[..];
    put_seg(p, 0x000, 0, 0x93, 0xFFFF, 0); // es
    put_seg(p, 0x010, 0xF000, 0x9B, 0xFFFF, u64::from(eip & 0xFFFF_0000)); // cs
    put_seg(p, 0x020, 0, 0x93, 0xFFFF, 0); // ss
    put_seg(p, 0x030, 0, 0x93, 0xFFFF, 0); // ds
    put_seg(p, 0x040, 0, 0x93, 0xFFFF, 0); // fs
    put_seg(p, 0x050, 0, 0x93, 0xFFFF, 0); // gs
    put_seg(p, 0x060, 0, 0, 0xFFFF, 0); // gdtr
    put_seg(p, 0x070, 0, 0x82, 0xFFFF, 0); // ldtr
    put_seg(p, 0x080, 0, 0, 0xFFFF, 0); // idtr
    put_seg(p, 0x090, 0, 0x8B, 0xFFFF, 0); // tr
    put_u64(p, 0x0D0, 0x1000); // efer: KVM sets SVME
    put_u64(p, 0x148, 0x40); // cr4: KVM sets MCE
    put_u64(p, 0x158, 0x10); // cr0: ET
    put_u64(p, 0x160, 0x400); // dr7
    put_u64(p, 0x168, 0xFFFF_0FF0); // dr6
    put_u64(p, 0x170, 0x2); // rflags
    put_u64(p, 0x178, u64::from(eip & 0xFFFF)); // rip
    put_u64(p, 0x268, 0x0007_0406_0007_0406); // g_pat: power-on PAT
    put_u64(p, 0x310, u64::from(vcpu_signature)); // rdx
    put_u64(p, 0x3B0, sev_features);
    put_u64(p, 0x3E8, 0x1); // xcr0
    p[0x408..0x40C].copy_from_slice(&0x1F80u32.to_le_bytes()); // mxcsr
    p[0x410..0x412].copy_from_slice(&0x37Fu16.to_le_bytes()); // x87 fcw
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epyc_v4_signature_is_family_17h() {
        assert_eq!(qemu_cpu_signature("EPYC-v4"), Some(0x0080_0F12));
        assert_eq!(qemu_cpu_signature("EPYC-Milan"), Some(0x00A0_0F11));
        assert_eq!(qemu_cpu_signature("Skylake"), None);
    }

    #[test]
    fn bsp_vmsa_starts_in_the_reset_segment() {
        let page = build_vmsa(BSP_EIP, 1, 0x800F12);
        assert_eq!(&page[0x10..0x12], &0xF000u16.to_le_bytes());
        assert_eq!(&page[0x18..0x20], &0xFFFF_0000u64.to_le_bytes());
        assert_eq!(&page[0x178..0x180], &0xFFF0u64.to_le_bytes());
        assert_eq!(page[0x3B0], 1);
    }
}
