//! The guest's PID 1 (`cloister-agent`): early init, the agent ttrpc
//! server on vsock, containers from OCI specs, exec, stdio streams, events
//! and stats.

pub mod attest;
pub mod cgroups;
pub mod container;
pub mod device_filter;
pub mod init;
pub mod io;
pub mod network;
pub mod policy;
pub mod process;
pub mod server;
pub mod stdio_listener;
