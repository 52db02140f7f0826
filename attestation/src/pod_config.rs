//! What cloister reads out of a pod's init-data (see [`crate::initdata`]):
//! where the KBS is, how to trust it, which resources to fetch, and the
//! agent policy. One parser for the shim (which refuses a bad document
//! before the pod starts) and the agent (which uses it after checking the
//! digest against the TEE).
//!
//! The `[data]` entries follow Confidential Containers where they overlap:
//!
//! ```toml
//! [data]
//! "aa.toml" = '''                      # CoCo attestation-agent config
//! [token_configs.kbs]
//! url = "https://kbs.example:8443"
//! cert = """-----BEGIN CERTIFICATE-----..."""
//! '''
//! "cdh.toml" = '''...'''               # CoCo data hub config: accepted, not used
//! "policy.rego" = '''...'''            # agent API policy
//! "cloister.toml" = '''
//! [kbs]                                # overrides aa.toml's url / cert
//! url = "https://kbs.example:8443"
//! cert = """..."""
//! vsock_port = 1026                    # reach the KBS through the host's vsock forwarder
//! [resources]                          # secret name = KBS resource <repo>/<type>/<tag>
//! "db-password" = "default/key/db"
//! '''
//! ```
//!
//! Any other `[data]` key is refused: a misspelt `"polcy.rego"` silently
//! ignored would run the pod without the policy its owner wrote.

use crate::initdata::InitData;
use crate::kbs::store::check_segment;
use serde::Deserialize;
use std::collections::BTreeMap;
use thiserror::Error;

/// `[data]` key of CoCo's attestation-agent config.
pub const AA_TOML: &str = "aa.toml";
/// `[data]` key of CoCo's confidential-data-hub config.
pub const CDH_TOML: &str = "cdh.toml";
/// `[data]` key of the agent API policy.
pub const POLICY_REGO: &str = "policy.rego";
/// `[data]` key of cloister's own settings.
pub const CLOISTER_TOML: &str = "cloister.toml";
/// Every `[data]` key accepted.
pub const KNOWN_DATA_KEYS: [&str; 4] = [AA_TOML, CDH_TOML, POLICY_REGO, CLOISTER_TOML];
/// Longest secret name (it becomes a file name in the guest).
pub const MAX_SECRET_NAME: usize = 64;

/// Errors in init-data contents; each names the entry and field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PodConfigError {
    /// A `[data]` key we do not know.
    #[error(
        "init-data [data] key {0:?} is not one of aa.toml, cdh.toml, policy.rego, cloister.toml"
    )]
    UnknownDataKey(String),
    /// An entry that is not TOML of the expected shape.
    #[error("init-data entry {entry:?} is not valid: {reason}")]
    Entry {
        /// `[data]` key.
        entry: &'static str,
        /// Why.
        reason: String,
    },
    /// A field with a bad value.
    #[error("init-data field {field} = {value:?} is invalid: {reason}")]
    Field {
        /// e.g. `cloister.toml kbs.url`.
        field: String,
        /// The value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// Resources requested without a KBS.
    #[error("init-data names resources but no kbs url (cloister.toml [kbs] url or aa.toml [token_configs.kbs] url)")]
    NoKbs,
}

/// How the guest reaches and trusts the KBS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbsSettings {
    /// `http://` or `https://` base URL.
    pub url: String,
    /// PEM CA bundle the KBS certificate must chain to (https).
    pub cert: Option<String>,
    /// Host vsock port forwarded to the KBS, when the guest has no network
    /// route to it.
    pub vsock_port: Option<u32>,
}

/// What the pod's init-data asks of the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodConfig {
    /// The KBS, if any.
    pub kbs: Option<KbsSettings>,
    /// Secret name → KBS resource path `<repo>/<type>/<tag>`.
    pub resources: BTreeMap<String, String>,
    /// Agent API policy (Rego text).
    pub policy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CloisterToml {
    kbs: Option<CloisterKbs>,
    #[serde(default)]
    resources: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloisterKbs {
    url: Option<String>,
    cert: Option<String>,
    vsock_port: Option<u32>,
}

/// CoCo's aa.toml: only `[token_configs.kbs]` matters to us; the rest of
/// the file is theirs and not checked.
#[derive(Deserialize, Default)]
struct AaToml {
    #[serde(default)]
    token_configs: AaTokenConfigs,
}

#[derive(Deserialize, Default)]
struct AaTokenConfigs {
    kbs: Option<AaKbs>,
}

#[derive(Deserialize)]
struct AaKbs {
    url: String,
    cert: Option<String>,
}

fn entry<T: for<'de> Deserialize<'de> + Default>(
    init: &InitData,
    key: &'static str,
) -> Result<T, PodConfigError> {
    match init.data.get(key) {
        None => Ok(T::default()),
        Some(text) => toml::from_str(text).map_err(|e| PodConfigError::Entry {
            entry: key,
            reason: e.message().to_owned(),
        }),
    }
}

fn field(field: &str, value: impl ToString, reason: &'static str) -> PodConfigError {
    PodConfigError::Field {
        field: field.to_owned(),
        value: value.to_string(),
        reason,
    }
}

/// Checks a KBS base URL: `http(s)://host[:port][/path]`, no credentials,
/// query or fragment.
fn check_url(name: &str, url: &str) -> Result<(), PodConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| field(name, url, "must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(field(name, url, "has no host"));
    }
    if authority.contains('@') || url.contains('?') || url.contains('#') {
        return Err(field(
            name,
            url,
            "must not carry credentials, a query or a fragment",
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(field(
            name,
            url,
            "contains whitespace or control characters",
        ));
    }
    Ok(())
}

/// A secret name is a plain file name in the guest's secrets folder.
pub fn check_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SECRET_NAME
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks a KBS resource path `<repo>/<type>/<tag>`.
pub fn check_resource_path(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    segments.len() == 3 && segments.iter().all(|s| check_segment(s).is_ok())
}

impl PodConfig {
    /// Reads and checks the entries of `init`.
    pub fn from_init_data(init: &InitData) -> Result<Self, PodConfigError> {
        if let Some(key) = init
            .data
            .keys()
            .find(|k| !KNOWN_DATA_KEYS.contains(&k.as_str()))
        {
            return Err(PodConfigError::UnknownDataKey(key.clone()));
        }
        let ours: CloisterToml = entry(init, CLOISTER_TOML)?;
        let aa: AaToml = entry(init, AA_TOML)?;

        let aa_kbs = aa.token_configs.kbs;
        let (url, cert, vsock_port) = match ours.kbs {
            Some(k) => {
                let url = k.url.or_else(|| aa_kbs.as_ref().map(|a| a.url.clone()));
                let cert = k
                    .cert
                    .or_else(|| aa_kbs.as_ref().and_then(|a| a.cert.clone()));
                (url, cert, k.vsock_port)
            }
            None => (
                aa_kbs.as_ref().map(|a| a.url.clone()),
                aa_kbs.and_then(|a| a.cert),
                None,
            ),
        };
        let kbs = match url {
            None => {
                if let Some(port) = vsock_port {
                    return Err(field(
                        "cloister.toml kbs.vsock_port",
                        port,
                        "set without a kbs url",
                    ));
                }
                None
            }
            Some(url) => {
                check_url("kbs url", &url)?;
                let cert = cert.filter(|c| !c.trim().is_empty());
                if let Some(cert) = &cert {
                    if !cert.contains("-----BEGIN CERTIFICATE-----") {
                        return Err(field(
                            "kbs cert",
                            cert.chars().take(40).collect::<String>(),
                            "is not a PEM certificate",
                        ));
                    }
                }
                if url.starts_with("https://") && cert.is_none() {
                    // The guest has no system trust store to fall back on.
                    return Err(field(
                        "kbs cert",
                        "",
                        "an https kbs url needs the CA certificate (the guest has no trust store)",
                    ));
                }
                if let Some(port) = vsock_port {
                    if port < 1024 || port == u32::MAX {
                        return Err(field(
                            "cloister.toml kbs.vsock_port",
                            port,
                            "must be in 1024..4294967295",
                        ));
                    }
                }
                Some(KbsSettings {
                    url: url.trim_end_matches('/').to_owned(),
                    cert,
                    vsock_port,
                })
            }
        };
        for (name, path) in &ours.resources {
            if !check_secret_name(name) {
                return Err(field(
                    "cloister.toml resources key",
                    name,
                    "must be a plain file name ([A-Za-z0-9._-], at most 64, not starting with '.')",
                ));
            }
            if !check_resource_path(path) {
                return Err(field(
                    &format!("cloister.toml resources.{name}"),
                    path,
                    "must be a kbs resource path <repo>/<type>/<tag>",
                ));
            }
        }
        if !ours.resources.is_empty() && kbs.is_none() {
            return Err(PodConfigError::NoKbs);
        }
        Ok(Self {
            kbs,
            resources: ours.resources,
            policy: init.data.get(POLICY_REGO).cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(data: &str) -> InitData {
        let text = format!("version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n{data}");
        InitData::parse(text.as_bytes()).unwrap()
    }

    const OURS: &str = r#""cloister.toml" = '''
[kbs]
url = "http://127.0.0.1:8080/"
vsock_port = 1026
[resources]
"db-password" = "test/key/db"
'''
"#;

    #[test]
    fn cloister_toml_gives_kbs_and_resources() {
        let config = PodConfig::from_init_data(&doc(OURS)).unwrap();
        let kbs = config.kbs.unwrap();
        assert_eq!(kbs.url, "http://127.0.0.1:8080");
        assert_eq!(kbs.vsock_port, Some(1026));
        assert_eq!(config.resources["db-password"], "test/key/db");
        assert_eq!(config.policy, None);
    }

    #[test]
    fn coco_aa_toml_gives_the_kbs_and_policy_is_kept() {
        let data = r#""aa.toml" = '''
[token_configs.coco_as]
url = "https://as.example"
[token_configs.kbs]
url = "https://kbs.example:8443"
cert = """
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
"""
'''
"cdh.toml" = '''
[kbc]
name = "cc_kbc"
'''
"policy.rego" = "package agent_policy"
"#;
        let config = PodConfig::from_init_data(&doc(data)).unwrap();
        let kbs = config.kbs.unwrap();
        assert_eq!(kbs.url, "https://kbs.example:8443");
        assert!(kbs.cert.unwrap().contains("MIIB"));
        assert_eq!(config.policy.as_deref(), Some("package agent_policy"));
    }

    #[test]
    fn empty_data_needs_no_kbs() {
        let config = PodConfig::from_init_data(&doc("")).unwrap();
        assert_eq!(config, PodConfig::default());
    }

    fn error(data: &str) -> String {
        PodConfigError::to_string(&PodConfig::from_init_data(&doc(data)).unwrap_err())
    }

    #[test]
    fn every_bad_field_is_named() {
        assert!(error("\"polcy.rego\" = \"x\"").contains("\"polcy.rego\""));
        assert!(error("\"cloister.toml\" = \"[kbs]\\nurl = 1\"").contains("cloister.toml"));
        assert!(
            error("\"cloister.toml\" = \"[kbs]\\nurl = \\\"u\\\"\\nextra = 1\"")
                .contains("cloister.toml")
        );
        assert!(error("\"cloister.toml\" = \"[kbs]\\nurl = \\\"ftp://x\\\"\"").contains("kbs url"));
        assert!(
            error("\"cloister.toml\" = \"[kbs]\\nurl = \\\"http://u@x\\\"\"")
                .contains("credentials")
        );
        assert!(
            error("\"cloister.toml\" = \"[kbs]\\nurl = \\\"https://x\\\"\"").contains("kbs cert")
        );
        assert!(error(
            "\"cloister.toml\" = \"[kbs]\\nurl = \\\"https://x\\\"\\ncert = \\\"nope\\\"\""
        )
        .contains("not a PEM"));
        assert!(
            error("\"cloister.toml\" = \"[kbs]\\nurl = \\\"http://x\\\"\\nvsock_port = 2\"")
                .contains("kbs.vsock_port")
        );
        assert!(error("\"cloister.toml\" = \"[kbs]\\nvsock_port = 2000\"")
            .contains("without a kbs url"));
        assert!(error(
            "\"cloister.toml\" = \"[kbs]\\nurl = \\\"http://x\\\"\\n[resources]\\n\\\"../x\\\" = \\\"a/b/c\\\"\""
        )
        .contains("resources key"));
        assert!(error(
            "\"cloister.toml\" = \"[kbs]\\nurl = \\\"http://x\\\"\\n[resources]\\nk = \\\"a/../c\\\"\""
        )
        .contains("resources.k"));
        assert!(
            error("\"cloister.toml\" = \"[resources]\\nk = \\\"a/b/c\\\"\"").contains("no kbs url")
        );
        assert!(error("\"aa.toml\" = \"[token_configs.kbs]\\ncert = 1\"").contains("aa.toml"));
    }

    #[test]
    fn secret_names_and_resource_paths() {
        assert!(check_secret_name("db-password.txt"));
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(!check_secret_name(bad), "{bad:?}");
        }
        assert!(check_resource_path("default/key/db"));
        for bad in ["a/b", "a/b/c/d", "a//c", "a/../c", "/a/b"] {
            assert!(!check_resource_path(bad), "{bad:?}");
        }
    }
}
