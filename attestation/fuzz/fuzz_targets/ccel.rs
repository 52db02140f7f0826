//! Fuzzes CC event log parsing and replay.
#![no_main]

use cloister_attestation::tdx::ccel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = ccel::parse(data) {
        let _ = ccel::replay(&events);
    }
});
