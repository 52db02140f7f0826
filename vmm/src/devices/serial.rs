//! The 8250 UART at COM1 (port 0x3f8, IRQ 4): the guest's console.
//! Register emulation is vm-superio's; we wire its interrupt to an irqfd
//! and its output to stdout, a file or nowhere.

use std::io::{self, Write};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::metrics::VmmMetrics;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises an interrupt by writing to an eventfd registered as irqfd.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Counts bytes on their way out.
struct CountingWriter {
    out: Box<dyn Write + Send>,
    metrics: Arc<VmmMetrics>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        VmmMetrics::add(&self.metrics.serial_bytes_out, n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub struct SerialDevice {
    serial: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, CountingWriter>,
    metrics: Arc<VmmMetrics>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>, metrics: Arc<VmmMetrics>) -> Self {
        let writer = CountingWriter {
            out,
            metrics: metrics.clone(),
        };
        Self {
            serial: vm_superio::Serial::new(EventFdTrigger(interrupt), writer),
            metrics,
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(offset), 1) => data[0] = self.serial.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, *value) {
            // The console is best effort: a full disk or closed pipe must
            // not stop the guest.
            VmmMetrics::add(&self.metrics.serial_errors, 1);
            tracing::debug!("serial output failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_to_thr_reach_output_and_raise_irq() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let metrics = Arc::new(VmmMetrics::default());
        let mut dev = SerialDevice::new(
            evt.try_clone().unwrap(),
            Box::new(out.clone()),
            metrics.clone(),
        );
        dev.write(1, &[0x2]); // IER: THR empty interrupt
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(evt.read().unwrap() >= 1);
        assert_eq!(VmmMetrics::get(&metrics.serial_bytes_out), 2);
    }

    #[test]
    fn serial_wide_access_reads_ones_and_is_ignored() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, Box::new(io::sink()), Arc::new(VmmMetrics::default()));
        let mut data = [0u8; 2];
        dev.read(5, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
    }
}
