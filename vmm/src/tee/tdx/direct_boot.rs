//! The TDX direct boot as an ordered region list: the same kernel,
//! initramfs, command line and `boot_params` pages as SNP (no CC blob: a
//! TD learns its CPUID from the TDX module), plus a one-page reset-vector
//! stub at the top of 4 GiB, because a TD vCPU starts at 0xFFFFFFF0 in
//! 32-bit protected mode and the VMM cannot set its registers. Every other
//! RAM page is added unmeasured, so the guest finds all of its e820 RAM
//! accepted (without firmware, nobody would accept it).
//!
//! The launcher adds exactly these regions with `KVM_TDX_INIT_MEM_REGION`
//! and [`TdxDirectBoot::mrtd`] replays them through the attestation
//! crate's MRTD calculator: the reference MRTD by construction.

use cloister_attestation::measure::tdx::MrtdCalculator;

use crate::tee::boot_image::{build_boot_image, BootImage, BootImageError, ReservedPages, PAGE};

/// The reset-vector stub page.
pub const RESET_PAGE_GPA: u64 = 0xFFFF_F000;
const RESET_VECTOR_OFFSET: usize = 0xFF0;

/// One `KVM_TDX_INIT_MEM_REGION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxRegion {
    pub gpa: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Contents; `None`: zero pages.
    pub data: Option<Vec<u8>>,
    /// Also TDH.MR.EXTEND the contents into MRTD.
    pub measure: bool,
}

/// The regions and what they boot.
#[derive(Debug, Clone)]
pub struct TdxDirectBoot {
    pub regions: Vec<TdxRegion>,
    pub image: BootImage,
}

/// The stub: zero EBX/EBP/EDI, ESI = boot_params, jump to the kernel's
/// 32-bit entry (Linux boot protocol); the reset vector jumps back to the
/// start of the page where there is room for it.
pub fn reset_page(entry: u32, boot_params: u32) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    let mut code = vec![0x31, 0xDB, 0x31, 0xED, 0x31, 0xFF, 0xBE];
    code.extend_from_slice(&boot_params.to_le_bytes());
    code.push(0xB8);
    code.extend_from_slice(&entry.to_le_bytes());
    code.extend_from_slice(&[0xFF, 0xE0]);
    page[..code.len()].copy_from_slice(&code);
    // jmp rel32 from the instruction after it (0xFFFFFFF5) to 0xFFFFF000.
    let rel =
        (RESET_PAGE_GPA as i64 - (RESET_PAGE_GPA as i64 + RESET_VECTOR_OFFSET as i64 + 5)) as i32;
    page[RESET_VECTOR_OFFSET] = 0xE9;
    page[RESET_VECTOR_OFFSET + 1..RESET_VECTOR_OFFSET + 5].copy_from_slice(&rel.to_le_bytes());
    page
}

/// Builds the region list for one vCPU.
pub fn tdx_direct_boot(
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    memory_mib: u32,
) -> Result<TdxDirectBoot, BootImageError> {
    // Nothing reserved below 1 MiB but a page nobody uses.
    let image = build_boot_image(
        kernel,
        initrd,
        cmdline,
        memory_mib,
        ReservedPages {
            start: 0x3000,
            end: 0x4000,
        },
        0,
        // No ACPI: TDX guests here have one vCPU and no devices.
        0,
    )?;
    let mut loaded: Vec<TdxRegion> = [&image.boot_params, &image.cmdline, &image.kernel]
        .into_iter()
        .chain(image.initrd.as_ref())
        .map(|r| TdxRegion {
            gpa: r.gpa,
            len: r.data.len() as u64,
            data: Some(r.data.clone()),
            measure: true,
        })
        .collect();
    loaded.push(TdxRegion {
        gpa: RESET_PAGE_GPA,
        len: PAGE,
        data: Some(reset_page(image.entry, image.boot_params.gpa as u32)),
        measure: true,
    });
    loaded.sort_by_key(|r| r.gpa);

    let mut regions = Vec::new();
    let mut ram: Vec<(u64, u64)> = image.ram.iter().map(|&(s, l)| (s, s + l)).collect();
    ram.push((RESET_PAGE_GPA, RESET_PAGE_GPA + PAGE));
    ram.sort_unstable();
    for (start, end) in ram {
        let mut cursor = start;
        for r in loaded
            .iter()
            .filter(|r| r.gpa + r.len > start && r.gpa < end)
        {
            if r.gpa > cursor {
                regions.push(TdxRegion {
                    gpa: cursor,
                    len: r.gpa - cursor,
                    data: None,
                    measure: false,
                });
            }
            regions.push(r.clone());
            cursor = cursor.max(r.gpa + r.len);
        }
        if end > cursor {
            regions.push(TdxRegion {
                gpa: cursor,
                len: end - cursor,
                data: None,
                measure: false,
            });
        }
    }
    Ok(TdxDirectBoot { regions, image })
}

impl TdxDirectBoot {
    /// MRTD after FINALIZE: PAGE.ADD of every page, MR.EXTEND of the
    /// measured ones, in region order.
    pub fn mrtd(&self) -> [u8; 48] {
        let mut calc = MrtdCalculator::default();
        for r in &self.regions {
            match &r.data {
                Some(data) => calc.add_region(r.gpa, data, r.measure),
                None => {
                    for i in 0..r.len / PAGE {
                        calc.page_add(r.gpa + i * PAGE);
                    }
                }
            }
        }
        calc.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tee::boot_image::tests::fake_bzimage;

    #[test]
    fn reset_vector_jumps_to_the_stub_which_enters_the_kernel() {
        let page = reset_page(0x10_0000, 0x7000);
        // jmp rel32 -0xff5 at 0xff0.
        assert_eq!(&page[0xFF0..0xFF5], &[0xE9, 0x0B, 0xF0, 0xFF, 0xFF]);
        assert_eq!(
            &page[..18],
            &[
                0x31, 0xDB, 0x31, 0xED, 0x31, 0xFF, 0xBE, 0x00, 0x70, 0, 0, 0xB8, 0, 0, 0x10, 0,
                0xFF, 0xE0
            ]
        );
    }

    #[test]
    fn every_ram_page_and_the_reset_page_are_added_once_in_order() {
        let kernel = fake_bzimage(9000);
        let boot = tdx_direct_boot(&kernel, Some(&[3u8; 100]), "console=hvc0", 32).unwrap();
        let mut cursor = 0;
        let mut total = 0;
        for r in &boot.regions {
            assert!(r.gpa >= cursor, "disorder at {:#x}", r.gpa);
            cursor = r.gpa + r.len;
            total += r.len;
        }
        assert_eq!(total, (32 << 20) + PAGE);
        assert_eq!(boot.regions.last().unwrap().gpa, RESET_PAGE_GPA);
        let measured: Vec<u64> = boot
            .regions
            .iter()
            .filter(|r| r.measure)
            .map(|r| r.gpa)
            .collect();
        assert_eq!(measured.len(), 5, "{measured:x?}");
    }

    #[test]
    fn mrtd_depends_on_measured_contents_only_where_measured() {
        let kernel = fake_bzimage(9000);
        let a = tdx_direct_boot(&kernel, None, "a", 32).unwrap().mrtd();
        assert_eq!(a, tdx_direct_boot(&kernel, None, "a", 32).unwrap().mrtd());
        assert_ne!(a, tdx_direct_boot(&kernel, None, "b", 32).unwrap().mrtd());
        assert_ne!(a, tdx_direct_boot(&kernel, None, "a", 64).unwrap().mrtd());
    }
}
