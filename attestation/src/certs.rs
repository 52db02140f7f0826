//! X.509 certificates of the TEE vendors: parsing, raw to-be-signed bytes,
//! and the two signature schemes the chains use (AMD: RSA-PSS SHA-384 with
//! 48-byte salt; Intel: ECDSA P-256 SHA-256).
//!
//! Signatures are checked over the TBS bytes sliced out of the DER the vendor
//! issued, never over a re-encoding.

use der::Decode;
use p256::ecdsa::signature::Verifier as _;
use rsa::pkcs1::DecodeRsaPublicKey;
use sha2::{Digest, Sha384};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;
use x509_cert::Certificate;

/// OID of RSASSA-PSS.
const OID_RSASSA_PSS: &str = "1.2.840.113549.1.1.10";
/// OID of ecdsa-with-SHA256.
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// Errors from certificate handling.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CertError {
    /// Not DER X.509.
    #[error("certificate is not valid der x.509: {0}")]
    Der(String),
    /// No certificate in a PEM bundle or PEM that does not parse.
    #[error("pem bundle holds no parsable certificate: {0}")]
    Pem(String),
    /// Signature algorithm other than the one the chain must use.
    #[error("certificate {subject:?} is signed with {found}, expected {expected}")]
    Algorithm {
        /// Subject of the certificate.
        subject: String,
        /// OID found.
        found: String,
        /// OID expected.
        expected: &'static str,
    },
    /// The issuer's public key is not of the kind the scheme needs.
    #[error("issuer {0:?} has no usable public key for this signature scheme")]
    IssuerKey(String),
    /// The signature does not verify.
    #[error("signature on certificate {subject:?} does not verify with the key of {issuer:?}")]
    Signature {
        /// Subject of the certificate.
        subject: String,
        /// Subject of the issuer certificate.
        issuer: String,
    },
    /// Outside notBefore..notAfter.
    #[error("certificate {subject:?} is not valid at unix time {now}")]
    Expired {
        /// Subject of the certificate.
        subject: String,
        /// Checked time.
        now: u64,
    },
}

/// A parsed certificate with its original encoding.
#[derive(Debug, Clone)]
pub struct Cert {
    /// Parsed certificate.
    pub cert: Certificate,
    der: Vec<u8>,
    tbs_range: std::ops::Range<usize>,
}

/// Reads a DER header at `pos`: returns (header length, content length).
fn der_header(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let first_len = *b.get(pos + 1)?;
    if first_len < 0x80 {
        return Some((2, first_len as usize));
    }
    let n = (first_len & 0x7F) as usize;
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for i in 0..n {
        len = (len << 8) | *b.get(pos + 2 + i)? as usize;
    }
    Some((2 + n, len))
}

impl Cert {
    /// Parses one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let cert = Certificate::from_der(der).map_err(|e| CertError::Der(e.to_string()))?;
        // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, ... }: the TBS is
        // the first element, header included.
        let (outer_hdr, _) =
            der_header(der, 0).ok_or_else(|| CertError::Der("bad outer header".into()))?;
        let (tbs_hdr, tbs_len) =
            der_header(der, outer_hdr).ok_or_else(|| CertError::Der("bad tbs header".into()))?;
        let end = outer_hdr + tbs_hdr + tbs_len;
        if end > der.len() {
            return Err(CertError::Der("tbs runs past the end".into()));
        }
        Ok(Self {
            cert,
            der: der.to_vec(),
            tbs_range: outer_hdr..end,
        })
    }

    /// Parses every certificate of a PEM bundle, in order.
    pub fn from_pem_bundle(pem: &[u8]) -> Result<Vec<Self>, CertError> {
        let text = std::str::from_utf8(pem).map_err(|e| CertError::Pem(e.to_string()))?;
        let mut out = Vec::new();
        let begin = "-----BEGIN CERTIFICATE-----";
        let end = "-----END CERTIFICATE-----";
        let mut rest = text;
        while let Some(start) = rest.find(begin) {
            let after = &rest[start + begin.len()..];
            let stop = after
                .find(end)
                .ok_or_else(|| CertError::Pem("unterminated certificate".into()))?;
            let b64: String = after[..stop]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                .map_err(|e| CertError::Pem(e.to_string()))?;
            out.push(Self::from_der(&der)?);
            rest = &after[stop + end.len()..];
        }
        if out.is_empty() {
            return Err(CertError::Pem("no certificate found".into()));
        }
        Ok(out)
    }

    /// The certificate's DER encoding as received.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The to-be-signed bytes as received.
    pub fn tbs(&self) -> &[u8] {
        &self.der[self.tbs_range.clone()]
    }

    /// The subject as an RFC 4514 string.
    pub fn subject(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }

    /// The subject's common name, if any.
    pub fn common_name(&self) -> Option<String> {
        let subject = self.subject();
        subject
            .split(',')
            .find_map(|part| part.trim().strip_prefix("CN=").map(str::to_owned))
    }

    /// The raw subjectPublicKey bit string contents.
    pub fn public_key_bytes(&self) -> &[u8] {
        self.cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
    }

    /// The raw `extnValue` of the extension with the given dotted OID.
    pub fn extension(&self, oid: &str) -> Option<&[u8]> {
        self.cert
            .tbs_certificate
            .extensions
            .as_ref()?
            .iter()
            .find(|ext| ext.extn_id.to_string() == oid)
            .map(|ext| ext.extn_value.as_bytes())
    }

    /// Checks notBefore <= now <= notAfter.
    pub fn check_validity(&self, now: SystemTime) -> Result<(), CertError> {
        let validity = &self.cert.tbs_certificate.validity;
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let not_before = validity.not_before.to_unix_duration().as_secs();
        let not_after = validity.not_after.to_unix_duration().as_secs();
        if now_secs < not_before || now_secs > not_after {
            return Err(CertError::Expired {
                subject: self.subject(),
                now: now_secs,
            });
        }
        Ok(())
    }

    fn signature_algorithm(&self) -> String {
        self.cert.signature_algorithm.oid.to_string()
    }

    fn signature_error(&self, issuer: &Cert) -> CertError {
        CertError::Signature {
            subject: self.subject(),
            issuer: issuer.subject(),
        }
    }

    /// Verifies an RSASSA-PSS (SHA-384, MGF1 SHA-384, salt 48) signature by
    /// `issuer`, as AMD's ARK, ASK, ASVK, VCEK and VLEK certificates carry.
    pub fn verify_rsa_pss_sha384(&self, issuer: &Cert) -> Result<(), CertError> {
        if self.signature_algorithm() != OID_RSASSA_PSS {
            return Err(CertError::Algorithm {
                subject: self.subject(),
                found: self.signature_algorithm(),
                expected: OID_RSASSA_PSS,
            });
        }
        let key = rsa::RsaPublicKey::from_pkcs1_der(issuer.public_key_bytes())
            .map_err(|_| CertError::IssuerKey(issuer.subject()))?;
        let hashed = Sha384::digest(self.tbs());
        let signature = self
            .cert
            .signature
            .as_bytes()
            .ok_or_else(|| self.signature_error(issuer))?;
        key.verify(rsa::Pss::new::<Sha384>(), &hashed, signature)
            .map_err(|_| self.signature_error(issuer))
    }

    /// Verifies an ECDSA P-256 SHA-256 signature by `issuer`, as Intel's SGX
    /// PCK chain carries.
    pub fn verify_ecdsa_p256(&self, issuer: &Cert) -> Result<(), CertError> {
        if self.signature_algorithm() != OID_ECDSA_SHA256 {
            return Err(CertError::Algorithm {
                subject: self.subject(),
                found: self.signature_algorithm(),
                expected: OID_ECDSA_SHA256,
            });
        }
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(issuer.public_key_bytes())
            .map_err(|_| CertError::IssuerKey(issuer.subject()))?;
        let signature = self
            .cert
            .signature
            .as_bytes()
            .and_then(|der| p256::ecdsa::Signature::from_der(der).ok())
            .ok_or_else(|| self.signature_error(issuer))?;
        key.verify(self.tbs(), &signature)
            .map_err(|_| self.signature_error(issuer))
    }

    /// True when both certificates have the same DER encoding.
    pub fn same_as(&self, other: &Cert) -> bool {
        self.der == other.der
    }
}

/// Unwraps a DER value of the given tag from an extension value, or returns
/// the bytes unchanged when they are not wrapped (AMD has shipped both).
pub fn unwrap_der(bytes: &[u8], tag: u8) -> &[u8] {
    if bytes.first() == Some(&tag) {
        if let Some((hdr, len)) = der_header(bytes, 0) {
            if hdr + len == bytes.len() {
                return &bytes[hdr..];
            }
        }
    }
    bytes
}

/// Decodes a DER INTEGER extension value (the VCEK SPL extensions).
pub fn der_integer_u8(bytes: &[u8]) -> Option<u8> {
    let content = unwrap_der(bytes, 0x02);
    let trimmed: Vec<u8> = content.iter().copied().skip_while(|&b| b == 0).collect();
    match trimmed.as_slice() {
        [] => Some(0),
        [v] => Some(*v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::testdata;

    #[test]
    fn vcek_with_zero_serial_parses_and_tbs_matches_reencoding() {
        let der = std::fs::read(testdata("snp/test-vcek.der")).unwrap();
        let cert = Cert::from_der(&der).unwrap();
        assert_eq!(cert.common_name().as_deref(), Some("SEV-VCEK"));
        let reencoded = der::Encode::to_der(&cert.cert.tbs_certificate).unwrap();
        assert_eq!(cert.tbs(), reencoded.as_slice());
    }

    #[test]
    fn from_der_with_garbage_returns_der_error() {
        assert!(matches!(
            Cert::from_der(&[0x30, 0x03, 1, 2, 3]),
            Err(CertError::Der(_))
        ));
        assert!(matches!(Cert::from_der(&[]), Err(CertError::Der(_))));
    }

    #[test]
    fn pem_bundle_without_certificate_returns_pem_error() {
        assert!(matches!(
            Cert::from_pem_bundle(b"hello"),
            Err(CertError::Pem(_))
        ));
    }

    #[test]
    fn der_integer_reads_wrapped_and_raw() {
        assert_eq!(der_integer_u8(&[0x02, 0x01, 0x73]), Some(0x73));
        assert_eq!(der_integer_u8(&[0x02, 0x02, 0x00, 0xCE]), Some(0xCE));
        assert_eq!(der_integer_u8(&[0x02, 0x02, 0x01, 0xCE]), None);
    }
}
