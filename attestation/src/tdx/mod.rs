//! Intel TDX evidence: quotes (v4, v5), their verification against Intel's
//! SGX root, and CCEL event-log replay into RTMRs.

pub mod ccel;
pub mod quote;
pub mod verify;

pub use quote::{QuoteError, TdReport, TdxQuote};
pub use verify::{verify_quote, TcbStatus, TdxExpectations, TdxVerifyError, VerifiedTdxQuote};
