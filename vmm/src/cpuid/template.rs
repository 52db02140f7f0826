//! Named CPU templates: which CPUID features a guest may see.
//!
//! `host` passes through what KVM supports. `nested-pvm` is for hosts whose
//! `/dev/kvm` is nested paravirtualized KVM (`kvm_pvm`): there the guest's
//! kernel mode is emulated instruction by instruction, and the emulator
//! cannot execute POPCNT, CLAC/STAC (SMAP), XSAVE/XRSTOR or CMPXCHG16B, so
//! a kernel that sees those features dies in an emulation failure. Hiding
//! them makes Linux pick the fallbacks. Measured facts are in
//! `shared/notes/guest-boot.md`.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;

use crate::vstate::kvm::HostKvmKind;

/// A set of CPUID masks, plus the kernel arguments a guest needs with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    Host,
    NestedPvm,
}

/// An unknown template name.
#[derive(Debug, thiserror::Error)]
#[error("unknown CPU template {0:?} (known: host, nested-pvm)")]
pub struct CpuTemplateError(pub String);

impl FromStr for CpuTemplate {
    type Err = CpuTemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "nested-pvm" => Ok(CpuTemplate::NestedPvm),
            other => Err(CpuTemplateError(other.to_string())),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuTemplate::Host => "host",
            CpuTemplate::NestedPvm => "nested-pvm",
        })
    }
}

// Leaf 1 ECX.
const FMA: u32 = 1 << 12;
const CX16: u32 = 1 << 13;
const POPCNT: u32 = 1 << 23;
const XSAVE: u32 = 1 << 26;
const OSXSAVE: u32 = 1 << 27;
const AVX: u32 = 1 << 28;
const F16C: u32 = 1 << 29;
// Leaf 7.0 EBX.
const AVX2: u32 = 1 << 5;
const SMEP: u32 = 1 << 7;
const SMAP: u32 = 1 << 20;
/// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL: all need XSAVE state.
const AVX512_EBX: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
// Leaf 7.0 ECX: AVX-512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ; VAES, VPCLMULQDQ.
const AVX512_ECX: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
// Leaf 7.0 EDX: IA32_ARCH_CAPABILITIES MSR (KVM_SET_MSRS of it fails on kvm_pvm).
const ARCH_CAPABILITIES: u32 = 1 << 29;
// Leaf 0x80000001 ECX: ABM (LZCNT + POPCNT on AMD).
const ABM: u32 = 1 << 5;

impl CpuTemplate {
    /// The template for this host when the config names none.
    pub fn for_host(kind: HostKvmKind) -> Self {
        match kind {
            HostKvmKind::Hardware => CpuTemplate::Host,
            HostKvmKind::NestedPvm => CpuTemplate::NestedPvm,
        }
    }

    /// Kernel arguments a guest needs with this template. kvm_pvm shows
    /// SMAP/SMEP to the guest whatever CPUID says, so Linux must be told
    /// to leave them off; `noxsave` keeps it from probing XSAVE state.
    pub fn kernel_args(self) -> &'static [&'static str] {
        match self {
            CpuTemplate::Host => &[],
            CpuTemplate::NestedPvm => &["clearcpuid=smap,smep,popcnt", "noxsave"],
        }
    }

    /// Applies the template's masks to one CPUID entry.
    pub fn apply(self, entry: &mut kvm_cpuid_entry2) {
        if self == CpuTemplate::Host {
            return;
        }
        match (entry.function, entry.index) {
            (0x0, _) => {
                // "GenuineIntel": Linux then skips AMD's FXSAVE-leak
                // workaround, whose FNCLEX the emulator cannot run.
                entry.ebx = u32::from_le_bytes(*b"Genu");
                entry.edx = u32::from_le_bytes(*b"ineI");
                entry.ecx = u32::from_le_bytes(*b"ntel");
            }
            (0x1, _) => entry.ecx &= !(FMA | CX16 | POPCNT | XSAVE | OSXSAVE | AVX | F16C),
            (0x7, 0) => {
                entry.ebx &= !(AVX2 | SMEP | SMAP | AVX512_EBX);
                entry.ecx &= !AVX512_ECX;
                entry.edx &= !ARCH_CAPABILITIES;
            }
            (0xd, _) => {
                // No XSAVE: no extended state to describe.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            (0x8000_0001, _) => entry.ecx &= !ABM,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, value: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: value,
            ebx: value,
            ecx: value,
            edx: value,
            ..Default::default()
        }
    }

    #[test]
    fn nested_pvm_hides_features_the_emulator_cannot_run() {
        let mut leaf1 = entry(1, 0, u32::MAX);
        CpuTemplate::NestedPvm.apply(&mut leaf1);
        for bit in [CX16, POPCNT, XSAVE, OSXSAVE] {
            assert_eq!(leaf1.ecx & bit, 0, "bit {bit:#x}");
        }
        let mut leaf7 = entry(7, 0, u32::MAX);
        CpuTemplate::NestedPvm.apply(&mut leaf7);
        assert_eq!(leaf7.ebx & (SMEP | SMAP), 0);
        assert_eq!(leaf7.edx & ARCH_CAPABILITIES, 0);
        let mut xsave = entry(0xd, 1, u32::MAX);
        CpuTemplate::NestedPvm.apply(&mut xsave);
        assert_eq!((xsave.eax, xsave.ebx, xsave.ecx, xsave.edx), (0, 0, 0, 0));
    }

    #[test]
    fn nested_pvm_reports_intel_vendor() {
        let mut leaf0 = entry(0, 0, 0);
        CpuTemplate::NestedPvm.apply(&mut leaf0);
        let mut vendor = Vec::new();
        for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(vendor, b"GenuineIntel");
    }

    #[test]
    fn host_template_changes_nothing() {
        let mut leaf1 = entry(1, 0, u32::MAX);
        CpuTemplate::Host.apply(&mut leaf1);
        assert_eq!(leaf1.ecx, u32::MAX);
        assert!(CpuTemplate::Host.kernel_args().is_empty());
    }

    #[test]
    fn template_names_parse_and_unknown_is_refused() {
        assert_eq!(
            "nested-pvm".parse::<CpuTemplate>().unwrap(),
            CpuTemplate::NestedPvm
        );
        assert_eq!("host".parse::<CpuTemplate>().unwrap(), CpuTemplate::Host);
        let err = "skylake".parse::<CpuTemplate>().unwrap_err();
        assert!(err.to_string().contains("\"skylake\""));
    }

    #[test]
    fn template_is_chosen_by_host_kind() {
        assert_eq!(
            CpuTemplate::for_host(HostKvmKind::NestedPvm),
            CpuTemplate::NestedPvm
        );
        assert_eq!(
            CpuTemplate::for_host(HostKvmKind::Hardware),
            CpuTemplate::Host
        );
    }
}
