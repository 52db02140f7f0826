//! The attestation token returned by `/kbs/v0/attest`: a JWT (ES256) signed
//! by the KBS's own key, carrying the claims and the TEE public key, so a
//! client may present it as `Authorization: Bearer` instead of the cookie.

use super::protocol::TeePubKey;
use super::verifier::Claims;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from token checks.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    #[error("token is not a well-formed jwt")]
    Malformed,
    /// Not ES256.
    #[error("token algorithm is not es256")]
    Algorithm,
    /// Signature invalid.
    #[error("token signature does not verify with this kbs's key")]
    Signature,
    /// Past `exp`.
    #[error("token expired at {0}")]
    Expired(u64),
}

/// Token body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer.
    pub iss: String,
    /// Issued at.
    pub iat: u64,
    /// Expiry.
    pub exp: u64,
    /// Verified claims.
    pub claims: ClaimsWire,
    /// The TEE key resources are encrypted to.
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: TeePubKey,
}

/// Claims as carried in the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimsWire {
    /// TEE.
    pub tee: String,
    /// Measurement hex.
    pub measurement: String,
    /// Init-data digest hex.
    pub init_data_digest: Option<String>,
}

impl From<&Claims> for ClaimsWire {
    fn from(c: &Claims) -> Self {
        Self {
            tee: c.tee.clone(),
            measurement: c.measurement.clone(),
            init_data_digest: c.init_data_digest.clone(),
        }
    }
}

/// Signs and checks tokens.
#[derive(Debug, Clone)]
pub struct TokenSigner {
    key: p256::ecdsa::SigningKey,
}

impl Default for TokenSigner {
    fn default() -> Self {
        Self {
            key: p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
        }
    }
}

impl TokenSigner {
    /// Issues a token.
    pub fn issue(&self, body: &TokenClaims) -> String {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(body).unwrap_or_default());
        let input = format!("{header}.{payload}");
        let signature: p256::ecdsa::Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    /// Checks a token's signature and expiry at `now` (unix seconds).
    pub fn check(&self, token: &str, now: u64) -> Result<TokenClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: serde_json::Value = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
            return Err(TokenError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|b| p256::ecdsa::Signature::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        self.key
            .verifying_key()
            .verify(format!("{h}.{p}").as_bytes(), &signature)
            .map_err(|_| TokenError::Signature)?;
        let body: TokenClaims = URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if now > body.exp {
            return Err(TokenError::Expired(body.exp));
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kbs::protocol::TeeKeyPair;

    fn body(exp: u64) -> TokenClaims {
        TokenClaims {
            iss: "cloister-kbs".into(),
            iat: 0,
            exp,
            claims: ClaimsWire {
                tee: "sample".into(),
                measurement: String::new(),
                init_data_digest: None,
            },
            tee_pubkey: TeeKeyPair::generate_ec().public_jwk(),
        }
    }

    #[test]
    fn issued_token_checks_and_tampering_fails() {
        let signer = TokenSigner::default();
        let token = signer.issue(&body(100));
        assert_eq!(signer.check(&token, 50).unwrap().claims.tee, "sample");
        assert_eq!(
            signer.check(&token, 101).unwrap_err(),
            TokenError::Expired(100)
        );
        let other = TokenSigner::default();
        assert_eq!(other.check(&token, 50).unwrap_err(), TokenError::Signature);
        let forged = format!(
            "{}.{}.{}",
            token.split('.').next().unwrap(),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body(10_000)).unwrap()),
            token.split('.').nth(2).unwrap()
        );
        assert_eq!(
            signer.check(&forged, 50).unwrap_err(),
            TokenError::Signature
        );
        assert_eq!(signer.check("a.b", 0).unwrap_err(), TokenError::Malformed);
    }
}
