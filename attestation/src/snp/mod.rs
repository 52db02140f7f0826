//! AMD SEV-SNP evidence: the attestation report, AMD's key hierarchy and the
//! verification of one against the other.

pub mod chain;
pub mod evidence;
pub mod report;
pub mod tcb;
pub mod verify;

pub use chain::{AmdRoots, ChainError};
pub use evidence::{EvidenceError, SnpEvidence};
pub use report::{AttestationReport, GuestPolicy, ReportError, SigningKey, REPORT_LEN};
pub use tcb::{Generation, TcbVersion};
pub use verify::{
    verify_report, verify_report_builtin, SnpExpectations, SnpVerifyError, VerifiedSnpReport,
};
