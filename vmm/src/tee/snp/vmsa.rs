//! The VMSA (SEV-ES save area) KVM builds for each vCPU at
//! `KVM_SEV_SNP_LAUNCH_FINISH` from the registers the VMM set
//! (`sev_es_sync_vmsa`, Linux 6.12): segments as the VMCB stores them,
//! EFER with SVME, CR4 with MCE, the GPRs, `sev_features`, XCR0 and the
//! reset FPU state. The launch digest covers these pages, so this model
//! and the registers the launcher sets must agree exactly; on hardware
//! the firmware's MEASUREMENT is the judge (`vmm/tests/tee_launch.rs`).
//!
//! Offsets follow Linux's `struct sev_es_save_area`.

use kvm_bindings::kvm_segment;

use crate::tee::kvm::VcpuBootState;

/// `SVM_SEV_FEAT_SNP_ACTIVE`: KVM sets it in every SNP guest's VMSA.
pub const SEV_FEATURE_SNP_ACTIVE: u64 = 1;
const EFER_SVME: u64 = 1 << 12;
const CR4_MCE: u64 = 1 << 6;
const CR0_CD_NW: u64 = (1 << 30) | (1 << 29);

/// VMCB segment attribute word from a KVM segment (`svm_set_segment`).
fn vmcb_attrib(s: &kvm_segment) -> u16 {
    let present = u16::from(s.present & 1 != 0 && s.unusable == 0);
    u16::from(s.type_ & 0xf)
        | u16::from(s.s & 1) << 4
        | u16::from(s.dpl & 3) << 5
        | present << 7
        | u16::from(s.avl & 1) << 8
        | u16::from(s.l & 1) << 9
        | u16::from(s.db & 1) << 10
        | u16::from(s.g & 1) << 11
}

fn put_seg(page: &mut [u8], off: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
    page[off..off + 2].copy_from_slice(&selector.to_le_bytes());
    page[off + 2..off + 4].copy_from_slice(&attrib.to_le_bytes());
    page[off + 4..off + 8].copy_from_slice(&limit.to_le_bytes());
    page[off + 8..off + 16].copy_from_slice(&base.to_le_bytes());
}

fn put_kvm_seg(page: &mut [u8], off: usize, s: &kvm_segment) {
    put_seg(page, off, s.selector, vmcb_attrib(s), s.limit, s.base);
}

fn put_u64(page: &mut [u8], off: usize, v: u64) {
    page[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The VMSA page of a vCPU with `state`, in a VM whose `sev_features`
/// (INIT2's `vmsa_features` plus SNP_ACTIVE) are `sev_features`.
pub fn vmsa_from_state(state: &VcpuBootState, sev_features: u64) -> Box<[u8; 4096]> {
    let mut page = Box::new([0u8; 4096]);
    let p = &mut page[..];
    let (r, s) = (&state.regs, &state.sregs);
    put_kvm_seg(p, 0x000, &s.es);
    put_kvm_seg(p, 0x010, &s.cs);
    put_kvm_seg(p, 0x020, &s.ss);
    put_kvm_seg(p, 0x030, &s.ds);
    put_kvm_seg(p, 0x040, &s.fs);
    put_kvm_seg(p, 0x050, &s.gs);
    put_seg(p, 0x060, 0, 0, u32::from(s.gdt.limit), s.gdt.base);
    put_kvm_seg(p, 0x070, &s.ldt);
    put_seg(p, 0x080, 0, 0, u32::from(s.idt.limit), s.idt.base);
    put_kvm_seg(p, 0x090, &s.tr);
    put_u64(p, 0x0D0, s.efer | EFER_SVME);
    put_u64(p, 0x148, s.cr4 | CR4_MCE);
    put_u64(p, 0x150, s.cr3);
    put_u64(p, 0x158, s.cr0 & !CR0_CD_NW);
    put_u64(p, 0x160, 0x400); // dr7 at reset
    put_u64(p, 0x168, 0xFFFF_0FF0); // dr6 at reset
    put_u64(p, 0x170, r.rflags);
    put_u64(p, 0x178, r.rip);
    put_u64(p, 0x1D8, r.rsp);
    put_u64(p, 0x1F8, r.rax);
    put_u64(p, 0x240, s.cr2);
    put_u64(p, 0x268, 0x0007_0406_0007_0406); // g_pat at power-on
    put_u64(p, 0x308, r.rcx);
    put_u64(p, 0x310, r.rdx);
    put_u64(p, 0x318, r.rbx);
    put_u64(p, 0x328, r.rbp);
    put_u64(p, 0x330, r.rsi);
    put_u64(p, 0x338, r.rdi);
    for (i, v) in [r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
        .into_iter()
        .enumerate()
    {
        put_u64(p, 0x340 + 8 * i, v);
    }
    put_u64(p, 0x3B0, sev_features);
    put_u64(p, 0x3E8, 1); // xcr0: x87 only
    p[0x408..0x40C].copy_from_slice(&0x1F80u32.to_le_bytes()); // mxcsr
    p[0x410..0x412].copy_from_slice(&0x37Fu16.to_le_bytes()); // x87 fcw
    page
}

/// The architectural reset state (what an AP holds until the guest gives
/// it a VMSA of its own with SNP AP creation); `rdx` = CPUID 1 EAX as
/// KVM sets it at reset.
pub fn reset_state(cpu_signature: u32) -> VcpuBootState {
    let data = kvm_segment {
        limit: 0xFFFF,
        type_: 3,
        present: 1,
        s: 1,
        ..Default::default()
    };
    let mut sregs = kvm_bindings::kvm_sregs {
        cs: kvm_segment {
            selector: 0xF000,
            base: 0xFFFF_0000,
            type_: 0xB,
            ..data
        },
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: kvm_segment {
            limit: 0xFFFF,
            type_: 0xB,
            present: 1,
            ..Default::default()
        },
        ldt: kvm_segment {
            limit: 0xFFFF,
            type_: 2,
            present: 1,
            ..Default::default()
        },
        cr0: 0x10,
        ..Default::default()
    };
    sregs.gdt.limit = 0xFFFF;
    sregs.idt.limit = 0xFFFF;
    VcpuBootState {
        regs: kvm_bindings::kvm_regs {
            rip: 0xFFF0,
            rflags: 2,
            rdx: u64::from(cpu_signature),
            ..Default::default()
        },
        sregs,
    }
}

/// 32-bit protected mode, paging off, flat `__BOOT_CS`/`__BOOT_DS`, ESI =
/// `boot_params`: the Linux 32-bit boot protocol entry. With paging off
/// every access of an SEV guest is private, so no page tables (and no
/// C-bit in them) are needed before the kernel builds its own.
pub fn protected_mode_entry(entry: u32, boot_params: u32) -> VcpuBootState {
    let code = kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: 0x10,
        type_: 0xB,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x18,
        type_: 0x3,
        ..code
    };
    let sregs = kvm_bindings::kvm_sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: kvm_segment {
            limit: 0xFFFF,
            type_: 0xB,
            present: 1,
            ..Default::default()
        },
        ldt: kvm_segment {
            limit: 0xFFFF,
            type_: 2,
            present: 1,
            ..Default::default()
        },
        cr0: 0x11, // PE | ET
        ..Default::default()
    };
    VcpuBootState {
        regs: kvm_bindings::kvm_regs {
            rip: u64::from(entry),
            rsi: u64::from(boot_params),
            rflags: 2,
            ..Default::default()
        },
        sregs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_attestation::measure::vmsa::{build_vmsa, BSP_EIP};

    /// The reset-state VMSA equals the attestation crate's model of the
    /// one KVM/QEMU build (which sev-snp-measure agrees with).
    #[test]
    fn reset_state_vmsa_matches_attestation_model() {
        let ours = vmsa_from_state(&reset_state(0x00A0_0F11), 1);
        let theirs = build_vmsa(BSP_EIP, 1, 0x00A0_0F11);
        let diff: Vec<usize> = (0..4096).filter(|&i| ours[i] != theirs[i]).collect();
        assert!(diff.is_empty(), "VMSA bytes differ at {diff:x?}");
    }

    #[test]
    fn protected_mode_entry_vmsa_has_flat_segments_and_esi() {
        let page = vmsa_from_state(&protected_mode_entry(0x10_0000, 0x7000), 1);
        // cs: selector 0x10, attrib 0xC9B (G, D/B, P, S, type 0xB), 4 GiB.
        assert_eq!(&page[0x10..0x14], &[0x10, 0, 0x9B, 0x0C]);
        assert_eq!(&page[0x14..0x18], &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(&page[0x178..0x180], &0x10_0000u64.to_le_bytes());
        assert_eq!(&page[0x330..0x338], &0x7000u64.to_le_bytes());
        assert_eq!(&page[0x158..0x160], &0x11u64.to_le_bytes());
        assert_eq!(&page[0xD0..0xD8], &0x1000u64.to_le_bytes());
    }
}
