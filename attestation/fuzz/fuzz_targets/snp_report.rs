//! Fuzzes SEV-SNP report parsing (raw bytes) and evidence decoding (JSON).
#![no_main]

use cloister_attestation::snp::{AttestationReport, SnpEvidence};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = AttestationReport::parse(data) {
        let _ = report.generation_from_cpuid();
        let _ = report.signed_bytes().len();
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = SnpEvidence::from_json(&value);
    }
});
