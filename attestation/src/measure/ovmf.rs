//! OVMF as the SNP launch front end (QEMU/Kata layout).
//!
//! The firmware image is mapped to end at 4 GiB. Its last 32 bytes hold the
//! reset vector; just before them sits a GUIDed footer table, read backwards:
//!
//! ```text
//! ... | entry data | size u16 | guid [16] | ... | total size u16 | FOOTER_GUID [16] | 32 bytes
//! ```
//!
//! Entries used here: the SEV-ES reset block (AP reset EIP), the SEV hashes
//! table location, and the offset (from the end) of the SEV metadata
//! (`"ASEV"`, size, version, count, then `{gpa u32, size u32, type u32}`
//! sections: 1 = zeroed SEC memory, 2 = secrets, 3 = CPUID, 4 = SVSM CAA,
//! 0x10 = kernel hashes).
//!
//! Launch order: firmware pages, metadata sections in file order, then one
//! VMSA per vCPU (BSP at the reset vector, APs at the SEV-ES reset EIP).

use super::guid_le;
use super::kernel_hashes::KernelHashes;
use super::snp::{LaunchPage, SnpLaunchDigest, PAGE_SIZE};
use super::vmsa::{build_vmsa, BSP_EIP};
use thiserror::Error;

const FOOTER_GUID: &str = "96b582de-1fb2-45f7-baea-a366c55a082d";
const SEV_HASH_TABLE_RV_GUID: &str = "7255371f-3a3b-4b04-927b-1da6efa8d454";
const SEV_ES_RESET_BLOCK_GUID: &str = "00f771de-1a7e-4fcb-890e-68c77e2fb44e";
const SEV_METADATA_GUID: &str = "dc886566-984a-4798-a75e-5585a7bf67cc";
const ENTRY_HEADER: usize = 18;
const FOUR_GIB: u64 = 1 << 32;

/// Errors from reading an OVMF image.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OvmfError {
    /// Image size unusable.
    #[error("ovmf image of {0} bytes is not a whole number of pages below 4 gib")]
    Size(usize),
    /// No footer table.
    #[error("ovmf image has no guided footer table")]
    NoFooter,
    /// Malformed table or metadata.
    #[error("ovmf {0} is malformed")]
    Malformed(&'static str),
    /// Required table entry missing.
    #[error("ovmf footer table lacks the {0} entry")]
    MissingEntry(&'static str),
    /// Unknown metadata section type.
    #[error("ovmf sev metadata section type {0:#x} is unknown")]
    SectionType(u32),
    /// Kernel hashes given but the firmware has no place for them.
    #[error("kernel hashes given but this ovmf has no snp_kernel_hashes section")]
    NoKernelHashesSection,
}

/// Kind of an SEV metadata section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Pre-validated, zeroed SEC memory.
    SecMem,
    /// SNP secrets page.
    Secrets,
    /// SNP CPUID page.
    Cpuid,
    /// SVSM calling-area page.
    SvsmCaa,
    /// Kernel hashes page.
    KernelHashes,
}

/// One SEV metadata section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// GPA.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Kind.
    pub kind: SectionKind,
}

/// A parsed OVMF image.
#[derive(Debug, Clone)]
pub struct Ovmf {
    data: Vec<u8>,
    table: Vec<([u8; 16], Vec<u8>)>,
    sections: Vec<Section>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Ovmf {
    /// Parses the footer table and SEV metadata of an image.
    pub fn parse(data: Vec<u8>) -> Result<Self, OvmfError> {
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) || data.len() as u64 > FOUR_GIB
        {
            return Err(OvmfError::Size(data.len()));
        }
        let footer_start = data
            .len()
            .checked_sub(32 + ENTRY_HEADER)
            .ok_or(OvmfError::NoFooter)?;
        let footer = &data[footer_start..];
        if footer[2..18] != guid_le(FOOTER_GUID) {
            return Err(OvmfError::NoFooter);
        }
        let total = u16::from_le_bytes([footer[0], footer[1]]) as usize;
        let table_len = total
            .checked_sub(ENTRY_HEADER)
            .ok_or(OvmfError::Malformed("footer table size"))?;
        let table_start = footer_start
            .checked_sub(table_len)
            .ok_or(OvmfError::Malformed("footer table size"))?;
        let mut rest = &data[table_start..footer_start];
        let mut table = Vec::new();
        while rest.len() >= ENTRY_HEADER {
            let header = &rest[rest.len() - ENTRY_HEADER..];
            let size = u16::from_le_bytes([header[0], header[1]]) as usize;
            if size < ENTRY_HEADER || size > rest.len() {
                return Err(OvmfError::Malformed("footer table entry"));
            }
            let mut guid = [0u8; 16];
            guid.copy_from_slice(&header[2..18]);
            table.push((
                guid,
                rest[rest.len() - size..rest.len() - ENTRY_HEADER].to_vec(),
            ));
            rest = &rest[..rest.len() - size];
        }
        let mut ovmf = Self {
            data,
            table,
            sections: Vec::new(),
        };
        ovmf.sections = ovmf.parse_metadata()?;
        Ok(ovmf)
    }

    fn entry(&self, guid: &str) -> Option<&[u8]> {
        let want = guid_le(guid);
        self.table
            .iter()
            .find(|(g, _)| *g == want)
            .map(|(_, d)| d.as_slice())
    }

    fn parse_metadata(&self) -> Result<Vec<Section>, OvmfError> {
        let Some(entry) = self.entry(SEV_METADATA_GUID) else {
            return Ok(Vec::new());
        };
        let from_end = u32_at(entry, 0).ok_or(OvmfError::Malformed("sev metadata entry"))? as usize;
        let start = self
            .data
            .len()
            .checked_sub(from_end)
            .ok_or(OvmfError::Malformed("sev metadata offset"))?;
        let header = self
            .data
            .get(start..start + 16)
            .ok_or(OvmfError::Malformed("sev metadata header"))?;
        if &header[..4] != b"ASEV" {
            return Err(OvmfError::Malformed("sev metadata signature"));
        }
        let count = u32_at(header, 12).unwrap_or(0) as usize;
        let mut sections = Vec::with_capacity(count.min(64));
        for i in 0..count {
            let off = start + 16 + 12 * i;
            let desc = self
                .data
                .get(off..off + 12)
                .ok_or(OvmfError::Malformed("sev metadata section"))?;
            let (gpa, size, ty) = (
                u32_at(desc, 0).unwrap_or(0),
                u32_at(desc, 4).unwrap_or(0),
                u32_at(desc, 8).unwrap_or(0),
            );
            let kind = match ty {
                1 => SectionKind::SecMem,
                2 => SectionKind::Secrets,
                3 => SectionKind::Cpuid,
                4 => SectionKind::SvsmCaa,
                0x10 => SectionKind::KernelHashes,
                other => return Err(OvmfError::SectionType(other)),
            };
            sections.push(Section {
                gpa: u64::from(gpa),
                size: u64::from(size),
                kind,
            });
        }
        Ok(sections)
    }

    /// GPA of the first firmware byte (the image ends at 4 GiB).
    pub fn gpa(&self) -> u64 {
        FOUR_GIB - self.data.len() as u64
    }

    /// The SEV metadata sections in file order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// EIP at which application processors start (SEV-ES reset block).
    pub fn sev_es_reset_eip(&self) -> Result<u32, OvmfError> {
        self.entry(SEV_ES_RESET_BLOCK_GUID)
            .and_then(|e| u32_at(e, 0))
            .ok_or(OvmfError::MissingEntry("sev-es reset block"))
    }

    /// GPA of the SEV hashes table.
    pub fn sev_hashes_table_gpa(&self) -> Result<u64, OvmfError> {
        self.entry(SEV_HASH_TABLE_RV_GUID)
            .and_then(|e| u32_at(e, 0))
            .map(u64::from)
            .ok_or(OvmfError::MissingEntry("sev hash table"))
    }

    /// The launch page list for `vcpus` vCPUs: firmware, metadata sections,
    /// VMSAs. This is what a VMM launching this firmware must add, in order.
    pub fn snp_launch_pages(
        &self,
        vcpus: u32,
        vcpu_signature: u32,
        sev_features: u64,
        kernel_hashes: Option<&KernelHashes>,
    ) -> Result<Vec<LaunchPage>, OvmfError> {
        let mut pages = vec![LaunchPage::Normal {
            gpa: self.gpa(),
            data: self.data.clone(),
        }];
        for section in &self.sections {
            pages.push(match section.kind {
                SectionKind::SecMem | SectionKind::SvsmCaa => LaunchPage::Zero {
                    gpa: section.gpa,
                    len: section.size,
                },
                SectionKind::Secrets => LaunchPage::Secrets { gpa: section.gpa },
                SectionKind::Cpuid => LaunchPage::Cpuid { gpa: section.gpa },
                SectionKind::KernelHashes => match kernel_hashes {
                    Some(hashes) => {
                        let table_gpa = self.sev_hashes_table_gpa()?;
                        let page = hashes
                            .page((table_gpa & 0xFFF) as usize)
                            .ok_or(OvmfError::Malformed("sev hash table position"))?;
                        LaunchPage::Normal {
                            gpa: section.gpa,
                            data: page,
                        }
                    }
                    None => LaunchPage::Zero {
                        gpa: section.gpa,
                        len: section.size,
                    },
                },
            });
        }
        if kernel_hashes.is_some()
            && !self
                .sections
                .iter()
                .any(|s| s.kind == SectionKind::KernelHashes)
        {
            return Err(OvmfError::NoKernelHashesSection);
        }
        let ap_eip = self.sev_es_reset_eip()?;
        for cpu in 0..vcpus {
            let eip = if cpu == 0 { BSP_EIP } else { ap_eip };
            pages.push(LaunchPage::Vmsa(build_vmsa(
                eip,
                sev_features,
                vcpu_signature,
            )));
        }
        Ok(pages)
    }

    /// The expected SNP `MEASUREMENT` of a QEMU launch of this firmware.
    pub fn snp_launch_digest(
        &self,
        vcpus: u32,
        vcpu_signature: u32,
        sev_features: u64,
        kernel_hashes: Option<&KernelHashes>,
    ) -> Result<[u8; 48], OvmfError> {
        let pages = self.snp_launch_pages(vcpus, vcpu_signature, sev_features, kernel_hashes)?;
        let mut ld = SnpLaunchDigest::default();
        for page in &pages {
            ld.add(page);
        }
        Ok(ld.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_without_footer_returns_error() {
        assert_eq!(
            Ovmf::parse(vec![0u8; 8192]).unwrap_err(),
            OvmfError::NoFooter
        );
        assert_eq!(
            Ovmf::parse(vec![0u8; 100]).unwrap_err(),
            OvmfError::Size(100)
        );
        assert_eq!(Ovmf::parse(Vec::new()).unwrap_err(), OvmfError::Size(0));
    }

    #[test]
    fn parse_with_oversized_footer_returns_malformed() {
        let mut data = vec![0u8; 8192];
        let footer = data.len() - 32 - ENTRY_HEADER;
        data[footer..footer + 2].copy_from_slice(&0xFFFFu16.to_le_bytes());
        data[footer + 2..footer + 18].copy_from_slice(&guid_le(FOOTER_GUID));
        assert!(matches!(Ovmf::parse(data), Err(OvmfError::Malformed(_))));
    }
}
