//! Verification of an SEV-SNP report: endorsement chain, report signature
//! over the raw signed bytes, VCEK/VLEK TCB extensions against
//! `reported_tcb`, VCEK hwID against `chip_id`, then the guest's policy and
//! the caller's expectations.

use super::chain::{AmdRoots, ChainError};
use super::report::{AttestationReport, ReportError, SigningKey};
use super::tcb::{Generation, TcbVersion};
use crate::certs::{der_integer_u8, unwrap_der, Cert};
use p384::ecdsa::signature::Verifier as _;
use std::time::SystemTime;
use thiserror::Error;

const OID_PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HW_ID: &str = "1.3.6.1.4.1.3704.1.4";

/// Errors from verifying an SNP report.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnpVerifyError {
    /// Report did not parse.
    #[error("snp report: {0}")]
    Report(#[from] ReportError),
    /// Chain did not verify.
    #[error("snp endorsement chain: {0}")]
    Chain(#[from] ChainError),
    /// Generation neither in the report, nor in the VCEK, nor given.
    #[error("cannot tell the processor generation: report v{0} has no cpuid and the certificate no product name")]
    UnknownGeneration(u32),
    /// Roots of another generation than the report's.
    #[error("report is from a {report} processor but the roots given are {roots}'s")]
    GenerationMismatch {
        /// From the report or VCEK.
        report: Generation,
        /// Of the roots.
        roots: Generation,
    },
    /// Endorsement key not an ECDSA P-384 key.
    #[error("endorsement key certificate does not hold a p-384 public key")]
    EndorsementKey,
    /// ECDSA signature invalid.
    #[error("snp report signature does not verify with the endorsement key")]
    Signature,
    /// A TCB extension is missing.
    #[error("endorsement certificate lacks extension {0}")]
    MissingExtension(&'static str),
    /// A TCB extension disagrees with the reported TCB.
    #[error("endorsement certificate {field} spl is {cert}, report's reported_tcb says {report}")]
    TcbMismatch {
        /// Component.
        field: &'static str,
        /// Value in the certificate.
        cert: u8,
        /// Value in the report.
        report: u8,
    },
    /// hwID differs from chip_id.
    #[error("vcek hwid {cert} differs from report chip_id {report}")]
    HwId {
        /// hex of the certificate's hwID.
        cert: String,
        /// hex of the report's chip_id prefix.
        report: String,
    },
    /// VMPL other than the one expected.
    #[error("report requested at vmpl {found}, expected {expected}")]
    Vmpl {
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
    /// Debug policy bit set while not allowed.
    #[error("guest policy {0:#x} allows debugging")]
    Debug(u64),
    /// report_data differs.
    #[error("report_data {found} differs from expected {expected}")]
    ReportData {
        /// hex found.
        found: String,
        /// hex expected.
        expected: String,
    },
    /// host_data differs.
    #[error("host_data {found} differs from expected {expected}")]
    HostData {
        /// hex found.
        found: String,
        /// hex expected.
        expected: String,
    },
    /// measurement not among the accepted values.
    #[error("measurement {0} is not among the reference values")]
    Measurement(String),
    /// TCB below minimum.
    #[error("reported tcb ({found}) is below the minimum ({minimum})")]
    Tcb {
        /// Found.
        found: TcbVersion,
        /// Minimum.
        minimum: TcbVersion,
    },
}

/// What the relying party demands of a report besides a valid signature.
#[derive(Debug, Clone, Default)]
pub struct SnpExpectations {
    /// Accept reports whose policy allows debugging.
    pub allow_debug: bool,
    /// Required VMPL (0 for the guest kernel / agent).
    pub vmpl: u32,
    /// Exact report_data.
    pub report_data: Option<[u8; 64]>,
    /// Exact host_data.
    pub host_data: Option<[u8; 32]>,
    /// Accepted measurements; empty accepts any.
    pub measurements: Vec<[u8; 48]>,
    /// Minimum reported TCB.
    pub minimum_tcb: Option<TcbVersion>,
}

/// A report that passed verification.
#[derive(Debug, Clone)]
pub struct VerifiedSnpReport {
    /// The report.
    pub report: AttestationReport,
    /// The generation used.
    pub generation: Generation,
    /// The reported TCB in that generation's layout.
    pub reported_tcb: TcbVersion,
}

/// Works out the generation from the report (v3+ CPUID) or the VCEK's
/// product name; a v2 report with a VLEK needs `hint`.
pub fn detect_generation(
    report: &AttestationReport,
    endorsement: &Cert,
    hint: Option<Generation>,
) -> Result<Generation, SnpVerifyError> {
    if let Some(g) = report.generation_from_cpuid() {
        return Ok(g);
    }
    let from_cert = endorsement
        .extension(OID_PRODUCT_NAME)
        .and_then(|raw| {
            // IA5String (tag 0x16) in current certificates.
            let inner = unwrap_der(raw, 0x16);
            std::str::from_utf8(inner).ok()
        })
        .and_then(Generation::from_product_name);
    from_cert
        .or(hint)
        .ok_or(SnpVerifyError::UnknownGeneration(report.version))
}

fn check_report_signature(
    report: &AttestationReport,
    endorsement: &Cert,
) -> Result<(), SnpVerifyError> {
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(endorsement.public_key_bytes())
        .map_err(|_| SnpVerifyError::EndorsementKey)?;
    let signature = p384::ecdsa::Signature::from_scalars(report.signature_r, report.signature_s)
        .map_err(|_| SnpVerifyError::Signature)?;
    key.verify(report.signed_bytes(), &signature)
        .map_err(|_| SnpVerifyError::Signature)
}

fn check_tcb_extensions(endorsement: &Cert, reported: &TcbVersion) -> Result<(), SnpVerifyError> {
    let mut fields: Vec<(&'static str, &'static str, u8)> = vec![
        ("bootloader", OID_BL_SPL, reported.bootloader),
        ("tee", OID_TEE_SPL, reported.tee),
        ("snp", OID_SNP_SPL, reported.snp),
        ("microcode", OID_UCODE_SPL, reported.microcode),
    ];
    if let Some(fmc) = reported.fmc {
        fields.push(("fmc", OID_FMC_SPL, fmc));
    }
    for (field, oid, report_value) in fields {
        let raw = endorsement
            .extension(oid)
            .ok_or(SnpVerifyError::MissingExtension(oid))?;
        let cert_value = der_integer_u8(raw).ok_or(SnpVerifyError::MissingExtension(oid))?;
        if cert_value != report_value {
            return Err(SnpVerifyError::TcbMismatch {
                field,
                cert: cert_value,
                report: report_value,
            });
        }
    }
    Ok(())
}

fn check_hw_id(
    endorsement: &Cert,
    report: &AttestationReport,
    generation: Generation,
) -> Result<(), SnpVerifyError> {
    let raw = endorsement
        .extension(OID_HW_ID)
        .ok_or(SnpVerifyError::MissingExtension(OID_HW_ID))?;
    let hw_id = unwrap_der(raw, 0x04);
    let chip = &report.chip_id[..generation.chip_id_len()];
    if hw_id != chip {
        return Err(SnpVerifyError::HwId {
            cert: hex::encode(hw_id),
            report: hex::encode(chip),
        });
    }
    Ok(())
}

/// Checks everything about a report that does not need the signature:
/// VMPL, debug policy, report_data, host_data, measurement, minimum TCB.
pub fn check_expectations(
    report: &AttestationReport,
    reported_tcb: &TcbVersion,
    expect: &SnpExpectations,
) -> Result<(), SnpVerifyError> {
    if report.vmpl != expect.vmpl {
        return Err(SnpVerifyError::Vmpl {
            found: report.vmpl,
            expected: expect.vmpl,
        });
    }
    if report.policy.debug_allowed() && !expect.allow_debug {
        return Err(SnpVerifyError::Debug(report.policy.0));
    }
    if let Some(expected) = &expect.report_data {
        if expected != &report.report_data {
            return Err(SnpVerifyError::ReportData {
                found: hex::encode(report.report_data),
                expected: hex::encode(expected),
            });
        }
    }
    if let Some(expected) = &expect.host_data {
        if expected != &report.host_data {
            return Err(SnpVerifyError::HostData {
                found: hex::encode(report.host_data),
                expected: hex::encode(expected),
            });
        }
    }
    if !expect.measurements.is_empty() && !expect.measurements.contains(&report.measurement) {
        return Err(SnpVerifyError::Measurement(hex::encode(report.measurement)));
    }
    if let Some(minimum) = &expect.minimum_tcb {
        if !reported_tcb.meets(minimum) {
            return Err(SnpVerifyError::Tcb {
                found: *reported_tcb,
                minimum: *minimum,
            });
        }
    }
    Ok(())
}

/// Verifies a report end to end against `roots`.
pub fn verify_report(
    report_bytes: &[u8],
    endorsement: &Cert,
    roots: &AmdRoots,
    expect: &SnpExpectations,
    now: SystemTime,
) -> Result<VerifiedSnpReport, SnpVerifyError> {
    let report = AttestationReport::parse(report_bytes)?;
    let generation = detect_generation(&report, endorsement, Some(roots.generation))?;
    if generation != roots.generation {
        return Err(SnpVerifyError::GenerationMismatch {
            report: generation,
            roots: roots.generation,
        });
    }
    roots.verify_endorsement(endorsement, report.signing_key, now)?;
    check_report_signature(&report, endorsement)?;
    let reported_tcb = report.reported_tcb(generation);
    check_tcb_extensions(endorsement, &reported_tcb)?;
    if report.signing_key == SigningKey::Vcek {
        check_hw_id(endorsement, &report, generation)?;
    }
    check_expectations(&report, &reported_tcb, expect)?;
    Ok(VerifiedSnpReport {
        report,
        generation,
        reported_tcb,
    })
}

/// Verifies with the built-in roots of the generation the report names.
pub fn verify_report_builtin(
    report_bytes: &[u8],
    endorsement: &Cert,
    expect: &SnpExpectations,
    now: SystemTime,
) -> Result<VerifiedSnpReport, SnpVerifyError> {
    let report = AttestationReport::parse(report_bytes)?;
    let generation = detect_generation(&report, endorsement, None)?;
    let roots = AmdRoots::builtin(generation)?;
    verify_report(report_bytes, endorsement, &roots, expect, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::CertError;
    use crate::snp::report::SIGNED_LEN;
    use crate::test_support::{fixed_now, testdata};

    fn report_bytes() -> Vec<u8> {
        std::fs::read(testdata("snp/test-report.bin")).unwrap()
    }

    fn cert(name: &str) -> Cert {
        Cert::from_der(&std::fs::read(testdata(name)).unwrap()).unwrap()
    }

    fn milan() -> AmdRoots {
        AmdRoots::builtin(Generation::Milan).unwrap()
    }

    #[test]
    fn recorded_report_verifies_with_recorded_vcek() {
        let vcek = cert("snp/test-vcek.der");
        let verified = verify_report(
            &report_bytes(),
            &vcek,
            &milan(),
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap();
        assert_eq!(verified.generation, Generation::Milan);
        assert_eq!(verified.reported_tcb.microcode, 0x73);
        let auto = verify_report_builtin(
            &report_bytes(),
            &vcek,
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap();
        assert_eq!(auto.generation, Generation::Milan);
    }

    #[test]
    fn flipping_any_byte_of_the_signed_area_fails() {
        // Every byte of 0x000-0x29F, one at a time: each flip must be rejected
        // (by the parser when it hits a checked field, else by the signature).
        let vcek = cert("snp/test-vcek.der");
        let roots = milan();
        let original = report_bytes();
        for offset in 0..SIGNED_LEN {
            let mut bytes = original.clone();
            bytes[offset] ^= 0x01;
            let err = verify_report(
                &bytes,
                &vcek,
                &roots,
                &SnpExpectations::default(),
                fixed_now(),
            )
            .expect_err(&format!("flip at {offset:#x} verified"));
            assert!(
                matches!(
                    err,
                    SnpVerifyError::Signature
                        | SnpVerifyError::Report(_)
                        | SnpVerifyError::GenerationMismatch { .. }
                        | SnpVerifyError::UnknownGeneration(_)
                        | SnpVerifyError::Chain(ChainError::EndorsementKind { .. })
                ),
                "flip at {offset:#x}: {err}"
            );
        }
    }

    #[test]
    fn flipping_a_measurement_byte_returns_signature_error() {
        let mut bytes = report_bytes();
        bytes[0x90] ^= 0x80;
        let err = verify_report(
            &bytes,
            &cert("snp/test-vcek.der"),
            &milan(),
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap_err();
        assert_eq!(err, SnpVerifyError::Signature);
    }

    #[test]
    fn flipping_the_signature_returns_signature_error() {
        let mut bytes = report_bytes();
        bytes[0x2A0] ^= 0x01;
        let err = verify_report(
            &bytes,
            &cert("snp/test-vcek.der"),
            &milan(),
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap_err();
        assert_eq!(err, SnpVerifyError::Signature);
    }

    #[test]
    fn invalid_vceks_are_rejected() {
        for name in [
            "snp/test-vcek-invalid-legacy.der",
            "snp/test-vcek-invalid-new.der",
        ] {
            let err = verify_report(
                &report_bytes(),
                &cert(name),
                &milan(),
                &SnpExpectations::default(),
                fixed_now(),
            )
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    SnpVerifyError::Signature
                        | SnpVerifyError::Chain(ChainError::Cert(CertError::Signature { .. }))
                        | SnpVerifyError::EndorsementKey
                ),
                "{name}: {err}"
            );
            // Independently of the chain, the invalid VCEKs' keys must not
            // verify the report's signature either.
            let report = AttestationReport::parse(&report_bytes()).unwrap();
            assert!(
                check_report_signature(&report, &cert(name)).is_err(),
                "{name}"
            );
        }
    }

    #[test]
    fn wrong_generation_roots_return_generation_mismatch() {
        for generation in [Generation::Genoa, Generation::Turin] {
            let err = verify_report(
                &report_bytes(),
                &cert("snp/test-vcek.der"),
                &AmdRoots::builtin(generation).unwrap(),
                &SnpExpectations::default(),
                fixed_now(),
            )
            .unwrap_err();
            assert_eq!(
                err,
                SnpVerifyError::GenerationMismatch {
                    report: Generation::Milan,
                    roots: generation
                }
            );
        }
    }

    #[test]
    fn expectations_are_enforced() {
        let vcek = cert("snp/test-vcek.der");
        let verify = |expect: SnpExpectations| {
            verify_report(&report_bytes(), &vcek, &milan(), &expect, fixed_now())
        };
        let report = AttestationReport::parse(&report_bytes()).unwrap();

        let ok = SnpExpectations {
            report_data: Some(report.report_data),
            host_data: Some(report.host_data),
            measurements: vec![[0u8; 48], report.measurement],
            minimum_tcb: Some(report.reported_tcb(Generation::Milan)),
            ..Default::default()
        };
        verify(ok.clone()).unwrap();

        let mut wrong = report.report_data;
        wrong[0] ^= 1;
        assert!(matches!(
            verify(SnpExpectations {
                report_data: Some(wrong),
                ..ok.clone()
            }),
            Err(SnpVerifyError::ReportData { .. })
        ));
        assert!(matches!(
            verify(SnpExpectations {
                host_data: Some([1u8; 32]),
                ..ok.clone()
            }),
            Err(SnpVerifyError::HostData { .. })
        ));
        assert!(matches!(
            verify(SnpExpectations {
                measurements: vec![[0u8; 48]],
                ..ok.clone()
            }),
            Err(SnpVerifyError::Measurement(_))
        ));
        let mut higher = report.reported_tcb(Generation::Milan);
        higher.snp += 1;
        assert!(matches!(
            verify(SnpExpectations {
                minimum_tcb: Some(higher),
                ..ok.clone()
            }),
            Err(SnpVerifyError::Tcb { .. })
        ));
        assert!(matches!(
            verify(SnpExpectations {
                vmpl: 1,
                ..ok.clone()
            }),
            Err(SnpVerifyError::Vmpl {
                found: 0,
                expected: 1
            })
        ));
    }

    #[test]
    fn debug_policy_is_refused_unless_allowed() {
        let mut report = AttestationReport::parse(&report_bytes()).unwrap();
        report.policy.0 |= 1 << 19;
        let tcb = report.reported_tcb(Generation::Milan);
        assert!(matches!(
            check_expectations(&report, &tcb, &SnpExpectations::default()),
            Err(SnpVerifyError::Debug(_))
        ));
        check_expectations(
            &report,
            &tcb,
            &SnpExpectations {
                allow_debug: true,
                ..Default::default()
            },
        )
        .unwrap();
    }

    #[test]
    fn vcek_tcb_and_hwid_extensions_match_the_report() {
        let vcek = cert("snp/test-vcek.der");
        let report = AttestationReport::parse(&report_bytes()).unwrap();
        let tcb = report.reported_tcb(Generation::Milan);
        check_tcb_extensions(&vcek, &tcb).unwrap();
        check_hw_id(&vcek, &report, Generation::Milan).unwrap();

        let mut other = tcb;
        other.microcode = 0xCE;
        assert_eq!(
            check_tcb_extensions(&vcek, &other).unwrap_err(),
            SnpVerifyError::TcbMismatch {
                field: "microcode",
                cert: 0x73,
                report: 0xCE
            }
        );
        let mut moved = report.clone();
        moved.chip_id[5] ^= 1;
        assert!(matches!(
            check_hw_id(&vcek, &moved, Generation::Milan),
            Err(SnpVerifyError::HwId { .. })
        ));
    }
}
