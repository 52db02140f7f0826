//! JWE (RFC 7516) in the flattened JSON serialisation, as KBS resource
//! responses use it: content encrypted with A256GCM under a random CEK, the
//! CEK wrapped to the TEE key with RSA-OAEP-256 or ECDH-ES+A256KW (P-256,
//! Concat KDF per RFC 7518 4.6.2).
//!
//! The AAD is the ASCII of the `protected` member exactly as received, so a
//! response from any server decrypts regardless of how it ordered its header.

use super::protocol::{
    TeeKeyPair, TeePublicKey, ALG_ECDH_ES_A256KW, ALG_RSA_OAEP_256, ENC_A256GCM,
};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit as _, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use rand_core::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Errors from JWE handling.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JweError {
    /// JSON shape wrong.
    #[error("jwe member {0} is missing or not a base64url string")]
    Member(&'static str),
    /// Header unusable.
    #[error("jwe protected header: {0}")]
    Header(String),
    /// Algorithm not supported or not matching the key.
    #[error("jwe alg {alg:?} / enc {enc:?} is not supported with this key")]
    Algorithm {
        /// alg.
        alg: String,
        /// enc.
        enc: String,
    },
    /// Key unwrap failed.
    #[error("jwe content key cannot be unwrapped with this key")]
    Unwrap,
    /// Tag mismatch.
    #[error("jwe ciphertext or header fails authentication")]
    Decrypt,
    /// Encryption-side failure.
    #[error("jwe encryption failed: {0}")]
    Encrypt(String),
}

/// One round of the Concat KDF (enough for key lengths up to 256 bits).
fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], key_bits: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for part in [alg.as_bytes(), apu, apv] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.update(key_bits.to_be_bytes());
    h.finalize().into()
}

fn ec_jwk(public: &p256::PublicKey) -> Value {
    let point = public.to_encoded_point(false);
    json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(point.x().map(|x| x.as_slice()).unwrap_or(&[])),
        "y": URL_SAFE_NO_PAD.encode(point.y().map(|y| y.as_slice()).unwrap_or(&[])),
    })
}

/// Encrypts `plaintext` to `key`, returning the flattened JWE JSON.
pub fn encrypt(plaintext: &[u8], key: &TeePublicKey) -> Result<Value, JweError> {
    let mut cek = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut cek);
    let (header, encrypted_key) = match key {
        TeePublicKey::Rsa(public) => {
            let wrapped = public
                .encrypt(&mut rand_core::OsRng, rsa::Oaep::new::<Sha256>(), &cek)
                .map_err(|e| JweError::Encrypt(e.to_string()))?;
            (
                json!({"alg": ALG_RSA_OAEP_256, "enc": ENC_A256GCM}),
                wrapped,
            )
        }
        TeePublicKey::Ec(public) => {
            let ephemeral = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
            let shared = ephemeral.diffie_hellman(public);
            let kek = concat_kdf(shared.raw_secret_bytes(), ALG_ECDH_ES_A256KW, &[], &[], 256);
            let mut wrapped = vec![0u8; cek.len() + 8];
            aes_kw::KekAes256::from(kek)
                .wrap(&cek, &mut wrapped)
                .map_err(|e| JweError::Encrypt(e.to_string()))?;
            (
                json!({"alg": ALG_ECDH_ES_A256KW, "enc": ENC_A256GCM,
                       "epk": ec_jwk(&ephemeral.public_key())}),
                wrapped,
            )
        }
    };
    let protected = URL_SAFE_NO_PAD.encode(header.to_string());
    let mut iv = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut iv);
    let cipher = Aes256Gcm::new_from_slice(&cek).map_err(|e| JweError::Encrypt(e.to_string()))?;
    let mut sealed = cipher
        .encrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: protected.as_bytes(),
            },
        )
        .map_err(|e| JweError::Encrypt(e.to_string()))?;
    let tag = sealed.split_off(sealed.len() - 16);
    Ok(json!({
        "protected": protected,
        "encrypted_key": URL_SAFE_NO_PAD.encode(encrypted_key),
        "iv": URL_SAFE_NO_PAD.encode(iv),
        "ciphertext": URL_SAFE_NO_PAD.encode(sealed),
        "tag": URL_SAFE_NO_PAD.encode(tag),
    }))
}

fn member(jwe: &Value, name: &'static str) -> Result<Vec<u8>, JweError> {
    jwe.get(name)
        .and_then(Value::as_str)
        .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
        .ok_or(JweError::Member(name))
}

fn header_b64(header: &Value, name: &str) -> Result<Vec<u8>, JweError> {
    match header.get(name) {
        None => Ok(Vec::new()),
        Some(v) => v
            .as_str()
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .ok_or_else(|| JweError::Header(format!("{name} is not base64url"))),
    }
}

fn epk(header: &Value) -> Result<p256::PublicKey, JweError> {
    let epk = header
        .get("epk")
        .ok_or_else(|| JweError::Header("epk missing".into()))?;
    let coord = |name: &str| {
        epk.get(name)
            .and_then(Value::as_str)
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| JweError::Header(format!("epk.{name} is not a 32-byte coordinate")))
    };
    if epk.get("crv").and_then(Value::as_str) != Some("P-256") {
        return Err(JweError::Header("epk curve is not P-256".into()));
    }
    let (x, y) = (coord("x")?, coord("y")?);
    let point = p256::EncodedPoint::from_affine_coordinates(
        p256::FieldBytes::from_slice(&x),
        p256::FieldBytes::from_slice(&y),
        false,
    );
    Option::from(p256::PublicKey::from_encoded_point(&point))
        .ok_or_else(|| JweError::Header("epk is not on P-256".into()))
}

/// Decrypts a flattened JWE with the TEE's private key.
pub fn decrypt(jwe: &Value, key: &TeeKeyPair) -> Result<Vec<u8>, JweError> {
    let protected_b64 = jwe
        .get("protected")
        .and_then(Value::as_str)
        .ok_or(JweError::Member("protected"))?;
    let header: Value = URL_SAFE_NO_PAD
        .decode(protected_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| JweError::Header("not base64url json".into()))?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let enc = header.get("enc").and_then(Value::as_str).unwrap_or("");
    let encrypted_key = member(jwe, "encrypted_key")?;
    let cek = match (alg, enc, key) {
        (ALG_RSA_OAEP_256, ENC_A256GCM, TeeKeyPair::Rsa(private)) => private
            .decrypt(rsa::Oaep::new::<Sha256>(), &encrypted_key)
            .map_err(|_| JweError::Unwrap)?,
        (ALG_ECDH_ES_A256KW, ENC_A256GCM, TeeKeyPair::Ec(secret)) => {
            let shared =
                p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk(&header)?.as_affine());
            let kek = concat_kdf(
                shared.raw_secret_bytes(),
                ALG_ECDH_ES_A256KW,
                &header_b64(&header, "apu")?,
                &header_b64(&header, "apv")?,
                256,
            );
            if encrypted_key.len() != 40 {
                return Err(JweError::Unwrap);
            }
            let mut cek = vec![0u8; 32];
            aes_kw::KekAes256::from(kek)
                .unwrap(&encrypted_key, &mut cek)
                .map_err(|_| JweError::Unwrap)?;
            cek
        }
        _ => {
            return Err(JweError::Algorithm {
                alg: alg.into(),
                enc: enc.into(),
            })
        }
    };
    let iv = member(jwe, "iv")?;
    if iv.len() != 12 {
        return Err(JweError::Member("iv"));
    }
    let mut sealed = member(jwe, "ciphertext")?;
    sealed.extend_from_slice(&member(jwe, "tag")?);
    let cipher = Aes256Gcm::new_from_slice(&cek).map_err(|_| JweError::Unwrap)?;
    cipher
        .decrypt(
            Nonce::from_slice(&iv),
            Payload {
                msg: &sealed,
                aad: protected_b64.as_bytes(),
            },
        )
        .map_err(|_| JweError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(pair: &TeeKeyPair) {
        let public = TeePublicKey::from_jwk(&pair.public_jwk()).unwrap();
        let jwe = encrypt(b"disk key 0123", &public).unwrap();
        // The kbs-types wire struct must accept what we produce.
        let _: kbs_types::Response = serde_json::from_value(jwe.clone()).unwrap();
        assert_eq!(decrypt(&jwe, pair).unwrap(), b"disk key 0123");

        let mut tampered = jwe.clone();
        let mut ct = URL_SAFE_NO_PAD
            .decode(tampered["ciphertext"].as_str().unwrap())
            .unwrap();
        ct[0] ^= 1;
        tampered["ciphertext"] = URL_SAFE_NO_PAD.encode(ct).into();
        assert_eq!(decrypt(&tampered, pair).unwrap_err(), JweError::Decrypt);

        let other = match pair {
            TeeKeyPair::Ec(_) => TeeKeyPair::generate_ec(),
            TeeKeyPair::Rsa(_) => TeeKeyPair::generate_rsa().unwrap(),
        };
        assert_eq!(decrypt(&jwe, &other).unwrap_err(), JweError::Unwrap);
    }

    #[test]
    fn ecdh_es_a256kw_round_trip_and_tamper() {
        roundtrip(&TeeKeyPair::generate_ec());
    }

    #[test]
    fn rsa_oaep_256_round_trip_and_tamper() {
        roundtrip(&TeeKeyPair::generate_rsa().unwrap());
    }

    #[test]
    fn rfc7518_appendix_c_concat_kdf() {
        // RFC 7518 appendix C: ECDH-ES with A128GCM, apu "Alice", apv "Bob".
        let z = [
            158u8, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let out = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(URL_SAFE_NO_PAD.encode(&out[..16]), "VqqN6vgjbSBcIijNcacQGg");
    }

    #[test]
    fn wrong_algorithm_and_garbage_are_rejected() {
        let pair = TeeKeyPair::generate_ec();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"dir","enc":"A256GCM"}"#);
        let jwe = json!({"protected": header, "encrypted_key": "", "iv": "", "ciphertext": "", "tag": ""});
        assert!(matches!(
            decrypt(&jwe, &pair),
            Err(JweError::Algorithm { .. })
        ));
        assert!(matches!(
            decrypt(&json!({"protected": "!!"}), &pair),
            Err(JweError::Header(_))
        ));
        assert_eq!(
            decrypt(&json!({}), &pair).unwrap_err(),
            JweError::Member("protected")
        );
    }
}
