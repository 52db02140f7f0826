//! The `cloister-kbs` policy file: reference values per TEE and the
//! resource policy, in TOML.
//!
//! ```toml
//! [reference.snp]
//! measurements = ["<96 hex>"]          # accepted launch measurements (required)
//! allow_debug = false
//! minimum_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }
//!
//! [reference.tdx]
//! mr_td = ["<96 hex>"]                 # accepted MRTDs (required)
//! allow_debug = false
//!
//! [reference.init_data]
//! required = true                      # refuse evidence without init-data
//! digests = ["<hex>"]                  # accepted init-data digests (empty: any bound one)
//!
//! [[policy]]                           # first matching rule decides
//! resources = "default/*/*"            # <repo>/<type>/<tag>, `*` = one whole segment
//! tees = ["snp", "tdx"]                # TEEs that may fetch them
//! measurements = ["<hex>"]             # optional: only guests with these measurements
//! init_data_digests = ["<hex>"]        # optional: only guests launched with this init-data
//! ```

use super::token::ClaimsWire;
use crate::snp::TcbVersion;
use serde::Deserialize;
use thiserror::Error;

/// Errors from reading the policy file.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// TOML invalid.
    #[error("kbs policy file is not valid: {0}")]
    Toml(String),
    /// A hex value has the wrong form.
    #[error("kbs policy value {value:?} in {field} is not {len} bytes of hex")]
    Hex {
        /// Field.
        field: &'static str,
        /// Value.
        value: String,
        /// Expected byte length.
        len: usize,
    },
    /// A policy rule is malformed.
    #[error("kbs policy rule {0:?} must have three segments <repo>/<type>/<tag>")]
    Rule(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnp {
    #[serde(default)]
    measurements: Vec<String>,
    #[serde(default)]
    allow_debug: bool,
    minimum_tcb: Option<RawTcb>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcb {
    fmc: Option<u8>,
    bootloader: u8,
    tee: u8,
    snp: u8,
    microcode: u8,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTdx {
    #[serde(default)]
    mr_td: Vec<String>,
    #[serde(default)]
    allow_debug: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInitData {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    digests: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReference {
    #[serde(default)]
    snp: RawSnp,
    #[serde(default)]
    tdx: RawTdx,
    #[serde(default)]
    init_data: RawInitData,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    resources: String,
    tees: Vec<String>,
    #[serde(default)]
    measurements: Vec<String>,
    #[serde(default)]
    init_data_digests: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    reference: RawReference,
    #[serde(default)]
    policy: Vec<RawRule>,
}

/// SNP reference values.
#[derive(Debug, Clone, Default)]
pub struct SnpReference {
    /// Accepted measurements.
    pub measurements: Vec<[u8; 48]>,
    /// Accept debug guests.
    pub allow_debug: bool,
    /// Minimum reported TCB.
    pub minimum_tcb: Option<TcbVersion>,
}

/// TDX reference values.
#[derive(Debug, Clone, Default)]
pub struct TdxReference {
    /// Accepted MRTDs.
    pub mr_td: Vec<[u8; 48]>,
    /// Accept debug TDs.
    pub allow_debug: bool,
}

/// Init-data requirements.
#[derive(Debug, Clone, Default)]
pub struct InitDataReference {
    /// Evidence must come with init-data.
    pub required: bool,
    /// Accepted digests (empty: any).
    pub digests: Vec<Vec<u8>>,
}

/// All reference values.
#[derive(Debug, Clone, Default)]
pub struct ReferenceValues {
    /// SNP.
    pub snp: SnpReference,
    /// TDX.
    pub tdx: TdxReference,
    /// Init-data.
    pub init_data: InitDataReference,
}

/// One resource policy rule.
#[derive(Debug, Clone)]
pub struct PolicyRule {
    /// Pattern segments (`*` = any).
    pub pattern: [String; 3],
    /// TEEs allowed (lowercase names as on the wire).
    pub tees: Vec<String>,
    /// Measurements allowed (lowercase hex); empty allows any.
    pub measurements: Vec<String>,
    /// Init-data digests allowed (lowercase hex); empty allows any.
    pub init_data_digests: Vec<String>,
}

/// The whole policy file.
#[derive(Debug, Clone, Default)]
pub struct KbsPolicy {
    /// Reference values.
    pub reference: ReferenceValues,
    /// Resource rules, first match decides; no match denies.
    pub rules: Vec<PolicyRule>,
}

fn hex_fixed<const N: usize>(field: &'static str, v: &str) -> Result<[u8; N], ConfigError> {
    let err = || ConfigError::Hex {
        field,
        value: v.to_owned(),
        len: N,
    };
    let bytes = hex::decode(v.trim()).map_err(|_| err())?;
    bytes.try_into().map_err(|_| err())
}

/// Outcome of a policy decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the rule with this pattern.
    Allow(String),
    /// Denied, with the reason.
    Deny(String),
}

impl KbsPolicy {
    /// Parses the TOML policy file.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let snp = SnpReference {
            measurements: raw
                .reference
                .snp
                .measurements
                .iter()
                .map(|m| hex_fixed::<48>("reference.snp.measurements", m))
                .collect::<Result<_, _>>()?,
            allow_debug: raw.reference.snp.allow_debug,
            minimum_tcb: raw.reference.snp.minimum_tcb.map(|t| TcbVersion {
                fmc: t.fmc,
                bootloader: t.bootloader,
                tee: t.tee,
                snp: t.snp,
                microcode: t.microcode,
            }),
        };
        let tdx = TdxReference {
            mr_td: raw
                .reference
                .tdx
                .mr_td
                .iter()
                .map(|m| hex_fixed::<48>("reference.tdx.mr_td", m))
                .collect::<Result<_, _>>()?,
            allow_debug: raw.reference.tdx.allow_debug,
        };
        let init_data = InitDataReference {
            required: raw.reference.init_data.required,
            digests: raw
                .reference
                .init_data
                .digests
                .iter()
                .map(|d| {
                    hex::decode(d.trim()).map_err(|_| ConfigError::Hex {
                        field: "reference.init_data.digests",
                        value: d.clone(),
                        len: 48,
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let rules = raw
            .policy
            .into_iter()
            .map(|r| {
                let parts: Vec<&str> = r.resources.split('/').collect();
                let [repo, ty, tag] = parts.as_slice() else {
                    return Err(ConfigError::Rule(r.resources.clone()));
                };
                Ok(PolicyRule {
                    pattern: [repo.to_string(), ty.to_string(), tag.to_string()],
                    tees: r.tees.iter().map(|t| t.to_lowercase()).collect(),
                    measurements: r.measurements.iter().map(|m| m.to_lowercase()).collect(),
                    init_data_digests: r
                        .init_data_digests
                        .iter()
                        .map(|d| d.to_lowercase())
                        .collect(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            reference: ReferenceValues {
                snp,
                tdx,
                init_data,
            },
            rules,
        })
    }

    /// Decides whether a session with these claims may read `path`.
    pub fn decide(&self, claims: &ClaimsWire, path: &[&str; 3]) -> Decision {
        for rule in &self.rules {
            let matches = rule
                .pattern
                .iter()
                .zip(path.iter())
                .all(|(p, s)| p == "*" || p == s);
            if !matches {
                continue;
            }
            let pattern = rule.pattern.join("/");
            if !rule.tees.contains(&claims.tee) {
                return Decision::Deny(format!("rule {pattern} does not allow tee {}", claims.tee));
            }
            if !rule.measurements.is_empty() && !rule.measurements.contains(&claims.measurement) {
                return Decision::Deny(format!(
                    "rule {pattern} does not allow measurement {}",
                    claims.measurement
                ));
            }
            if !rule.init_data_digests.is_empty() {
                let digest = claims.init_data_digest.as_deref().unwrap_or("none");
                if !rule.init_data_digests.iter().any(|d| d == digest) {
                    return Decision::Deny(format!(
                        "rule {pattern} does not allow init-data digest {digest}"
                    ));
                }
            }
            return Decision::Allow(pattern);
        }
        Decision::Deny("no policy rule matches the resource".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[reference.snp]
measurements = ["a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c"]
minimum_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }

[reference.init_data]
required = true
digests = ["00ff"]

[[policy]]
resources = "default/key/*"
tees = ["snp", "tdx"]

[[policy]]
resources = "*/*/*"
tees = ["sample"]
init_data_digests = ["00ff"]
"#;

    fn claims(tee: &str, init: Option<&str>) -> ClaimsWire {
        ClaimsWire {
            tee: tee.into(),
            measurement: "aa".into(),
            init_data_digest: init.map(str::to_owned),
        }
    }

    #[test]
    fn parse_reads_reference_values_and_rules() {
        let policy = KbsPolicy::parse(FILE).unwrap();
        assert_eq!(policy.reference.snp.measurements.len(), 1);
        assert_eq!(policy.reference.snp.minimum_tcb.unwrap().microcode, 115);
        assert!(policy.reference.init_data.required);
        assert_eq!(policy.reference.init_data.digests, vec![vec![0x00, 0xFF]]);
        assert_eq!(policy.rules.len(), 2);
    }

    #[test]
    fn first_matching_rule_decides() {
        let policy = KbsPolicy::parse(FILE).unwrap();
        assert!(matches!(
            policy.decide(&claims("snp", None), &["default", "key", "disk"]),
            Decision::Allow(_)
        ));
        assert!(matches!(
            policy.decide(&claims("sample", Some("00ff")), &["default", "key", "disk"]),
            Decision::Deny(_)
        ));
        assert!(matches!(
            policy.decide(&claims("sample", Some("00ff")), &["other", "x", "y"]),
            Decision::Allow(_)
        ));
        assert!(matches!(
            policy.decide(&claims("sample", Some("0100")), &["other", "x", "y"]),
            Decision::Deny(_)
        ));
        assert!(matches!(
            policy.decide(&claims("sample", None), &["other", "x", "y"]),
            Decision::Deny(_)
        ));
        assert!(matches!(
            KbsPolicy::default().decide(&claims("snp", None), &["a", "b", "c"]),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn bad_files_are_rejected_with_reason() {
        assert!(matches!(
            KbsPolicy::parse("[reference.snp]\nmeasurements = [\"abc\"]"),
            Err(ConfigError::Hex { .. })
        ));
        assert!(matches!(
            KbsPolicy::parse("[[policy]]\nresources = \"a/b\"\ntees = []"),
            Err(ConfigError::Rule(_))
        ));
        assert!(matches!(
            KbsPolicy::parse("[reference.snp]\nmeasurement = []"),
            Err(ConfigError::Toml(_))
        ));
    }
}
