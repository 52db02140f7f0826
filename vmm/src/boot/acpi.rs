//! The ACPI tables of a confidential guest, in one page: RSDP, XSDT, a
//! hardware-reduced FADT, a MADT listing every vCPU's local APIC and the
//! I/O APIC, and a DSDT describing the serial port and each virtio-mmio
//! device with its window and interrupt (built with rust-vmm's
//! `acpi_tables`, laid out as Firecracker and Cloud Hypervisor do).
//!
//! Why a firmware-less SNP guest needs them: Linux does not look for an MP
//! table under SEV-SNP (`sme_early_init` makes `find_mptable` a no-op), so
//! without a MADT it knows one CPU and no I/O APIC — the other vCPUs stay
//! idle and devices are limited to the 8259's lines. The page is loaded
//! and measured like the kernel; `boot_params.acpi_rsdp_addr` points at
//! it.
//!
//! Why the devices are in the DSDT rather than on the command line: a
//! hardware-reduced platform has no legacy PIC, so Linux sets up no ISA
//! IRQ mappings, and an IRQ named on the command line would reach no
//! driver. An interrupt in a device's `_CRS` is registered as a GSI
//! (edge-triggered, active high: what virtio-mmio and the 16550 raise),
//! on any of the I/O APIC's 24 pins.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::layout::{APIC_DEFAULT_ADDRESS, IOAPIC_ADDRESS};
use super::mptable::MAX_MPTABLE_CPUS;

/// The tables' page.
pub const ACPI_TABLES_SIZE: usize = 4096;
const OEM_ID: [u8; 6] = *b"CLSTER";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;
/// Where each table starts in the page (the RSDP at its start, each
/// table 16-byte aligned; the DSDT last, it grows with the devices).
const XSDT_OFFSET: usize = 0x40;
const FADT_OFFSET: usize = 0x80;
const MADT_OFFSET: usize = 0x1a0;
const DSDT_OFFSET: usize = 0x300;
/// MADT `flags`: the guest also has a dual 8259 (KVM's).
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IAPC_BOOT_ARCH: no VGA, no CMOS RTC; Linux then probes neither.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// COM1, the console.
const COM1_PORT: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
/// KVM's I/O APIC.
const IOAPIC_PINS: u32 = 24;

/// Why the tables cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("vcpus = {0}: the ACPI tables describe 1 to {MAX_MPTABLE_CPUS} vCPUs")]
    Vcpus(u8),
    #[error("virtio device {index}: {reason}")]
    Device { index: usize, reason: String },
    #[error("the ACPI tables need {0} bytes, more than their page")]
    TooLarge(usize),
}

/// A virtio-mmio device as the guest finds it: its register window and
/// its I/O APIC pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioWindow {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Recomputes the checksum byte (offset 9) of a table whose bytes changed.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// `\_SB` with COM1 and one `LNRO0005` device per virtio-mmio window
/// (the ACPI id Linux's virtio_mmio driver matches).
fn dsdt(devices: &[VirtioMmioWindow]) -> Result<Vec<u8>, AcpiError> {
    // Each device has a pin of its own, so there are at most 23 of them
    // before anything is built (names V000.., `_UID` bytes).
    let mut pins = std::collections::HashSet::new();
    for (index, d) in devices.iter().enumerate() {
        let reason = if d.irq >= IOAPIC_PINS || d.irq == COM1_IRQ {
            Some(format!("irq {} is not a free I/O APIC pin", d.irq))
        } else if !pins.insert(d.irq) {
            Some(format!("irq {} is another device's", d.irq))
        } else if d.len == 0 || d.base.checked_add(d.len).is_none_or(|end| end > 1 << 32) {
            Some(format!(
                "window {:#x}+{:#x} is not below 4 GiB",
                d.base, d.len
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(AcpiError::Device { index, reason });
        }
    }
    let com1_ports = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_resources = ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    let com1_names = [
        Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
        Name::new(Path::new("_UID"), &0u8),
        Name::new(Path::new("_CRS"), &com1_resources),
    ];
    let com1 = Device::new(
        Path::new("COM1"),
        com1_names.iter().map(|n| n as &dyn Aml).collect(),
    );
    // Built before the devices that borrow them.
    let windows: Vec<(Memory32Fixed, Interrupt, u8)> = devices
        .iter()
        .zip(0u8..)
        .map(|(d, uid)| {
            (
                Memory32Fixed::new(true, d.base as u32, d.len as u32),
                Interrupt::new(true, true, false, false, d.irq),
                uid,
            )
        })
        .collect();
    let resources: Vec<ResourceTemplate> = windows
        .iter()
        .map(|(memory, interrupt, _)| ResourceTemplate::new(vec![memory, interrupt]))
        .collect();
    let names: Vec<(Name, Name, Name)> = windows
        .iter()
        .zip(&resources)
        .map(|((_, _, uid), crs)| {
            (
                Name::new(Path::new("_HID"), &"LNRO0005"),
                Name::new(Path::new("_UID"), uid),
                Name::new(Path::new("_CRS"), crs),
            )
        })
        .collect();
    let virtio: Vec<Device> = names
        .iter()
        .zip(0usize..)
        .map(|((hid, uid, crs), i)| {
            Device::new(
                Path::new(&format!("V{i:03}")),
                vec![hid as &dyn Aml, uid, crs],
            )
        })
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    let scope = Scope::new(Path::new("\\_SB_"), children);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // One append: the table's length and checksum follow it.
    table.append_slice(&bytes_of(&scope));
    Ok(table.as_slice().to_vec())
}

/// The tables for `vcpus` vCPUs and `devices`, as the page to load at
/// `base` (a guest-physical address below 4 GiB: the RSDP is at `base`).
pub fn build_acpi_tables(
    base: u64,
    vcpus: u8,
    devices: &[VirtioMmioWindow],
) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > MAX_MPTABLE_CPUS {
        return Err(AcpiError::Vcpus(vcpus));
    }
    let at = |offset: usize| base + offset as u64;

    let dsdt = dsdt(devices)?;
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(at(DSDT_OFFSET))
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    let fadt = fadt.finalize();

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_DEFAULT_ADDRESS as u32),
    );
    for cpu in 0..vcpus {
        // APIC ids equal the vCPU index, as CPUID reports them.
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // The same id the MP table of plain VMs gives it.
    madt.add_structure(IoApic::new(vcpus + 1, IOAPIC_ADDRESS as u32, 0));
    let mut madt = bytes_of(&madt);
    // `flags` follow the header (36 bytes) and the local APIC address.
    madt[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut madt);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(at(FADT_OFFSET));
    xsdt.add_entry(at(MADT_OFFSET));

    let needed = DSDT_OFFSET + dsdt.len();
    if needed > ACPI_TABLES_SIZE {
        return Err(AcpiError::TooLarge(needed));
    }
    let mut page = vec![0u8; ACPI_TABLES_SIZE];
    for (offset, table) in [
        (0, bytes_of(&Rsdp::new(OEM_ID, at(XSDT_OFFSET)))),
        (XSDT_OFFSET, bytes_of(&xsdt)),
        (FADT_OFFSET, bytes_of(&fadt)),
        (MADT_OFFSET, madt),
        (DSDT_OFFSET, dsdt),
    ] {
        page[offset..offset + table.len()].copy_from_slice(&table);
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    // An independent reading of the page, as a guest's ACPI code does it:
    // every table found through the pointers, every checksum checked.

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// The table at guest address `gpa`: its signature is checked, its
    /// checksum must be zero.
    fn table<'a>(page: &'a [u8], base: u64, gpa: u64, signature: &[u8; 4]) -> &'a [u8] {
        let offset = usize::try_from(gpa - base).unwrap();
        let len = u32_at(page, offset + 4) as usize;
        let table = &page[offset..offset + len];
        assert_eq!(&table[..4], signature);
        assert_eq!(
            sum(table),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        table
    }

    struct Tables {
        fadt_flags: u32,
        dsdt: Vec<u8>,
        lapic_address: u32,
        madt_flags: u32,
        /// (uid, apic id, flags)
        lapics: Vec<(u8, u8, u32)>,
        /// (id, address, gsi base)
        ioapics: Vec<(u8, u32, u32)>,
        other_madt_entries: usize,
    }

    fn read(page: &[u8], base: u64) -> Tables {
        let rsdp = &page[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table(page, base, u64_at(rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|e| u64_at(e, 0)).collect();
        assert_eq!(entries.len(), 2, "FADT and MADT");
        let fadt = table(page, base, entries[0], b"FACP");
        // X_DSDT (offset 140) is what an ACPI 2.0+ guest follows.
        let dsdt = table(page, base, u64_at(fadt, 140), b"DSDT");
        let madt = table(page, base, entries[1], b"APIC");
        let mut tables = Tables {
            fadt_flags: u32_at(fadt, 112),
            dsdt: dsdt.to_vec(),
            lapic_address: u32_at(madt, 36),
            madt_flags: u32_at(madt, 40),
            lapics: Vec::new(),
            ioapics: Vec::new(),
            other_madt_entries: 0,
        };
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            assert!(len >= 2 && at + len <= madt.len(), "MADT entry at {at}");
            let entry = &madt[at..at + len];
            match kind {
                0 => tables.lapics.push((entry[2], entry[3], u32_at(entry, 4))),
                1 => tables
                    .ioapics
                    .push((entry[2], u32_at(entry, 4), u32_at(entry, 8))),
                _ => tables.other_madt_entries += 1,
            }
            at += len;
        }
        tables
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// An Extended Interrupt descriptor (consumer, edge, active high,
    /// exclusive) for `irq`, as AML encodes it.
    fn interrupt_descriptor(irq: u32) -> Vec<u8> {
        let mut d = vec![0x89, 6, 0, 0b0011, 1];
        d.extend_from_slice(&irq.to_le_bytes());
        d
    }

    /// A Memory32Fixed descriptor (read-write) for a window.
    fn memory_descriptor(base: u32, len: u32) -> Vec<u8> {
        let mut d = vec![0x86, 9, 0, 1];
        d.extend_from_slice(&base.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d
    }

    fn windows(count: u32) -> Vec<VirtioMmioWindow> {
        (0..count)
            .map(|slot| VirtioMmioWindow {
                base: 0xd000_0000 + u64::from(slot) * 0x1000,
                len: 0x1000,
                irq: 5 + slot,
            })
            .collect()
    }

    #[test]
    fn tables_list_every_vcpu_the_ioapic_and_every_device() {
        let base = 0x6000;
        let devices = windows(3);
        let page = build_acpi_tables(base, 3, &devices).unwrap();
        assert_eq!(page.len(), ACPI_TABLES_SIZE);

        let tables = read(&page, base);

        assert_ne!(tables.fadt_flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(tables.lapic_address, 0xfee0_0000);
        assert_eq!(tables.madt_flags, 1, "PCAT_COMPAT");
        assert_eq!(tables.lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(tables.ioapics, [(4, 0xfec0_0000, 0)]);
        assert_eq!(tables.other_madt_entries, 0);
        let dsdt = &tables.dsdt;
        assert_eq!(count(dsdt, b"LNRO0005"), 3);
        for (slot, d) in devices.iter().enumerate() {
            assert_eq!(count(dsdt, format!("V{slot:03}").as_bytes()), 1);
            assert_eq!(count(dsdt, &memory_descriptor(d.base as u32, 0x1000)), 1);
            assert_eq!(
                count(dsdt, &interrupt_descriptor(d.irq)),
                1,
                "irq {}",
                d.irq
            );
        }
        // COM1: EISA id PNP0501, ports 0x3f8-0x3ff, IRQ 4.
        assert_eq!(count(dsdt, &[0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        assert_eq!(count(dsdt, &interrupt_descriptor(4)), 1);
    }

    #[test]
    fn the_largest_vm_fits_the_page() {
        let devices = windows(19);
        let page = build_acpi_tables(0x6000, MAX_MPTABLE_CPUS, &devices).unwrap();
        let tables = read(&page, 0x6000);
        assert_eq!(tables.lapics.len(), usize::from(MAX_MPTABLE_CPUS));
        assert_eq!(count(&tables.dsdt, b"LNRO0005"), 19);
    }

    #[test]
    fn bad_counts_and_devices_are_refused_naming_them() {
        for vcpus in [0, MAX_MPTABLE_CPUS + 1] {
            let err = build_acpi_tables(0x6000, vcpus, &[]).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("vcpus = {vcpus}:")),
                "{err}"
            );
        }
        let mut devices = windows(2);
        devices[1].irq = 24;
        let err = build_acpi_tables(0x6000, 1, &devices).unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtio device 1: irq 24 is not a free I/O APIC pin"
        );
        devices[1].irq = 4;
        let err = build_acpi_tables(0x6000, 1, &devices).unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtio device 1: irq 4 is not a free I/O APIC pin"
        );
        devices[1].irq = 5;
        let err = build_acpi_tables(0x6000, 1, &devices).unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtio device 1: irq 5 is another device's"
        );
        devices[1].irq = 6;
        devices[0].len = 0x2000;
        devices[0].base = 0xffff_f000;
        let err = build_acpi_tables(0x6000, 1, &devices).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("virtio device 0: window 0xfffff000+0x2000"),
            "{err}"
        );
        // More devices than pins: refused before any name is made.
        let many: Vec<VirtioMmioWindow> = (0..300u32)
            .map(|i| VirtioMmioWindow {
                base: 0xd000_0000 + u64::from(i) * 0x1000,
                len: 0x1000,
                irq: 5 + i % 19,
            })
            .collect();
        let err = build_acpi_tables(0x6000, 1, &many).unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtio device 19: irq 5 is another device's"
        );
        devices[0].len = 0x1000;
        devices[0].base = 1 << 32;
        let err = build_acpi_tables(0x6000, 1, &devices).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("virtio device 0: window 0x100000000"),
            "{err}"
        );
    }

    #[test]
    fn pointers_follow_the_base_address() {
        let a = build_acpi_tables(0x6000, 2, &[]).unwrap();
        let b = build_acpi_tables(0xe0000, 2, &[]).unwrap();
        assert_ne!(a, b);
        read(&b, 0xe0000);
    }
}
