//! AMD's key hierarchy per processor generation:
//!
//! ```text
//! ARK (self-signed, RSA-4096) ─┬─> ASK  ─> VCEK (per chip and TCB, ECDSA P-384)
//!                              └─> ASVK ─> VLEK (per cloud provider and TCB)
//! ```
//!
//! Every link is RSASSA-PSS with SHA-384. The roots of all three generations
//! are built in (AMD publishes them at its KDS; the copies here are byte-exact).

use super::report::SigningKey;
use super::tcb::Generation;
use crate::certs::{Cert, CertError};
use std::time::SystemTime;
use thiserror::Error;

const MILAN_PEM: &[u8] = include_bytes!("../../certs/amd/milan_ask_ark_asvk.pem");
const GENOA_PEM: &[u8] = include_bytes!("../../certs/amd/genoa_ask_ark_asvk.pem");
const TURIN_PEM: &[u8] = include_bytes!("../../certs/amd/turin_ask_ark_asvk.pem");

/// Errors from building or checking the AMD chain.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A certificate failed to parse or verify.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A bundle lacks one of ARK, ASK, ASVK for the generation.
    #[error("amd root bundle for {generation} has no certificate named {name:?}")]
    Missing {
        /// Generation.
        generation: Generation,
        /// Expected common name.
        name: String,
    },
    /// The endorsement key certificate is of the wrong kind for the report.
    #[error("report is signed by the {expected:?} but the certificate given is {found:?}")]
    EndorsementKind {
        /// Kind the report names.
        expected: SigningKey,
        /// Common name of the certificate given.
        found: String,
    },
    /// Report says it is not signed.
    #[error("report is not signed (signing_key = none)")]
    Unsigned,
}

/// ARK, ASK and ASVK of one generation.
#[derive(Debug, Clone)]
pub struct AmdRoots {
    /// Generation these roots belong to.
    pub generation: Generation,
    /// AMD Root Key (self-signed).
    pub ark: Cert,
    /// AMD SEV Key, signs VCEKs.
    pub ask: Cert,
    /// AMD SEV VLEK Key, signs VLEKs.
    pub asvk: Cert,
}

impl AmdRoots {
    /// The built-in roots of a generation.
    pub fn builtin(generation: Generation) -> Result<Self, ChainError> {
        let pem = match generation {
            Generation::Milan => MILAN_PEM,
            Generation::Genoa => GENOA_PEM,
            Generation::Turin => TURIN_PEM,
        };
        Self::from_pem_bundle(generation, pem)
    }

    /// Picks ARK, ASK and ASVK out of a PEM bundle by their common names
    /// (`ARK-<gen>`, `SEV-<gen>`, `SEV-VLEK-<gen>`).
    pub fn from_pem_bundle(generation: Generation, pem: &[u8]) -> Result<Self, ChainError> {
        let certs = Cert::from_pem_bundle(pem)?;
        let find = |name: String| {
            certs
                .iter()
                .find(|c| c.common_name().as_deref() == Some(name.as_str()))
                .cloned()
                .ok_or(ChainError::Missing { generation, name })
        };
        Ok(Self {
            generation,
            ark: find(format!("ARK-{generation}"))?,
            ask: find(format!("SEV-{generation}"))?,
            asvk: find(format!("SEV-VLEK-{generation}"))?,
        })
    }

    /// Verifies ARK (self-signed) → ASK/ASVK → endorsement key certificate,
    /// and that each is valid at `now`.
    pub fn verify_endorsement(
        &self,
        endorsement: &Cert,
        kind: SigningKey,
        now: SystemTime,
    ) -> Result<(), ChainError> {
        let (intermediate, expected_cn) = match kind {
            SigningKey::Vcek => (&self.ask, "SEV-VCEK"),
            SigningKey::Vlek => (&self.asvk, "SEV-VLEK"),
            SigningKey::None => return Err(ChainError::Unsigned),
        };
        let found = endorsement.common_name().unwrap_or_default();
        if found != expected_cn {
            return Err(ChainError::EndorsementKind {
                expected: kind,
                found,
            });
        }
        self.ark.verify_rsa_pss_sha384(&self.ark)?;
        intermediate.verify_rsa_pss_sha384(&self.ark)?;
        endorsement.verify_rsa_pss_sha384(intermediate)?;
        for cert in [&self.ark, intermediate, endorsement] {
            cert.check_validity(now)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fixed_now, testdata};

    fn vcek() -> Cert {
        Cert::from_der(&std::fs::read(testdata("snp/test-vcek.der")).unwrap()).unwrap()
    }

    #[test]
    fn builtin_roots_of_every_generation_are_self_consistent() {
        for generation in [Generation::Milan, Generation::Genoa, Generation::Turin] {
            let roots = AmdRoots::builtin(generation).unwrap();
            roots.ark.verify_rsa_pss_sha384(&roots.ark).unwrap();
            roots.ask.verify_rsa_pss_sha384(&roots.ark).unwrap();
            roots.asvk.verify_rsa_pss_sha384(&roots.ark).unwrap();
        }
    }

    #[test]
    fn builtin_roots_equal_testdata_bundles() {
        for (generation, file) in [
            (Generation::Milan, "snp/milan_ask_ark_asvk.pem"),
            (Generation::Genoa, "snp/genoa_ask_ark_asvk.pem"),
            (Generation::Turin, "snp/turin_ask_ark_asvk.pem"),
        ] {
            let from_file =
                AmdRoots::from_pem_bundle(generation, &std::fs::read(testdata(file)).unwrap())
                    .unwrap();
            let builtin = AmdRoots::builtin(generation).unwrap();
            assert!(builtin.ark.same_as(&from_file.ark));
        }
    }

    #[test]
    fn recorded_vcek_chains_to_milan() {
        let roots = AmdRoots::builtin(Generation::Milan).unwrap();
        roots
            .verify_endorsement(&vcek(), SigningKey::Vcek, fixed_now())
            .unwrap();
    }

    #[test]
    fn recorded_vcek_with_genoa_or_turin_roots_returns_signature_error() {
        for generation in [Generation::Genoa, Generation::Turin] {
            let roots = AmdRoots::builtin(generation).unwrap();
            let err = roots
                .verify_endorsement(&vcek(), SigningKey::Vcek, fixed_now())
                .unwrap_err();
            assert!(
                matches!(err, ChainError::Cert(CertError::Signature { ref issuer, .. }) if issuer.contains(&format!("SEV-{generation}"))),
                "{generation}: {err}"
            );
        }
    }

    #[test]
    fn vcek_presented_as_vlek_returns_kind_error() {
        let roots = AmdRoots::builtin(Generation::Milan).unwrap();
        let err = roots
            .verify_endorsement(&vcek(), SigningKey::Vlek, fixed_now())
            .unwrap_err();
        assert!(matches!(err, ChainError::EndorsementKind { .. }));
    }

    #[test]
    fn ask_swapped_for_asvk_returns_signature_error() {
        let mut roots = AmdRoots::builtin(Generation::Milan).unwrap();
        roots.ask = roots.asvk.clone();
        let err = roots
            .verify_endorsement(&vcek(), SigningKey::Vcek, fixed_now())
            .unwrap_err();
        assert!(matches!(err, ChainError::Cert(CertError::Signature { .. })));
    }

    #[test]
    fn vcek_after_not_after_returns_expired() {
        let roots = AmdRoots::builtin(Generation::Milan).unwrap();
        let later = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_950_000_000);
        let err = roots
            .verify_endorsement(&vcek(), SigningKey::Vcek, later)
            .unwrap_err();
        assert!(matches!(err, ChainError::Cert(CertError::Expired { .. })));
    }
}
