//! Confidential launch: AMD SEV-SNP and Intel TDX guests on upstream KVM
//! (Linux 6.12+ for SNP, 6.16+ for TDX).
//!
//! What boots: a firmware-less direct boot of a bzImage (32-bit boot
//! protocol entry, `boot_params` built by us, the initramfs, the command
//! line), every page of it loaded into private `guest_memfd` memory and
//! measured ([`boot_image`]). For SNP the kernel finds the CPUID and
//! secrets pages through a `SETUP_CC_BLOB` `setup_data` entry
//! ([`snp::direct_boot`]); for TDX a one-page reset-vector stub enters the
//! kernel ([`tdx::direct_boot`]). Because the page list is computed from
//! our own files, `cloister-vmm --print-launch-digest` gives the reference
//! value without hardware, and it is the very list the launcher loads.
//!
//! All KVM access goes through [`kvm::TeeKvm`]; [`fake::RecordingKvm`]
//! checks every sequence in unit tests on hosts without the hardware.
//! Which vCPU exits the VMM must handle: [`exits`].

pub mod boot_image;
pub mod config;
pub mod exits;
pub mod fake;
pub mod host;
pub mod kvm;
pub mod memory;
pub mod run;
pub mod snp;
pub mod tdx;

use std::fmt;
use std::str::FromStr;

/// Which TEE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeeKind {
    Snp,
    Tdx,
}

impl FromStr for TeeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "snp" => Ok(TeeKind::Snp),
            "tdx" => Ok(TeeKind::Tdx),
            other => Err(format!("tee = {other}: expected snp or tdx")),
        }
    }
}

impl fmt::Display for TeeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TeeKind::Snp => "snp",
            TeeKind::Tdx => "tdx",
        })
    }
}
