//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! finds its CPUs, I/O APIC and interrupt routing. It sits at the start of
//! the EBDA, where Linux scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_DEFAULT_ADDRESS, EBDA_START, IOAPIC_ADDRESS, MPTABLE_START};

/// Legacy IRQs routed through the I/O APIC (KVM's IOAPIC has 24 pins).
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;

/// The EBDA holds 1 KiB: that bounds the number of processor entries.
pub const MAX_MPTABLE_CPUS: u8 = 32;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit the MP table (at most {MAX_MPTABLE_CPUS})")]
    TooManyCpus(u8),
    #[error("vCPU count must be at least 1")]
    NoCpus,
    #[error("cannot write the MP table to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table.
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_MPTABLE_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let mut e = [0u8; PROCESSOR_LEN];
        e[0] = 0; // processor
        e[1] = cpu; // local APIC id, equal to the CPUID APIC id
        e[2] = APIC_VERSION;
        e[3] = 0x1 | if cpu == 0 { 0x2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&e);
    }
    // One ISA bus.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    // The I/O APIC.
    let mut e = [0u8; SHORT_ENTRY_LEN];
    e[0] = 2;
    e[1] = ioapic_id;
    e[2] = IOAPIC_VERSION;
    e[3] = 1; // usable
    e[4..8].copy_from_slice(&(IOAPIC_ADDRESS as u32).to_le_bytes());
    entries.extend_from_slice(&e);
    // ISA IRQ n → I/O APIC pin n, default polarity and trigger.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0 = ExtINT and LINT1 = NMI on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);

    let table_len = HEADER_LEN + entries.len();
    let entry_count = u16::from(num_cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"CLOISTER");
    header[16..28].copy_from_slice(b"microVM     ");
    header[34..36].copy_from_slice(&entry_count.to_le_bytes());
    header[36..40].copy_from_slice(&(APIC_DEFAULT_ADDRESS as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    let table_addr = (MPTABLE_START as u32) + FLOATING_LEN as u32;
    floating[4..8].copy_from_slice(&table_addr.to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4; // spec revision 1.4
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&table);
    debug_assert!(out.len() as u64 <= 0xa0000 - EBDA_START);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs to guest memory.
pub fn write_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let table = build_mptable(num_cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn mptable_checksums_are_valid() {
        let t = build_mptable(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(sum(&t[16..16 + len]), 0);
        assert_eq!(t.len(), 16 + len);
    }

    #[test]
    fn mptable_lists_each_cpu_with_bsp_first() {
        let t = build_mptable(3).unwrap();
        let first = 16 + HEADER_LEN;
        for cpu in 0..3usize {
            let e = &t[first + cpu * PROCESSOR_LEN..];
            assert_eq!(e[0], 0);
            assert_eq!(e[1] as usize, cpu);
            assert_eq!(e[3] & 0x2 != 0, cpu == 0);
        }
    }

    #[test]
    fn mptable_for_max_cpus_fits_the_ebda() {
        let t = build_mptable(MAX_MPTABLE_CPUS).unwrap();
        assert!(t.len() as u64 <= 0xa0000 - EBDA_START);
    }

    #[test]
    fn mptable_with_too_many_cpus_is_refused() {
        assert!(matches!(
            build_mptable(33),
            Err(MptableError::TooManyCpus(33))
        ));
        assert!(matches!(build_mptable(0), Err(MptableError::NoCpus)));
    }
}
