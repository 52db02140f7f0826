//! Fuzzes the virtio-mmio transport with the rng device behind it, through
//! the window the vCPUs use: the input is a program of register reads and
//! writes (any offset, any width), writes into the small guest memory (so descriptor tables and
//! rings can be crafted), queue kicks, and a shortcut that runs the
//! driver's whole bring-up with fuzzed queue addresses. After every step
//! the transport's invariants must hold; nothing may panic.
#![no_main]

use std::sync::{Arc, Mutex};

use cloister_vmm::devices::bus::{lock, BusDevice};
use cloister_vmm::devices::virtio::device::VIRTIO_F_VERSION_1;
use cloister_vmm::devices::virtio::mmio::{
    reg, status, MmioTransport, MmioWindow, MMIO_WINDOW_SIZE,
};
use cloister_vmm::devices::virtio::rng::{RngDevice, RNG_MAX_REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Small, so fuzzed addresses often land inside it (and often just past it).
const MEM_SIZE: u64 = 0x1_0000;
const SIZES: [usize; 4] = [1, 2, 4, 8];

/// Reads the input front to back; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn write32(t: &mut MmioWindow, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn bring_up(t: &mut MmioWindow, input: &mut Input<'_>) {
    write32(t, reg::STATUS, 0);
    write32(t, reg::STATUS, status::ACKNOWLEDGE);
    write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write32(t, reg::DRIVER_FEATURES_SEL, 1);
    write32(t, reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write32(t, reg::STATUS, features_ok);
    write32(t, reg::QUEUE_SEL, 0);
    write32(t, reg::QUEUE_NUM, 1 << (input.u8() % 10));
    for low in [reg::QUEUE_DESC_LOW, reg::QUEUE_DRIVER_LOW, reg::QUEUE_DEVICE_LOW] {
        write32(t, low, u32::from(input.u16()));
    }
    write32(t, reg::QUEUE_READY, 1);
    write32(t, reg::STATUS, features_ok | status::DRIVER_OK);
}

fn check_invariants(t: &MmioTransport) {
    let st = t.status();
    if st & status::DRIVER_OK != 0 {
        assert_ne!(st & status::FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK: {st:#x}");
    }
    if st & status::FEATURES_OK != 0 {
        assert_ne!(t.acked_features() & VIRTIO_F_VERSION_1, 0, "FEATURES_OK without VERSION_1");
    }
    assert_eq!(t.acked_features() & !VIRTIO_F_VERSION_1, 0, "unoffered feature acked");
    if t.is_active() {
        let q = t.queue(0).expect("rng has one queue");
        assert!(q.size().is_power_of_two() && q.size() <= q.max_size());
    }
    let report = t.report();
    assert!(report.counters.bytes_to_guest <= report.counters.requests * RNG_MAX_REQUEST_BYTES as u64);
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(Box::new(RngDevice::new()), mem.clone(), irq).expect("transport"),
    ));
    let mut t = MmioWindow::new(transport.clone()).expect("window");
    let mut input = Input(data);
    while !input.is_empty() {
        match input.u8() % 5 {
            0 => {
                let offset = u64::from(input.u16()) % MMIO_WINDOW_SIZE;
                let size = SIZES[usize::from(input.u8() % 4)];
                let size = size.min((MMIO_WINDOW_SIZE - offset) as usize);
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..size]);
            }
            1 => {
                let offset = u64::from(input.u16()) % MMIO_WINDOW_SIZE;
                let size = SIZES[usize::from(input.u8() % 4)];
                let size = size.min((MMIO_WINDOW_SIZE - offset) as usize);
                let value = [input.u32().to_le_bytes(), input.u32().to_le_bytes()].concat();
                t.write(offset, &value[..size]);
            }
            2 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len).to_vec();
                // Writes past the end of memory fail, as a guest's would.
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            3 => {
                let queue = u32::from(input.u8() % 2);
                write32(&mut t, reg::QUEUE_NOTIFY, queue);
                lock(&transport).handle_queue_event(queue as usize);
            }
            _ => bring_up(&mut t, &mut input),
        }
        check_invariants(&lock(&transport));
    }
});
