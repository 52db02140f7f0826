//! What an SEV-SNP or TDX pod is launched with: the `[confidential]` keys
//! a real TEE launch needs (policy, vCPU model, firmware, quote service,
//! the bzImage), checked once when the config is loaded, and bound to the
//! pod's init-data digest ([`TeeSettings::launch`]) for the hypervisor.
//!
//! The `sample` TEE has none of this: it boots an ordinary VM.

use std::path::{Path, PathBuf};

use crate::config::ConfigError;

use super::{ConfidentialSection, PodConfidential, TeeKind};

/// SNP guest policy by default: SMT allowed (bit 16), the reserved
/// must-be-one bit 17, ABI 0.0, no debug, no migration agent.
pub const DEFAULT_SNP_POLICY: u64 = 0x30000;
/// SNP policy bit 17: reserved, must be one.
pub const SNP_POLICY_MBO: u64 = 1 << 17;
/// SNP policy bit 19: the host may decrypt the guest's memory.
pub const SNP_POLICY_DEBUG: u64 = 1 << 19;
/// SNP policy bits 26..63: reserved, must be zero.
pub const SNP_POLICY_MBZ: u64 = !((1 << 26) - 1);
/// TDX ATTRIBUTES bit 0: the TD is debuggable (the host reads its state).
pub const TDX_ATTRIBUTE_DEBUG: u64 = 1;
/// OVMF for the `qemu` backend by default (Ubuntu's `ovmf` package paths;
/// Debian 12 ships neither).
pub const DEFAULT_SNP_FIRMWARE: &str = "/usr/share/ovmf/OVMF.amdsev.fd";
pub const DEFAULT_TDX_FIRMWARE: &str = "/usr/share/ovmf/OVMF.inteltdx.fd";
/// The SNP vCPU models the measurement knows (QEMU's names).
const SNP_VCPU_TYPES: &str = "EPYC, EPYC-Rome, EPYC-Milan, EPYC-Genoa";

/// The vCPU an SNP guest reports in CPUID 1 EAX, measured in every VMSA:
/// without it the launch digest depends on the host's CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnpVcpu {
    /// A QEMU EPYC model name.
    Type(String),
    Signature(u32),
}

/// Where a TD's quote requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuoteService {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
}

impl std::fmt::Display for QuoteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuoteService::Unix(path) => write!(f, "unix:{}", path.display()),
            QuoteService::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// The TEE-specific settings from `[confidential]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeeSettingsKind {
    Snp {
        policy: u64,
        vcpu: Option<SnpVcpu>,
    },
    Tdx {
        /// None: the VMM's default (SEPT_VE_DISABLE).
        attributes: Option<u64>,
        /// None: the VMM's default.
        xfam: Option<u64>,
        quote_service: Option<QuoteService>,
    },
}

/// `[confidential]` for an SNP or TDX runtime class, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeeSettings {
    /// The bzImage: a confidential guest boots through the Linux boot
    /// protocol (cloister-vmm's direct boot, or OVMF), not the PVH entry
    /// of the vmlinux ordinary pods use.
    pub kernel: PathBuf,
    /// OVMF, for the `qemu` backend.
    pub firmware: PathBuf,
    pub kind: TeeSettingsKind,
}

/// The launch binding: the init-data digest fitted to the TEE's field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeeLaunchKind {
    Snp {
        policy: u64,
        vcpu: Option<SnpVcpu>,
        /// HOST_DATA: [`PodConfidential::snp_host_data`].
        host_data: [u8; 32],
    },
    Tdx {
        attributes: Option<u64>,
        xfam: Option<u64>,
        quote_service: Option<QuoteService>,
        /// MRCONFIGID: [`PodConfidential::tdx_mr_config_id`].
        mr_config_id: [u8; 48],
    },
}

/// Everything a hypervisor backend needs to launch one SNP/TDX pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeeLaunch {
    pub kernel: PathBuf,
    pub firmware: PathBuf,
    pub kind: TeeLaunchKind,
}

impl TeeLaunch {
    pub fn tee(&self) -> TeeKind {
        match self.kind {
            TeeLaunchKind::Snp { .. } => TeeKind::Snp,
            TeeLaunchKind::Tdx { .. } => TeeKind::Tdx,
        }
    }

    /// The bound value as hex: HOST_DATA (SNP) or MRCONFIGID (TDX).
    pub fn binding_hex(&self) -> String {
        match &self.kind {
            TeeLaunchKind::Snp { host_data, .. } => hex::encode(host_data),
            TeeLaunchKind::Tdx { mr_config_id, .. } => hex::encode(mr_config_id),
        }
    }
}

impl TeeSettings {
    /// Binds the pod's init-data digest (all zero without init-data).
    pub fn launch(&self, pod: &PodConfidential) -> TeeLaunch {
        let kind = match &self.kind {
            TeeSettingsKind::Snp { policy, vcpu } => TeeLaunchKind::Snp {
                policy: *policy,
                vcpu: vcpu.clone(),
                host_data: pod.snp_host_data(),
            },
            TeeSettingsKind::Tdx {
                attributes,
                xfam,
                quote_service,
            } => TeeLaunchKind::Tdx {
                attributes: *attributes,
                xfam: *xfam,
                quote_service: quote_service.clone(),
                mr_config_id: pod.tdx_mr_config_id(),
            },
        };
        TeeLaunch {
            kernel: self.kernel.clone(),
            firmware: self.firmware.clone(),
            kind,
        }
    }
}

fn invalid(
    key: &'static str,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn check_snp_policy(policy: u64, allow_debug: bool) -> Result<u64, ConfigError> {
    let key = "confidential.snp_policy";
    let value = format!("{policy:#x}");
    if policy & SNP_POLICY_MBO == 0 {
        return Err(invalid(
            key,
            &value,
            format!(
                "reserved bit 17 must be set (try {:#x})",
                policy | SNP_POLICY_MBO
            ),
        ));
    }
    if policy & SNP_POLICY_MBZ != 0 {
        return Err(invalid(
            key,
            &value,
            format!("reserved bits {:#x} must be zero", policy & SNP_POLICY_MBZ),
        ));
    }
    if policy & SNP_POLICY_DEBUG != 0 && !allow_debug {
        return Err(invalid(
            key,
            &value,
            "debug bit 19 lets the host decrypt the guest's memory; set confidential.allow_debug = true to launch such a pod",
        ));
    }
    Ok(policy)
}

fn parse_quote_service(text: &str) -> Result<QuoteService, ConfigError> {
    let key = "confidential.quote_service";
    if let Some(path) = text.strip_prefix("unix:") {
        if !Path::new(path).is_absolute() {
            return Err(invalid(key, text, "unix: needs an absolute socket path"));
        }
        return Ok(QuoteService::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = text.strip_prefix("vsock:") {
        let parsed = rest
            .split_once(':')
            .and_then(|(cid, port)| Some((cid.parse().ok()?, port.parse().ok()?)));
        return match parsed {
            Some((cid, port)) => Ok(QuoteService::Vsock { cid, port }),
            None => Err(invalid(
                key,
                text,
                "expected vsock:CID:PORT (decimal numbers)",
            )),
        };
    }
    Err(invalid(key, text, "expected unix:PATH or vsock:CID:PORT"))
}

fn absolute(key: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Err(invalid(key, path.display(), "must be an absolute path"))
    }
}

impl ConfidentialSection {
    /// The SNP/TDX launch settings, or `None` for an ordinary or `sample`
    /// runtime class. `guest_kernel` is `[guest] kernel`: the bzImage is
    /// looked for next to it unless `kernel` names one.
    pub fn tee_settings(&self, guest_kernel: &Path) -> Result<Option<TeeSettings>, ConfigError> {
        let tee = self.tee;
        let snp_only = [
            (
                "confidential.snp_policy",
                self.snp_policy.map(|p| format!("{p:#x}")),
            ),
            ("confidential.vcpu_type", self.vcpu_type.clone()),
            (
                "confidential.cpu_signature",
                self.cpu_signature.map(|s| format!("{s:#x}")),
            ),
        ];
        let tdx_only = [
            (
                "confidential.tdx_attributes",
                self.tdx_attributes.map(|a| format!("{a:#x}")),
            ),
            (
                "confidential.tdx_xfam",
                self.tdx_xfam.map(|x| format!("{x:#x}")),
            ),
            ("confidential.quote_service", self.quote_service.clone()),
        ];
        let hardware_only = [
            (
                "confidential.kernel",
                self.kernel.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "confidential.firmware",
                self.firmware.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "confidential.allow_debug",
                self.allow_debug.then(|| "true".to_owned()),
            ),
        ];
        let refuse_unless = |fields: &[(&'static str, Option<String>)], wanted: &[TeeKind]| {
            for (key, value) in fields {
                if let (Some(value), false) = (value, tee.is_some_and(|t| wanted.contains(&t))) {
                    let names: Vec<&str> = wanted.iter().map(|t| t.as_str()).collect();
                    let current = tee.map_or("unset", TeeKind::as_str);
                    return Err(invalid(
                        key,
                        value,
                        format!(
                            "applies only to tee = {} (confidential.tee is {current})",
                            names.join(" or ")
                        ),
                    ));
                }
            }
            Ok(())
        };
        refuse_unless(&snp_only, &[TeeKind::Snp])?;
        refuse_unless(&tdx_only, &[TeeKind::Tdx])?;
        refuse_unless(&hardware_only, &[TeeKind::Snp, TeeKind::Tdx])?;

        let (kind, default_firmware) = match tee {
            None | Some(TeeKind::Sample) => return Ok(None),
            Some(TeeKind::Snp) => {
                let policy = check_snp_policy(
                    self.snp_policy.unwrap_or(DEFAULT_SNP_POLICY),
                    self.allow_debug,
                )?;
                let vcpu = match (&self.vcpu_type, self.cpu_signature) {
                    (Some(name), Some(_)) => {
                        return Err(invalid(
                            "confidential.vcpu_type",
                            name,
                            "give vcpu_type or cpu_signature, not both",
                        ))
                    }
                    (Some(name), None) => {
                        if cloister_attestation::measure::vmsa::qemu_cpu_signature(name).is_none() {
                            return Err(invalid(
                                "confidential.vcpu_type",
                                name,
                                format!("not an SNP vCPU model we can measure ({SNP_VCPU_TYPES})"),
                            ));
                        }
                        Some(SnpVcpu::Type(name.clone()))
                    }
                    (None, Some(signature)) => Some(SnpVcpu::Signature(signature)),
                    (None, None) => None,
                };
                (TeeSettingsKind::Snp { policy, vcpu }, DEFAULT_SNP_FIRMWARE)
            }
            Some(TeeKind::Tdx) => {
                if let Some(attributes) = self.tdx_attributes {
                    if attributes & TDX_ATTRIBUTE_DEBUG != 0 && !self.allow_debug {
                        return Err(invalid(
                            "confidential.tdx_attributes",
                            format!("{attributes:#x}"),
                            "DEBUG (bit 0) lets the host read the TD's state; set confidential.allow_debug = true to launch such a pod",
                        ));
                    }
                }
                let quote_service = self
                    .quote_service
                    .as_deref()
                    .map(parse_quote_service)
                    .transpose()?;
                (
                    TeeSettingsKind::Tdx {
                        attributes: self.tdx_attributes,
                        xfam: self.tdx_xfam,
                        quote_service,
                    },
                    DEFAULT_TDX_FIRMWARE,
                )
            }
        };
        let kernel = match &self.kernel {
            Some(path) => absolute("confidential.kernel", path)?,
            None => guest_kernel.with_file_name("bzImage"),
        };
        let firmware = match &self.firmware {
            Some(path) => absolute("confidential.firmware", path)?,
            None => PathBuf::from(default_firmware),
        };
        Ok(Some(TeeSettings {
            kernel,
            firmware,
            kind,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMLINUX: &str = "/usr/share/cloister/vmlinux";

    fn settings(toml_text: &str) -> Result<Option<TeeSettings>, ConfigError> {
        let section: ConfidentialSection = toml::from_str(toml_text).unwrap();
        section.tee_settings(Path::new(VMLINUX))
    }

    fn error(toml_text: &str) -> String {
        settings(toml_text).unwrap_err().to_string()
    }

    #[test]
    fn snp_defaults_are_policy_0x30000_the_bzimage_beside_vmlinux_and_amdsev_ovmf() {
        let got = settings("tee = \"snp\"").unwrap().unwrap();
        assert_eq!(
            got,
            TeeSettings {
                kernel: PathBuf::from("/usr/share/cloister/bzImage"),
                firmware: PathBuf::from("/usr/share/ovmf/OVMF.amdsev.fd"),
                kind: TeeSettingsKind::Snp {
                    policy: 0x30000,
                    vcpu: None
                },
            }
        );
    }

    #[test]
    fn tdx_settings_parse_with_their_defaults_and_overrides() {
        let got = settings("tee = \"tdx\"").unwrap().unwrap();
        assert_eq!(
            got.firmware,
            PathBuf::from("/usr/share/ovmf/OVMF.inteltdx.fd")
        );
        let got = settings(
            "tee = \"tdx\"\ntdx_attributes = 0x10000000\ntdx_xfam = 0xe7\nquote_service = \"vsock:2:4050\"\nkernel = \"/k/bzImage\"\nfirmware = \"/fw/TDVF.fd\"\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            TeeSettings {
                kernel: PathBuf::from("/k/bzImage"),
                firmware: PathBuf::from("/fw/TDVF.fd"),
                kind: TeeSettingsKind::Tdx {
                    attributes: Some(0x1000_0000),
                    xfam: Some(0xe7),
                    quote_service: Some(QuoteService::Vsock { cid: 2, port: 4050 }),
                },
            }
        );
    }

    #[test]
    fn ordinary_and_sample_classes_have_no_tee_settings() {
        assert_eq!(settings("").unwrap(), None);
        assert_eq!(settings("tee = \"sample\"").unwrap(), None);
    }

    #[test]
    fn bad_values_are_refused_naming_key_and_value() {
        let cases = [
            ("tee = \"snp\"\nsnp_policy = 0x10000", "confidential.snp_policy = 0x10000: reserved bit 17 must be set (try 0x30000)"),
            ("tee = \"snp\"\nsnp_policy = 0x4030000", "confidential.snp_policy = 0x4030000: reserved bits 0x4000000 must be zero"),
            ("tee = \"snp\"\nsnp_policy = 0xb0000", "confidential.snp_policy = 0xb0000: debug bit 19"),
            ("tee = \"snp\"\nvcpu_type = \"Skylake\"", "confidential.vcpu_type = Skylake: not an SNP vCPU model"),
            ("tee = \"snp\"\nvcpu_type = \"EPYC\"\ncpu_signature = 0xa00f11", "confidential.vcpu_type = EPYC: give vcpu_type or cpu_signature"),
            ("tee = \"tdx\"\ntdx_attributes = 0x10000001", "confidential.tdx_attributes = 0x10000001: DEBUG (bit 0)"),
            ("tee = \"tdx\"\nquote_service = \"tcp:1\"", "confidential.quote_service = tcp:1: expected unix:PATH or vsock:CID:PORT"),
            ("tee = \"tdx\"\nquote_service = \"vsock:2\"", "confidential.quote_service = vsock:2: expected vsock:CID:PORT"),
            ("tee = \"tdx\"\nquote_service = \"unix:qgs.sock\"", "confidential.quote_service = unix:qgs.sock: unix: needs an absolute"),
            ("tee = \"snp\"\nkernel = \"bzImage\"", "confidential.kernel = bzImage: must be an absolute path"),
            ("tee = \"tdx\"\nfirmware = \"ovmf.fd\"", "confidential.firmware = ovmf.fd: must be an absolute path"),
            ("tee = \"tdx\"\nsnp_policy = 0x30000", "confidential.snp_policy = 0x30000: applies only to tee = snp (confidential.tee is tdx)"),
            ("tee = \"snp\"\nquote_service = \"vsock:2:1\"", "confidential.quote_service = vsock:2:1: applies only to tee = tdx (confidential.tee is snp)"),
            ("tee = \"sample\"\nfirmware = \"/o.fd\"", "confidential.firmware = /o.fd: applies only to tee = snp or tdx (confidential.tee is sample)"),
            ("tdx_xfam = 0xe7", "confidential.tdx_xfam = 0xe7: applies only to tee = tdx (confidential.tee is unset)"),
        ];
        for (text, want) in cases {
            let got = error(text);
            assert!(
                got.starts_with(&format!("config key {want}")),
                "{text}:\n got {got}\nwant {want}"
            );
        }
    }

    #[test]
    fn debug_policies_need_allow_debug() {
        let got = settings("tee = \"snp\"\nsnp_policy = 0xb0000\nallow_debug = true")
            .unwrap()
            .unwrap();
        assert!(matches!(
            got.kind,
            TeeSettingsKind::Snp {
                policy: 0xb0000,
                ..
            }
        ));
        let got = settings("tee = \"tdx\"\ntdx_attributes = 0x1\nallow_debug = true")
            .unwrap()
            .unwrap();
        assert!(matches!(
            got.kind,
            TeeSettingsKind::Tdx {
                attributes: Some(1),
                ..
            }
        ));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<ConfidentialSection>("tee = \"snp\"\nsnp_polcy = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("snp_polcy"), "{err}");
    }

    #[test]
    fn launch_binds_host_data_and_mr_config_id_of_the_pod() {
        let doc = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n";
        let section: ConfidentialSection =
            toml::from_str("tee = \"snp\"\nvcpu_type = \"EPYC-Milan\"").unwrap();
        let annotations = std::collections::HashMap::from([(
            cloister_protocol::annotations::INIT_DATA.to_owned(),
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, doc),
        )]);
        let pod = PodConfidential::resolve(&section, &annotations)
            .unwrap()
            .unwrap();
        let digest = pod.init_data.as_ref().unwrap().document.digest();
        let launch = section
            .tee_settings(Path::new(VMLINUX))
            .unwrap()
            .unwrap()
            .launch(&pod);
        match &launch.kind {
            TeeLaunchKind::Snp {
                host_data, vcpu, ..
            } => {
                assert_eq!(host_data[..], digest[..32]);
                assert_eq!(vcpu, &Some(SnpVcpu::Type("EPYC-Milan".into())));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(launch.binding_hex(), hex::encode(&digest[..32]));
    }
}
