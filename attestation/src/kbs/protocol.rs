//! KBS attestation protocol 0.4.0 (Trustee's RCAR), the parts both sides
//! share: wire types (from `kbs-types`), the TEE key pair and its JWK, and the
//! REPORT_DATA binding.
//!
//! ```text
//! client                                   server
//!   POST /kbs/v0/auth    Request{version,tee}      ─>  Challenge{nonce}  + Set-Cookie kbs-session-id
//!   POST /kbs/v0/attest  Attestation{runtime-data{nonce,tee-pubkey},
//!                                    tee-evidence, init-data?}  ─>  {"token": JWT}
//!   GET  /kbs/v0/resource/<repo>/<type>/<tag>       ─>  flattened JWE to tee-pubkey
//! ```
//!
//! REPORT_DATA = SHA-384(JCS({"additional-evidence", "nonce", "tee-pubkey"}))
//! zero-padded to 64 bytes: the hardware signs the nonce (freshness) and the
//! key the secrets will be encrypted to.

use super::canonical_json::{canonicalize, CanonicalJsonError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
pub use kbs_types::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, InitData as WireInitData, Request,
    Response, RuntimeData, Tee, TeePubKey,
};
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use rsa::traits::PublicKeyParts;
use serde_json::json;
use sha2::{Digest, Sha384};
use thiserror::Error;

/// Protocol version spoken.
pub const PROTOCOL_VERSION: &str = "0.4.0";
/// Session cookie name.
pub const SESSION_COOKIE: &str = "kbs-session-id";
/// JWE key-wrap algorithm for EC keys.
pub const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// JWE key-wrap algorithm for RSA keys.
pub const ALG_RSA_OAEP_256: &str = "RSA-OAEP-256";
/// JWE content encryption.
pub const ENC_A256GCM: &str = "A256GCM";

/// Errors from protocol helpers.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Canonicalisation failed.
    #[error(transparent)]
    Canonical(#[from] CanonicalJsonError),
    /// JWK unusable.
    #[error("tee public key is not usable: {0}")]
    Jwk(String),
    /// RSA key generation failed.
    #[error("rsa key generation failed: {0}")]
    KeyGen(String),
}

/// The ephemeral key pair a TEE generates per attestation.
#[derive(Clone)]
pub enum TeeKeyPair {
    /// P-256, for ECDH-ES+A256KW.
    Ec(p256::SecretKey),
    /// RSA, for RSA-OAEP-256.
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl std::fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ec(_) => f.write_str("TeeKeyPair::Ec(..)"),
            Self::Rsa(_) => f.write_str("TeeKeyPair::Rsa(..)"),
        }
    }
}

impl TeeKeyPair {
    /// A fresh P-256 key.
    pub fn generate_ec() -> Self {
        Self::Ec(p256::SecretKey::random(&mut rand_core::OsRng))
    }

    /// A fresh RSA-2048 key.
    pub fn generate_rsa() -> Result<Self, ProtocolError> {
        rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
            .map(|k| Self::Rsa(Box::new(k)))
            .map_err(|e| ProtocolError::KeyGen(e.to_string()))
    }

    /// The public half as the JWK sent in `tee-pubkey`.
    pub fn public_jwk(&self) -> TeePubKey {
        match self {
            Self::Ec(secret) => {
                let point = secret.public_key().to_encoded_point(false);
                TeePubKey::EC {
                    crv: "P-256".into(),
                    alg: ALG_ECDH_ES_A256KW.into(),
                    x: URL_SAFE_NO_PAD.encode(point.x().map(|x| x.as_slice()).unwrap_or(&[])),
                    y: URL_SAFE_NO_PAD.encode(point.y().map(|y| y.as_slice()).unwrap_or(&[])),
                }
            }
            Self::Rsa(key) => TeePubKey::RSA {
                alg: ALG_RSA_OAEP_256.into(),
                k_mod: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                k_exp: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            },
        }
    }
}

/// A TEE public key decoded from its JWK.
#[derive(Debug, Clone)]
pub enum TeePublicKey {
    /// P-256.
    Ec(p256::PublicKey),
    /// RSA.
    Rsa(rsa::RsaPublicKey),
}

fn b64url(field: &str, value: &str) -> Result<Vec<u8>, ProtocolError> {
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| ProtocolError::Jwk(format!("{field} is not base64url: {e}")))
}

impl TeePublicKey {
    /// Decodes and checks a JWK: P-256 with ECDH-ES+A256KW, or RSA (>= 2048
    /// bits) with RSA-OAEP-256.
    pub fn from_jwk(jwk: &TeePubKey) -> Result<Self, ProtocolError> {
        match jwk {
            TeePubKey::EC { crv, alg, x, y } => {
                if crv != "P-256" {
                    return Err(ProtocolError::Jwk(format!("curve {crv:?} is not P-256")));
                }
                if alg != ALG_ECDH_ES_A256KW {
                    return Err(ProtocolError::Jwk(format!(
                        "alg {alg:?} is not {ALG_ECDH_ES_A256KW}"
                    )));
                }
                let (x, y) = (b64url("x", x)?, b64url("y", y)?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(ProtocolError::Jwk("x or y is not 32 bytes".into()));
                }
                let point = p256::EncodedPoint::from_affine_coordinates(
                    p256::FieldBytes::from_slice(&x),
                    p256::FieldBytes::from_slice(&y),
                    false,
                );
                Option::from(p256::PublicKey::from_encoded_point(&point))
                    .map(Self::Ec)
                    .ok_or_else(|| ProtocolError::Jwk("point is not on P-256".into()))
            }
            TeePubKey::RSA { alg, k_mod, k_exp } => {
                if alg != ALG_RSA_OAEP_256 {
                    return Err(ProtocolError::Jwk(format!(
                        "alg {alg:?} is not {ALG_RSA_OAEP_256}"
                    )));
                }
                let n = rsa::BigUint::from_bytes_be(&b64url("n", k_mod)?);
                let e = rsa::BigUint::from_bytes_be(&b64url("e", k_exp)?);
                let key = rsa::RsaPublicKey::new(n, e)
                    .map_err(|err| ProtocolError::Jwk(format!("rsa key: {err}")))?;
                if key.size() < 256 {
                    return Err(ProtocolError::Jwk(format!(
                        "rsa modulus of {} bits is below 2048",
                        key.size() * 8
                    )));
                }
                Ok(Self::Rsa(key))
            }
            TeePubKey::AKP { alg, .. } => Err(ProtocolError::Jwk(format!(
                "key type AKP ({alg}) is not supported"
            ))),
        }
    }
}

/// REPORT_DATA binding nonce, TEE key and additional evidence.
pub fn report_data(
    nonce: &str,
    tee_pubkey: &TeePubKey,
    additional_evidence: &str,
) -> Result<[u8; 64], ProtocolError> {
    let doc = json!({
        "additional-evidence": additional_evidence,
        "nonce": nonce,
        "tee-pubkey": tee_pubkey,
    });
    let canonical = canonicalize(&doc)?;
    let mut out = [0u8; 64];
    out[..48].copy_from_slice(&Sha384::digest(canonical.as_bytes()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_jwk_round_trips() {
        let pair = TeeKeyPair::generate_ec();
        let jwk = pair.public_jwk();
        let TeePublicKey::Ec(public) = TeePublicKey::from_jwk(&jwk).unwrap() else {
            panic!("not ec");
        };
        let TeeKeyPair::Ec(secret) = pair else {
            panic!("not ec");
        };
        assert_eq!(public, secret.public_key());
    }

    #[test]
    fn malformed_jwks_are_rejected_with_reason() {
        let bad_curve = TeePubKey::EC {
            crv: "P-384".into(),
            alg: ALG_ECDH_ES_A256KW.into(),
            x: "AA".into(),
            y: "AA".into(),
        };
        assert!(
            matches!(TeePublicKey::from_jwk(&bad_curve), Err(ProtocolError::Jwk(m)) if m.contains("P-384"))
        );
        let off_curve = TeePubKey::EC {
            crv: "P-256".into(),
            alg: ALG_ECDH_ES_A256KW.into(),
            x: URL_SAFE_NO_PAD.encode([1u8; 32]),
            y: URL_SAFE_NO_PAD.encode([1u8; 32]),
        };
        assert!(TeePublicKey::from_jwk(&off_curve).is_err());
        let not_b64 = TeePubKey::RSA {
            alg: ALG_RSA_OAEP_256.into(),
            k_mod: "***".into(),
            k_exp: "AQAB".into(),
        };
        assert!(TeePublicKey::from_jwk(&not_b64).is_err());
        let small = TeePubKey::RSA {
            alg: ALG_RSA_OAEP_256.into(),
            k_mod: URL_SAFE_NO_PAD.encode([0xC3u8; 64]),
            k_exp: "AQAB".into(),
        };
        assert!(TeePublicKey::from_jwk(&small).is_err());
    }

    #[test]
    fn report_data_is_sha384_of_canonical_json_padded() {
        let jwk = TeePubKey::EC {
            crv: "P-256".into(),
            alg: ALG_ECDH_ES_A256KW.into(),
            x: "X".into(),
            y: "Y".into(),
        };
        let rd = report_data("n0nce", &jwk, "").unwrap();
        let doc = r#"{"additional-evidence":"","nonce":"n0nce","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"X","y":"Y"}}"#;
        assert_eq!(&rd[..48], Sha384::digest(doc.as_bytes()).as_slice());
        assert_eq!(&rd[48..], &[0u8; 16]);
        assert_ne!(report_data("other", &jwk, "").unwrap(), rd);
    }
}
