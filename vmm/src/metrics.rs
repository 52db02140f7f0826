//! Counters the VMM keeps while it runs and reports when it exits (and,
//! on request, periodically while it runs).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::devices::virtio::mmio::TransportReport;

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

    /// [`Self::to_json`] plus a `devices` list with each virtio device's
    /// counters.
    pub fn to_json_with_devices(&self, devices: &[DeviceReport]) -> serde_json::Value {
        let mut json = self.to_json();
        if let Some(map) = json.as_object_mut() {
            map.insert(
                "devices".into(),
                serde_json::to_value(devices).unwrap_or_default(),
            );
        }
        json
    }
}

/// One virtio device's counters and where it sits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub mmio_base: u64,
    pub irq: u32,
    #[serde(flatten)]
    pub transport: TransportReport,
}

/// Writes a JSON line of the VMM's counters every interval, from its own
/// thread, until dropped.
pub struct PeriodicMetrics {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PeriodicMetrics {
    /// Starts writing `snapshot()` to `out` every `interval`.
    pub fn start(
        interval: Duration,
        mut out: Box<dyn Write + Send>,
        snapshot: impl Fn() -> serde_json::Value + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                crate::jail::seccomp::apply_to_this_thread_or_abort(
                    crate::jail::seccomp::ThreadKind::Helper,
                );
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    // Best effort: a closed stderr must not stop the VM.
                    let _ = writeln!(out, "{}", snapshot());
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for PeriodicMetrics {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the metrics thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn periodic_metrics_writes_json_lines_until_dropped() {
        let out = Shared::default();
        let metrics = Arc::new(VmmMetrics::default());
        VmmMetrics::add(&metrics.mmio_exits, 7);
        let m = metrics.clone();
        let periodic =
            PeriodicMetrics::start(Duration::from_millis(5), Box::new(out.clone()), move || {
                m.to_json_with_devices(&[])
            })
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            < 2
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(periodic);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["mmio_exits"], 7);
        assert_eq!(first["devices"], serde_json::json!([]));
        let lines = text.lines().count();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            String::from_utf8(out.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .count(),
            lines
        );
    }
}
