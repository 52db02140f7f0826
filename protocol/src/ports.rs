//! Guest vsock ports the agent listens on.

/// The agent's ttrpc server (`AgentService`).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Stdio streams: the host opens one connection per stream of a process and
/// starts it with a [`crate::stdio::StreamHeader`].
pub const STDIO_VSOCK_PORT: u32 = 1025;
