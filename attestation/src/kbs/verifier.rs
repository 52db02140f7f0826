//! Server-side evidence verification: dispatches `tee-evidence` by TEE type,
//! checks it against the expected REPORT_DATA, the init-data binding and the
//! reference values, and returns the claims the resource policy sees.
//!
//! Evidence shapes (the `primary_evidence` member):
//! - `snp`: see [`crate::snp::evidence`];
//! - `tdx`: `{"quote": "<base64>", "cc_eventlog": "<base64>"?}`;
//! - `sample`: `{"svn": "1", "report_data": "<base64>", "init_data_digest": "<hex>"?}`,
//!   a software stand-in with no security, refused unless explicitly allowed.

use super::config::ReferenceValues;
use super::protocol::Tee;
use crate::initdata::InitData;
use crate::snp::{self, SnpEvidence, SnpExpectations};
use crate::tdx::{self, TdxExpectations};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::SystemTime;
use thiserror::Error;

/// Errors from evidence verification.
#[derive(Debug, Error)]
pub enum VerifierError {
    /// TEE not supported.
    #[error("tee type {0} is not supported by this kbs")]
    UnsupportedTee(String),
    /// Sample TEE without the insecure flag.
    #[error("sample tee refused: the kbs was not started with --insecure-allow-sample-tee")]
    SampleRefused,
    /// Evidence JSON malformed.
    #[error("{tee} evidence is malformed: {reason}")]
    Malformed {
        /// TEE.
        tee: &'static str,
        /// Why.
        reason: String,
    },
    /// SNP verification failed.
    #[error(transparent)]
    Snp(#[from] snp::SnpVerifyError),
    /// SNP evidence decoding failed.
    #[error(transparent)]
    SnpEvidence(#[from] snp::EvidenceError),
    /// TDX verification failed.
    #[error(transparent)]
    Tdx(#[from] tdx::TdxVerifyError),
    /// CCEL replay failed.
    #[error(transparent)]
    Ccel(#[from] tdx::ccel::CcelError),
    /// No reference values configured.
    #[error("no reference {0} configured: refusing to accept any value")]
    NoReference(&'static str),
    /// REPORT_DATA mismatch (sample).
    #[error("report_data {found} differs from expected {expected}")]
    ReportData {
        /// hex found.
        found: String,
        /// hex expected.
        expected: String,
    },
    /// Init-data required but absent.
    #[error("init-data is required by the reference values but none was presented")]
    InitDataMissing,
    /// Init-data digest not accepted.
    #[error("init-data digest {0} is not among the accepted digests")]
    InitDataDigest(String),
    /// Init-data digest not bound in the evidence (sample).
    #[error("init-data digest {presented} is not the one bound in the evidence ({bound})")]
    InitDataBinding {
        /// hex of the presented init-data's digest.
        presented: String,
        /// hex of what the evidence binds.
        bound: String,
    },
}

/// What verified evidence says about the guest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Claims {
    /// TEE type as on the wire.
    pub tee: String,
    /// Launch measurement (SNP MEASUREMENT, TDX MRTD; empty for sample).
    pub measurement: String,
    /// Digest of the init-data presented and bound, if any.
    pub init_data_digest: Option<String>,
    /// TCB status note.
    pub tcb: String,
}

#[derive(Deserialize)]
struct TdxEvidence {
    quote: String,
    #[serde(default)]
    cc_eventlog: Option<String>,
}

#[derive(Deserialize)]
struct SampleEvidence {
    #[allow(dead_code)] // carried for Trustee compatibility; not a security property
    svn: String,
    report_data: String,
    #[serde(default)]
    init_data_digest: Option<String>,
}

fn check_init_data_reference(
    init_data: Option<&InitData>,
    refs: &ReferenceValues,
) -> Result<Option<String>, VerifierError> {
    let Some(init) = init_data else {
        if refs.init_data.required {
            return Err(VerifierError::InitDataMissing);
        }
        return Ok(None);
    };
    let digest = init.digest();
    if !refs.init_data.digests.is_empty() && !refs.init_data.digests.contains(&digest) {
        return Err(VerifierError::InitDataDigest(hex::encode(&digest)));
    }
    Ok(Some(hex::encode(digest)))
}

fn b64(tee: &'static str, field: &str, value: &str) -> Result<Vec<u8>, VerifierError> {
    STANDARD
        .decode(value)
        .map_err(|e| VerifierError::Malformed {
            tee,
            reason: format!("{field} is not base64: {e}"),
        })
}

/// Verifies evidence for `tee`.
pub fn verify_evidence(
    tee: Tee,
    evidence: &Value,
    expected_report_data: &[u8; 64],
    init_data: Option<&InitData>,
    refs: &ReferenceValues,
    allow_sample: bool,
    now: SystemTime,
) -> Result<Claims, VerifierError> {
    let init_data_digest = check_init_data_reference(init_data, refs)?;
    match tee {
        Tee::Snp => {
            if refs.snp.measurements.is_empty() {
                return Err(VerifierError::NoReference("snp measurements"));
            }
            let ev = SnpEvidence::from_json(evidence)?;
            let expect = SnpExpectations {
                allow_debug: refs.snp.allow_debug,
                vmpl: 0,
                report_data: Some(*expected_report_data),
                host_data: init_data.map(InitData::snp_host_data),
                measurements: refs.snp.measurements.clone(),
                minimum_tcb: refs.snp.minimum_tcb,
            };
            let verified = snp::verify_report_builtin(&ev.report, &ev.endorsement, &expect, now)?;
            Ok(Claims {
                tee: "snp".into(),
                measurement: hex::encode(verified.report.measurement),
                init_data_digest,
                tcb: format!("{} {}", verified.generation, verified.reported_tcb),
            })
        }
        Tee::Tdx => {
            if refs.tdx.mr_td.is_empty() {
                return Err(VerifierError::NoReference("tdx mr_td values"));
            }
            let ev: TdxEvidence =
                serde_json::from_value(evidence.clone()).map_err(|e| VerifierError::Malformed {
                    tee: "tdx",
                    reason: e.to_string(),
                })?;
            let quote = b64("tdx", "quote", &ev.quote)?;
            let expect = TdxExpectations {
                allow_debug: refs.tdx.allow_debug,
                report_data: Some(*expected_report_data),
                mr_config_id: init_data.map(InitData::tdx_mr_config_id),
                mr_td: refs.tdx.mr_td.clone(),
            };
            let verified = tdx::verify_quote(&quote, &expect, now)?;
            if let Some(log) = ev.cc_eventlog {
                tdx::ccel::check_against(
                    &b64("tdx", "cc_eventlog", &log)?,
                    &verified.quote.td_report.rtmr,
                )?;
            }
            Ok(Claims {
                tee: "tdx".into(),
                measurement: hex::encode(verified.quote.td_report.mr_td),
                init_data_digest,
                tcb: "not checked (no pcs collateral)".into(),
            })
        }
        Tee::Sample => {
            if !allow_sample {
                return Err(VerifierError::SampleRefused);
            }
            let ev: SampleEvidence =
                serde_json::from_value(evidence.clone()).map_err(|e| VerifierError::Malformed {
                    tee: "sample",
                    reason: e.to_string(),
                })?;
            let found = b64("sample", "report_data", &ev.report_data)?;
            if found.as_slice() != expected_report_data.as_slice() {
                return Err(VerifierError::ReportData {
                    found: hex::encode(found),
                    expected: hex::encode(expected_report_data),
                });
            }
            if let Some(presented) = &init_data_digest {
                let bound = ev.init_data_digest.unwrap_or_default();
                if &bound != presented {
                    return Err(VerifierError::InitDataBinding {
                        presented: presented.clone(),
                        bound,
                    });
                }
            }
            Ok(Claims {
                tee: "sample".into(),
                measurement: String::new(),
                init_data_digest,
                tcb: "none (sample tee)".into(),
            })
        }
        other => Err(VerifierError::UnsupportedTee(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::AttestationReport;
    use crate::test_support::{fixed_now, testdata};

    fn snp_refs(measurement: [u8; 48]) -> ReferenceValues {
        let mut refs = ReferenceValues::default();
        refs.snp.measurements = vec![measurement];
        refs
    }

    #[test]
    fn recorded_snp_evidence_verifies_with_its_report_data() {
        let report = std::fs::read(testdata("snp/test-report.bin")).unwrap();
        let vcek = std::fs::read(testdata("snp/test-vcek.der")).unwrap();
        let parsed = AttestationReport::parse(&report).unwrap();
        let evidence = SnpEvidence {
            report,
            endorsement: crate::certs::Cert::from_der(&vcek).unwrap(),
        }
        .to_json()
        .unwrap();
        let claims = verify_evidence(
            Tee::Snp,
            &evidence,
            &parsed.report_data,
            None,
            &snp_refs(parsed.measurement),
            false,
            fixed_now(),
        )
        .unwrap();
        assert_eq!(claims.measurement, hex::encode(parsed.measurement));

        let err = verify_evidence(
            Tee::Snp,
            &evidence,
            &[0u8; 64],
            None,
            &snp_refs(parsed.measurement),
            false,
            fixed_now(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            VerifierError::Snp(snp::SnpVerifyError::ReportData { .. })
        ));
        let err = verify_evidence(
            Tee::Snp,
            &evidence,
            &parsed.report_data,
            None,
            &ReferenceValues::default(),
            false,
            fixed_now(),
        )
        .unwrap_err();
        assert!(matches!(err, VerifierError::NoReference(_)));
    }

    #[test]
    fn recorded_tdx_quote_verifies_and_foreign_ccel_is_refused() {
        let quote = std::fs::read(testdata("tdx/tdx_quote_5.dat")).unwrap();
        let parsed = crate::tdx::TdxQuote::parse(&quote).unwrap();
        let mut refs = ReferenceValues::default();
        refs.tdx.mr_td = vec![parsed.td_report.mr_td];
        refs.tdx.allow_debug = true;
        let evidence = serde_json::json!({"quote": STANDARD.encode(&quote)});
        verify_evidence(
            Tee::Tdx,
            &evidence,
            &parsed.td_report.report_data,
            None,
            &refs,
            false,
            fixed_now(),
        )
        .unwrap();
        let ccel = std::fs::read(testdata("tdx/CCEL_data")).unwrap();
        let with_log = serde_json::json!({"quote": STANDARD.encode(&quote), "cc_eventlog": STANDARD.encode(ccel)});
        assert!(matches!(
            verify_evidence(
                Tee::Tdx,
                &with_log,
                &parsed.td_report.report_data,
                None,
                &refs,
                false,
                fixed_now()
            ),
            Err(VerifierError::Ccel(_))
        ));
    }

    #[test]
    fn sample_is_refused_without_flag_and_checks_report_data() {
        let rd = [7u8; 64];
        let evidence = serde_json::json!({"svn": "1", "report_data": STANDARD.encode(rd)});
        let refs = ReferenceValues::default();
        assert!(matches!(
            verify_evidence(Tee::Sample, &evidence, &rd, None, &refs, false, fixed_now()),
            Err(VerifierError::SampleRefused)
        ));
        verify_evidence(Tee::Sample, &evidence, &rd, None, &refs, true, fixed_now()).unwrap();
        assert!(matches!(
            verify_evidence(
                Tee::Sample,
                &evidence,
                &[8u8; 64],
                None,
                &refs,
                true,
                fixed_now()
            ),
            Err(VerifierError::ReportData { .. })
        ));
        assert!(matches!(
            verify_evidence(
                Tee::Sample,
                &serde_json::json!({"svn": 1}),
                &rd,
                None,
                &refs,
                true,
                fixed_now()
            ),
            Err(VerifierError::Malformed { .. })
        ));
    }
}
