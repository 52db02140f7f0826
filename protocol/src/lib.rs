//! The wire contracts between processes: `agent.proto` (shim ↔ agent) with
//! its generated ttrpc code, vsock port numbers, annotation keys and the
//! stdio stream header. Nothing else lives here.

#[allow(clippy::all, missing_docs, unused_qualifications)]
mod generated;

pub mod annotations;
pub mod confidential;
pub mod ports;
pub mod stdio;

/// Messages of `agent.proto` (package `cloister.agent.v1`).
pub use generated::agent;
/// Async ttrpc client and server of `AgentService`.
pub use generated::agent_ttrpc;

/// Re-exported so clients and servers use the exact versions the generated
/// code was built against.
pub use protobuf;
pub use ttrpc;
