//! Counters specific to virtio-net, next to the device's `DeviceMetrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Frame and drop counters, readable from any thread.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest, and their bytes (without header).
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the guest written to the tap, and their bytes.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the tap larger than the rx buffer chain they got
    /// (without mergeable buffers), dropped.
    pub rx_dropped_too_big: AtomicU64,
    /// Frames from the tap shorter than the virtio-net header, dropped.
    pub rx_dropped_runt: AtomicU64,
    /// rx buffers returned unused: device-readable descriptors, shorter
    /// than the header, or outside guest memory. A frame that already had
    /// buffers before the bad one is dropped with it.
    pub rx_bad_buffers: AtomicU64,
    /// Reads from the tap that failed (not "nothing to read").
    pub rx_tap_errors: AtomicU64,
    /// Times rx stopped for lack of guest buffers (and stopped polling the
    /// tap until the next rx kick).
    pub rx_parked: AtomicU64,
    /// tx chains longer than header + [`super::MAX_FRAME_LEN`], dropped.
    pub tx_dropped_oversize: AtomicU64,
    /// tx chains shorter than the 12-byte header, dropped.
    pub tx_dropped_bad_header: AtomicU64,
    /// tx chains with device-writable descriptors or outside guest memory,
    /// dropped.
    pub tx_dropped_bad_chain: AtomicU64,
    /// Frames the tap refused (bad GSO header, tap down or busy), dropped.
    pub tx_dropped_tap_error: AtomicU64,
}

/// A point-in-time copy of [`NetMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetMetricsSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped_too_big: u64,
    pub rx_dropped_runt: u64,
    pub rx_bad_buffers: u64,
    pub rx_tap_errors: u64,
    pub rx_parked: u64,
    pub tx_dropped_oversize: u64,
    pub tx_dropped_bad_header: u64,
    pub tx_dropped_bad_chain: u64,
    pub tx_dropped_tap_error: u64,
}

impl NetMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            rx_dropped_too_big: get(&self.rx_dropped_too_big),
            rx_dropped_runt: get(&self.rx_dropped_runt),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            rx_tap_errors: get(&self.rx_tap_errors),
            rx_parked: get(&self.rx_parked),
            tx_dropped_oversize: get(&self.tx_dropped_oversize),
            tx_dropped_bad_header: get(&self.tx_dropped_bad_header),
            tx_dropped_bad_chain: get(&self.tx_dropped_bad_chain),
            tx_dropped_tap_error: get(&self.tx_dropped_tap_error),
        }
    }
}
