//! `cloister measure`: the reference values a KBS needs for the pods of
//! an SNP/TDX runtime class. It plans the pod as the launcher does
//! ([`crate::sandbox::PodVmPlan`]), writes the same `vm.json`
//! ([`crate::vmm_client::cloister_vm_json`]) and asks `cloister-vmm
//! --print-launch-digest` to measure it, so the digest is the one the
//! hardware will report for a pod the shim launches.
//!
//! What is measured and what is not: the SNP launch digest (MEASUREMENT)
//! and the TDX MRTD cover the bzImage, initramfs, command line, memory
//! size, vCPU count and model, and (SNP) the number of virtio devices
//! (they are listed in the measured ACPI tables). HOST_DATA /
//! MRCONFIGID (the init-data digest) are reported beside it, not in it.
//!
//! An SNP pod on the `qemu` backend boots OVMF with kernel hashes: its
//! digest is OVMF's pages, the hashes of the `-kernel`/`-initrd`/`-append`
//! QEMU is given ([`crate::vmm_client::qemu_confidential_args`], the
//! launcher's own arguments) and one VMSA per vCPU
//! (`cloister_attestation::measure::ovmf`); memory size and devices are
//! not in it. TDX on QEMU (TDVF) is not computed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cloister_protocol::annotations;

use super::TeeKind;
use crate::config::{ConfigError, ConfigSource, HypervisorKind, RuntimeConfig, VmNic};
use crate::sandbox::{PodVmPlan, SandboxError};
use crate::vmm_client::{cloister_vm_json, write_vm_json, HypervisorError, VmPaths};

/// What to measure.
#[derive(Debug, Clone)]
pub struct MeasureRequest {
    /// The runtime config of the runtime class (`ConfigPath`).
    pub config: PathBuf,
    /// An init-data file (TOML, optionally gzip'd) in place of
    /// `[confidential] init_data`.
    pub init_data: Option<PathBuf>,
    /// The pod's `io.cloister.init-data` annotation value (base64).
    pub annotation: Option<String>,
    /// Other pod annotations that size the VM (`KEY=VALUE`, e.g.
    /// `io.kubernetes.cri.sandbox-memory`).
    pub pod_annotations: Vec<(String, String)>,
    /// How many NICs the pod's VM gets (one per interface of the pod's
    /// network namespace: 1 under Kubernetes, 0 for `ctr run` without CNI).
    pub nics: u32,
}

/// The reference values of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    pub tee: TeeKind,
    /// SNP MEASUREMENT or TDX MRTD, hex.
    pub launch_digest: String,
    /// HOST_DATA (SNP) or MRCONFIGID (TDX), hex.
    pub binding: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub nics: u32,
    pub kernel: PathBuf,
    /// The `tee` section as written to vm.json.
    pub tee_section: serde_json::Value,
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (digest, binding) = match self.tee {
            TeeKind::Tdx => ("mrtd", "mr_config_id"),
            _ => ("launch_digest", "host_data"),
        };
        writeln!(f, "tee: {}", self.tee.as_str())?;
        writeln!(f, "{digest}: {}", self.launch_digest)?;
        writeln!(f, "{binding}: {}", self.binding)?;
        writeln!(
            f,
            "vm: {} vcpus, {} MiB, {} nics, kernel {}",
            self.vcpus,
            self.memory_mib,
            self.nics,
            self.kernel.display()
        )?;
        write!(f, "vm.json tee: {}", self.tee_section)
    }
}

/// Why a pod could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] SandboxError),
    #[error(
        "{config}: [confidential] tee is {tee}: only snp and tdx pods have a launch measurement"
    )]
    NotHardwareTee { config: PathBuf, tee: String },
    #[error("{config}: a TDX pod on the qemu backend boots TDVF, whose MRTD cloister measure does not compute")]
    QemuTdx { config: PathBuf },
    #[error("{config}: an SNP pod on the qemu backend runs -cpu host, whose signature is the host's: set [confidential] vcpu_type to measure it")]
    QemuHostCpu { config: PathBuf },
    #[error(transparent)]
    QemuTee(#[from] crate::vmm_client::QemuTeeError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("firmware {path}: {source}")]
    Ovmf {
        path: PathBuf,
        source: cloister_attestation::measure::ovmf::OvmfError,
    },
    #[error("pod annotation {0:?}: expected KEY=VALUE")]
    BadAnnotation(String),
    #[error("cannot prepare {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    VmJson(#[from] HypervisorError),
    #[error("cannot run {vmm}: {source}")]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    #[error("{vmm} --print-launch-digest failed ({status}): {stderr}")]
    Vmm {
        vmm: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{vmm} --print-launch-digest printed {0:?}, not a 48-byte hex digest", vmm = .1.display())]
    BadDigest(String, PathBuf),
}

/// `KEY=VALUE` of `--pod-annotation`.
pub fn parse_pod_annotation(text: &str) -> Result<(String, String), MeasureError> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(MeasureError::BadAnnotation(text.to_owned())),
    }
}

/// A folder for the vm.json, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> Result<Self, MeasureError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "cloister-measure-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).map_err(|source| MeasureError::Folder {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Plans the pod, writes its vm.json and has `cloister-vmm` measure it.
pub fn measure(request: &MeasureRequest) -> Result<Measurement, MeasureError> {
    let mut config = RuntimeConfig::load(&ConfigSource::RuntimeOption(request.config.clone()))?;
    if let Some(file) = &request.init_data {
        config.confidential.init_data = Some(file.clone());
    }
    let mut pod_annotations: HashMap<String, String> =
        request.pod_annotations.iter().cloned().collect();
    if let Some(value) = &request.annotation {
        pod_annotations.insert(annotations::INIT_DATA.to_owned(), value.clone());
    }
    let PodVmPlan { mut vm, tee, .. } = PodVmPlan::for_pod(&config, &pod_annotations)?;
    let Some(tee) = tee else {
        return Err(MeasureError::NotHardwareTee {
            config: request.config.clone(),
            tee: config
                .confidential
                .tee
                .map_or("unset".to_owned(), |t| t.as_str().to_owned()),
        });
    };
    if vm.hypervisor == HypervisorKind::Qemu {
        return measure_qemu_snp(request, &config, &vm, &tee);
    }
    // Only their number is measured; the fds are never opened.
    vm.nics = (0..request.nics)
        .map(|index| VmNic {
            tap_fd: 3 + i32::try_from(index).unwrap_or(i32::MAX - 3),
            mac: format!("02:00:00:00:{:02x}:{:02x}", index >> 8 & 0xff, index & 0xff),
        })
        .collect();
    let scratch = ScratchDir::create()?;
    let paths = VmPaths {
        dir: scratch.0.clone(),
    };
    let json = cloister_vm_json(&config, &vm, &paths, Some(&tee));
    write_vm_json(&json, &paths.vm_config())?;
    let launch_digest = print_launch_digest(&config.vmm.path, &paths.vm_config())?;
    Ok(Measurement {
        tee: tee.tee(),
        launch_digest,
        binding: tee.binding_hex(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        nics: request.nics,
        kernel: tee.kernel.clone(),
        tee_section: serde_json::to_value(&json.tee).unwrap_or_default(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, MeasureError> {
    std::fs::read(path).map_err(|source| MeasureError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// QEMU's SEV_FEATURES for an SNP guest: SNPActive only (QEMU 9.1's
/// default, and sev-snp-measure's and cloister-kbs's default).
const QEMU_SNP_SEV_FEATURES: u64 = 1;

/// OVMF + kernel hashes, from the arguments the launcher gives QEMU.
fn measure_qemu_snp(
    request: &MeasureRequest,
    config: &RuntimeConfig,
    vm: &crate::config::PodVm,
    tee: &super::launch::TeeLaunch,
) -> Result<Measurement, MeasureError> {
    use crate::vmm_client::{qemu_confidential_args, QemuTee, VmPaths};
    use cloister_attestation::measure::{kernel_hashes::KernelHashes, ovmf::Ovmf, vmsa};
    let qemu_tee = QemuTee::from_launch(tee)?;
    if matches!(qemu_tee, QemuTee::Tdx { .. }) {
        return Err(MeasureError::QemuTdx {
            config: request.config.clone(),
        });
    }
    let paths = VmPaths {
        dir: std::env::temp_dir(),
    };
    let args: Vec<String> = qemu_confidential_args(config, vm, &paths, &qemu_tee)?
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let after = |flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .unwrap_or_default()
    };
    let signature =
        vmsa::qemu_cpu_signature(&after("-cpu")).ok_or_else(|| MeasureError::QemuHostCpu {
            config: request.config.clone(),
        })?;
    let firmware = PathBuf::from(after("-bios"));
    let ovmf = Ovmf::parse(read(&firmware)?).map_err(|source| MeasureError::Ovmf {
        path: firmware.clone(),
        source,
    })?;
    let kernel = read(Path::new(&after("-kernel")))?;
    let initrd = read(Path::new(&after("-initrd")))?;
    let hashes = KernelHashes::new(&kernel, Some(&initrd), Some(&after("-append")));
    let digest = ovmf
        .snp_launch_digest(vm.vcpus, signature, QEMU_SNP_SEV_FEATURES, Some(&hashes))
        .map_err(|source| MeasureError::Ovmf {
            path: firmware,
            source,
        })?;
    Ok(Measurement {
        tee: tee.tee(),
        launch_digest: hex::encode(digest),
        binding: tee.binding_hex(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        nics: request.nics,
        kernel: tee.kernel.clone(),
        tee_section: serde_json::json!({"qemu": after("-object")}),
    })
}

/// `cloister-vmm --config VM_JSON --print-launch-digest`.
pub fn print_launch_digest(vmm: &Path, vm_json: &Path) -> Result<String, MeasureError> {
    let output = Command::new(vmm)
        .arg("--config")
        .arg(vm_json)
        .arg("--print-launch-digest")
        .env("CLOISTER_LOG", "warn")
        .output()
        .map_err(|source| MeasureError::Spawn {
            vmm: vmm.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(MeasureError::Vmm {
            vmm: vmm.to_path_buf(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match hex::decode(&text) {
        Ok(bytes) if bytes.len() == 48 => Ok(text),
        _ => Err(MeasureError::BadDigest(text, vmm.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_annotation_needs_key_and_value() {
        assert_eq!(
            parse_pod_annotation("io.kubernetes.cri.sandbox-memory=1073741824").unwrap(),
            (
                "io.kubernetes.cri.sandbox-memory".to_owned(),
                "1073741824".to_owned()
            )
        );
        let err = parse_pod_annotation("=1").unwrap_err().to_string();
        assert!(err.contains("\"=1\""), "{err}");
        assert!(parse_pod_annotation("key").is_err());
    }

    fn config_file(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("snp.toml");
        std::fs::write(&path, body).unwrap();
        path
    }

    fn request(config: PathBuf) -> MeasureRequest {
        MeasureRequest {
            config,
            init_data: None,
            annotation: None,
            pod_annotations: Vec::new(),
            nics: 1,
        }
    }

    #[test]
    fn sample_and_ordinary_classes_and_the_qemu_backend_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = measure(&request(config_file(
            dir.path(),
            "[confidential]\ntee = \"sample\"\n",
        )))
        .unwrap_err()
        .to_string();
        assert!(err.contains("tee is sample"), "{err}");
        let err = measure(&request(config_file(dir.path(), "")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tee is unset"), "{err}");
        let err = measure(&request(config_file(
            dir.path(),
            "hypervisor = \"qemu\"\n[confidential]\ntee = \"snp\"\n",
        )))
        .unwrap_err()
        .to_string();
        assert!(err.contains("set [confidential] vcpu_type"), "{err}");
        let err = measure(&request(config_file(
            dir.path(),
            "hypervisor = \"qemu\"\n[confidential]\ntee = \"tdx\"\n",
        )))
        .unwrap_err()
        .to_string();
        assert!(err.contains("boots TDVF"), "{err}");
        let err = measure(&request(config_file(
            dir.path(),
            &format!("hypervisor = \"qemu\"\n[confidential]\ntee = \"snp\"\nvcpu_type = \"EPYC-Milan\"\nfirmware = \"{}/absent.fd\"\n", dir.path().display()),
        )))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(&format!("cannot read {}/absent.fd", dir.path().display())),
            "{err}"
        );
    }

    #[test]
    fn a_vmm_that_fails_is_reported_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = dir.path().join("vmm.sh");
        std::fs::write(
            &vmm,
            "#!/bin/sh\necho 'cloister-vmm: no kernel' >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = config_file(
            dir.path(),
            &format!(
                "[vmm]\npath = \"{}\"\n[confidential]\ntee = \"tdx\"\n",
                vmm.display()
            ),
        );
        let err = measure(&request(config)).unwrap_err().to_string();
        assert!(err.contains("exit status: 2"), "{err}");
        assert!(err.contains("cloister-vmm: no kernel"), "{err}");
    }
}
