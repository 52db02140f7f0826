//! The wire contracts between processes: agent.proto (shim <-> agent), vmm.proto (shim <-> VMM control), generated ttrpc code, vsock port numbers and annotation keys. Nothing else lives here.
