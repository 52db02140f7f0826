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

// Leaf 1 ECX: what `nested-pvm` keeps. The set follows QEMU's `qemu64`
// model, with which Linux is known to boot on kvm_pvm, plus what KVM
// itself provides (x2APIC, TSC deadline, hypervisor bit).
const LEAF1_ECX_SSE3: u32 = 1 << 0;
const LEAF1_ECX_SSSE3: u32 = 1 << 9;
const LEAF1_ECX_SSE41: u32 = 1 << 19;
const LEAF1_ECX_SSE42: u32 = 1 << 20;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const NESTED_LEAF1_ECX: u32 = LEAF1_ECX_SSE3
    | LEAF1_ECX_SSSE3
    | LEAF1_ECX_SSE41
    | LEAF1_ECX_SSE42
    | LEAF1_ECX_X2APIC
    | LEAF1_ECX_HYPERVISOR;
// Leaf 1 EDX: the classic features from FPU to SSE2 (bits 0-26, without
// the reserved bits 10 and 20, PSN 18, DS 21, ACPI 22), no HTT/TM/PBE.
const NESTED_LEAF1_EDX: u32 = 0x07ff_fbff & !((1 << 18) | (1 << 20) | (1 << 21) | (1 << 22));
// Leaf 0x80000001 ECX: LAHF/SAHF only. EDX: SYSCALL, NX, LM, as an
// Intel CPU reports them (we claim to be one).
const NESTED_EXT1_ECX: u32 = 1 << 0;
const NESTED_EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 29);

// Leaf 0x40000001 EAX, KVM paravirt features: QEMU's default set (kvmclock
// and kvmclock2, no-op I/O delay, async PF and its interrupt, steal time,
// PV EOI, stable clock bit), the set with which Linux boots on kvm_pvm.
const NESTED_KVM_FEATURES: u32 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 14) | (1 << 24);

// Named bits the tests check are gone.
#[cfg(test)]
const CX16: u32 = 1 << 13;
#[cfg(test)]
const POPCNT: u32 = 1 << 23;
#[cfg(test)]
const XSAVE: u32 = 1 << 26;
#[cfg(test)]
const OSXSAVE: u32 = 1 << 27;
#[cfg(test)]
const SMEP: u32 = 1 << 7;
#[cfg(test)]
const SMAP: u32 = 1 << 20;
#[cfg(test)]
const ARCH_CAPABILITIES: u32 = 1 << 29;

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
    /// to leave them off, and XSAVE too (6.12 no longer knows `noxsave`).
    pub fn kernel_args(self) -> &'static [&'static str] {
        match self {
            CpuTemplate::Host => &[],
            CpuTemplate::NestedPvm => &["clearcpuid=xsave,smap,smep,popcnt"],
        }
    }

    /// Applies the template to one CPUID entry: `host` leaves it, and
    /// `nested-pvm` keeps an allowlist modelled on QEMU's `qemu64`.
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
            (0x1, _) => {
                entry.ecx &= NESTED_LEAF1_ECX;
                entry.edx &= NESTED_LEAF1_EDX;
            }
            // Structured extended features (SMEP, SMAP, FSGSBASE, INVPCID,
            // AVX2/512, ARCH_CAPABILITIES, ...), XSAVE state, thermal and
            // power, processor trace: none of them.
            (0x6 | 0x7 | 0xd | 0x14, _) => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            // Intel reports no vendor string in the extended range.
            (0x8000_0000, _) => {
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            (0x4000_0001, _) => entry.eax &= NESTED_KVM_FEATURES,
            (0x8000_0001, _) => {
                entry.ecx &= NESTED_EXT1_ECX;
                entry.edx &= NESTED_EXT1_EDX;
            }
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
    fn nested_pvm_keeps_what_linux_needs_on_kvm() {
        let mut leaf1 = entry(1, 0, u32::MAX);
        CpuTemplate::NestedPvm.apply(&mut leaf1);
        for bit in [LEAF1_ECX_X2APIC, LEAF1_ECX_HYPERVISOR, LEAF1_ECX_SSE42] {
            assert_ne!(leaf1.ecx & bit, 0, "bit {bit:#x}");
        }
        assert_eq!(leaf1.edx & 0x1, 1, "FPU");
        assert_eq!(
            leaf1.edx & (1 << 28),
            0,
            "HTT is set per vCPU count, not by the template"
        );
        let mut ext = entry(0x8000_0001, 0, u32::MAX);
        CpuTemplate::NestedPvm.apply(&mut ext);
        assert_eq!(ext.edx, (1 << 11) | (1 << 20) | (1 << 29));
        assert_eq!(ext.ecx, 1);
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
