//! Deterministic mutation of the recorded evidence through every parser:
//! random byte flips, truncations and extensions must yield `Ok` or `Err`,
//! never a panic. (The cargo-fuzz targets in `attestation/fuzz` search far
//! wider; this keeps a floor in every CI run on stable Rust.)

use cloister_attestation::initdata::InitData;
use cloister_attestation::snp::{AttestationReport, SnpEvidence};
use cloister_attestation::tdx::{ccel, TdxQuote};
use std::path::PathBuf;

fn testdata(rel: &str) -> PathBuf {
    std::env::var_os("CLOISTER_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"))
        .join(rel)
}

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..=rng.below(8) {
                let i = rng.below(data.len());
                if let Some(b) = data.get_mut(i) {
                    *b = rng.next() as u8;
                }
            }
        }
        1 => data.truncate(rng.below(data.len() + 1)),
        2 => {
            let extra = rng.below(64);
            data.extend((0..extra).map(|_| rng.next() as u8));
        }
        _ => {
            // Overwrite a little-endian length-like field with a large value.
            let i = rng.below(data.len().saturating_sub(4));
            if i + 4 <= data.len() {
                data[i..i + 4].copy_from_slice(&(rng.next() as u32 | 0x8000_0000).to_le_bytes());
            }
        }
    }
    data
}

#[test]
fn mutated_evidence_never_panics() {
    let report = std::fs::read(testdata("snp/test-report.bin")).unwrap();
    let quote4 = std::fs::read(testdata("tdx/tdx_quote_4.dat")).unwrap();
    let quote5 = std::fs::read(testdata("tdx/tdx_quote_5.dat")).unwrap();
    let log = std::fs::read(testdata("tdx/CCEL_data")).unwrap()[..12_000].to_vec();
    let evidence = std::fs::read(testdata("snp/genoa-evidence.json")).unwrap();
    let init = br#"version = "0.1.0"
algorithm = "sha256"
[data]
"policy.rego" = "package p"
"#;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut parsed_ok = 0usize;
    for _ in 0..3000 {
        parsed_ok += AttestationReport::parse(&mutate(&mut rng, &report)).is_ok() as usize;
        parsed_ok += TdxQuote::parse(&mutate(&mut rng, &quote4)).is_ok() as usize;
        parsed_ok += TdxQuote::parse(&mutate(&mut rng, &quote5)).is_ok() as usize;
        if let Ok(events) = ccel::parse(&mutate(&mut rng, &log)) {
            let _ = ccel::replay(&events);
            parsed_ok += 1;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&mutate(&mut rng, &evidence)) {
            parsed_ok += SnpEvidence::from_json(&v).is_ok() as usize;
        }
        parsed_ok += InitData::parse(&mutate(&mut rng, init)).is_ok() as usize;
    }
    // Some mutations leave the input valid (e.g. a flip in a reserved byte);
    // the point is that none panicked.
    assert!(parsed_ok > 0);
}
