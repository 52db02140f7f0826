//! [`VhostUserDevice`]: any [`VirtioDevice`] as a `vhost-user-backend`
//! backend.
//!
//! The vhost-user handler (rust-vmm's `vhost-user-backend`) owns the
//! protocol: memory table, vring addresses, kick and call eventfds, ring
//! enable. This adapter only translates what reaches the backend into the
//! transport-independent device calls:
//!
//! | vhost-user                              | device                         |
//! |-----------------------------------------|--------------------------------|
//! | `GET_FEATURES` / `SET_FEATURES`         | `features()` / `ack_features()` (minus `VHOST_USER_F_PROTOCOL_FEATURES`) |
//! | `GET_CONFIG` / `SET_CONFIG`             | `read_config()` / `write_config()` |
//! | all vrings ready and enabled            | `activate()`, then every queue processed once |
//! | kick on vring *i*                       | `process_queue(i, ctx)`        |
//! | `host_event_fd()` readable              | `process_host_event(ctx)`      |
//! | `RESET_DEVICE`, or `SET_FEATURES` again | `reset()`                      |
//! | a vring stopped (`GET_VRING_BASE`)      | no calls until it runs again   |
//!
//! vhost-user has no "driver OK" message: the device is activated once
//! every queue the front end serves ([`front_end_queues`]) has been
//! started (kick fd received) and enabled. A kick that arrives before that
//! is not lost: activation processes every queue.
//! The host event fd is level-triggered; while the device is inactive it
//! is taken out of the epoll set (or host work would spin the loop) and put
//! back on activation.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringMutex, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::devices::virtio::device::{
    device_type, DeviceError, DeviceMetrics, QueueContext, UsedNotifier, VirtioDevice,
};

/// QEMU's largest virtqueue (`VIRTQUEUE_MAX_SIZE`). Over vhost-user the
/// front end alone picks each ring's size (QEMU's vhost-user-vsock uses
/// 1024) and cannot be told the device's maximum, so the adapter accepts
/// up to this size even where the device's own maximum (what it offers
/// over virtio-mmio) is smaller. Devices do not size anything by it.
pub const FRONT_END_MAX_QUEUE_SIZE: u16 = 1024;

/// Largest configuration read answered; virtio configuration spaces are far
/// smaller (vhost-user caps `GET_CONFIG` at 256 bytes).
const MAX_CONFIG_READ: u32 = 4096;

/// The queues of `device` that a vhost-user front end hands to the back
/// end. QEMU's `vhost-user-vsock-device` keeps virtio-vsock's event queue
/// (the third) to itself and sets up only rx and tx over vhost-user; other
/// devices hand over all their queues.
pub fn front_end_queues(device: &dyn VirtioDevice) -> &[u16] {
    let sizes = device.queue_max_sizes();
    if device.device_type() == device_type::VSOCK {
        &sizes[..sizes.len().min(2)]
    } else {
        sizes
    }
}

/// The state machine of one device behind vhost-user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Waiting for every vring to be started and enabled.
    Inactive,
    Active,
    /// The device reported an error; it is not called again until the
    /// front end resets it (vhost-user cannot set `DEVICE_NEEDS_RESET`).
    Failed,
}

/// A [`VirtioDevice`] served over vhost-user. Wrapped in a `Mutex` (the
/// crate implements `VhostUserBackend` for `Mutex<impl VhostUserBackendMut>`)
/// because the protocol thread and the vring worker both call it.
pub struct VhostUserDevice {
    /// Devices are `Send` but not necessarily `Sync`, which the backend
    /// trait needs; this lock is never contended (the outer one is held).
    device: Mutex<Box<dyn VirtioDevice>>,
    /// What the device said at creation and never changes.
    name: String,
    /// Maximum sizes of the queues the front end serves.
    queue_max_sizes: Vec<u16>,
    offered_features: u64,
    /// The device's virtio id (`device_type`).
    device_type: u32,
    host_event_fd: Option<RawFd>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    activation: Activation,
    /// The vring worker's epoll fd, to park and unpark the host event fd;
    /// `None` until [`Self::attach_epoll`].
    epoll_fd: Option<RawFd>,
    /// The host event fd is currently out of the epoll set.
    host_event_parked: bool,
}

impl VhostUserDevice {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self {
            name: device.name().to_string(),
            queue_max_sizes: front_end_queues(device.as_ref()).to_vec(),
            offered_features: device.features(),
            device_type: device.device_type(),
            host_event_fd: device.host_event_fd(),
            device: Mutex::new(device),
            mem: None,
            activation: Activation::Inactive,
            epoll_fd: None,
            host_event_parked: false,
        }
    }

    /// The epoll data value of the device's host event: ids up to the number
    /// of queues belong to the vrings and to the exit event.
    pub fn host_event_id(&self) -> u16 {
        // Queue counts are tiny (a u16 index space by the virtio spec).
        u16::try_from(self.queue_max_sizes.len() + 1).unwrap_or(u16::MAX)
    }

    /// The fd the vring worker must watch for host-side work, if any.
    pub fn host_event_fd(&self) -> Option<RawFd> {
        self.host_event_fd
    }

    /// Tells the adapter which epoll set watches its host event fd (the
    /// vring worker's, where the fd has just been registered).
    pub fn attach_epoll(&mut self, epoll_fd: RawFd) {
        self.epoll_fd = Some(epoll_fd);
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's counters as JSON.
    pub fn metrics_json(&self) -> String {
        let snapshot = self
            .device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .metrics()
            .snapshot();
        serde_json::to_string(&snapshot).unwrap_or_default()
    }

    /// The device, for the calls that change it. (A panic in a device call
    /// poisons the lock; the device's own state decides what comes next.)
    fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
    }

    /// Activates the device when every vring is ready and enabled, then
    /// processes every queue once (kicks may have come before). Returns
    /// whether the device is active.
    fn try_activate(&mut self, vrings: &[VringMutex]) -> bool {
        if self.activation == Activation::Failed {
            return false;
        }
        let all_started = vrings.len() == self.queue_max_sizes.len()
            && vrings.iter().all(|vring| {
                let state = vring.get_ref();
                state.get_queue().ready() && state.is_enabled()
            });
        if self.activation == Activation::Active {
            // A ring the front end stopped (GET_VRING_BASE, e.g. on a driver
            // reset) must not be touched; the device waits, without host
            // events, until the ring runs again or features are
            // renegotiated (which resets it).
            self.set_host_event_parked(!all_started);
            return all_started;
        }
        if !all_started {
            tracing::debug!(
                "{}: not activated yet: vrings (ready, enabled) = {:?}",
                self.name,
                vrings
                    .iter()
                    .map(|vring| {
                        let state = vring.get_ref();
                        (state.get_queue().ready(), state.is_enabled())
                    })
                    .collect::<Vec<_>>()
            );
            return false;
        }
        if let Err(e) = self.device_mut().activate() {
            self.fail("activate", &e);
            return false;
        }
        tracing::info!("{}: activated over vhost-user", self.name);
        self.activation = Activation::Active;
        self.set_host_event_parked(false);
        for index in 0..vrings.len() {
            if let Err(e) =
                self.with_context(vrings, |device, ctx| device.process_queue(index, ctx))
            {
                self.fail("process queue after activation", &e);
                return false;
            }
        }
        true
    }

    fn fail(&mut self, what: &str, error: &DeviceError) {
        tracing::error!(
            "{}: {what} failed, device stopped until reset: {error}",
            self.name
        );
        self.activation = Activation::Failed;
        self.set_host_event_parked(true);
    }

    /// Takes the host event fd out of the worker's epoll set (`parked`) or
    /// puts it back.
    fn set_host_event_parked(&mut self, parked: bool) {
        if parked == self.host_event_parked {
            return;
        }
        let (Some(epoll_fd), Some(fd)) = (self.epoll_fd, self.host_event_fd) else {
            return;
        };
        let op = if parked {
            libc::EPOLL_CTL_DEL
        } else {
            libc::EPOLL_CTL_ADD
        };
        let mut event = libc::epoll_event {
            events: EventSet::IN.bits(),
            u64: u64::from(self.host_event_id()),
        };
        // SAFETY: epoll_ctl on two fds we were given (the worker's epoll
        // set, which outlives the backend's use of it, and the device's
        // own fd); `event` is a valid epoll_event for the call's duration.
        let rc = unsafe { libc::epoll_ctl(epoll_fd, op, fd, &mut event) };
        if rc == 0 {
            self.host_event_parked = parked;
        } else {
            tracing::error!(
                "{}: cannot {} host event fd {fd}: {}",
                self.name,
                if parked { "park" } else { "unpark" },
                io::Error::last_os_error()
            );
        }
    }

    /// Locks every vring (in index order; the protocol thread locks one at
    /// a time, so this cannot deadlock) and calls `f` with a
    /// [`QueueContext`] over them.
    fn with_context(
        &mut self,
        vrings: &[VringMutex],
        f: impl FnOnce(&mut dyn VirtioDevice, &mut QueueContext<'_, '_>) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let Some(mem) = self.mem.as_ref() else {
            return Err(DeviceError::Backend(
                "no guest memory table received yet".to_string(),
            ));
        };
        let mem = mem.memory();
        let mut guards: Vec<_> = vrings.iter().map(VringT::get_mut).collect();
        let calls = CallFds {
            fds: guards
                .iter()
                .map(|state: &std::sync::MutexGuard<'_, VringState>| {
                    state
                        .get_call()
                        .as_ref()
                        .map(std::os::fd::AsRawFd::as_raw_fd)
                })
                .collect(),
            raised: Cell::new(0),
        };
        let mut queues: Vec<&mut Queue> = guards
            .iter_mut()
            .map(|state| state.get_queue_mut())
            .collect();
        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut queues,
            notifier: &calls,
        };
        let device = self
            .device
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let result = f(device.as_mut(), &mut ctx);
        let metrics = device.metrics();
        // Counted here as virtio-mmio counts them: by the transport.
        DeviceMetrics::add(&metrics.interrupts, calls.raised.get());
        if result.is_err() {
            DeviceMetrics::add(&metrics.errors, 1);
        }
        result
    }
}

/// The vrings' call eventfds, valid while their vrings are locked (the
/// protocol thread replaces them only under the lock), and how many
/// interrupts went through them.
struct CallFds {
    fds: Vec<Option<RawFd>>,
    raised: Cell<u64>,
}

impl UsedNotifier for CallFds {
    fn notify_used(&self, queue_index: usize) -> io::Result<()> {
        self.raised.set(self.raised.get() + 1);
        let Some(Some(fd)) = self.fds.get(queue_index) else {
            // No call fd: the front end polls this ring (or has not set
            // one up yet); nothing to signal.
            return Ok(());
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: `fd` is the vring's call eventfd, kept open by the vring
        // lock held while this notifier exists; write(2) reads 8 bytes from
        // a live stack buffer.
        let written = unsafe { libc::write(*fd, one.as_ptr().cast(), one.len()) };
        if written == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // A full eventfd counter already wakes the front end.
        if err.kind() == io::ErrorKind::WouldBlock {
            Ok(())
        } else {
            Err(err)
        }
    }
}

impl VhostUserBackendMut for VhostUserDevice {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        self.queue_max_sizes.len()
    }

    fn max_queue_size(&self) -> usize {
        let device_max = self.queue_max_sizes.iter().copied().max().unwrap_or(0);
        usize::from(device_max.max(FRONT_END_MAX_QUEUE_SIZE))
    }

    fn features(&self) -> u64 {
        self.offered_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        // Features are negotiated once per driver session: QEMU sends
        // SET_FEATURES each time it starts the device (after a guest
        // reboot or driver reload too) and, unless RESET_DEVICE was
        // negotiated, nothing else marks the old session's end.
        if self.activation != Activation::Inactive {
            tracing::info!("{}: features negotiated again, resetting", self.name);
            self.reset_device();
        }
        let device_features = features & self.offered_features;
        self.device_mut().ack_features(device_features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads vsock's guest CID and block's geometry through
        // GET_CONFIG. MQ: lets the front end ask for the queue count.
        // RESET_DEVICE: a driver reset reaches the device as one message.
        let features = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::RESET_DEVICE;
        // QEMU keeps virtio-net's configuration space (MAC, status) itself
        // and warns about a net back end that offers CONFIG.
        if self.device_type == device_type::NET {
            features
        } else {
            features | VhostUserProtocolFeatures::CONFIG
        }
    }

    fn reset_device(&mut self) {
        tracing::info!("{}: reset by the front end", self.name);
        self.device_mut().reset();
        self.activation = Activation::Inactive;
        self.set_host_event_parked(true);
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The handler sets it on each vring's queue; the device reads it
        // from there through `needs_notification`.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        self.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_config(u64::from(offset), &mut data);
        data
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device_mut()
            .write_config(u64::from(offset), buf)
            .map_err(io::Error::other)
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("cannot create the vring worker's exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        let queue_count = self.queue_max_sizes.len();
        let is_host_event = device_event == self.host_event_id();
        if !is_host_event && usize::from(device_event) >= queue_count {
            tracing::warn!("{}: unknown event id {device_event}", self.name);
            return Ok(());
        }
        if !self.try_activate(vrings) {
            if is_host_event {
                // Level-triggered: it would fire again at once.
                self.set_host_event_parked(true);
            }
            return Ok(());
        }
        let result = if is_host_event {
            self.with_context(vrings, |device, ctx| device.process_host_event(ctx))
        } else {
            let index = usize::from(device_event);
            // One kick per event: the handler drained the eventfd's count.
            DeviceMetrics::add(&self.device_mut().metrics().notifications, 1);
            self.with_context(vrings, |device, ctx| device.process_queue(index, ctx))
        };
        // An error stops the device, not the worker thread: returning it
        // would end the vring worker for good.
        if let Err(e) = result {
            self.fail(
                if is_host_event {
                    "host event"
                } else {
                    "queue event"
                },
                &e,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    use std::sync::{Arc, Mutex};

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::device::VIRTIO_F_VERSION_1;

    const QUEUE_SIZE: u16 = 16;
    const FEATURE_X: u64 = 1 << 5;

    /// What the test device saw, shared with the test.
    #[derive(Debug, Default)]
    struct Seen {
        acked: Option<u64>,
        activations: usize,
        resets: usize,
        /// (queue, chains completed) per process_queue call.
        processed: Vec<(usize, usize)>,
        host_events: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    /// Two queues; completes every available chain with length 0.
    struct RecordingDevice {
        seen: Arc<Mutex<Seen>>,
        host_event: Option<EventFd>,
        fail_queue: bool,
        metrics: DeviceMetrics,
    }

    impl VirtioDevice for RecordingDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn name(&self) -> &str {
            "recording"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[QUEUE_SIZE, QUEUE_SIZE]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | FEATURE_X
        }
        fn ack_features(&mut self, features: u64) {
            self.seen.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let config = [0xa0u8, 0xa1, 0xa2, 0xa3];
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
            if offset >= 4 {
                return Err(DeviceError::Backend(format!("offset {offset} read-only")));
            }
            self.seen
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
            Ok(())
        }
        fn activate(&mut self) -> Result<(), DeviceError> {
            self.seen.lock().unwrap().activations += 1;
            Ok(())
        }
        fn process_queue(
            &mut self,
            queue_index: usize,
            ctx: &mut QueueContext<'_, '_>,
        ) -> Result<(), DeviceError> {
            if self.fail_queue {
                return Err(DeviceError::Backend("bad request".to_string()));
            }
            let mut done = 0;
            let mem = ctx.mem;
            let queue = &mut ctx.queues[queue_index];
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                queue
                    .add_used(mem, chain.head_index(), 0)
                    .map_err(|source| DeviceError::Queue {
                        index: queue_index,
                        source,
                    })?;
                done += 1;
            }
            if done > 0 {
                ctx.signal_used_queue(queue_index)?;
            }
            self.seen
                .lock()
                .unwrap()
                .processed
                .push((queue_index, done));
            Ok(())
        }
        fn host_event_fd(&self) -> Option<RawFd> {
            self.host_event
                .as_ref()
                .map(std::os::fd::AsRawFd::as_raw_fd)
        }
        fn process_host_event(
            &mut self,
            _ctx: &mut QueueContext<'_, '_>,
        ) -> Result<(), DeviceError> {
            if let Some(event) = &self.host_event {
                let _ = event.read();
            }
            self.seen.lock().unwrap().host_events += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.seen.lock().unwrap().resets += 1;
        }
        fn metrics(&self) -> &DeviceMetrics {
            &self.metrics
        }
    }

    struct Fixture {
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        backend: VhostUserDevice,
        vrings: Vec<VringMutex>,
        calls: Vec<EventConsumer>,
        seen: Arc<Mutex<Seen>>,
        chains_added: [u16; 2],
    }

    /// Queue `i`'s rings live at `i * 64 KiB`.
    fn ring_base(index: usize) -> GuestAddress {
        GuestAddress(index as u64 * 0x1_0000)
    }

    fn fixture(fail_queue: bool, host_event: Option<EventFd>) -> Fixture {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let device = RecordingDevice {
            seen: seen.clone(),
            host_event,
            fail_queue,
            metrics: DeviceMetrics::default(),
        };
        let mut backend = VhostUserDevice::new(Box::new(device));
        backend.update_memory(mem.clone()).unwrap();
        let mut vrings = Vec::new();
        let mut calls = Vec::new();
        for index in 0..2 {
            let guest = mem.memory();
            let mock = MockSplitQueue::create(&*guest, ring_base(index), QUEUE_SIZE);
            let vring = VringMutex::new(mem.clone(), QUEUE_SIZE).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
                .unwrap();
            let (consumer, notifier) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
            // SAFETY: the fd was just taken out of `notifier`, so the File
            // is its only owner.
            vring.set_call(Some(unsafe { File::from_raw_fd(notifier.into_raw_fd()) }));
            vrings.push(vring);
            calls.push(consumer);
        }
        Fixture {
            mem,
            backend,
            vrings,
            calls,
            seen,
            chains_added: [0; 2],
        }
    }

    impl Fixture {
        fn start(&self, index: usize) {
            self.vrings[index].set_queue_ready(true);
            self.vrings[index].set_enabled(true);
        }

        /// Makes one single-descriptor chain available on queue `index`,
        /// as a driver does: descriptor, avail ring entry, then avail idx.
        /// (A new `MockSplitQueue` would zero the ring indices.)
        fn add_chain(&mut self, index: usize) {
            let guest = self.mem.memory();
            let slot = self.chains_added[index];
            let desc_table = ring_base(index);
            let avail = desc_table.unchecked_add(16 * u64::from(QUEUE_SIZE));
            let buffer = 0x8_0000 + u64::from(slot) * 0x100;
            let desc = RawDescriptor::from(SplitDescriptor::new(buffer, 0x100, 0, 0));
            guest
                .write_obj(desc, desc_table.unchecked_add(16 * u64::from(slot)))
                .unwrap();
            guest
                .write_obj(slot, avail.unchecked_add(4 + 2 * u64::from(slot)))
                .unwrap();
            guest.write_obj(slot + 1, avail.unchecked_add(2)).unwrap();
            self.chains_added[index] += 1;
        }

        fn kick(&mut self, index: u16) {
            self.backend
                .handle_event(index, EventSet::IN, &self.vrings, 0)
                .unwrap();
        }

        fn used_idx(&self, index: usize) -> u16 {
            self.vrings[index].queue_used_idx().unwrap()
        }
    }

    #[test]
    fn features_add_protocol_features_and_ack_passes_only_device_bits() {
        let mut f = fixture(false, None);
        let offered = f.backend.features();
        assert_eq!(
            offered,
            VIRTIO_F_VERSION_1 | FEATURE_X | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        );
        assert!(f
            .backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));

        f.backend.acked_features(offered | (1 << 60));

        assert_eq!(
            f.seen.lock().unwrap().acked,
            Some(VIRTIO_F_VERSION_1 | FEATURE_X)
        );
    }

    #[test]
    fn queue_count_comes_from_the_device_and_sizes_up_to_qemus_maximum_are_accepted() {
        let f = fixture(false, None);
        assert_eq!(f.backend.num_queues(), 2);
        assert_eq!(
            f.backend.max_queue_size(),
            usize::from(FRONT_END_MAX_QUEUE_SIZE)
        );
        assert_eq!(f.backend.host_event_id(), 3);
    }

    #[test]
    fn get_config_reads_device_config_zero_padded_and_set_config_reaches_it() {
        let mut f = fixture(false, None);
        assert_eq!(f.backend.get_config(2, 4), [0xa2, 0xa3, 0, 0]);
        assert_eq!(f.backend.get_config(0, u32::MAX).len(), 4096);

        f.backend.set_config(1, &[7]).unwrap();
        let err = f.backend.set_config(9, &[7]).unwrap_err();

        assert_eq!(f.seen.lock().unwrap().config_writes, [(1, vec![7])]);
        assert!(err.to_string().contains("offset 9"), "{err}");
    }

    #[test]
    fn kick_before_all_queues_start_waits_then_activation_processes_every_queue() {
        let mut f = fixture(false, None);
        f.start(0);
        f.add_chain(0);

        f.kick(0);

        assert_eq!(f.backend.activation(), Activation::Inactive);
        assert_eq!(f.seen.lock().unwrap().activations, 0);
        assert_eq!(f.used_idx(0), 0);

        f.start(1);
        f.kick(1);

        let seen = f.seen.lock().unwrap();
        assert_eq!(seen.activations, 1);
        // Activation: both queues once (queue 0's early chain completed),
        // then the kicked queue 1.
        assert_eq!(seen.processed, [(0, 1), (1, 0), (1, 0)]);
        drop(seen);
        assert_eq!(f.backend.activation(), Activation::Active);
        assert_eq!(f.used_idx(0), 1);
        f.calls[0].consume().unwrap();
        assert!(f.calls[1].consume().is_err(), "queue 1 had nothing used");
    }

    #[test]
    fn kick_on_active_device_completes_chains_and_signals_call_fd() {
        let mut f = fixture(false, None);
        f.start(0);
        f.start(1);
        f.kick(0);
        f.add_chain(1);
        f.add_chain(1);

        f.kick(1);

        assert_eq!(f.used_idx(1), 2);
        f.calls[1].consume().unwrap();
        assert_eq!(f.seen.lock().unwrap().processed.last(), Some(&(1, 2)));
        let metrics = f.backend.metrics_json();
        assert!(metrics.contains("\"interrupts\":1"), "{metrics}");
        assert!(metrics.contains("\"notifications\":2"), "{metrics}");
    }

    #[test]
    fn features_negotiated_again_after_activation_reset_the_device() {
        let mut f = fixture(false, None);
        f.backend.acked_features(VIRTIO_F_VERSION_1);
        f.start(0);
        f.start(1);
        f.kick(0);
        assert_eq!(f.backend.activation(), Activation::Active);

        f.backend.acked_features(VIRTIO_F_VERSION_1);

        assert_eq!(f.backend.activation(), Activation::Inactive);
        assert_eq!(f.seen.lock().unwrap().resets, 1);
        f.kick(0);
        assert_eq!(f.seen.lock().unwrap().activations, 2);
    }

    #[test]
    fn stopped_ring_pauses_an_active_device_until_it_runs_again() {
        let mut f = fixture(false, None);
        f.start(0);
        f.start(1);
        f.kick(0);
        let calls_before = f.seen.lock().unwrap().processed.len();
        f.vrings[1].set_queue_ready(false);

        f.kick(0);

        assert_eq!(f.backend.activation(), Activation::Active);
        assert_eq!(f.seen.lock().unwrap().processed.len(), calls_before);
        f.start(1);
        f.kick(0);
        assert_eq!(f.seen.lock().unwrap().processed.len(), calls_before + 1);
        assert_eq!(f.seen.lock().unwrap().activations, 1);
    }

    #[test]
    fn device_error_stops_device_without_failing_the_worker_until_reset() {
        let mut f = fixture(true, None);
        f.start(0);
        f.start(1);

        f.kick(0);
        assert_eq!(f.backend.activation(), Activation::Failed);
        f.kick(0);
        assert_eq!(f.seen.lock().unwrap().activations, 1);

        f.backend.reset_device();
        assert_eq!(f.backend.activation(), Activation::Inactive);
        assert_eq!(f.seen.lock().unwrap().resets, 1);
        f.kick(0);
        assert_eq!(f.seen.lock().unwrap().activations, 2);
    }

    #[test]
    fn host_event_before_activation_is_parked_and_unparked_on_activation() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        event.write(1).unwrap();
        let epoll = vmm_sys_util::epoll::Epoll::new().unwrap();
        let mut f = fixture(false, Some(event.try_clone().unwrap()));
        let id = u64::from(f.backend.host_event_id());
        epoll
            .ctl(
                vmm_sys_util::epoll::ControlOperation::Add,
                f.backend.host_event_fd().unwrap(),
                vmm_sys_util::epoll::EpollEvent::new(EventSet::IN, id),
            )
            .unwrap();
        f.backend.attach_epoll(epoll.as_raw_fd());
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 4];
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 1);

        f.kick(f.backend.host_event_id());

        assert_eq!(f.seen.lock().unwrap().host_events, 0);
        assert_eq!(epoll.wait(0, &mut events).unwrap(), 0, "parked");

        f.start(0);
        f.start(1);
        f.kick(0);

        assert_eq!(epoll.wait(0, &mut events).unwrap(), 1, "unparked");
        assert_eq!(events[0].data(), id);
        f.kick(f.backend.host_event_id());
        assert_eq!(f.seen.lock().unwrap().host_events, 1);
    }
}
