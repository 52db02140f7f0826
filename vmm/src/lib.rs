//! `cloister-vmm`: one KVM microVM per pod.
//!
//! A [`builder::VmSpec`] (from the command line or a JSON
//! [`config::VmConfig`]) becomes a KVM VM with guest memory, a Linux kernel
//! booted through PVH or the 64-bit protocol, legacy devices (8250 serial,
//! i8042 reset, boot timer) and one thread per vCPU; [`builder::run_vm`]
//! runs it until the guest resets, powers off or fails.

pub mod boot;
pub mod builder;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod jail;
pub mod limits;
pub mod metrics;
pub mod signals;
pub mod tee;
pub mod vhost_user;
pub mod vstate;
