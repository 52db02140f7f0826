//! The KBS attestation protocol (Trustee-compatible RCAR, version 0.4.0):
//! shared protocol pieces, the client the guest agent uses, and the server
//! behind `cloister-kbs`.

pub mod canonical_json;
pub mod jwe;
pub mod protocol;
