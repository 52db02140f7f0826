//! The register state machine against a small test device in real guest
//! memory, driven the way Linux's virtio_mmio driver drives it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::device::device_type;

const FEATURE_TEST_BIT: u64 = 1 << 3;
const MEM_SIZE: usize = 0x10_0000;

/// Two queues (16 and 8 entries), 8 bytes of writable configuration, and
/// a switch that makes queue processing fail.
struct TestDevice {
    acked: u64,
    config: [u8; 8],
    activations: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    processed: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
    metrics: DeviceMetrics,
}

struct Handles {
    activations: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    processed: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
}

fn test_device() -> (TestDevice, Handles) {
    let handles = Handles {
        activations: Arc::default(),
        resets: Arc::default(),
        processed: Arc::default(),
        fail: Arc::default(),
    };
    let dev = TestDevice {
        acked: 0,
        config: *b"cloister",
        activations: handles.activations.clone(),
        resets: handles.resets.clone(),
        processed: handles.processed.clone(),
        fail: handles.fail.clone(),
        metrics: DeviceMetrics::default(),
    };
    (dev, handles)
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn name(&self) -> &str {
        "test"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | FEATURE_TEST_BIT
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .filter(|r| r.end <= self.config.len())
            .ok_or_else(|| DeviceError::Backend(format!("config write at offset {offset:#x}")))?;
        self.config[range].copy_from_slice(data);
        Ok(())
    }
    fn activate(&mut self) -> Result<(), DeviceError> {
        self.activations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError> {
        self.processed.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(DeviceError::Backend("test failure".into()));
        }
        ctx.notifier
            .notify_used(queue_index)
            .map_err(DeviceError::Io)
    }
    fn reset(&mut self) {
        self.acked = 0;
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }
}

fn transport() -> (MmioTransport, Handles, EventFd) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (dev, handles) = test_device();
    let t = MmioTransport::new(Box::new(dev), mem, irq.try_clone().unwrap()).unwrap();
    (t, handles, irq)
}

fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn features(t: &mut MmioTransport) -> u64 {
    wr(t, reg::DEVICE_FEATURES_SEL, 0);
    let low = rd(t, reg::DEVICE_FEATURES);
    wr(t, reg::DEVICE_FEATURES_SEL, 1);
    let high = rd(t, reg::DEVICE_FEATURES);
    (u64::from(high) << 32) | u64::from(low)
}

fn write_driver_features(t: &mut MmioTransport, features: u64) {
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, features as u32);
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
pub(crate) fn negotiate(t: &mut MmioTransport, accept: u64) {
    wr(t, reg::STATUS, status::ACKNOWLEDGE);
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write_driver_features(t, accept);
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

/// Sets up queue `index` with `size` entries at `base` (descriptor table,
/// then rings) and marks it ready.
fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    wr(t, reg::QUEUE_SEL, index);
    wr(t, reg::QUEUE_NUM, size);
    let desc = base;
    let driver = base + 16 * u64::from(size);
    let device = (driver + 6 + 2 * u64::from(size) + 3) & !3;
    for (low, high, addr) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
        (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver),
        (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, device),
    ] {
        wr(t, low, addr as u32);
        wr(t, high, (addr >> 32) as u32);
    }
    wr(t, reg::QUEUE_READY, 1);
}

const DRIVER_OK_STATUS: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

fn bring_up(t: &mut MmioTransport) {
    negotiate(t, VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT);
    setup_queue(t, 0, 16, 0x1000);
    setup_queue(t, 1, 8, 0x2000);
    wr(t, reg::STATUS, DRIVER_OK_STATUS);
}

#[test]
fn mmio_identity_registers_read_magic_version_device_vendor() {
    let (mut t, _, _) = transport();
    assert_eq!(rd(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), device_type::RNG);
    assert_eq!(rd(&mut t, reg::VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
}

#[test]
fn mmio_feature_negotiation_masks_unoffered_bits_and_reaches_driver_ok() {
    let (mut t, handles, _) = transport();
    assert_eq!(
        features(&mut t),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | FEATURE_TEST_BIT
    );
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // Bit 5 and bit 40 are not offered.
    write_driver_features(
        &mut t,
        VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT | 1 << 5 | 1 << 40,
    );
    assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(
        rd(&mut t, reg::STATUS) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    setup_queue(&mut t, 0, 16, 0x1000);
    wr(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert_eq!(rd(&mut t, reg::STATUS), DRIVER_OK_STATUS);
    assert!(t.is_active());
    assert_eq!(handles.activations.load(Ordering::SeqCst), 1);
    // The state eventfd tells the event loop to look.
    assert!(t.state_event().read().unwrap() >= 1);
}

#[test]
fn mmio_features_ok_without_version_1_is_refused() {
    let (mut t, handles, _) = transport();
    negotiate(&mut t, FEATURE_TEST_BIT);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER,
        "FEATURES_OK must not stick"
    );
    assert_eq!(t.report().refused_register_accesses, 1);
    wr(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert_eq!(handles.activations.load(Ordering::SeqCst), 0);
}

#[test]
fn plain_transport_does_not_offer_access_platform() {
    let (mut t, _, _) = transport();
    assert_eq!(features(&mut t) & VIRTIO_F_ACCESS_PLATFORM, 0);
    // A driver that accepts it anyway gets it masked, as any unoffered bit.
    negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
    assert_eq!(
        rd(&mut t, reg::STATUS) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    assert_eq!(t.report().refused_feature_negotiations, 0);
}

#[test]
fn confidential_transport_offers_access_platform_and_refuses_a_driver_without_it() {
    let (t, handles, _) = transport();
    let mut t = t.require_access_platform();
    assert_eq!(
        features(&mut t),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | FEATURE_TEST_BIT | VIRTIO_F_ACCESS_PLATFORM
    );
    negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER,
        "FEATURES_OK must not stick without ACCESS_PLATFORM"
    );
    let report = t.report();
    assert_eq!(report.refused_feature_negotiations, 1);
    assert_eq!(report.refused_register_accesses, 1);
    // Cannot be activated past the refusal.
    wr(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert_eq!(handles.activations.load(Ordering::SeqCst), 0);

    // After a reset, a driver that accepts it is served.
    wr(&mut t, reg::STATUS, 0);
    negotiate(
        &mut t,
        VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT | VIRTIO_F_ACCESS_PLATFORM,
    );
    assert_eq!(
        rd(&mut t, reg::STATUS) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    assert_eq!(
        t.acked_features(),
        VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT | VIRTIO_F_ACCESS_PLATFORM
    );
    setup_queue(&mut t, 0, 16, 0x1000);
    wr(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    assert!(t.is_active());
    assert_eq!(handles.activations.load(Ordering::SeqCst), 1);
}

#[test]
fn mmio_status_written_out_of_order_is_refused() {
    let (mut t, handles, _) = transport();
    // DRIVER before ACKNOWLEDGE.
    wr(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    // DRIVER_OK straight after ACKNOWLEDGE|DRIVER.
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    assert_eq!(handles.activations.load(Ordering::SeqCst), 0);
    assert_eq!(t.report().refused_register_accesses, 2);
    // Giving up is always allowed.
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_eq!(rd(&mut t, reg::STATUS) & status::FAILED, status::FAILED);
}

#[test]
fn mmio_driver_features_after_features_ok_are_refused() {
    let (mut t, _, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    write_driver_features(&mut t, VIRTIO_F_VERSION_1 | FEATURE_TEST_BIT);
    assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn mmio_queue_size_not_power_of_two_or_above_max_is_refused() {
    let (mut t, _, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
    for bad in [0, 12, 32, 0x1_0000 + 8] {
        wr(&mut t, reg::QUEUE_NUM, bad);
    }
    assert_eq!(t.queue(0).unwrap().size(), 16, "size unchanged");
    wr(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.queue(0).unwrap().size(), 4);
    assert_eq!(t.report().refused_register_accesses, 4);
    // A queue that does not exist has no maximum.
    wr(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    wr(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.report().refused_register_accesses, 5);
}

#[test]
fn mmio_queue_setup_before_features_ok_or_while_ready_is_refused() {
    let (mut t, _, _) = transport();
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(t.queue(0).unwrap().size(), 16);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write_driver_features(&mut t, VIRTIO_F_VERSION_1);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    setup_queue(&mut t, 0, 16, 0x1000);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(t.queue(0).unwrap().desc_table(), 0x1000);
}

#[test]
fn mmio_queue_outside_guest_memory_sets_needs_reset_with_config_interrupt() {
    let (mut t, handles, irq) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 16, MEM_SIZE as u64 - 0x100);
    wr(&mut t, reg::STATUS, DRIVER_OK_STATUS);
    let st = rd(&mut t, reg::STATUS);
    assert_eq!(st & status::DEVICE_NEEDS_RESET, status::DEVICE_NEEDS_RESET);
    assert!(!t.is_active());
    assert_eq!(handles.activations.load(Ordering::SeqCst), 0);
    assert_eq!(
        rd(&mut t, reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 1);
    // Queue events are not handed to a device that needs a reset.
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    t.handle_queue_event(0);
    assert_eq!(handles.processed.load(Ordering::SeqCst), 0);
    // The driver's only way out is a reset.
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(rd(&mut t, reg::STATUS), st);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
}

#[test]
fn mmio_queue_address_above_4gib_is_assembled_from_both_halves() {
    let (mut t, _, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    wr(&mut t, reg::QUEUE_SEL, 1);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x2000);
    wr(&mut t, reg::QUEUE_DESC_HIGH, 0x1);
    assert_eq!(t.queue(1).unwrap().desc_table(), 0x1_0000_2000);
    // Misaligned rings are refused.
    wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x3002);
    assert_ne!(t.queue(1).unwrap().used_ring() & 0xffff_ffff, 0x3002);
}

#[test]
fn mmio_reset_clears_status_features_queues_and_interrupts() {
    let (mut t, handles, _) = transport();
    bring_up(&mut t);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    t.handle_queue_event(0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(handles.resets.load(Ordering::SeqCst), 1);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(t.acked_features(), 0);
    assert!(!t.is_active());
    for index in 0..2 {
        wr(&mut t, reg::QUEUE_SEL, index);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        let q = t.queue(index as usize).unwrap();
        assert_eq!(q.size(), q.max_size());
    }
    // And it can be brought up again.
    bring_up(&mut t);
    assert!(t.is_active());
    assert_eq!(handles.activations.load(Ordering::SeqCst), 2);
}

#[test]
fn mmio_queue_notify_reaches_device_and_raises_used_interrupt() {
    let (mut t, handles, irq) = transport();
    bring_up(&mut t);
    wr(&mut t, reg::QUEUE_NOTIFY, 1);
    wr(&mut t, reg::QUEUE_NOTIFY, 1);
    t.handle_queue_event(1);
    assert_eq!(handles.processed.load(Ordering::SeqCst), 1);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    wr(&mut t, reg::INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    let report = t.report();
    assert_eq!(report.counters.notifications, 2);
    assert_eq!(report.counters.interrupts, 1);
    // A notify of a queue that does not exist is refused.
    wr(&mut t, reg::QUEUE_NOTIFY, 2);
    assert_eq!(t.report().refused_register_accesses, 1);
}

#[test]
fn mmio_device_error_sets_needs_reset_and_stops_processing() {
    let (mut t, handles, _) = transport();
    bring_up(&mut t);
    handles.fail.store(true, Ordering::SeqCst);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    t.handle_queue_event(0);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        DRIVER_OK_STATUS | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    let report = t.report();
    assert_eq!((report.counters.errors, report.needs_reset_events), (1, 1));
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    t.handle_queue_event(0);
    assert_eq!(handles.processed.load(Ordering::SeqCst), 1);
}

#[test]
fn mmio_config_space_reads_and_writes_go_to_device_and_out_of_range_reads_zero() {
    let (mut t, _, _) = transport();
    let mut data = [0u8; 8];
    t.read(MMIO_CONFIG_SPACE_OFFSET, &mut data);
    assert_eq!(&data, b"cloister");
    let mut byte = [0u8; 1];
    t.read(MMIO_CONFIG_SPACE_OFFSET + 3, &mut byte);
    assert_eq!(byte[0], b'i');
    t.write(MMIO_CONFIG_SPACE_OFFSET + 4, b"ISTE");
    t.read(MMIO_CONFIG_SPACE_OFFSET, &mut data);
    assert_eq!(&data, b"cloiISTE");
    // Beyond the device's 8 bytes.
    let mut word = [0xffu8; 4];
    t.read(MMIO_CONFIG_SPACE_OFFSET + 6, &mut word);
    assert_eq!(word, [b'T', b'E', 0, 0]);
    t.read(MMIO_WINDOW_SIZE - 4, &mut word);
    assert_eq!(word, [0; 4]);
    t.write(MMIO_CONFIG_SPACE_OFFSET + 6, b"xyz");
    assert_eq!(t.report().refused_register_accesses, 1);
}

#[test]
fn mmio_bad_register_offsets_and_widths_are_refused_without_effect() {
    let (mut t, _, _) = transport();
    let mut two = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xffu8; 4];
    t.read(reg::MAGIC_VALUE + 1, &mut four);
    assert_eq!(four, [0; 4]);
    t.read(0x0f0, &mut four);
    t.read(reg::QUEUE_NOTIFY, &mut four);
    t.write(reg::STATUS, &[1]);
    t.write(reg::STATUS + 2, &1u32.to_le_bytes());
    t.write(reg::MAGIC_VALUE, &1u32.to_le_bytes());
    t.write(reg::STATUS, &1u64.to_le_bytes());
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(t.report().refused_register_accesses, 8);
}

#[test]
fn log_limiter_allows_first_sixteen_then_powers_of_two() {
    let mut limiter = LogLimiter::default();
    let allowed: Vec<u64> = (1..=100).filter(|_| limiter.allow()).collect::<Vec<_>>();
    assert_eq!(allowed.len(), 16 + 2, "{allowed:?}");
}
