//! The host's KVM: open `/dev/kvm` and prove it offers what we rely on.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version Linux has ever shipped.
const KVM_API_VERSION: i32 = 12;

/// Capabilities the VMM uses, each with the reason we need it.
pub const REQUIRED_CAPS: &[(Cap, &str, &str)] = &[
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP",
        "in-kernel PIC/IOAPIC/LAPIC",
    ),
    (Cap::Hlt, "KVM_CAP_HLT", "halted vCPUs wait in the kernel"),
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY",
        "guest RAM from our mmap",
    ),
    (
        Cap::SetTssAddr,
        "KVM_CAP_SET_TSS_ADDR",
        "TSS region for real-mode emulation",
    ),
    (
        Cap::SetIdentityMapAddr,
        "KVM_CAP_SET_IDENTITY_MAP_ADDR",
        "identity-map page placement",
    ),
    (
        Cap::ExtCpuid,
        "KVM_CAP_EXT_CPUID",
        "KVM_GET_SUPPORTED_CPUID",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2", "in-kernel i8254 timer"),
    (
        Cap::PitState2,
        "KVM_CAP_PIT_STATE2",
        "in-kernel i8254 timer state",
    ),
    (
        Cap::Irqfd,
        "KVM_CAP_IRQFD",
        "device interrupts through eventfds",
    ),
    (
        Cap::Ioeventfd,
        "KVM_CAP_IOEVENTFD",
        "device notifications through eventfds",
    ),
    (
        Cap::MpState,
        "KVM_CAP_MP_STATE",
        "secondary vCPUs wait for INIT/SIPI",
    ),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT",
        "stopping vCPUs promptly",
    ),
];

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open {path}: {source} (is the kvm module loaded, and may this user open it?)")]
    Open {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {found}, expected {KVM_API_VERSION}")]
    ApiVersion { found: i32 },
    #[error("KVM lacks required capabilities: {}", .0.join(", "))]
    MissingCapabilities(Vec<String>),
}

/// How the host provides `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvmKind {
    /// VMX/SVM hardware virtualization.
    Hardware,
    /// Nested paravirtualized KVM (`kvm_pvm`): guest kernel mode is
    /// emulated, and some instructions are not emulated at all.
    NestedPvm,
}

impl HostKvmKind {
    /// Tells the kinds apart by the presence of the `kvm_pvm` module. The
    /// answer is kept: a jailed VMM asks before it loses sight of /sys.
    pub fn detect() -> Self {
        static KIND: std::sync::OnceLock<HostKvmKind> = std::sync::OnceLock::new();
        *KIND.get_or_init(|| Self::from_sysfs(Path::new("/sys/module")))
    }

    fn from_sysfs(module_dir: &Path) -> Self {
        if module_dir.join("kvm_pvm").exists() {
            HostKvmKind::NestedPvm
        } else {
            HostKvmKind::Hardware
        }
    }
}

/// An open `/dev/kvm` whose API version and capabilities were checked.
pub struct KvmContext {
    kvm: Kvm,
    pub max_vcpus: usize,
    pub host_kind: HostKvmKind,
}

impl KvmContext {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(|source| KvmError::Open {
            path: "/dev/kvm".into(),
            source,
        })?;
        let found = kvm.get_api_version();
        if found != KVM_API_VERSION {
            return Err(KvmError::ApiVersion { found });
        }
        let missing: Vec<String> = REQUIRED_CAPS
            .iter()
            .filter(|(cap, _, _)| !kvm.check_extension(*cap))
            .map(|(_, name, why)| format!("{name} ({why})"))
            .collect();
        if !missing.is_empty() {
            return Err(KvmError::MissingCapabilities(missing));
        }
        let max_vcpus = kvm.get_max_vcpus();
        Ok(Self {
            kvm,
            max_vcpus,
            host_kind: HostKvmKind::detect(),
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_kind_from_sysfs_sees_kvm_pvm() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HostKvmKind::from_sysfs(dir.path()), HostKvmKind::Hardware);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(HostKvmKind::from_sysfs(dir.path()), HostKvmKind::NestedPvm);
    }

    #[test]
    fn required_caps_have_unique_names() {
        let mut names: Vec<_> = REQUIRED_CAPS.iter().map(|c| c.1).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REQUIRED_CAPS.len());
    }
}
