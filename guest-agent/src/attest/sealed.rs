//! Sealed secrets in Confidential Containers' format: a value
//! `sealed.<JWS header>.<JWS payload>.<signature>` (base64url parts) whose
//! payload is JSON
//!
//! ```json
//! {"version": "0.1.0", "type": "vault", "name": "kbs:///default/key/db",
//!  "provider": "kbs", "provider_settings": {}, "annotations": {}}
//! ```
//!
//! The value can travel through the untrusted control plane (a Kubernetes
//! Secret, an env var) because it is only a reference: the agent resolves
//! `name` through the attested KBS session and puts the plaintext in its
//! place before the process starts. Only `vault` secrets held by the `kbs`
//! provider are supported; `envelope` secrets (a wrapped key plus
//! ciphertext for an external KMS) are refused by name. As in CoCo, the JWS
//! signature is not verified: the KBS's resource policy decides what an
//! attested guest may fetch, whoever wrote the reference.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cloister_attestation::pod_config::check_resource_path;
use serde::Deserialize;
use thiserror::Error;

/// Prefix of a sealed secret.
pub const SEALED_PREFIX: &str = "sealed.";

/// Why a sealed secret is malformed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealedSecretError {
    #[error("sealed secret has {0} dot-separated parts, expected 4 (sealed.<header>.<payload>.<signature>)")]
    Parts(usize),
    #[error("sealed secret payload is not base64url: {0}")]
    Base64(String),
    #[error("sealed secret payload is not the expected json: {0}")]
    Json(String),
    #[error("sealed secret version {0:?} is not supported (0.1.0)")]
    Version(String),
    #[error("sealed secret type {0:?} is not supported (only vault)")]
    Type(String),
    #[error("sealed secret provider {0:?} is not supported (only kbs)")]
    Provider(String),
    #[error("sealed secret name {0:?} is not kbs:///<repo>/<type>/<tag>")]
    Name(String),
}

#[derive(Deserialize)]
struct Payload {
    version: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    provider: String,
}

/// A parsed vault-type sealed secret: the KBS resource holding the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    /// `<repo>/<type>/<tag>`.
    pub resource: String,
}

/// Whether `value` claims to be a sealed secret (and must then parse).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

/// Parses a sealed secret.
pub fn parse(value: &str) -> Result<SealedSecret, SealedSecretError> {
    let parts: Vec<&str> = value.trim_end().split('.').collect();
    if parts.len() != 4 || parts[0] != "sealed" {
        return Err(SealedSecretError::Parts(parts.len()));
    }
    let payload = URL_SAFE_NO_PAD
        .decode(parts[2].trim_end_matches('='))
        .map_err(|e| SealedSecretError::Base64(e.to_string()))?;
    let payload: Payload =
        serde_json::from_slice(&payload).map_err(|e| SealedSecretError::Json(e.to_string()))?;
    if payload.version != "0.1.0" {
        return Err(SealedSecretError::Version(payload.version));
    }
    if payload.kind != "vault" {
        return Err(SealedSecretError::Type(payload.kind));
    }
    if payload.provider != "kbs" {
        return Err(SealedSecretError::Provider(payload.provider));
    }
    let resource = payload
        .name
        .strip_prefix("kbs:///")
        .filter(|path| check_resource_path(path))
        .ok_or_else(|| SealedSecretError::Name(payload.name.clone()))?;
    Ok(SealedSecret {
        resource: resource.to_owned(),
    })
}

/// Builds a sealed secret for `resource` (tests, and users' tooling).
pub fn seal_reference(resource: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
    let payload = serde_json::json!({
        "version": "0.1.0",
        "type": "vault",
        "name": format!("kbs:///{resource}"),
        "provider": "kbs",
        "provider_settings": {},
        "annotations": {}
    });
    let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
    format!("{SEALED_PREFIX}{header}.{payload}.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_payload(json: &str) -> String {
        format!("sealed.e30.{}.c2ln", URL_SAFE_NO_PAD.encode(json))
    }

    #[test]
    fn vault_secret_names_its_kbs_resource() {
        let value = seal_reference("default/key/db");
        assert!(is_sealed(&value));
        assert_eq!(
            parse(&value).unwrap(),
            SealedSecret {
                resource: "default/key/db".into()
            }
        );
        // CoCo's own tool signs; padding and a signature are accepted.
        let signed = with_payload(
            r#"{"version":"0.1.0","type":"vault","name":"kbs:///a/b/c","provider":"kbs","provider_settings":{},"annotations":{}}"#,
        );
        assert_eq!(parse(&signed).unwrap().resource, "a/b/c");
        assert!(!is_sealed("plain value"));
    }

    #[test]
    fn malformed_secrets_are_named() {
        assert_eq!(
            parse("sealed.a.b").unwrap_err(),
            SealedSecretError::Parts(3)
        );
        assert!(matches!(
            parse("sealed.a.!!!.c").unwrap_err(),
            SealedSecretError::Base64(_)
        ));
        assert!(matches!(
            parse(&with_payload("[1]")).unwrap_err(),
            SealedSecretError::Json(_)
        ));
        let cases = [
            (
                r#"{"version":"0.2.0","type":"vault","name":"kbs:///a/b/c","provider":"kbs"}"#,
                SealedSecretError::Version("0.2.0".into()),
            ),
            (
                r#"{"version":"0.1.0","type":"envelope","provider":"aliyun"}"#,
                SealedSecretError::Type("envelope".into()),
            ),
            (
                r#"{"version":"0.1.0","type":"vault","name":"kbs:///a/b/c","provider":"vault"}"#,
                SealedSecretError::Provider("vault".into()),
            ),
            (
                r#"{"version":"0.1.0","type":"vault","name":"kbs:///a/../c","provider":"kbs"}"#,
                SealedSecretError::Name("kbs:///a/../c".into()),
            ),
            (
                r#"{"version":"0.1.0","type":"vault","name":"https://x/a/b/c","provider":"kbs"}"#,
                SealedSecretError::Name("https://x/a/b/c".into()),
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(parse(&with_payload(json)).unwrap_err(), expected, "{json}");
        }
    }
}
