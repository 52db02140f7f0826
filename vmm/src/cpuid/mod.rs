//! What each vCPU sees in CPUID: KVM's supported set, shaped by a named
//! CPU template, then normalised per vCPU (APIC id, topology, hypervisor
//! bit) so that Linux's view matches the MP table.

pub mod template;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

pub use template::{CpuTemplate, CpuTemplateError};

/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` items (x2APIC id shift).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Topology each vCPU reports: one socket, `cpu_count` cores, one thread
/// per core. APIC ids are the vCPU indexes, as in the MP table.
pub fn normalize_entry(entry: &mut kvm_cpuid_entry2, cpu_index: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_index);
    // At least one vCPU: the config refuses zero, and `count - 1` below
    // must not underflow whoever calls this.
    let count = u32::from(cpu_count.max(1));
    match entry.function {
        0x1 => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: cores per package in
            // EAX[31:26]; caches above level 2 are shared by all cores.
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
        }
        0xb | 0x1f => {
            let (shift, logical, level_type) = match entry.index {
                0 => (0, 1, LEVEL_TYPE_SMT),
                1 => (id_bits(count), count, LEVEL_TYPE_CORE),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = logical;
            entry.ecx = (level_type << 8) | (entry.index & 0xff);
            entry.edx = apic_id;
        }
        0x8000_0008 => {
            // AMD: number of cores - 1 in ECX[7:0], APIC id size in [15:12].
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
        }
        0x8000_001e => {
            // AMD extended APIC id, core id, node id.
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

/// The CPUID table for vCPU `cpu_index` of `cpu_count`.
pub fn cpuid_for_vcpu(
    supported: &CpuId,
    template: CpuTemplate,
    cpu_index: u8,
    cpu_count: u8,
) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        template.apply(entry);
        normalize_entry(entry, cpu_index, cpu_count);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        e.ebx = 0x0000_0800; // CLFLUSH size kept
        normalize_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf1_single_cpu_clears_htt() {
        let mut e = entry(1, 0);
        e.edx = LEAF1_EDX_HTT;
        normalize_entry(&mut e, 0, 1);
        assert_eq!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_reports_smt_then_core_level() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        let mut end = entry(0xb, 2);
        for e in [&mut smt, &mut core, &mut end] {
            normalize_entry(e, 2, 3);
        }
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn leaf4_shares_l3_between_all_cores() {
        let mut l1 = entry(4, 0);
        l1.eax = (1 << 5) | 0x1;
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 0x3;
        normalize_entry(&mut l1, 0, 2);
        normalize_entry(&mut l3, 0, 2);
        assert_eq!(l1.eax >> 26, 1);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 1);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
    }
}
