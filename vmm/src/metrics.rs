//! Counters the VMM keeps while it runs and reports when it exits.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-VM counters. Devices get an `Arc` of it and add to their fields.
#[derive(Debug, Default)]
pub struct VmmMetrics {
    pub vcpu_exits: AtomicU64,
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    /// Port or MMIO accesses no device answered.
    pub unhandled_accesses: AtomicU64,
    pub serial_bytes_out: AtomicU64,
    pub serial_errors: AtomicU64,
    /// Microseconds from VMM start to the guest's boot-timer write.
    pub boot_timer_us: AtomicU64,
}

impl VmmMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A flat JSON object of every counter.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "vcpu_exits": Self::get(&self.vcpu_exits),
            "io_exits": Self::get(&self.io_exits),
            "mmio_exits": Self::get(&self.mmio_exits),
            "unhandled_accesses": Self::get(&self.unhandled_accesses),
            "serial_bytes_out": Self::get(&self.serial_bytes_out),
            "serial_errors": Self::get(&self.serial_errors),
            "boot_timer_us": Self::get(&self.boot_timer_us),
        })
    }
}
