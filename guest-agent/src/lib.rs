//! The guest's PID 1 (`cloister-agent`): early init, the agent ttrpc server on vsock, containers from OCI specs, exec, stdio streams, events, stats and the in-guest attester.
