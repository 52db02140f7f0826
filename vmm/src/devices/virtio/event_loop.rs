//! The "virtio" thread: one epoll loop (event-manager) for every device,
//! off the vCPU threads.
//!
//! Per device it watches the queue eventfds (a kick from the driver, via
//! KVM's ioeventfd or the transport's `QueueNotify` fallback), the
//! transport's state eventfd (activated, reset or failed), and, while the
//! device is active, its host-side fd. Each event locks the device's
//! transport, which the vCPU threads lock for register accesses.
//!
//! A device error does not reach this loop: the transport marks the
//! device DEVICE_NEEDS_RESET and the loop stops watching its host fd.
//! The loop ends when [`VirtioThread`] is dropped.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use crate::devices::bus::lock;

/// `Events::data` of the transport's state eventfd.
const STATE_EVENT: u32 = u32::MAX;
/// `Events::data` of the device's host-side fd; queue events carry their
/// queue index.
const HOST_EVENT: u32 = u32::MAX - 1;

/// Why the virtio thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the virtio event manager: {0}")]
    EventManager(event_manager::Error),
    #[error("cannot create the virtio thread's stop eventfd: {0}")]
    StopEvent(std::io::Error),
    #[error("cannot start the virtio thread: {0}")]
    Spawn(std::io::Error),
}

/// Routes one transport's events to it.
struct TransportHandler {
    transport: Arc<Mutex<MmioTransport>>,
    /// The host fd being watched, if any.
    watched_host_fd: Option<RawFd>,
}

impl TransportHandler {
    /// Watches the device's host fd exactly while the device is active.
    fn sync_host_fd(&mut self, transport: &MmioTransport, ops: &mut EventOps) {
        let wanted = transport.host_event_fd().filter(|_| transport.is_active());
        if wanted == self.watched_host_fd {
            return;
        }
        if let Some(fd) = self.watched_host_fd.take() {
            if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                tracing::warn!(
                    device = transport.name(),
                    "cannot stop watching host fd {fd}: {e}"
                );
            }
        }
        if let Some(fd) = wanted {
            match ops.add(Events::with_data_raw(fd, HOST_EVENT, EventSet::IN)) {
                Ok(()) => self.watched_host_fd = Some(fd),
                Err(e) => {
                    tracing::error!(device = transport.name(), "cannot watch host fd {fd}: {e}")
                }
            }
        }
    }
}

impl MutEventSubscriber for TransportHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let transport = self.transport.clone();
        let transport = lock(&transport);
        for (index, event) in transport.queue_events().iter().enumerate() {
            let data = u32::try_from(index).unwrap_or(HOST_EVENT);
            if let Err(e) = ops.add(Events::with_data(event, data, EventSet::IN)) {
                tracing::error!(device = transport.name(), "cannot watch queue {index}: {e}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            transport.state_event(),
            STATE_EVENT,
            EventSet::IN,
        )) {
            tracing::error!(device = transport.name(), "cannot watch state changes: {e}");
        }
        self.sync_host_fd(&transport, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let transport = self.transport.clone();
        let mut transport = lock(&transport);
        match events.data() {
            STATE_EVENT => {
                transport.consume_state_event();
                let was_watching = self.watched_host_fd.is_some();
                self.sync_host_fd(&transport, ops);
                if transport.is_active() && !was_watching {
                    // Buffers made available before activation were
                    // announced by kicks the inactive device ignored.
                    transport.process_all_queues();
                }
            }
            HOST_EVENT => transport.handle_host_event(),
            index => transport.handle_queue_event(index as usize),
        }
        // Processing may have failed the device: stop watching its host fd
        // now rather than spin on it until the state event is seen.
        self.sync_host_fd(&transport, ops);
    }
}

/// Ends the loop when its eventfd is written.
struct StopHandler {
    event: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!("cannot watch the virtio stop eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.stop.store(true, Ordering::Release);
    }
}

type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The running device thread; dropping it stops and joins the thread.
pub struct VirtioThread {
    stop_event: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VirtioThread {
    /// Starts the loop over `transports`.
    pub fn start(transports: &[Arc<Mutex<MmioTransport>>]) -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::EventManager)?;
        let stop_event = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::StopEvent)?;
        let stop = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(StopHandler {
            event: stop_event.try_clone().map_err(EventLoopError::StopEvent)?,
            stop: stop.clone(),
        }));
        for transport in transports {
            manager.add_subscriber(Box::new(TransportHandler {
                transport: transport.clone(),
                watched_host_fd: None,
            }));
        }
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                crate::jail::seccomp::apply_to_this_thread_or_abort(
                    crate::jail::seccomp::ThreadKind::Virtio,
                );
                while !stop_flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!("virtio event loop failed, devices stop: {e}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            stop_event,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for VirtioThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.stop_event.write(1) {
            tracing::error!("cannot signal the virtio thread to stop: {e}");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the virtio thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::atomic::AtomicU64;

    use crate::devices::virtio::device::{
        device_type, DeviceError, DeviceMetrics, QueueContext, VirtioDevice, VIRTIO_F_VERSION_1,
    };
    use crate::devices::virtio::mmio::tests::negotiate;
    use crate::devices::virtio::mmio::{reg, status};
    use crate::devices::virtio::rng::RngDevice;

    fn wr(t: &Mutex<MmioTransport>, offset: u64, value: u32) {
        lock(t).write(offset, &value.to_le_bytes());
    }

    /// The rng device behind the transport, brought up by register writes
    /// with its queue where a mock driver queue lives, served by the thread.
    #[test]
    fn virtio_thread_serves_kicked_queue_and_stops_on_drop() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x10_0000,
                32,
                VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(
                Box::new(RngDevice::new()),
                mem.clone(),
                irq.try_clone().unwrap(),
            )
            .unwrap(),
        ));
        let thread = VirtioThread::start(std::slice::from_ref(&transport)).unwrap();

        negotiate(&mut lock(&transport), VIRTIO_F_VERSION_1);
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&transport, reg::QUEUE_NUM, 16);
        for (offset, addr) in [
            (reg::QUEUE_DESC_LOW, vq.desc_table_addr()),
            (reg::QUEUE_DRIVER_LOW, vq.avail_addr()),
            (reg::QUEUE_DEVICE_LOW, vq.used_addr()),
        ] {
            wr(&transport, offset, addr.0 as u32);
        }
        wr(&transport, reg::QUEUE_READY, 1);
        wr(&transport, reg::STATUS, features_ok | status::DRIVER_OK);
        wr(&transport, reg::QUEUE_NOTIFY, 0);

        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.used().idx().load() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 32);
        drop(thread);
        let report = lock(&transport).report();
        assert_eq!(report.counters.requests, 1);
        assert!(report.counters.interrupts >= 1);
        assert!(irq.read().unwrap() >= 1);
        assert!(lock(&transport).queue(0).unwrap().ready());
    }

    /// A device whose only work is host-side: it drains its eventfd and
    /// counts, failing when told to.
    struct HostWorkDevice {
        host: EventFd,
        handled: Arc<AtomicU64>,
        fail: Arc<AtomicBool>,
        metrics: DeviceMetrics,
    }

    impl VirtioDevice for HostWorkDevice {
        fn device_type(&self) -> u32 {
            device_type::VSOCK
        }
        fn name(&self) -> &str {
            "host-work"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[4]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _features: u64) {}
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn activate(&mut self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn process_queue(
            &mut self,
            _queue_index: usize,
            _ctx: &mut QueueContext<'_, '_>,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn host_event_fd(&self) -> Option<RawFd> {
            Some(std::os::fd::AsRawFd::as_raw_fd(&self.host))
        }
        fn process_host_event(
            &mut self,
            _ctx: &mut QueueContext<'_, '_>,
        ) -> Result<(), DeviceError> {
            let _ = self.host.read();
            self.handled.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(DeviceError::Backend("host side broke".into()));
            }
            Ok(())
        }
        fn reset(&mut self) {}
        fn metrics(&self) -> &DeviceMetrics {
            &self.metrics
        }
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn virtio_thread_watches_host_fd_only_while_device_is_active() {
        let host = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let handled = Arc::new(AtomicU64::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let device = HostWorkDevice {
            host: host.try_clone().unwrap(),
            handled: handled.clone(),
            fail: fail.clone(),
            metrics: Default::default(),
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(Box::new(device), mem, irq).unwrap(),
        ));
        let thread = VirtioThread::start(std::slice::from_ref(&transport)).unwrap();
        let count = || handled.load(Ordering::SeqCst);

        // Host work before the driver activated the device waits.
        host.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count(), 0);

        negotiate(&mut lock(&transport), VIRTIO_F_VERSION_1);
        let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&transport, reg::STATUS, features_ok | status::DRIVER_OK);
        assert!(wait_for(|| count() == 1), "pending host work not handled");

        host.write(1).unwrap();
        assert!(wait_for(|| count() == 2));

        // A failing device needs a reset and is no longer woken: the fd
        // stays readable, yet it is not handled again (no spinning).
        fail.store(true, Ordering::SeqCst);
        host.write(1).unwrap();
        assert!(wait_for(|| count() == 3));
        // The count moves inside the failing call; the status is set by
        // the virtio thread after it returns.
        let needs_reset = || lock(&transport).status() & status::DEVICE_NEEDS_RESET != 0;
        assert!(
            wait_for(needs_reset),
            "the failed device does not need a reset"
        );
        host.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count(), 3);

        // After a reset and a new bring-up the device works again.
        fail.store(false, Ordering::SeqCst);
        wr(&transport, reg::STATUS, 0);
        wr(&transport, reg::STATUS, status::ACKNOWLEDGE);
        wr(
            &transport,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(&transport, reg::DRIVER_FEATURES_SEL, 1);
        wr(
            &transport,
            reg::DRIVER_FEATURES,
            (VIRTIO_F_VERSION_1 >> 32) as u32,
        );
        wr(&transport, reg::STATUS, features_ok);
        wr(&transport, reg::STATUS, features_ok | status::DRIVER_OK);
        assert!(wait_for(|| count() == 4), "device not served after reset");
        drop(thread);
    }
}
