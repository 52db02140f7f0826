//! The containerd shim v2 (`containerd-shim-cloister-v2`) and the host CLI (`cloister`): task API, pod sandboxes, stdio, events, runtime config and host checks.

pub mod agent_client;
pub mod audit;
pub mod check;
pub mod compat;
pub mod confidential;
pub mod config;
pub mod container;
pub mod events;
pub mod guest_spec;
pub mod inspect;
pub mod io;
pub mod jail_ids;
pub mod lifecycle;
pub mod network;
pub mod pod_policy;
pub mod policy_gen;
pub mod safe_path;
pub mod safe_teardown;
pub mod sandbox;
pub mod service;
pub mod stats;
pub mod vm_processes;
pub mod vmm_client;
pub mod vmm_jail;
