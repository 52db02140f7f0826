//! SNP evidence as it travels in the KBS protocol's `tee-evidence`.
//!
//! Two shapes are accepted:
//! - cloister's: `{"report": "<base64 of the 1184 raw bytes>", "cert_chain": [...]}`,
//!   which keeps the signed bytes exactly as the firmware wrote them;
//! - Trustee's: `{"attestation_report": {<field by field>}, "cert_chain": [...]}`.
//!   That shape has no raw bytes, so the report is rebuilt field by field with
//!   the reserved areas zero (which the firmware guarantees); a report whose
//!   reserved bytes were not zero would then fail its signature check, never
//!   pass one it should not.
//!
//! [`SnpEvidence::to_json`] writes both at once, so the same evidence is read
//! by cloister-kbs (raw bytes preferred) and by Trustee (which ignores
//! `report`); the field-by-field half is byte-for-byte what Trustee emits.
//!
//! `cert_chain` entries are `{"cert_type": "VCEK"|"VLEK"|"ASK"|"ARK", "data": [u8...]}`.

use super::report::{AttestationReport, REPORT_LEN, SIGNED_LEN};
use super::tcb::{Generation, TcbVersion};
use crate::certs::{Cert, CertError};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// Errors from decoding SNP evidence JSON.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EvidenceError {
    /// JSON shape wrong.
    #[error("snp evidence json: {0}")]
    Json(String),
    /// Base64 invalid.
    #[error("snp evidence report is not valid base64: {0}")]
    Base64(String),
    /// No VCEK or VLEK in the chain.
    #[error("snp evidence carries no vcek or vlek certificate")]
    NoEndorsement,
    /// Certificate unparsable.
    #[error("snp evidence certificate: {0}")]
    Cert(#[from] CertError),
    /// A field has the wrong length.
    #[error("snp evidence field {field} has {len} bytes, expected {expected}")]
    FieldLength {
        /// Field.
        field: &'static str,
        /// Length found.
        len: usize,
        /// Length expected.
        expected: usize,
    },
}

/// One certificate entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertEntry {
    /// "VCEK", "VLEK", "ASK", "ARK".
    pub cert_type: String,
    /// DER bytes.
    pub data: Vec<u8>,
}

/// Decoded SNP evidence: raw report bytes and the endorsement certificate.
#[derive(Debug, Clone)]
pub struct SnpEvidence {
    /// The 1184 report bytes.
    pub report: Vec<u8>,
    /// VCEK or VLEK.
    pub endorsement: Cert,
}

#[derive(Deserialize)]
struct Tcb {
    fmc: Option<u8>,
    bootloader: u8,
    tee: u8,
    snp: u8,
    microcode: u8,
}

#[derive(Deserialize)]
struct FwVersion {
    major: u8,
    minor: u8,
    build: u8,
}

#[derive(Deserialize)]
struct Signature {
    r: Vec<u8>,
    s: Vec<u8>,
}

/// Trustee's (the `sev` crate's serde) field-by-field report.
#[derive(Deserialize)]
struct StructuredReport {
    version: u32,
    guest_svn: u32,
    policy: u64,
    family_id: Vec<u8>,
    image_id: Vec<u8>,
    vmpl: u32,
    sig_algo: u32,
    current_tcb: Tcb,
    plat_info: u64,
    key_info: u32,
    report_data: Vec<u8>,
    measurement: Vec<u8>,
    host_data: Vec<u8>,
    id_key_digest: Vec<u8>,
    author_key_digest: Vec<u8>,
    report_id: Vec<u8>,
    report_id_ma: Vec<u8>,
    reported_tcb: Tcb,
    cpuid_fam_id: Option<u8>,
    cpuid_mod_id: Option<u8>,
    cpuid_step: Option<u8>,
    chip_id: Vec<u8>,
    committed_tcb: Tcb,
    current: FwVersion,
    committed: FwVersion,
    launch_tcb: Tcb,
    launch_mit_vector: Option<u64>,
    current_mit_vector: Option<u64>,
    signature: Signature,
}

fn put(
    out: &mut [u8],
    off: usize,
    field: &'static str,
    bytes: &[u8],
    expected: usize,
) -> Result<(), EvidenceError> {
    if bytes.len() != expected {
        return Err(EvidenceError::FieldLength {
            field,
            len: bytes.len(),
            expected,
        });
    }
    out[off..off + expected].copy_from_slice(bytes);
    Ok(())
}

impl StructuredReport {
    fn to_bytes(&self) -> Result<Vec<u8>, EvidenceError> {
        let generation = match (self.cpuid_fam_id, self.cpuid_mod_id) {
            (Some(f), Some(m)) => Generation::from_cpuid(f, m),
            _ => None,
        }
        .unwrap_or(if self.current_tcb.fmc.is_some() {
            Generation::Turin
        } else {
            Generation::Milan
        });
        let tcb = |t: &Tcb| {
            TcbVersion {
                fmc: t.fmc,
                bootloader: t.bootloader,
                tee: t.tee,
                snp: t.snp,
                microcode: t.microcode,
            }
            .encode(generation)
            .to_le_bytes()
        };
        let mut b = vec![0u8; REPORT_LEN];
        b[0x00..0x04].copy_from_slice(&self.version.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&self.guest_svn.to_le_bytes());
        b[0x08..0x10].copy_from_slice(&self.policy.to_le_bytes());
        put(&mut b, 0x10, "family_id", &self.family_id, 16)?;
        put(&mut b, 0x20, "image_id", &self.image_id, 16)?;
        b[0x30..0x34].copy_from_slice(&self.vmpl.to_le_bytes());
        b[0x34..0x38].copy_from_slice(&self.sig_algo.to_le_bytes());
        b[0x38..0x40].copy_from_slice(&tcb(&self.current_tcb));
        b[0x40..0x48].copy_from_slice(&self.plat_info.to_le_bytes());
        b[0x48..0x4C].copy_from_slice(&self.key_info.to_le_bytes());
        put(&mut b, 0x50, "report_data", &self.report_data, 64)?;
        put(&mut b, 0x90, "measurement", &self.measurement, 48)?;
        put(&mut b, 0xC0, "host_data", &self.host_data, 32)?;
        put(&mut b, 0xE0, "id_key_digest", &self.id_key_digest, 48)?;
        put(
            &mut b,
            0x110,
            "author_key_digest",
            &self.author_key_digest,
            48,
        )?;
        put(&mut b, 0x140, "report_id", &self.report_id, 32)?;
        put(&mut b, 0x160, "report_id_ma", &self.report_id_ma, 32)?;
        b[0x180..0x188].copy_from_slice(&tcb(&self.reported_tcb));
        if self.version >= 3 {
            b[0x188] = self.cpuid_fam_id.unwrap_or(0);
            b[0x189] = self.cpuid_mod_id.unwrap_or(0);
            b[0x18A] = self.cpuid_step.unwrap_or(0);
        }
        put(&mut b, 0x1A0, "chip_id", &self.chip_id, 64)?;
        b[0x1E0..0x1E8].copy_from_slice(&tcb(&self.committed_tcb));
        b[0x1E8] = self.current.build;
        b[0x1E9] = self.current.minor;
        b[0x1EA] = self.current.major;
        b[0x1EC] = self.committed.build;
        b[0x1ED] = self.committed.minor;
        b[0x1EE] = self.committed.major;
        b[0x1F0..0x1F8].copy_from_slice(&tcb(&self.launch_tcb));
        if self.version >= 5 {
            b[0x1F8..0x200].copy_from_slice(&self.launch_mit_vector.unwrap_or(0).to_le_bytes());
            b[0x200..0x208].copy_from_slice(&self.current_mit_vector.unwrap_or(0).to_le_bytes());
        }
        put(&mut b, SIGNED_LEN, "signature.r", &self.signature.r, 72)?;
        put(
            &mut b,
            SIGNED_LEN + 72,
            "signature.s",
            &self.signature.s,
            72,
        )?;
        Ok(b)
    }
}

impl SnpEvidence {
    /// Decodes evidence JSON in either accepted shape.
    pub fn from_json(value: &Value) -> Result<Self, EvidenceError> {
        let report = if let Some(b64) = value.get("report").and_then(Value::as_str) {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| EvidenceError::Base64(e.to_string()))?
        } else if let Some(structured) = value.get("attestation_report") {
            let parsed: StructuredReport = serde_json::from_value(structured.clone())
                .map_err(|e| EvidenceError::Json(e.to_string()))?;
            parsed.to_bytes()?
        } else {
            return Err(EvidenceError::Json(
                "neither \"report\" nor \"attestation_report\" present".into(),
            ));
        };
        let chain: Vec<CertEntry> = match value.get("cert_chain") {
            Some(Value::Null) | None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| EvidenceError::Json(format!("cert_chain: {e}")))?,
        };
        let entry = chain
            .iter()
            .find(|c| {
                c.cert_type.eq_ignore_ascii_case("vcek") || c.cert_type.eq_ignore_ascii_case("vlek")
            })
            .ok_or(EvidenceError::NoEndorsement)?;
        Ok(Self {
            report,
            endorsement: Cert::from_der(&entry.data)?,
        })
    }

    /// Encodes in both shapes at once: `report` (raw, preferred by
    /// cloister) and `attestation_report` (field by field, what Trustee's
    /// verifier reads; it ignores the extra member).
    pub fn to_json(&self) -> Result<Value, EvidenceError> {
        let kind = if self.endorsement.common_name().as_deref() == Some("SEV-VLEK") {
            "VLEK"
        } else {
            "VCEK"
        };
        Ok(serde_json::json!({
            "report": base64::engine::general_purpose::STANDARD.encode(&self.report),
            "attestation_report": structured(&self.report)?,
            "cert_chain": [CertEntry { cert_type: kind.into(), data: self.endorsement.der().to_vec() }],
        }))
    }
}

/// The field-by-field form of a raw report (the `sev` crate's serde shape).
pub fn structured(bytes: &[u8]) -> Result<Value, EvidenceError> {
    let r = AttestationReport::parse(bytes).map_err(|e| EvidenceError::Json(e.to_string()))?;
    let generation = r.generation_from_cpuid().unwrap_or(Generation::Milan);
    let tcb = |raw: u64| {
        let t = TcbVersion::decode(raw, generation);
        serde_json::json!({"fmc": t.fmc, "bootloader": t.bootloader, "tee": t.tee,
                           "snp": t.snp, "microcode": t.microcode})
    };
    let version = |(major, minor, build): (u8, u8, u8)| serde_json::json!({"major": major, "minor": minor, "build": build});
    let key_info = u32::from_le_bytes([bytes[0x48], bytes[0x49], bytes[0x4A], bytes[0x4B]]);
    let mut v = serde_json::json!({
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": r.policy.0,
        "family_id": r.family_id.to_vec(),
        "image_id": r.image_id.to_vec(),
        "vmpl": r.vmpl,
        "sig_algo": r.signature_algo,
        "current_tcb": tcb(r.current_tcb),
        "plat_info": r.platform_info,
        "key_info": key_info,
        "report_data": r.report_data.to_vec(),
        "measurement": r.measurement.to_vec(),
        "host_data": r.host_data.to_vec(),
        "id_key_digest": r.id_key_digest.to_vec(),
        "author_key_digest": r.author_key_digest.to_vec(),
        "report_id": r.report_id.to_vec(),
        "report_id_ma": r.report_id_ma.to_vec(),
        "reported_tcb": tcb(r.reported_tcb),
        "cpuid_fam_id": r.cpuid.map(|c| c.0),
        "cpuid_mod_id": r.cpuid.map(|c| c.1),
        "cpuid_step": r.cpuid.map(|c| c.2),
        "chip_id": r.chip_id.to_vec(),
        "committed_tcb": tcb(r.committed_tcb),
        "current": version(r.current_version),
        "committed": version(r.committed_version),
        "launch_tcb": tcb(r.launch_tcb),
        "signature": {
            "r": bytes[SIGNED_LEN..SIGNED_LEN + 72].to_vec(),
            "s": bytes[SIGNED_LEN + 72..SIGNED_LEN + 144].to_vec(),
        },
    });
    if let Some((launch, current)) = r.mit_vectors {
        v["launch_mit_vector"] = launch.into();
        v["current_mit_vector"] = current.into();
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::{verify_report_builtin, SnpExpectations, SnpVerifyError};
    use crate::test_support::{fixed_now, testdata};

    fn genoa() -> Value {
        serde_json::from_slice(&std::fs::read(testdata("snp/genoa-evidence.json")).unwrap())
            .unwrap()
    }

    #[test]
    fn trustee_genoa_evidence_verifies_against_genoa_roots() {
        let evidence = SnpEvidence::from_json(&genoa()).unwrap();
        let verified = verify_report_builtin(
            &evidence.report,
            &evidence.endorsement,
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap();
        assert_eq!(verified.report.version, 3);
        assert_eq!(verified.generation, Generation::Genoa);
        assert_eq!(verified.reported_tcb.snp, 23);
    }

    #[test]
    fn structured_form_equals_trustees_json_exactly() {
        // Rebuild raw bytes from Trustee's JSON, then render them back: the
        // result must be the very JSON Trustee produced.
        let original = genoa();
        let evidence = SnpEvidence::from_json(&original).unwrap();
        assert_eq!(
            structured(&evidence.report).unwrap(),
            original["attestation_report"]
        );
    }

    #[test]
    fn trustee_genoa_evidence_with_changed_field_fails_signature() {
        let mut value = genoa();
        value["attestation_report"]["guest_svn"] = 1.into();
        let evidence = SnpEvidence::from_json(&value).unwrap();
        let err = verify_report_builtin(
            &evidence.report,
            &evidence.endorsement,
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap_err();
        assert_eq!(err, SnpVerifyError::Signature);
    }

    #[test]
    fn cloister_shape_round_trips_recorded_report() {
        let evidence = SnpEvidence {
            report: std::fs::read(testdata("snp/test-report.bin")).unwrap(),
            endorsement: Cert::from_der(&std::fs::read(testdata("snp/test-vcek.der")).unwrap())
                .unwrap(),
        };
        let json = evidence.to_json().unwrap();
        let back = SnpEvidence::from_json(&json).unwrap();
        assert_eq!(back.report, evidence.report);
        // The field-by-field half alone rebuilds the same bytes.
        let mut trustee_only = json.clone();
        trustee_only.as_object_mut().unwrap().remove("report");
        assert_eq!(
            SnpEvidence::from_json(&trustee_only).unwrap().report,
            evidence.report
        );
        verify_report_builtin(
            &back.report,
            &back.endorsement,
            &SnpExpectations::default(),
            fixed_now(),
        )
        .unwrap();
    }

    #[test]
    fn malformed_evidence_is_rejected_with_reason() {
        assert!(matches!(
            SnpEvidence::from_json(&serde_json::json!({"report": "!!"})),
            Err(EvidenceError::Base64(_))
        ));
        assert!(matches!(
            SnpEvidence::from_json(&serde_json::json!({})),
            Err(EvidenceError::Json(_))
        ));
        let mut value = genoa();
        value["cert_chain"] = serde_json::json!([]);
        assert_eq!(
            SnpEvidence::from_json(&value).unwrap_err(),
            EvidenceError::NoEndorsement
        );
        let mut value = genoa();
        value["attestation_report"]["chip_id"] = serde_json::json!([1, 2]);
        assert!(matches!(
            SnpEvidence::from_json(&value),
            Err(EvidenceError::FieldLength {
                field: "chip_id",
                ..
            })
        ));
    }
}
