//! Can this host launch an SNP or TDX VM? Checked before anything is
//! created, with every fact the answer rests on: the VM types KVM offers
//! (`KVM_CAP_VM_TYPES`), the module parameter that enables the feature,
//! and for SNP the PSP device.

use std::path::{Path, PathBuf};

use super::TeeKind;

/// `KVM_X86_SNP_VM` / `KVM_X86_TDX_VM` as bits of `KVM_CAP_VM_TYPES`.
pub const SNP_VM_TYPE_BIT: u32 = 1 << kvm_bindings::KVM_X86_SNP_VM;
pub const TDX_VM_TYPE_BIT: u32 = 1 << kvm_bindings::KVM_X86_TDX_VM;

/// The host cannot launch this kind of TEE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KVM on this host does not offer VM type {vm_type}: {}", .facts.join("; "))]
pub struct TeeHostError {
    pub vm_type: &'static str,
    /// What was checked, each with what was found.
    pub facts: Vec<String>,
}

/// Where the facts live (`/` on a real host, a fixture tree in tests).
#[derive(Debug, Clone)]
pub struct HostRoot(pub PathBuf);

impl HostRoot {
    pub fn real() -> Self {
        Self(PathBuf::from("/"))
    }
    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p.trim_start_matches('/'))
    }
}

fn vm_type_names(bits: u32) -> String {
    let names: Vec<&str> = [
        (0, "DEFAULT_VM"),
        (1, "SW_PROTECTED_VM"),
        (2, "SEV_VM"),
        (3, "SEV_ES_VM"),
        (4, "SNP_VM"),
        (5, "TDX_VM"),
    ]
    .iter()
    .filter(|(bit, _)| bits & (1 << bit) != 0)
    .map(|(_, name)| *name)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn module_param(root: &HostRoot, module: &str, param: &str) -> String {
    let path = format!("/sys/module/{module}/parameters/{param}");
    match std::fs::read_to_string(root.path(&path)) {
        Ok(v) => format!("{path} = {}", v.trim()),
        Err(_) if !root.path(&format!("/sys/module/{module}")).exists() => {
            format!("{path} missing ({module} not loaded)")
        }
        Err(_) => format!("{path} missing (this {module} has no {param} support)"),
    }
}

fn param_enabled(root: &HostRoot, module: &str, param: &str) -> bool {
    std::fs::read_to_string(root.path(&format!("/sys/module/{module}/parameters/{param}")))
        .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
        .unwrap_or(false)
}

/// Checks the host for `kind`. `vm_types` is `KVM_CAP_VM_TYPES` (None:
/// /dev/kvm could not be asked, with why).
pub fn check_host(
    kind: TeeKind,
    root: &HostRoot,
    vm_types: Result<u32, String>,
) -> Result<(), TeeHostError> {
    let (vm_type, bit, module, param) = match kind {
        TeeKind::Snp => ("KVM_X86_SNP_VM", SNP_VM_TYPE_BIT, "kvm_amd", "sev_snp"),
        TeeKind::Tdx => ("KVM_X86_TDX_VM", TDX_VM_TYPE_BIT, "kvm_intel", "tdx"),
    };
    let mut facts = Vec::new();
    let mut ok = true;
    match &vm_types {
        Ok(bits) => {
            facts.push(format!(
                "KVM_CAP_VM_TYPES = {bits:#x} ({})",
                vm_type_names(*bits)
            ));
            ok &= bits & bit != 0;
        }
        Err(why) => {
            facts.push(format!("KVM_CAP_VM_TYPES unknown: {why}"));
            ok = false;
        }
    }
    facts.push(module_param(root, module, param));
    ok &= param_enabled(root, module, param);
    if kind == TeeKind::Snp {
        let dev = root.path("/dev/sev");
        if dev.exists() {
            facts.push("/dev/sev present".into());
        } else {
            facts.push("/dev/sev missing (no PSP driver: ccp module)".into());
            ok = false;
        }
    }
    if ok {
        Ok(())
    } else {
        Err(TeeHostError { vm_type, facts })
    }
}

/// `KVM_CAP_VM_TYPES` of this host's /dev/kvm.
pub fn kvm_vm_types(kvm_device: &Path) -> Result<u32, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_device)
        .map_err(|e| format!("cannot open {}: {e}", kvm_device.display()))?;
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and returns one.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            KVM_CHECK_EXTENSION,
            libc::c_ulong::from(kvm_bindings::KVM_CAP_VM_TYPES),
        )
    };
    if ret < 0 {
        return Err(format!(
            "KVM_CHECK_EXTENSION failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // 0: the kernel predates the capability, so only the default type.
    Ok(if ret == 0 { 1 } else { ret as u32 })
}

/// `_IO(KVMIO, 0x03)`.
const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(files: &[(&str, &str)]) -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        let root = HostRoot(dir.path().to_path_buf());
        (dir, root)
    }

    #[test]
    fn this_kind_of_host_is_refused_with_every_fact() {
        let (_d, root) = root_with(&[]);
        let err = check_host(TeeKind::Snp, &root, Ok(0x1))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KVM on this host does not offer VM type KVM_X86_SNP_VM"),
            "{err}"
        );
        assert!(err.contains("KVM_CAP_VM_TYPES = 0x1 (DEFAULT_VM)"), "{err}");
        assert!(
            err.contains("/sys/module/kvm_amd/parameters/sev_snp missing (kvm_amd not loaded)"),
            "{err}"
        );
        assert!(err.contains("/dev/sev missing"), "{err}");
    }

    #[test]
    fn an_snp_host_passes() {
        let (_d, root) = root_with(&[
            ("/sys/module/kvm_amd/parameters/sev_snp", "Y\n"),
            ("/dev/sev", ""),
        ]);
        check_host(TeeKind::Snp, &root, Ok(0x1F)).unwrap();
        // SNP disabled by the module parameter.
        let (_d, root) = root_with(&[
            ("/sys/module/kvm_amd/parameters/sev_snp", "N\n"),
            ("/dev/sev", ""),
        ]);
        let err = check_host(TeeKind::Snp, &root, Ok(0x1F))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sev_snp = N"), "{err}");
    }

    #[test]
    fn tdx_needs_the_vm_type_and_kvm_intel_tdx() {
        let (_d, root) = root_with(&[("/sys/module/kvm_intel/parameters/tdx", "Y\n")]);
        check_host(TeeKind::Tdx, &root, Ok(0x21)).unwrap();
        let err = check_host(TeeKind::Tdx, &root, Ok(0x1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("KVM_X86_TDX_VM"), "{err}");
        let err = check_host(TeeKind::Tdx, &root, Err("cannot open /dev/kvm".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KVM_CAP_VM_TYPES unknown: cannot open /dev/kvm"),
            "{err}"
        );
    }

    #[test]
    fn vm_types_of_real_kvm_when_present() {
        match kvm_vm_types(Path::new("/dev/kvm")) {
            Ok(bits) => assert!(bits & 1 != 0, "default VM type missing: {bits:#x}"),
            Err(why) => eprintln!("SKIP: {why}"),
        }
    }
}
