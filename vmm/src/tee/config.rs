//! The `"tee"` section of vm.json and the `--tee*` / `--init-data` flags,
//! validated by name into a [`TeeSpec`].
//!
//! ```json
//! "tee": {"type": "snp", "policy": "0x30000", "init_data_digest": "<hex>",
//!         "cpu_signature": "0xa00f11"}
//! "tee": {"type": "tdx", "attributes": "0x10000000", "xfam": "0xe7",
//!         "mr_config_id": "<96 hex>", "quote_service": "unix:/run/tdx-qgs.sock"}
//! ```
//!
//! `host_data` (SNP, 32 bytes) and `mr_config_id` (TDX, 48 bytes) may be
//! given as they are, or derived from `init_data_digest` (the init-data
//! document's digest, any of SHA-256/384/512) truncated or zero-padded as
//! `cloister_attestation::initdata` does.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::snp::policy::{SnpPolicy, DEFAULT_POLICY};
use super::tdx::quote::QuoteServiceAddr;
use super::TeeKind;

/// TDX attributes cloister launches with by default: SEPT_VE_DISABLE
/// (bit 28), so EPT violations on private memory are not reflected to
/// the guest as #VE.
pub const DEFAULT_TDX_ATTRIBUTES: u64 = 1 << 28;
/// XFAM by default: x87, SSE, AVX, AVX-512 (opmask, ZMM_Hi256,
/// Hi16_ZMM) — the guest may still be given less by the TDX module.
pub const DEFAULT_TDX_XFAM: u64 = 0xE7;

/// The `"tee"` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TeeConfig {
    Snp(SnpConfig),
    Tdx(TdxConfig),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpConfig {
    /// Guest policy, hex (`0x30000` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// HOST_DATA, 64 hex characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_data_digest: Option<String>,
    /// CPUID Fn0000_0001 EAX the vCPUs report (it is measured in every
    /// VMSA): hex, or via `vcpu_type` (a QEMU EPYC model name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_type: Option<String>,
    /// `KVM_SEV_INIT2` `vmsa_features` (hex; 0 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmsa_features: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TdxConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xfam: Option<String>,
    /// MRCONFIGID, 96 hex characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mr_config_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_data_digest: Option<String>,
    /// Where quote requests go: `unix:PATH` or `vsock:CID:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote_service: Option<String>,
}

/// A `"tee"` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TeeConfigError {
    #[error("tee.{field} = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("tee.{0} and tee.init_data_digest both given: give one")]
    Both(&'static str),
    #[error(transparent)]
    Policy(#[from] super::snp::policy::SnpPolicyError),
    #[error("--init-data {path}: {reason}")]
    InitData { path: String, reason: String },
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> TeeConfigError {
    TeeConfigError::Invalid {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn parse_hex_u64(field: &'static str, text: &str) -> Result<u64, TeeConfigError> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16)
        .map_err(|e| invalid(field, text, format!("not a hex number: {e}")))
}

fn parse_hex_bytes<const N: usize>(
    field: &'static str,
    text: &str,
) -> Result<[u8; N], TeeConfigError> {
    let bytes = hex::decode(text).map_err(|e| invalid(field, text, format!("not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| invalid(field, text, format!("{} bytes, expected {N}", b.len())))
}

/// A digest truncated or zero-padded to `N` bytes (the init-data rule).
pub fn fit_digest<const N: usize>(digest: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = digest.len().min(N);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

fn digest_field<const N: usize>(
    direct: (&'static str, &Option<String>),
    init_data_digest: &Option<String>,
) -> Result<[u8; N], TeeConfigError> {
    match (direct.1, init_data_digest) {
        (Some(_), Some(_)) => Err(TeeConfigError::Both(direct.0)),
        (Some(text), None) => parse_hex_bytes::<N>(direct.0, text),
        (None, Some(text)) => {
            let digest = hex::decode(text)
                .map_err(|e| invalid("init_data_digest", text, format!("not hex: {e}")))?;
            if ![32, 48, 64].contains(&digest.len()) {
                return Err(invalid(
                    "init_data_digest",
                    text,
                    format!("{} bytes: not a SHA-256/384/512 digest", digest.len()),
                ));
            }
            Ok(fit_digest::<N>(&digest))
        }
        // No init-data: all zero, as the verifier expects without one.
        (None, None) => Ok([0u8; N]),
    }
}

/// The validated TEE launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeeSpec {
    Snp {
        policy: SnpPolicy,
        host_data: [u8; 32],
        /// None: the host CPU's (then the measurement is host-specific).
        cpu_signature: Option<u32>,
        vmsa_features: u64,
    },
    Tdx {
        attributes: u64,
        xfam: u64,
        mr_config_id: [u8; 48],
        quote_service: Option<QuoteServiceAddr>,
    },
}

impl TeeSpec {
    pub fn kind(&self) -> TeeKind {
        match self {
            TeeSpec::Snp { .. } => TeeKind::Snp,
            TeeSpec::Tdx { .. } => TeeKind::Tdx,
        }
    }
}

impl TeeConfig {
    /// An empty section of `kind` (for `--tee` without a config file).
    pub fn of_kind(kind: TeeKind) -> Self {
        match kind {
            TeeKind::Snp => TeeConfig::Snp(SnpConfig::default()),
            TeeKind::Tdx => TeeConfig::Tdx(TdxConfig::default()),
        }
    }

    pub fn kind(&self) -> TeeKind {
        match self {
            TeeConfig::Snp(_) => TeeKind::Snp,
            TeeConfig::Tdx(_) => TeeKind::Tdx,
        }
    }

    /// Sets the policy (SNP) from `--tee-policy`.
    pub fn set_policy(&mut self, policy: String) -> Result<(), TeeConfigError> {
        match self {
            TeeConfig::Snp(c) => {
                c.policy = Some(policy);
                Ok(())
            }
            TeeConfig::Tdx(_) => Err(invalid(
                "policy",
                &policy,
                "a TDX guest has attributes, not a policy (tee.attributes)",
            )),
        }
    }

    /// Binds an init-data file (`--init-data`): its digest replaces any
    /// configured `host_data` / `mr_config_id`.
    pub fn bind_init_data(&mut self, path: &Path) -> Result<(), TeeConfigError> {
        let fail = |reason: String| TeeConfigError::InitData {
            path: path.display().to_string(),
            reason,
        };
        let raw = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let doc = cloister_attestation::initdata::InitData::parse(&raw)
            .map_err(|e| fail(e.to_string()))?;
        let digest = Some(hex::encode(doc.digest()));
        match self {
            TeeConfig::Snp(c) => {
                c.host_data = None;
                c.init_data_digest = digest;
            }
            TeeConfig::Tdx(c) => {
                c.mr_config_id = None;
                c.init_data_digest = digest;
            }
        }
        Ok(())
    }

    /// Checks every field and resolves defaults.
    pub fn validate(&self) -> Result<TeeSpec, TeeConfigError> {
        match self {
            TeeConfig::Snp(c) => {
                let policy = match &c.policy {
                    Some(text) => SnpPolicy::new(parse_hex_u64("policy", text)?)?,
                    None => SnpPolicy::new(DEFAULT_POLICY)?,
                };
                let cpu_signature = match (&c.cpu_signature, &c.vcpu_type) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "vcpu_type",
                            c.vcpu_type.as_deref().unwrap_or_default(),
                            "give cpu_signature or vcpu_type, not both",
                        ))
                    }
                    (Some(text), None) => {
                        let v = parse_hex_u64("cpu_signature", text)?;
                        Some(u32::try_from(v).map_err(|_| {
                            invalid("cpu_signature", text, "CPUID 1 EAX is 32 bits")
                        })?)
                    }
                    (None, Some(name)) => Some(
                        cloister_attestation::measure::vmsa::qemu_cpu_signature(name).ok_or_else(
                            || invalid("vcpu_type", name, "not an EPYC model we know (EPYC, EPYC-Rome, EPYC-Milan, EPYC-Genoa)"),
                        )?,
                    ),
                    (None, None) => None,
                };
                let vmsa_features = match &c.vmsa_features {
                    Some(text) => parse_hex_u64("vmsa_features", text)?,
                    None => 0,
                };
                Ok(TeeSpec::Snp {
                    policy,
                    host_data: digest_field(("host_data", &c.host_data), &c.init_data_digest)?,
                    cpu_signature,
                    vmsa_features,
                })
            }
            TeeConfig::Tdx(c) => Ok(TeeSpec::Tdx {
                attributes: match &c.attributes {
                    Some(t) => parse_hex_u64("attributes", t)?,
                    None => DEFAULT_TDX_ATTRIBUTES,
                },
                xfam: match &c.xfam {
                    Some(t) => parse_hex_u64("xfam", t)?,
                    None => DEFAULT_TDX_XFAM,
                },
                mr_config_id: digest_field(("mr_config_id", &c.mr_config_id), &c.init_data_digest)?,
                quote_service: c
                    .quote_service
                    .as_deref()
                    .map(|t| {
                        t.parse()
                            .map_err(|e: String| invalid("quote_service", t, e))
                    })
                    .transpose()?,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<TeeConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn snp_section_with_defaults_validates() {
        let spec = parse(r#"{"type": "snp"}"#).unwrap().validate().unwrap();
        assert_eq!(
            spec,
            TeeSpec::Snp {
                policy: SnpPolicy::default(),
                host_data: [0; 32],
                cpu_signature: None,
                vmsa_features: 0
            }
        );
    }

    #[test]
    fn unknown_type_or_field_is_named() {
        let err = parse(r#"{"type": "sev"}"#).unwrap_err().to_string();
        assert!(err.contains("sev"), "{err}");
        let err = parse(r#"{"type": "snp", "polcy": "0x30000"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("polcy"), "{err}");
    }

    #[test]
    fn bad_values_are_named_with_the_field() {
        let cases = [
            (
                r#"{"type": "snp", "policy": "0x10000"}"#,
                "tee.policy = 0x10000",
            ),
            (r#"{"type": "snp", "policy": "zz"}"#, "tee.policy = zz"),
            (
                r#"{"type": "snp", "host_data": "abcd"}"#,
                "tee.host_data = abcd: 2 bytes, expected 32",
            ),
            (
                r#"{"type": "snp", "vcpu_type": "Skylake"}"#,
                "tee.vcpu_type = Skylake",
            ),
            (
                r#"{"type": "snp", "init_data_digest": "0011"}"#,
                "2 bytes: not a SHA",
            ),
            (
                r#"{"type": "tdx", "quote_service": "tcp:1"}"#,
                "tee.quote_service = tcp:1",
            ),
            (r#"{"type": "tdx", "mr_config_id": "00"}"#, "expected 48"),
        ];
        for (json, want) in cases {
            let err = parse(json).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let both = r#"{"type": "snp", "host_data": "00", "init_data_digest": "00"}"#;
        assert!(parse(both)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string()
            .contains("both"));
    }

    #[test]
    fn vcpu_type_gives_the_signature() {
        let spec = parse(r#"{"type": "snp", "vcpu_type": "EPYC-Milan"}"#)
            .unwrap()
            .validate()
            .unwrap();
        assert!(matches!(
            spec,
            TeeSpec::Snp {
                cpu_signature: Some(0x00A0_0F11),
                ..
            }
        ));
    }

    /// The VMM's HOST_DATA / MRCONFIGID from an init-data file equal what
    /// the attestation crate (and so the verifier) derives.
    #[test]
    fn init_data_file_binds_the_same_values_as_the_attestation_crate() {
        let doc = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = 'url = \"http://kbs\"'\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.toml");
        std::fs::write(&path, doc).unwrap();
        let parsed = cloister_attestation::initdata::InitData::parse(doc.as_bytes()).unwrap();

        let mut snp = TeeConfig::of_kind(TeeKind::Snp);
        snp.bind_init_data(&path).unwrap();
        match snp.validate().unwrap() {
            TeeSpec::Snp { host_data, .. } => assert_eq!(host_data, parsed.snp_host_data()),
            other => panic!("{other:?}"),
        }
        let mut tdx = TeeConfig::of_kind(TeeKind::Tdx);
        tdx.bind_init_data(&path).unwrap();
        match tdx.validate().unwrap() {
            TeeSpec::Tdx { mr_config_id, .. } => {
                assert_eq!(mr_config_id, parsed.tdx_mr_config_id())
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, "version = 1").unwrap();
        let err = snp.bind_init_data(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("--init-data {}", path.display())),
            "{err}"
        );
    }
}
