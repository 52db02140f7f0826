//! Fuzzes TDX quote parsing (v4/v5 header, body, signature data, PCK chain).
#![no_main]

use cloister_attestation::tdx::TdxQuote;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(quote) = TdxQuote::parse(data) {
        let _ = quote.qe_report_data().len();
        let _ = cloister_attestation::certs::Cert::from_pem_bundle(&quote.pck_chain_pem);
    }
});
