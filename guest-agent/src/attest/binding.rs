//! Checks the init-data the host delivered against what the TEE bound at
//! launch: SNP `HOST_DATA` (32 bytes) from an attestation report, TDX
//! `MRCONFIGID` (48 bytes) from a quote, both through configfs-tsm; the
//! `sample` TEE's value from the command line. The digest, fitted to the
//! field as the VMM fitted it, must match byte for byte; no init-data must
//! mean an all-zero field, so a host cannot drop the document (and the
//! policy in it) either.

use cloister_attestation::initdata::InitData;
use cloister_attestation::kbs::tsm::TsmReports;
use cloister_attestation::snp::AttestationReport;
use cloister_attestation::tdx::TdxQuote;

use super::cmdline::GuestTee;
use super::AttestError;

/// The launch binding as the TEE reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchBinding(pub Vec<u8>);

/// Reads the binding from the TEE.
pub fn read_binding(tee: &GuestTee, tsm: &dyn TsmReports) -> Result<LaunchBinding, AttestError> {
    let hardware = |e: String| AttestError::Binding {
        tee: tee.name(),
        reason: e,
    };
    match tee {
        GuestTee::Sample { bound_digest } => {
            Ok(LaunchBinding(bound_digest.clone().unwrap_or_default()))
        }
        GuestTee::Snp => {
            let report = tsm
                .report(&[0u8; 64])
                .map_err(|e| hardware(e.to_string()))?;
            let parsed =
                AttestationReport::parse(&report.outblob).map_err(|e| hardware(e.to_string()))?;
            Ok(LaunchBinding(parsed.host_data.to_vec()))
        }
        GuestTee::Tdx => {
            let report = tsm
                .report(&[0u8; 64])
                .map_err(|e| hardware(e.to_string()))?;
            let quote = TdxQuote::parse(&report.outblob).map_err(|e| hardware(e.to_string()))?;
            Ok(LaunchBinding(quote.td_report.mr_config_id.to_vec()))
        }
    }
}

/// Fits a digest into a field of `len` bytes as the VMM does: truncate or
/// zero-pad.
fn fit(digest: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let n = digest.len().min(len);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

/// Whether `init` (or its absence) is what the TEE bound.
pub fn check_binding(
    tee: &GuestTee,
    init: Option<&InitData>,
    bound: &LaunchBinding,
) -> Result<(), AttestError> {
    let expected = match (tee, init) {
        // Sample: the whole digest, or nothing at all.
        (GuestTee::Sample { .. }, Some(init)) => init.digest(),
        (GuestTee::Sample { .. }, None) => Vec::new(),
        (_, Some(init)) => fit(&init.digest(), bound.0.len()),
        (_, None) => vec![0u8; bound.0.len()],
    };
    if expected == bound.0 {
        return Ok(());
    }
    Err(AttestError::DigestMismatch {
        tee: tee.name(),
        delivered: if init.is_some() {
            hex::encode(&expected)
        } else {
            "none (no init-data delivered)".into()
        },
        bound: if bound.0.is_empty() {
            "none".into()
        } else {
            hex::encode(&bound.0)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_attestation::kbs::attester::AttesterError;
    use cloister_attestation::kbs::tsm::TsmReport;

    const DOC: &[u8] = b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n";

    struct NoTsm;
    impl TsmReports for NoTsm {
        fn report(&self, _: &[u8; 64]) -> Result<TsmReport, AttesterError> {
            Err(AttesterError::Platform {
                tee: "tsm".into(),
                reason: "no configfs-tsm here".into(),
            })
        }
    }

    #[test]
    fn sample_binding_must_be_the_whole_digest() {
        let init = InitData::parse(DOC).unwrap();
        let tee = GuestTee::Sample {
            bound_digest: Some(init.digest()),
        };
        let bound = read_binding(&tee, &NoTsm).unwrap();
        check_binding(&tee, Some(&init), &bound).unwrap();

        let tampered = InitData::parse(&[DOC, b"# changed\n"].concat()).unwrap();
        let err = check_binding(&tee, Some(&tampered), &bound).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&hex::encode(tampered.digest())), "{text}");
        assert!(text.contains(&hex::encode(init.digest())), "{text}");

        // Dropping the document is a mismatch too.
        assert!(check_binding(&tee, None, &bound).is_err());
        let unbound = GuestTee::Sample { bound_digest: None };
        check_binding(&unbound, None, &LaunchBinding(Vec::new())).unwrap();
        assert!(check_binding(&unbound, Some(&init), &LaunchBinding(Vec::new())).is_err());
    }

    #[test]
    fn snp_and_tdx_fields_are_the_fitted_digest_or_zero() {
        let init = InitData::parse(DOC).unwrap();
        let snp = LaunchBinding(init.snp_host_data().to_vec());
        check_binding(&GuestTee::Snp, Some(&init), &snp).unwrap();
        let tdx = LaunchBinding(init.tdx_mr_config_id().to_vec());
        check_binding(&GuestTee::Tdx, Some(&init), &tdx).unwrap();

        let zero = LaunchBinding(vec![0u8; 32]);
        check_binding(&GuestTee::Snp, None, &zero).unwrap();
        assert!(check_binding(&GuestTee::Snp, Some(&init), &zero).is_err());
        let err = check_binding(&GuestTee::Snp, None, &snp).unwrap_err();
        assert!(err.to_string().contains("no init-data delivered"), "{err}");
    }

    #[test]
    fn hardware_tee_without_tsm_says_why() {
        let err = read_binding(&GuestTee::Snp, &NoTsm).unwrap_err();
        assert!(err.to_string().contains("no configfs-tsm here"), "{err}");
    }
}
