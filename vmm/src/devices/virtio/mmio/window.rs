//! What sits on the MMIO bus for a transport: the registers the driver
//! uses while the device runs (`InterruptStatus`, `InterruptACK`, and
//! `QueueNotify` when KVM took no ioeventfd) are served without the
//! transport's lock, which the virtio thread holds while the device
//! processes a queue. A vCPU in the guest's interrupt handler therefore
//! never waits for a disk read or a vsock copy to finish. Every other
//! register goes to the transport under its lock.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{reg, MmioError, MmioInterrupt, MmioTransport};
use crate::devices::bus::{lock, BusDevice};

/// The bus device of one virtio-mmio window.
pub struct MmioWindow {
    transport: Arc<Mutex<MmioTransport>>,
    interrupt: Arc<MmioInterrupt>,
    /// Clones of the transport's queue eventfds (same eventfd objects).
    queue_events: Vec<EventFd>,
}

impl MmioWindow {
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> Result<Self, MmioError> {
        let (interrupt, queue_events) = {
            let t = lock(&transport);
            let events = t
                .queue_events()
                .iter()
                .enumerate()
                .map(|(index, e)| {
                    e.try_clone().map_err(|source| MmioError::QueueEvent {
                        device: t.name().to_string(),
                        index,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (t.interrupt().clone(), events)
        };
        Ok(Self {
            transport,
            interrupt,
            queue_events,
        })
    }
}

fn aligned_u32(offset: u64, data: &[u8]) -> Option<u32> {
    let bytes = <[u8; 4]>::try_from(data).ok()?;
    offset.is_multiple_of(4).then(|| u32::from_le_bytes(bytes))
}

impl BusDevice for MmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == reg::INTERRUPT_STATUS && data.len() == 4 {
            data.copy_from_slice(&self.interrupt.status().to_le_bytes());
            return;
        }
        lock(&self.transport).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, aligned_u32(offset, data)) {
            (reg::INTERRUPT_ACK, Some(bits)) => self.interrupt.acknowledge(bits),
            (reg::QUEUE_NOTIFY, Some(index)) => match self.queue_events.get(index as usize) {
                Some(event) => {
                    if let Err(e) = event.write(1) {
                        tracing::warn!("cannot signal queue {index}: {e}");
                    }
                }
                // Counted and logged by the transport.
                None => lock(&self.transport).write(offset, data),
            },
            _ => lock(&self.transport).write(offset, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::mmio::{INTERRUPT_USED_BUFFER, MMIO_MAGIC_VALUE};
    use crate::devices::virtio::rng::RngDevice;

    fn window() -> (Arc<Mutex<MmioTransport>>, MmioWindow) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(Box::new(RngDevice::new()), mem, irq).unwrap(),
        ));
        let window = MmioWindow::new(transport.clone()).unwrap();
        (transport, window)
    }

    #[test]
    fn window_serves_interrupt_registers_and_notify_while_transport_is_locked() {
        let (transport, mut window) = window();
        lock(&transport)
            .interrupt()
            .raise(INTERRUPT_USED_BUFFER)
            .unwrap();
        let busy = lock(&transport);
        let (done, finished) = mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            let mut status = [0u8; 4];
            window.read(reg::INTERRUPT_STATUS, &mut status);
            window.write(reg::INTERRUPT_ACK, &status);
            let mut after = [0xffu8; 4];
            window.read(reg::INTERRUPT_STATUS, &mut after);
            window.write(reg::QUEUE_NOTIFY, &0u32.to_le_bytes());
            done.send((status, after)).unwrap();
            window
        });
        let (status, after) = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the window waited for the transport's lock");
        assert_eq!(u32::from_le_bytes(status), INTERRUPT_USED_BUFFER);
        assert_eq!(after, [0; 4]);
        assert_eq!(busy.queue_events()[0].read().unwrap(), 1);
        drop(busy);
        let mut window = vcpu.join().unwrap();
        let mut magic = [0u8; 4];
        window.read(reg::MAGIC_VALUE, &mut magic);
        assert_eq!(u32::from_le_bytes(magic), MMIO_MAGIC_VALUE);
    }

    #[test]
    fn window_passes_bad_notify_to_transport_which_refuses_it() {
        let (transport, mut window) = window();
        window.write(reg::QUEUE_NOTIFY, &5u32.to_le_bytes());
        window.write(reg::QUEUE_NOTIFY, &[0]);
        assert_eq!(lock(&transport).report().refused_register_accesses, 2);
    }
}
