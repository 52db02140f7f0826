//! The guest side of evidence: an [`Attester`] produces `primary_evidence`
//! for a REPORT_DATA. Hardware attesters (SNP via `/dev/sev-guest` or
//! configfs-tsm, TDX via configfs-tsm) belong to the guest agent; this crate
//! provides the trait and the sample attester used in tests.

use super::protocol::Tee;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use thiserror::Error;

/// Errors from producing evidence.
#[derive(Debug, Error)]
pub enum AttesterError {
    /// The platform could not produce evidence.
    #[error("cannot produce {tee} evidence: {reason}")]
    Platform {
        /// TEE.
        tee: String,
        /// Why.
        reason: String,
    },
}

/// Produces evidence binding `report_data`.
pub trait Attester: Send + Sync {
    /// The TEE type announced in the KBS request.
    fn tee(&self) -> Tee;
    /// Evidence whose signed REPORT_DATA is `report_data`.
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, AttesterError>;
}

/// A software stand-in with no security (the KBS refuses it unless told).
#[derive(Debug, Clone, Default)]
pub struct SampleAttester {
    /// Hex digest of the init-data this "guest" was launched with.
    pub init_data_digest: Option<String>,
}

impl Attester for SampleAttester {
    fn tee(&self) -> Tee {
        Tee::Sample
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, AttesterError> {
        let mut ev = json!({"svn": "1", "report_data": STANDARD.encode(report_data)});
        if let Some(d) = &self.init_data_digest {
            ev["init_data_digest"] = Value::String(d.clone());
        }
        Ok(ev)
    }
}
