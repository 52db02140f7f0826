//! Verification of a TDX quote without Intel PCS collateral:
//!
//! 1. the PCK chain in the quote ends in Intel's SGX Root CA (built in) and
//!    each link verifies (ECDSA P-256 SHA-256) and is valid now;
//! 2. the QE report is signed by the PCK key;
//! 3. the QE report binds the attestation key:
//!    `qe_report.report_data[..32] == SHA-256(attestation_key || qe_auth_data)`;
//! 4. the quote (header and body) is signed by the attestation key.
//!
//! TCB status (is this platform's TCB up to date?) needs Intel's TCB info and
//! QE identity collateral; without them it is reported as `NotChecked`.

use super::quote::{QuoteError, TdxQuote};
use crate::certs::{Cert, CertError};
use p256::ecdsa::signature::Verifier as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::SystemTime;
use thiserror::Error;

const INTEL_SGX_ROOT_CA_PEM: &[u8] = include_bytes!("../../certs/intel/sgx_root_ca.pem");

/// Errors from verifying a quote.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TdxVerifyError {
    /// Quote did not parse.
    #[error("tdx quote: {0}")]
    Quote(#[from] QuoteError),
    /// Certificate problem.
    #[error("tdx pck chain: {0}")]
    Cert(#[from] CertError),
    /// Chain of wrong length.
    #[error("tdx pck chain has {0} certificates, expected 3 (pck, intermediate, root)")]
    ChainLength(usize),
    /// Chain root is not Intel's.
    #[error("tdx pck chain ends in {0:?}, not the intel sgx root ca")]
    UntrustedRoot(String),
    /// QE report signature invalid.
    #[error("qe report signature does not verify with the pck key")]
    QeReportSignature,
    /// QE report does not bind the attestation key.
    #[error("qe report data {found} does not bind the attestation key (expected {expected})")]
    QeBinding {
        /// hex found.
        found: String,
        /// hex expected.
        expected: String,
    },
    /// Attestation key not a P-256 point.
    #[error("quote attestation key is not a valid p-256 point")]
    AttestationKey,
    /// Quote signature invalid.
    #[error("tdx quote signature does not verify with the attestation key")]
    QuoteSignature,
    /// Debug TD refused.
    #[error("td attributes {0:#x} mark a debuggable td")]
    Debug(u64),
    /// report_data differs.
    #[error("tdx report_data {found} differs from expected {expected}")]
    ReportData {
        /// hex found.
        found: String,
        /// hex expected.
        expected: String,
    },
    /// mr_config_id differs.
    #[error("tdx mr_config_id {found} differs from expected {expected}")]
    MrConfigId {
        /// hex found.
        found: String,
        /// hex expected.
        expected: String,
    },
    /// MRTD not accepted.
    #[error("tdx mr_td {0} is not among the reference values")]
    MrTd(String),
}

/// TCB status of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcbStatus {
    /// No PCS collateral given: signature and chain verified, TCB level not.
    NotChecked,
}

/// What the relying party demands besides valid signatures.
#[derive(Debug, Clone, Default)]
pub struct TdxExpectations {
    /// Accept debuggable TDs.
    pub allow_debug: bool,
    /// Exact report_data.
    pub report_data: Option<[u8; 64]>,
    /// Exact mr_config_id.
    pub mr_config_id: Option<[u8; 48]>,
    /// Accepted MRTDs; empty accepts any.
    pub mr_td: Vec<[u8; 48]>,
}

/// A quote that passed verification.
#[derive(Debug, Clone)]
pub struct VerifiedTdxQuote {
    /// The quote.
    pub quote: TdxQuote,
    /// TCB status.
    pub tcb_status: TcbStatus,
}

/// Intel's SGX Root CA (also the root of TDX PCK chains).
pub fn intel_sgx_root() -> Result<Cert, CertError> {
    Cert::from_pem_bundle(INTEL_SGX_ROOT_CA_PEM)?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::Pem("built-in intel root missing".into()))
}

fn verify_pck_chain(quote: &TdxQuote, now: SystemTime) -> Result<Cert, TdxVerifyError> {
    let chain = Cert::from_pem_bundle(&quote.pck_chain_pem)?;
    let [pck, intermediate, root] = chain.as_slice() else {
        return Err(TdxVerifyError::ChainLength(chain.len()));
    };
    let trusted = intel_sgx_root()?;
    if !root.same_as(&trusted) {
        return Err(TdxVerifyError::UntrustedRoot(root.subject()));
    }
    trusted.verify_ecdsa_p256(&trusted)?;
    intermediate.verify_ecdsa_p256(&trusted)?;
    pck.verify_ecdsa_p256(intermediate)?;
    for cert in [&trusted, intermediate, pck] {
        cert.check_validity(now)?;
    }
    Ok(pck.clone())
}

fn p256_signature(raw: &[u8; 64]) -> Option<p256::ecdsa::Signature> {
    p256::ecdsa::Signature::from_slice(raw).ok()
}

/// Checks the signatures and chain of a parsed quote.
pub fn verify_quote_signatures(quote: &TdxQuote, now: SystemTime) -> Result<(), TdxVerifyError> {
    let pck = verify_pck_chain(quote, now)?;
    let pck_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(pck.public_key_bytes())
        .map_err(|_| CertError::IssuerKey(pck.subject()))?;
    let qe_sig =
        p256_signature(&quote.qe_report_signature).ok_or(TdxVerifyError::QeReportSignature)?;
    pck_key
        .verify(&quote.qe_report, &qe_sig)
        .map_err(|_| TdxVerifyError::QeReportSignature)?;

    let mut hasher = Sha256::new();
    hasher.update(quote.attestation_key);
    hasher.update(&quote.qe_auth_data);
    let mut expected = [0u8; 64];
    expected[..32].copy_from_slice(&hasher.finalize());
    if quote.qe_report_data() != expected {
        return Err(TdxVerifyError::QeBinding {
            found: hex::encode(quote.qe_report_data()),
            expected: hex::encode(expected),
        });
    }

    let mut sec1 = [0u8; 65];
    sec1[0] = 0x04;
    sec1[1..].copy_from_slice(&quote.attestation_key);
    let att_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| TdxVerifyError::AttestationKey)?;
    let sig = p256_signature(&quote.signature).ok_or(TdxVerifyError::QuoteSignature)?;
    att_key
        .verify(&quote.signed, &sig)
        .map_err(|_| TdxVerifyError::QuoteSignature)
}

/// Checks the TD report against the caller's expectations.
pub fn check_expectations(
    quote: &TdxQuote,
    expect: &TdxExpectations,
) -> Result<(), TdxVerifyError> {
    let td = &quote.td_report;
    if td.debug() && !expect.allow_debug {
        return Err(TdxVerifyError::Debug(td.td_attributes));
    }
    if let Some(expected) = &expect.report_data {
        if expected != &td.report_data {
            return Err(TdxVerifyError::ReportData {
                found: hex::encode(td.report_data),
                expected: hex::encode(expected),
            });
        }
    }
    if let Some(expected) = &expect.mr_config_id {
        if expected != &td.mr_config_id {
            return Err(TdxVerifyError::MrConfigId {
                found: hex::encode(td.mr_config_id),
                expected: hex::encode(expected),
            });
        }
    }
    if !expect.mr_td.is_empty() && !expect.mr_td.contains(&td.mr_td) {
        return Err(TdxVerifyError::MrTd(hex::encode(td.mr_td)));
    }
    Ok(())
}

/// Parses and verifies a quote.
pub fn verify_quote(
    bytes: &[u8],
    expect: &TdxExpectations,
    now: SystemTime,
) -> Result<VerifiedTdxQuote, TdxVerifyError> {
    let quote = TdxQuote::parse(bytes)?;
    verify_quote_signatures(&quote, now)?;
    check_expectations(&quote, expect)?;
    Ok(VerifiedTdxQuote {
        quote,
        tcb_status: TcbStatus::NotChecked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fixed_now, testdata};

    fn quote(v: u8) -> Vec<u8> {
        std::fs::read(testdata(&format!("tdx/tdx_quote_{v}.dat"))).unwrap()
    }

    #[test]
    fn builtin_root_has_intels_fingerprint() {
        let root = intel_sgx_root().unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(root.der())),
            "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
        );
    }

    #[test]
    fn recorded_v4_and_v5_quotes_verify_with_tcb_not_checked() {
        // The recorded v4 quote comes from a debug TD (td_attributes bit 0).
        let allow_debug = TdxExpectations {
            allow_debug: true,
            ..Default::default()
        };
        for v in [4, 5] {
            let verified = verify_quote(&quote(v), &allow_debug, fixed_now())
                .unwrap_or_else(|e| panic!("v{v}: {e}"));
            assert_eq!(verified.tcb_status, TcbStatus::NotChecked);
            let strict = verify_quote(&quote(v), &TdxExpectations::default(), fixed_now());
            if verified.quote.td_report.debug() {
                assert!(matches!(strict, Err(TdxVerifyError::Debug(_))), "v{v}");
            } else {
                strict.unwrap();
            }
        }
    }

    fn lenient() -> TdxExpectations {
        TdxExpectations {
            allow_debug: true,
            ..Default::default()
        }
    }

    #[test]
    fn flipping_any_byte_of_header_or_body_fails() {
        for v in [4u8, 5] {
            let original = quote(v);
            let signed_len = TdxQuote::parse(&original).unwrap().signed.len();
            for offset in 0..signed_len {
                let mut bytes = original.clone();
                bytes[offset] ^= 0x01;
                let err = verify_quote(&bytes, &lenient(), fixed_now())
                    .expect_err(&format!("v{v} flip at {offset} verified"));
                assert!(
                    matches!(
                        err,
                        TdxVerifyError::QuoteSignature | TdxVerifyError::Quote(_)
                    ),
                    "v{v} flip at {offset}: {err}"
                );
            }
        }
    }

    #[test]
    fn tampered_qe_report_and_auth_data_fail() {
        let original = quote(4);
        let parsed = TdxQuote::parse(&original).unwrap();
        // Offsets: signed part, u32 length, 64 sig, 64 key, u16+u32 cert header.
        let qe_report_at = parsed.signed.len() + 4 + 128 + 6;
        let mut bytes = original.clone();
        bytes[qe_report_at + 10] ^= 1;
        assert_eq!(
            verify_quote(&bytes, &lenient(), fixed_now()).unwrap_err(),
            TdxVerifyError::QeReportSignature
        );
        let auth_at = qe_report_at + 384 + 64 + 2;
        let mut bytes = original.clone();
        bytes[auth_at] ^= 1;
        assert!(matches!(
            verify_quote(&bytes, &lenient(), fixed_now()).unwrap_err(),
            TdxVerifyError::QeBinding { .. }
        ));
        let key_at = parsed.signed.len() + 4 + 64;
        let mut bytes = original.clone();
        bytes[key_at + 3] ^= 1;
        assert!(verify_quote(&bytes, &lenient(), fixed_now()).is_err());
    }

    #[test]
    fn chain_with_foreign_root_is_untrusted() {
        let mut parsed = TdxQuote::parse(&quote(4)).unwrap();
        let chain = Cert::from_pem_bundle(&parsed.pck_chain_pem).unwrap();
        // Replace the root by the intermediate: same length, wrong anchor.
        let b64 = |c: &Cert| {
            use base64::Engine as _;
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                base64::engine::general_purpose::STANDARD.encode(c.der())
            )
        };
        parsed.pck_chain_pem =
            format!("{}{}{}", b64(&chain[0]), b64(&chain[1]), b64(&chain[1])).into_bytes();
        assert!(matches!(
            verify_quote_signatures(&parsed, fixed_now()),
            Err(TdxVerifyError::UntrustedRoot(_))
        ));
        parsed.pck_chain_pem = b64(&chain[0]).into_bytes();
        assert_eq!(
            verify_quote_signatures(&parsed, fixed_now()).unwrap_err(),
            TdxVerifyError::ChainLength(1)
        );
    }

    #[test]
    fn expectations_are_enforced() {
        let parsed = TdxQuote::parse(&quote(4)).unwrap();
        let td = &parsed.td_report;
        let ok = TdxExpectations {
            allow_debug: true,
            report_data: Some(td.report_data),
            mr_config_id: Some(td.mr_config_id),
            mr_td: vec![td.mr_td],
        };
        check_expectations(&parsed, &ok).unwrap();
        assert!(matches!(
            check_expectations(
                &parsed,
                &TdxExpectations {
                    report_data: Some([7u8; 64]),
                    ..ok.clone()
                }
            ),
            Err(TdxVerifyError::ReportData { .. })
        ));
        assert!(matches!(
            check_expectations(
                &parsed,
                &TdxExpectations {
                    mr_config_id: Some([7u8; 48]),
                    ..ok.clone()
                }
            ),
            Err(TdxVerifyError::MrConfigId { .. })
        ));
        assert!(matches!(
            check_expectations(
                &parsed,
                &TdxExpectations {
                    mr_td: vec![[0u8; 48]],
                    ..ok.clone()
                }
            ),
            Err(TdxVerifyError::MrTd(_))
        ));
        let mut debug = parsed.clone();
        debug.td_report.td_attributes |= 1;
        assert!(matches!(
            check_expectations(&debug, &TdxExpectations::default()),
            Err(TdxVerifyError::Debug(_))
        ));
    }
}
