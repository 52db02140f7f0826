//! Counters specific to vsock, next to the device's `DeviceMetrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Connection-level counters, readable from any thread.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Guest `REQUEST`s that reached a listening `<uds_path>_<port>`.
    pub guest_connections: AtomicU64,
    /// Host `CONNECT`s the guest accepted.
    pub host_connections: AtomicU64,
    /// Guest `REQUEST`s for a host port nobody listens on.
    pub guest_connects_refused: AtomicU64,
    /// `CONNECT` lines refused (malformed, too long, timed out, too many).
    pub handshakes_rejected: AtomicU64,
    /// Host-initiated `REQUEST`s the guest did not answer in time.
    pub requests_timed_out: AtomicU64,
    /// `RST` packets sent to the guest.
    pub resets_sent: AtomicU64,
    /// `RST` packets for unknown connections dropped because the queue of
    /// them was full.
    pub resets_dropped: AtomicU64,
    /// Connections reset because the guest sent beyond its credit.
    pub credit_violations: AtomicU64,
    /// Connections currently open.
    pub open_connections: AtomicU64,
}

/// A point-in-time copy of [`VsockMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VsockMetricsSnapshot {
    pub guest_connections: u64,
    pub host_connections: u64,
    pub guest_connects_refused: u64,
    pub handshakes_rejected: u64,
    pub requests_timed_out: u64,
    pub resets_sent: u64,
    pub resets_dropped: u64,
    pub credit_violations: u64,
    pub open_connections: u64,
}

impl VsockMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set(counter: &AtomicU64, value: u64) {
        counter.store(value, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> VsockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VsockMetricsSnapshot {
            guest_connections: get(&self.guest_connections),
            host_connections: get(&self.host_connections),
            guest_connects_refused: get(&self.guest_connects_refused),
            handshakes_rejected: get(&self.handshakes_rejected),
            requests_timed_out: get(&self.requests_timed_out),
            resets_sent: get(&self.resets_sent),
            resets_dropped: get(&self.resets_dropped),
            credit_violations: get(&self.credit_violations),
            open_connections: get(&self.open_connections),
        }
    }
}
