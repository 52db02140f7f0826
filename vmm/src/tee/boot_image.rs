//! The firmware-less direct boot of a confidential guest, as bytes: a
//! bzImage's protected-mode kernel at 1 MiB, the initramfs at the top of
//! low memory, the command line, and a `boot_params` page built from the
//! bzImage's setup header (Linux 32-bit boot protocol,
//! `Documentation/arch/x86/boot.rst`). SEV-SNP and TDX both load these
//! pages and measure every one of them; nothing here touches KVM, so the
//! same bytes feed the launcher and `--print-launch-digest`.

use crate::boot::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::boot::loader::place_initrd;

pub const PAGE: u64 = 4096;
/// Where the protected-mode kernel goes and is entered (`code32_start`).
pub const KERNEL_START: u64 = HIGH_MEMORY_START;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const SETUP_HEADER_START: usize = 0x1f1;
/// Boot protocol 2.12: `xloadflags`, 64-bit `setup_data` handling.
const MIN_PROTOCOL: u16 = 0x020c;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const E820_MAX: usize = 128;

/// Why the boot image cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BootImageError {
    #[error("kernel is not a bzImage: {0}")]
    NotBzImage(&'static str),
    #[error("kernel boot protocol {0:#x} is older than 2.12")]
    OldProtocol(u16),
    #[error("kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("guest memory too small: {0}")]
    Memory(String),
    #[error(transparent)]
    Acpi(#[from] crate::boot::acpi::AcpiError),
}

/// A run of guest-physical pages with the bytes to load there (a whole
/// number of pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedRange {
    pub gpa: u64,
    pub data: Vec<u8>,
}

/// Pages the confidential boot reserves below 1 MiB (kept out of the e820
/// RAM map so the kernel never reuses them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedPages {
    pub start: u64,
    pub end: u64,
}

/// The loaded image.
#[derive(Debug, Clone)]
pub struct BootImage {
    pub boot_params: LoadedRange,
    pub cmdline: LoadedRange,
    pub kernel: LoadedRange,
    pub initrd: Option<LoadedRange>,
    /// Guest RAM as (gpa, len), page aligned.
    pub ram: Vec<(u64, u64)>,
    /// 32-bit entry point.
    pub entry: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn pad_to_pages(mut data: Vec<u8>) -> Vec<u8> {
    let len = data
        .len()
        .next_multiple_of(PAGE as usize)
        .max(PAGE as usize);
    data.resize(len, 0);
    data
}

/// Guest RAM for `memory_mib`: below the MMIO gap, the rest above 4 GiB.
pub fn guest_ram(memory_mib: u32) -> Vec<(u64, u64)> {
    let total = u64::from(memory_mib) << 20;
    let low = total.min(MMIO_GAP_START);
    let mut ram = vec![(0, low)];
    if total > low {
        ram.push((1 << 32, total - low));
    }
    ram
}

/// Builds the pages of a direct boot. `reserved` is left out of the e820
/// RAM map; `setup_data` is the GPA of a `setup_data` chain to link from
/// `boot_params` (0 for none); `acpi_rsdp` that of the ACPI RSDP (0: the
/// guest finds no ACPI).
pub fn build_boot_image(
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    memory_mib: u32,
    reserved: ReservedPages,
    setup_data: u64,
    acpi_rsdp: u64,
) -> Result<BootImage, BootImageError> {
    if kernel.len() < 0x268 {
        return Err(BootImageError::NotBzImage("shorter than its setup header"));
    }
    if u32_at(kernel, 0x202) != HDR_MAGIC {
        return Err(BootImageError::NotBzImage("no HdrS magic at 0x202"));
    }
    let protocol = u16_at(kernel, 0x206);
    if protocol < MIN_PROTOCOL {
        return Err(BootImageError::OldProtocol(protocol));
    }
    let setup_sects = match kernel[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm_offset = (setup_sects + 1) * 512;
    if pm_offset >= kernel.len() {
        return Err(BootImageError::NotBzImage(
            "no protected-mode kernel after the setup sectors",
        ));
    }
    let header_end = (0x202 + usize::from(kernel[0x201]))
        .min(kernel.len())
        .min(0x290);
    let init_size = u64::from(u32_at(kernel, 0x260));
    let pm = &kernel[pm_offset..];

    let ram = guest_ram(memory_mib);
    let low_end = ram[0].1;
    let kernel_end = KERNEL_START + (pm.len() as u64).next_multiple_of(PAGE).max(init_size);
    if kernel_end > low_end {
        return Err(BootImageError::Memory(format!(
            "the kernel needs memory up to {kernel_end:#x}, low memory ends at {low_end:#x}"
        )));
    }
    // The initramfs size in boot_params is the file's, not its pages'.
    let initrd_size = initrd.map(|data| data.len() as u64);
    // The 32-bit protocol keeps the initramfs below `initrd_addr_max`.
    let initrd_max = match u64::from(u32_at(kernel, 0x22c)) {
        0 => 0x3800_0000,
        max => max + 1,
    };
    let initrd = initrd
        .map(|data| {
            place_initrd(low_end.min(initrd_max), kernel_end, data.len() as u64)
                .map(|gpa| LoadedRange {
                    gpa,
                    data: pad_to_pages(data.to_vec()),
                })
                .map_err(|e| BootImageError::Memory(e.to_string()))
        })
        .transpose()?;
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootImageError::CmdlineTooLong(cmdline.len()));
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);

    let mut bp = vec![0u8; PAGE as usize];
    bp[SETUP_HEADER_START..header_end].copy_from_slice(&kernel[SETUP_HEADER_START..header_end]);
    bp[0x210] = 0xff; // type_of_loader: undefined
    bp[0x214..0x218].copy_from_slice(&(KERNEL_START as u32).to_le_bytes()); // code32_start
    if let Some(initrd) = &initrd {
        // Placed below the MMIO gap: both fit 32 bits.
        bp[0x218..0x21c].copy_from_slice(&(initrd.gpa as u32).to_le_bytes());
        let size = initrd_size.unwrap_or(0) as u32;
        bp[0x21c..0x220].copy_from_slice(&size.to_le_bytes());
    }
    bp[0x228..0x22c].copy_from_slice(&(CMDLINE_START as u32).to_le_bytes());
    bp[0x250..0x258].copy_from_slice(&setup_data.to_le_bytes());
    // acpi_rsdp_addr (protocol 2.14; older kernels ignore it and find no
    // ACPI, as before).
    bp[0x070..0x078].copy_from_slice(&acpi_rsdp.to_le_bytes());
    let e820 = e820_map(&ram, reserved);
    bp[0x1e8] = e820.len() as u8;
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        let at = 0x2d0 + i * 20;
        bp[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        bp[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
        bp[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
    }

    Ok(BootImage {
        boot_params: LoadedRange {
            gpa: ZERO_PAGE_START,
            data: bp,
        },
        cmdline: LoadedRange {
            gpa: CMDLINE_START,
            data: pad_to_pages(cmdline_bytes),
        },
        kernel: LoadedRange {
            gpa: KERNEL_START,
            data: pad_to_pages(pm.to_vec()),
        },
        initrd,
        ram,
        entry: KERNEL_START as u32,
    })
}

/// The e820 map: RAM minus `reserved`, the legacy hole (EBDA to 1 MiB)
/// left out.
pub fn e820_map(ram: &[(u64, u64)], reserved: ReservedPages) -> Vec<(u64, u64, u32)> {
    use crate::boot::layout::EBDA_START;
    let mut map = Vec::new();
    if reserved.start > 0 {
        map.push((0, reserved.start, E820_RAM));
    }
    map.push((reserved.start, reserved.end - reserved.start, E820_RESERVED));
    map.push((reserved.end, EBDA_START - reserved.end, E820_RAM));
    for &(start, len) in ram {
        let start_above_hole = start.max(HIGH_MEMORY_START);
        let end = start + len;
        if end > start_above_hole {
            map.push((start_above_hole, end - start_above_hole, E820_RAM));
        }
    }
    map.truncate(E820_MAX);
    map
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal bzImage: two setup sectors with a 2.15 header, then
    /// `pm_len` bytes of "kernel".
    pub(crate) fn fake_bzimage(pm_len: usize) -> Vec<u8> {
        let mut k = vec![0u8; 3 * 512 + pm_len];
        k[0x1f1] = 2; // setup_sects
        k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        k[0x201] = 0x66; // header length - 2
        k[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x211] = 1; // LOADED_HIGH
        k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        k[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size 4 MiB
        for (i, b) in k[3 * 512..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        k
    }

    const RESERVED: ReservedPages = ReservedPages {
        start: 0x3000,
        end: 0x6000,
    };

    #[test]
    fn boot_params_carry_header_cmdline_initrd_setup_data_and_e820() {
        let kernel = fake_bzimage(10_000);
        let image = build_boot_image(
            &kernel,
            Some(&[7u8; 5000]),
            "console=hvc0",
            128,
            RESERVED,
            0x3000,
            0x6000,
        )
        .unwrap();
        let bp = &image.boot_params.data;
        assert_eq!(
            u64::from_le_bytes(bp[0x070..0x078].try_into().unwrap()),
            0x6000,
            "acpi_rsdp_addr"
        );
        assert_eq!(u32_at(bp, 0x202), HDR_MAGIC);
        assert_eq!(bp[0x210], 0xff);
        assert_eq!(u32_at(bp, 0x228), CMDLINE_START as u32);
        let initrd = image.initrd.as_ref().unwrap();
        assert_eq!(u32_at(bp, 0x218) as u64, initrd.gpa);
        assert_eq!(u32_at(bp, 0x21c), 5000);
        assert_eq!(initrd.gpa, (128 << 20) - 0x2000);
        assert_eq!(
            u64::from_le_bytes(bp[0x250..0x258].try_into().unwrap()),
            0x3000
        );
        assert_eq!(bp[0x1e8], 4);
        // Second e820 entry: the reserved pages.
        assert_eq!(u32_at(bp, 0x2d0 + 20 + 16), E820_RESERVED);
        assert_eq!(image.kernel.data.len(), 12288);
        assert_eq!(&image.kernel.data[..4], &kernel[1536..1540]);
        assert_eq!(&image.cmdline.data[..13], b"console=hvc0\0");
    }

    #[test]
    fn a_vmlinux_or_old_kernel_is_refused_by_name() {
        let err = build_boot_image(b"\x7fELF", None, "", 128, RESERVED, 0, 0).unwrap_err();
        assert!(err.to_string().contains("not a bzImage"), "{err}");
        let mut old = fake_bzimage(100);
        old[0x206..0x208].copy_from_slice(&0x0209u16.to_le_bytes());
        let err = build_boot_image(&old, None, "", 128, RESERVED, 0, 0).unwrap_err();
        assert!(err.to_string().contains("0x209"), "{err}");
    }

    #[test]
    fn initramfs_stays_below_initrd_addr_max() {
        let kernel = fake_bzimage(4096);
        let image =
            build_boot_image(&kernel, Some(&[1u8; 4096]), "", 4096, RESERVED, 0, 0).unwrap();
        assert_eq!(image.initrd.unwrap().gpa, 0x8000_0000 - 4096);
    }

    #[test]
    fn memory_above_the_gap_is_its_own_ram_range() {
        assert_eq!(guest_ram(128), [(0, 128 << 20)]);
        assert_eq!(
            guest_ram(4096),
            [
                (0, MMIO_GAP_START),
                (1 << 32, (4096u64 << 20) - MMIO_GAP_START)
            ]
        );
    }
}
