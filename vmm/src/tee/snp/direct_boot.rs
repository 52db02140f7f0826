//! The one function that turns an SNP guest's direct boot (kernel,
//! initramfs, command line, `boot_params` with a `SETUP_CC_BLOB`
//! `setup_data` entry, CPUID and secrets pages, the ACPI tables, one VMSA
//! per vCPU) into the ordered [`LaunchPage`] list. The launcher loads
//! exactly this list with `SNP_LAUNCH_UPDATE` (VMSAs: measured by KVM at
//! `LAUNCH_FINISH` from the registers in [`SnpDirectBoot::vcpu_states`])
//! and `cloister-vmm --print-launch-digest` hands it to
//! [`cloister_attestation::measure::snp::launch_digest`]: the VMM and the
//! verifier agree by construction.
//!
//! Order: every guest page in ascending GPA — loaded pages as `Normal`,
//! the CPUID and secrets pages with their types, all other RAM as `Zero`
//! (validated and zeroed by the firmware; without firmware in the guest no
//! one else would validate it) — then the VMSAs in vCPU order.
//!
//! No MP table: Linux skips the `_MP_` scan in an SNP guest
//! (`sme_early_init` sets `x86_init.mpparse.find_mptable` to a no-op since
//! v6.9), so it would be measured and never read. The guest learns its
//! vCPUs, the I/O APIC and its virtio devices from the measured ACPI page
//! ([`crate::boot::acpi`]) that `boot_params.acpi_rsdp_addr` points to.

use cloister_attestation::measure::snp::LaunchPage;

use crate::boot::acpi::{build_acpi_tables, VirtioMmioWindow};
use crate::tee::boot_image::{build_boot_image, BootImage, BootImageError, ReservedPages, PAGE};
use crate::tee::kvm::VcpuBootState;

use super::vmsa::{protected_mode_entry, reset_state, vmsa_from_state, SEV_FEATURE_SNP_ACTIVE};

/// The `setup_data` node (`SETUP_CC_BLOB`) and the `cc_blob_sev_info` it
/// points to share this page.
pub const SETUP_DATA_GPA: u64 = 0x3000;
const CC_BLOB_GPA: u64 = SETUP_DATA_GPA + 0x40;
/// The SNP CPUID page.
pub const CPUID_PAGE_GPA: u64 = 0x4000;
/// The SNP secrets page (filled by the firmware: VMPCKs for guest requests).
pub const SECRETS_PAGE_GPA: u64 = 0x5000;
/// The ACPI tables (RSDP first).
pub const ACPI_TABLES_GPA: u64 = 0x6000;
/// `setup_data.type` of a confidential-computing blob.
const SETUP_CC_BLOB: u32 = 7;
/// `cc_blob_sev_info.magic`: "AMDE".
const CC_BLOB_SEV_HDR_MAGIC: u32 = 0x4544_4d41;

/// What the launch digest depends on.
#[derive(Debug, Clone, Copy)]
pub struct SnpBootInputs<'a> {
    /// bzImage bytes.
    pub kernel: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    /// The command line exactly as the guest will see it.
    pub cmdline: &'a str,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// The virtio-mmio devices, in slot order: the DSDT lists them.
    pub virtio_devices: &'a [VirtioMmioWindow],
    /// CPUID Fn0000_0001 EAX of the vCPUs (in each VMSA's RDX at reset).
    pub cpu_signature: u32,
    /// `KVM_SEV_INIT2` `vmsa_features`.
    pub vmsa_features: u64,
}

/// The page list and the vCPU registers behind its VMSAs.
#[derive(Debug, Clone)]
pub struct SnpDirectBoot {
    pub pages: Vec<LaunchPage>,
    pub vcpu_states: Vec<VcpuBootState>,
    pub image: BootImage,
    /// CPUID Fn0000_0001 EAX the vCPUs must report (it is in their VMSAs).
    pub cpu_signature: u32,
    /// `KVM_SEV_INIT2` `vmsa_features` the VMSAs were built for.
    pub vmsa_features: u64,
}

impl SnpDirectBoot {
    /// The launch digest the firmware will report as MEASUREMENT.
    pub fn launch_digest(&self) -> [u8; 48] {
        cloister_attestation::measure::snp::launch_digest(&self.pages)
    }
}

fn setup_data_page() -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    // struct setup_data { u64 next; u32 type; u32 len; } + u32 cc_blob_address
    page[8..12].copy_from_slice(&SETUP_CC_BLOB.to_le_bytes());
    page[12..16].copy_from_slice(&4u32.to_le_bytes());
    page[16..20].copy_from_slice(&(CC_BLOB_GPA as u32).to_le_bytes());
    // struct cc_blob_sev_info (40 bytes, packed).
    let b = &mut page[(CC_BLOB_GPA - SETUP_DATA_GPA) as usize..];
    b[0..4].copy_from_slice(&CC_BLOB_SEV_HDR_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&SECRETS_PAGE_GPA.to_le_bytes());
    b[16..20].copy_from_slice(&(PAGE as u32).to_le_bytes());
    b[24..32].copy_from_slice(&CPUID_PAGE_GPA.to_le_bytes());
    b[32..36].copy_from_slice(&(PAGE as u32).to_le_bytes());
    page
}

/// The GPA a page-list entry starts at and the bytes it covers (VMSAs
/// are not guest pages: `None`).
fn extent(page: &LaunchPage) -> Option<(u64, u64)> {
    match page {
        LaunchPage::Normal { gpa, data } => Some((*gpa, data.len() as u64)),
        LaunchPage::Zero { gpa, len } | LaunchPage::Unmeasured { gpa, len } => Some((*gpa, *len)),
        LaunchPage::Secrets { gpa } | LaunchPage::Cpuid { gpa } => Some((*gpa, PAGE)),
        LaunchPage::Vmsa(_) => None,
    }
}

/// Builds the page list.
pub fn snp_direct_boot(inputs: &SnpBootInputs<'_>) -> Result<SnpDirectBoot, BootImageError> {
    let image = build_boot_image(
        inputs.kernel,
        inputs.initrd,
        inputs.cmdline,
        inputs.memory_mib,
        ReservedPages {
            start: SETUP_DATA_GPA,
            end: ACPI_TABLES_GPA + PAGE,
        },
        SETUP_DATA_GPA,
        ACPI_TABLES_GPA,
    )?;
    let acpi = build_acpi_tables(ACPI_TABLES_GPA, inputs.vcpus, inputs.virtio_devices)?;
    let mut loaded = vec![
        LaunchPage::Normal {
            gpa: SETUP_DATA_GPA,
            data: setup_data_page(),
        },
        LaunchPage::Cpuid {
            gpa: CPUID_PAGE_GPA,
        },
        LaunchPage::Secrets {
            gpa: SECRETS_PAGE_GPA,
        },
        LaunchPage::Normal {
            gpa: ACPI_TABLES_GPA,
            data: acpi,
        },
    ];
    for range in [&image.boot_params, &image.cmdline, &image.kernel]
        .into_iter()
        .chain(image.initrd.as_ref())
    {
        loaded.push(LaunchPage::Normal {
            gpa: range.gpa,
            data: range.data.clone(),
        });
    }
    let mut spans: Vec<(u64, u64)> = loaded.iter().filter_map(extent).collect();
    spans.sort_unstable();

    // Every page of guest memory, the legacy hole (640 KiB to 1 MiB, not
    // RAM in the e820 map) included: a kernel with ACPI looks for the RSDP
    // in the EBDA and at 0xE0000-0xFFFFF before anything else (the
    // decompressor's get_rsdp_addr, when boot_params has none), and reading
    // a page that was never validated ends an SNP guest with a #VC. Zero
    // pages read as zeros: no RSDP, as on a machine without ACPI.
    let ram: Vec<(u64, u64)> = image
        .ram
        .iter()
        .map(|&(start, len)| (start, start + len))
        .collect();
    let mut pages = loaded;
    for (start, end) in ram {
        let mut cursor = start;
        for &(s, len) in spans.iter().filter(|(s, len)| s + len > start && *s < end) {
            if s > cursor {
                pages.push(LaunchPage::Zero {
                    gpa: cursor,
                    len: s - cursor,
                });
            }
            cursor = cursor.max(s + len);
        }
        if end > cursor {
            pages.push(LaunchPage::Zero {
                gpa: cursor,
                len: end - cursor,
            });
        }
    }
    pages.sort_by_key(|p| extent(p).map_or(u64::MAX, |(gpa, _)| gpa));

    let mut vcpu_states = vec![protected_mode_entry(
        image.entry,
        image.boot_params.gpa as u32,
    )];
    vcpu_states.extend((1..inputs.vcpus).map(|_| reset_state(inputs.cpu_signature)));
    let features = inputs.vmsa_features | SEV_FEATURE_SNP_ACTIVE;
    pages.extend(
        vcpu_states
            .iter()
            .map(|state| LaunchPage::Vmsa(vmsa_from_state(state, features))),
    );
    Ok(SnpDirectBoot {
        pages,
        vcpu_states,
        image,
        cpu_signature: inputs.cpu_signature,
        vmsa_features: inputs.vmsa_features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tee::boot_image::tests::fake_bzimage;

    fn inputs<'a>(kernel: &'a [u8], initrd: Option<&'a [u8]>) -> SnpBootInputs<'a> {
        SnpBootInputs {
            kernel,
            initrd,
            cmdline: "console=hvc0",
            memory_mib: 64,
            vcpus: 2,
            virtio_devices: &[],
            cpu_signature: 0x00A0_0F11,
            vmsa_features: 0,
        }
    }

    #[test]
    fn every_ram_page_is_covered_once_in_gpa_order_then_vmsas() {
        let kernel = fake_bzimage(20_000);
        let boot = snp_direct_boot(&inputs(&kernel, Some(&[1u8; 9000]))).unwrap();
        let spans: Vec<(u64, u64)> = boot.pages.iter().filter_map(extent).collect();
        let mut cursor = 0;
        let mut covered = 0;
        for (gpa, len) in &spans {
            assert!(*gpa >= cursor, "overlap or disorder at {gpa:#x}");
            assert_eq!(gpa % PAGE, 0);
            assert_eq!(len % PAGE, 0);
            cursor = gpa + len;
            covered += len;
        }
        // All 64 MiB, the legacy hole included (validated as zero pages).
        assert_eq!(covered, 64 << 20);
        // The legacy hole: 640 KiB to 1 MiB.
        let hole = 0xA_0000u64..0x10_0000;
        assert!(boot.pages.iter().any(|p| matches!(
            p,
            LaunchPage::Zero { gpa, len } if *gpa <= 0xE_0000 && gpa + len >= hole.end
        )));
        let vmsas = boot
            .pages
            .iter()
            .filter(|p| matches!(p, LaunchPage::Vmsa(_)))
            .count();
        assert_eq!(vmsas, 2);
        assert!(matches!(boot.pages.last(), Some(LaunchPage::Vmsa(_))));
    }

    #[test]
    fn acpi_tables_are_a_measured_page_boot_params_point_to() {
        let kernel = fake_bzimage(20_000);
        let devices = [VirtioMmioWindow {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }];
        let mut i = inputs(&kernel, None);
        i.virtio_devices = &devices;
        let boot = snp_direct_boot(&i).unwrap();

        let acpi = boot.pages.iter().find_map(|p| match p {
            LaunchPage::Normal { gpa, data } if *gpa == ACPI_TABLES_GPA => Some(data),
            _ => None,
        });
        let acpi = acpi.expect("the ACPI page is loaded and measured");
        assert_eq!(
            acpi,
            &build_acpi_tables(ACPI_TABLES_GPA, 2, &devices).unwrap()
        );
        let bp = &boot.image.boot_params.data;
        assert_eq!(&bp[0x070..0x078], &ACPI_TABLES_GPA.to_le_bytes());
        // Kept out of the guest's RAM map with the other boot pages.
        let e820_reserved = &bp[0x2d0 + 20..0x2d0 + 40];
        assert_eq!(&e820_reserved[0..8], &SETUP_DATA_GPA.to_le_bytes());
        assert_eq!(
            &e820_reserved[8..16],
            &(ACPI_TABLES_GPA + PAGE - SETUP_DATA_GPA).to_le_bytes()
        );
        // A device more or less is another measurement.
        assert_ne!(
            boot.launch_digest(),
            snp_direct_boot(&inputs(&kernel, None))
                .unwrap()
                .launch_digest()
        );
    }

    #[test]
    fn cc_blob_points_at_the_cpuid_and_secrets_pages() {
        let page = setup_data_page();
        assert_eq!(&page[8..12], &7u32.to_le_bytes());
        assert_eq!(&page[16..20], &0x3040u32.to_le_bytes());
        assert_eq!(&page[0x40..0x44], b"AMDE");
        assert_eq!(&page[0x48..0x50], &SECRETS_PAGE_GPA.to_le_bytes());
        assert_eq!(&page[0x58..0x60], &CPUID_PAGE_GPA.to_le_bytes());
    }

    #[test]
    fn digest_depends_on_kernel_cmdline_memory_and_vcpus() {
        let kernel = fake_bzimage(20_000);
        let base = snp_direct_boot(&inputs(&kernel, None))
            .unwrap()
            .launch_digest();
        let mut other = kernel.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_ne!(
            base,
            snp_direct_boot(&inputs(&other, None))
                .unwrap()
                .launch_digest()
        );
        let mut i = inputs(&kernel, None);
        i.cmdline = "console=hvc0 quiet";
        assert_ne!(base, snp_direct_boot(&i).unwrap().launch_digest());
        let mut i = inputs(&kernel, None);
        i.memory_mib = 128;
        assert_ne!(base, snp_direct_boot(&i).unwrap().launch_digest());
        let mut i = inputs(&kernel, None);
        i.vcpus = 1;
        assert_ne!(base, snp_direct_boot(&i).unwrap().launch_digest());
        assert_eq!(
            base,
            snp_direct_boot(&inputs(&kernel, None))
                .unwrap()
                .launch_digest()
        );
    }
}
