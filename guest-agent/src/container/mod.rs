//! Containers: OCI spec translation (`spec`, `seccomp`, `resources`,
//! `device_rules`), the
//! plan handed to the init helper (`plan`, `sync`), what the helper does
//! (`helper`, `setup`, `syscalls`), the lifecycle (`state`), and the
//! agent-side bookkeeping of every container (`manager`).

pub mod device_rules;
pub mod helper;
pub mod hooks;
pub mod manager;
pub mod names;
pub mod plan;
pub mod resources;
pub mod rootfs_path;
pub mod seccomp;
pub mod setup;
pub mod spec;
pub mod state;
pub mod sync;
pub mod syscalls;
