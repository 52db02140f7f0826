//! The KBS attestation protocol (Trustee-compatible RCAR, version 0.4.0):
//! shared protocol pieces, the client the guest agent uses, and the server
//! behind `cloister-kbs`.

pub mod attester;
pub mod audit;
pub mod canonical_json;
pub mod client;
pub mod config;
pub mod jwe;
pub mod protocol;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
pub mod tsm;
pub mod verifier;
