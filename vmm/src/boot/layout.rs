//! Where things live in guest-physical memory (x86_64).
//!
//! The low megabyte holds the boot structures; the kernel loads at its own
//! physical address (1 MiB or 16 MiB for a vmlinux); the initramfs goes as
//! high in low memory as it fits; the 1 GiB below 4 GiB is left for MMIO
//! devices, so guest RAM larger than 3 GiB continues above 4 GiB.

/// GDT used by the boot vCPU (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: no exception may happen before the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack of the boot vCPU for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: one PML4, one PDPT, one PD of 2 MiB pages (1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux x86's COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable, the MP
/// table lives at its start.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table for SMP guests without ACPI.
pub const MPTABLE_START: u64 = EBDA_START;
/// First byte above the legacy hole (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Guest RAM stops here and resumes at 4 GiB: the gap is for MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio register windows, one 4 KiB page per device from here up,
/// at the bottom of the MMIO gap (Linux finds them through
/// `virtio_mmio.device=` on the command line).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// Interrupt lines of virtio-mmio devices: IOAPIC pins 5 to 23 (4 is
/// COM1; KVM's IOAPIC has 24 pins, all routed in the MP table).
pub const VIRTIO_IRQ_FIRST: u32 = 5;
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// One interrupt line each.
pub const MAX_VIRTIO_DEVICES: usize = (VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as usize;
/// KVM's three-page TSS region and the identity-map page right below it,
/// inside the MMIO gap so they never overlap RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// I/O APIC and local APIC (fixed by the architecture).
pub const IOAPIC_ADDRESS: u64 = 0xfec0_0000;
pub const APIC_DEFAULT_ADDRESS: u64 = 0xfee0_0000;
/// Page size the initramfs is aligned to.
pub const PAGE_SIZE: u64 = 0x1000;
/// The guest needs room for boot structures, kernel and some working set;
/// below this no Linux boots.
pub const MIN_MEMORY_MIB: u32 = 16;
