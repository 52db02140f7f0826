//! TCB versions and processor generations.
//!
//! A TCB version is a 64-bit value whose byte layout depends on the processor
//! generation: Milan and Genoa put the boot loader SPL in byte 0, TEE in 1, SNP
//! in 6 and microcode in 7; Turin adds an FMC SPL in byte 0 and shifts boot
//! loader, TEE and SNP to bytes 1, 2, 3 (microcode stays in byte 7).

use serde::{Deserialize, Serialize};

/// AMD EPYC generation, which selects the TCB layout and the AMD root keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    /// Zen 3 (family 19h, models 00h-0Fh).
    Milan,
    /// Zen 4 (family 19h, models 10h-1Fh and A0h-AFh).
    Genoa,
    /// Zen 5 (family 1Ah, models 00h-11h).
    Turin,
}

impl Generation {
    /// The generation named by CPUID family and model, as reports of version 3
    /// and later carry them.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Self> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Self::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Self::Genoa),
            (0x1A, 0x00..=0x11) => Some(Self::Turin),
            _ => None,
        }
    }

    /// The generation named by a VCEK's `productName` extension ("Milan-B0").
    pub fn from_product_name(name: &str) -> Option<Self> {
        let base = name.split('-').next().unwrap_or(name);
        match base {
            "Milan" => Some(Self::Milan),
            "Genoa" => Some(Self::Genoa),
            "Turin" => Some(Self::Turin),
            _ => None,
        }
    }

    /// The name AMD uses in certificate subjects (`ARK-Milan`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Milan => "Milan",
            Self::Genoa => "Genoa",
            Self::Turin => "Turin",
        }
    }

    /// Length of the chip ID (the VCEK `hwID`): Turin uses 8 bytes, older
    /// generations all 64.
    pub fn chip_id_len(self) -> usize {
        match self {
            Self::Turin => 8,
            Self::Milan | Self::Genoa => 64,
        }
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded TCB version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TcbVersion {
    /// FMC SPL (Turin only).
    pub fmc: Option<u8>,
    /// Boot loader SPL.
    pub bootloader: u8,
    /// PSP OS (TEE) SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

impl TcbVersion {
    /// Decodes the raw 64-bit value in the given generation's layout.
    pub fn decode(raw: u64, generation: Generation) -> Self {
        let b = raw.to_le_bytes();
        match generation {
            Generation::Turin => Self {
                fmc: Some(b[0]),
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            },
            Generation::Milan | Generation::Genoa => Self {
                fmc: None,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            },
        }
    }

    /// Encodes back into the raw 64-bit value for the given generation.
    pub fn encode(&self, generation: Generation) -> u64 {
        let mut b = [0u8; 8];
        match generation {
            Generation::Turin => {
                b[0] = self.fmc.unwrap_or(0);
                b[1] = self.bootloader;
                b[2] = self.tee;
                b[3] = self.snp;
            }
            Generation::Milan | Generation::Genoa => {
                b[0] = self.bootloader;
                b[1] = self.tee;
                b[6] = self.snp;
            }
        }
        b[7] = self.microcode;
        u64::from_le_bytes(b)
    }

    /// True when every component is at least the minimum's (FMC only when
    /// both carry one).
    pub fn meets(&self, minimum: &TcbVersion) -> bool {
        let fmc_ok = match (self.fmc, minimum.fmc) {
            (Some(have), Some(min)) => have >= min,
            (None, Some(min)) => min == 0,
            _ => true,
        };
        fmc_ok
            && self.bootloader >= minimum.bootloader
            && self.tee >= minimum.tee
            && self.snp >= minimum.snp
            && self.microcode >= minimum.microcode
    }
}

impl std::fmt::Display for TcbVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc={fmc} ")?;
        }
        write!(
            f,
            "bl={} tee={} snp={} ucode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milan_layout_decodes_recorded_value() {
        // reported_tcb of the recorded Milan report: 03 00 00 00 00 00 08 73.
        let tcb = TcbVersion::decode(0x7308_0000_0000_0003, Generation::Milan);
        assert_eq!(
            tcb,
            TcbVersion {
                fmc: None,
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 0x73
            }
        );
        assert_eq!(tcb.encode(Generation::Milan), 0x7308_0000_0000_0003);
    }

    #[test]
    fn turin_layout_puts_fmc_first() {
        let raw = u64::from_le_bytes([1, 2, 3, 4, 0, 0, 0, 9]);
        let tcb = TcbVersion::decode(raw, Generation::Turin);
        assert_eq!(tcb.fmc, Some(1));
        assert_eq!(
            (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
            (2, 3, 4, 9)
        );
        assert_eq!(tcb.encode(Generation::Turin), raw);
    }

    #[test]
    fn meets_with_lower_microcode_returns_false() {
        let min = TcbVersion {
            fmc: None,
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 0x74,
        };
        let have = TcbVersion::decode(0x7308_0000_0000_0003, Generation::Milan);
        assert!(!have.meets(&min));
        assert!(have.meets(&TcbVersion {
            microcode: 0x73,
            ..min
        }));
    }

    #[test]
    fn cpuid_names_generation() {
        assert_eq!(Generation::from_cpuid(0x19, 0x01), Some(Generation::Milan));
        assert_eq!(Generation::from_cpuid(0x19, 0xA0), Some(Generation::Genoa));
        assert_eq!(Generation::from_cpuid(0x1A, 0x02), Some(Generation::Turin));
        assert_eq!(Generation::from_cpuid(0x17, 0x31), None);
        assert_eq!(
            Generation::from_product_name("Milan-B0"),
            Some(Generation::Milan)
        );
    }
}
