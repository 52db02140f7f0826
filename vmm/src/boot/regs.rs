//! Initial vCPU state for the two ways we enter a guest:
//! - `BootEntry::Pvh`: 32-bit protected mode, paging off, `ebx` = address
//!   of `hvm_start_info` (the PVH boot ABI of a vmlinux);
//! - `BootEntry::LongMode`: 64-bit mode on identity page tables, `rsi` =
//!   address of `boot_params` (Linux's 64-bit boot protocol; also how our
//!   KVM tests start their raw payloads).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{gdt_entry, segment_from_gdt, CODE32, CODE64, DATA, TSS32, TSS64};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use super::paging::write_identity_page_tables;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH entry point of a vmlinux ELF.
    Pvh { entry: u64 },
    /// 64-bit entry with `boot_params` at [`ZERO_PAGE_START`] (or a raw
    /// payload that ignores it).
    LongMode { entry: u64 },
}

/// Why vCPU state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot GDT/page tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("{what} ioctl failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {total} boot MSRs; first refused: {first_refused:#x}")]
    MsrsRefused {
        set: usize,
        total: usize,
        first_refused: u32,
    },
    #[error("cannot build MSR list: {0}")]
    MsrList(String),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { what, source }
}

/// The general-purpose registers at the entry point.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        BootEntry::LongMode { entry } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Writes the GDT (and page tables for long mode) and fills the segment
/// and control registers of `sregs` for `entry`.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    entry: BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let long_mode = matches!(entry, BootEntry::LongMode { .. });
    let gdt = if long_mode {
        [
            0,
            gdt_entry(CODE64, 0, 0xfffff),
            gdt_entry(DATA, 0, 0xfffff),
            gdt_entry(TSS64, 0, 0xfffff),
        ]
    } else {
        [
            0,
            gdt_entry(CODE32, 0, 0xfffff),
            gdt_entry(DATA, 0, 0xfffff),
            gdt_entry(TSS32, 0, 0x67),
        ]
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    if long_mode {
        sregs.cr3 = write_identity_page_tables(mem)?;
        sregs.cr4 |= CR4_PAE;
        // Assigned, not or-ed: KVM's reset value has caching disabled
        // (CD, NW), which a payload that never rewrites CR0 would keep.
        sregs.cr0 = CR0_PE | CR0_PG | CR0_ET;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    Ok(())
}

/// MSR values Linux expects from its boot loader.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    // MTRRs enabled, default memory type write-back.
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs; every one must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|e| RegsError::MsrList(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::MsrsRefused {
            set,
            total: entries.len(),
            first_refused: entries[set].index,
        });
    }
    Ok(())
}

/// Default x87/SSE control words (as after FNINIT / reset).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

/// Full state of the boot vCPU for `entry`.
pub fn setup_boot_vcpu<M: GuestMemory>(
    vcpu: &VcpuFd,
    mem: &M,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    setup_sregs(mem, entry, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(ioctl("KVM_SET_REGS"))?;
    setup_fpu(vcpu)
}

/// LINT0 delivers the PIC's ExtINT, LINT1 delivers NMI: what the BIOS
/// would have programmed and what Linux's virtual-wire mode expects.
pub fn setup_lapic_lints(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;

    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_lma() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, BootEntry::LongMode { entry: 0x1000 }, &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.ss.selector, 16);
        assert_eq!(sregs.gdt.limit, 31);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt_entry(CODE64, 0, 0xfffff));
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let mem = mem();
        let mut sregs = kvm_sregs {
            cr0: CR0_PG,
            efer: EFER_LME,
            ..Default::default()
        };
        setup_sregs(&mem, BootEntry::Pvh { entry: 0x100_0000 }, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, CR0_PE | CR0_ET);
        assert_eq!(sregs.efer, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
    }

    #[test]
    fn boot_regs_pass_start_info_or_zero_page() {
        let pvh = boot_regs(BootEntry::Pvh { entry: 0x1234 });
        assert_eq!((pvh.rip, pvh.rbx, pvh.rflags), (0x1234, PVH_INFO_START, 2));
        let lm = boot_regs(BootEntry::LongMode { entry: 0x5678 });
        assert_eq!(
            (lm.rip, lm.rsi, lm.rsp),
            (0x5678, ZERO_PAGE_START, BOOT_STACK_POINTER)
        );
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_wb_mtrr() {
        let msrs = boot_msr_entries();
        let misc = msrs.iter().find(|m| m.index == 0x1a0).unwrap();
        assert_eq!(misc.data, 1);
        let mtrr = msrs.iter().find(|m| m.index == 0x2ff).unwrap();
        assert_eq!(mtrr.data, 0x806);
    }
}
