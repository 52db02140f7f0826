//! The boot timer: the guest's init writes [`BOOT_TIMER_MAGIC`] to port
//! [`BOOT_TIMER_PORT`] once it runs, and the VMM logs the time since its
//! own start (Firecracker's boot-timer device, on an I/O port so a guest
//! reaches it with `ioperm` + `outb`, no `/dev/mem` mapping needed).

use std::sync::Arc;
use std::time::Instant;

use super::bus::BusDevice;
use crate::metrics::VmmMetrics;

pub const BOOT_TIMER_PORT: u64 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 123;

pub struct BootTimer {
    vmm_start: Instant,
    metrics: Arc<VmmMetrics>,
}

impl BootTimer {
    pub fn new(vmm_start: Instant, metrics: Arc<VmmMetrics>) -> Self {
        Self { vmm_start, metrics }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let elapsed = self.vmm_start.elapsed();
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        // Only the first signal counts: a guest may run init twice.
        if self
            .metrics
            .boot_timer_us
            .compare_exchange(
                0,
                us.max(1),
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
        {
            tracing::info!(
                "guest init reached: {}.{:03} ms after VMM start",
                us / 1000,
                us % 1000
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_timer_records_first_magic_write_only() {
        let metrics = Arc::new(VmmMetrics::default());
        let mut timer = BootTimer::new(Instant::now(), metrics.clone());
        timer.write(0, &[1]);
        assert_eq!(VmmMetrics::get(&metrics.boot_timer_us), 0);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = VmmMetrics::get(&metrics.boot_timer_us);
        assert!(first > 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(VmmMetrics::get(&metrics.boot_timer_us), first);
    }
}
