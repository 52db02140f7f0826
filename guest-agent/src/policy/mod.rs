//! The agent-API policy: a Rego policy (evaluated by `regorus`) decides
//! every AgentService request, and the opening of every stdio stream,
//! before the agent acts on it. Kata's agent policy is the model: one
//! boolean rule per request kind in `package agent_policy`, a default
//! policy that allows a normal pod, stricter ones per pod.
//!
//! - [`input`]: the JSON document each request becomes (`input` in Rego).
//! - [`engine`]: compiling a policy and deciding one request; denials name
//!   the request and the rule, plus the policy's `deny_reasons`.
//! - [`namespaces`]: which created container owns each namespace path a
//!   new container's spec joins (`CreateContainerRequest.namespace_owners`).
//! - [`store`]: the policy in force, `SetPolicy` from the host, the
//!   locked install from init-data for confidential pods, and what each
//!   live container was created with (exec and update rules read it).

pub mod engine;
pub mod input;
pub mod namespaces;
pub mod store;

pub use engine::{PolicyCompileError, PolicyDenial, PolicyEngine};
pub use input::{PolicyRequest, StreamRequest};
pub use store::{AgentPolicy, PolicyOrigin, SetPolicyError, DEFAULT_POLICY};
