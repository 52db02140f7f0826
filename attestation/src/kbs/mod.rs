//! The KBS attestation protocol (Trustee-compatible RCAR, version 0.4.0):
//! shared protocol pieces, the client the guest agent uses, and the server
//! behind `cloister-kbs`. The server half needs the `kbs-server` feature.

pub mod attester;
#[cfg(feature = "kbs-server")]
pub mod audit;
pub mod canonical_json;
pub mod client;
#[cfg(feature = "kbs-server")]
pub mod config;
pub mod jwe;
pub mod protocol;
#[cfg(feature = "kbs-server")]
pub mod server;
pub mod store;
pub mod tls;
#[cfg(feature = "kbs-server")]
pub mod token;
pub mod tsm;
#[cfg(feature = "kbs-server")]
pub mod verifier;
