//! virtio-console (device type 3): the guest's `hvc0`, written to a file or
//! the VMM's stdout.
//!
//! A single port without `VIRTIO_CONSOLE_F_MULTIPORT`: queue 0 (receiveq)
//! carries host-to-guest input and queue 1 (transmitq) guest output. Every
//! byte the guest puts in transmitq goes to the [`ConsoleOutput`], at most
//! [`MAX_TX_BYTES_PER_REQUEST`] per request; nothing is sent to the guest
//! (its receive buffers stay posted). The configuration space reports a fixed
//! 80x25 console (`VIRTIO_CONSOLE_F_SIZE`) and accepts emergency writes
//! (`VIRTIO_CONSOLE_F_EMERG_WRITE`), single characters written to `emerg_wr`
//! before the queues are up. With `console=hvc0` on the kernel command line
//! the guest's logs bypass the 8250 UART, whose every byte is a VM exit.

mod device;

pub use device::{
    ConsoleDevice, ConsoleError, ConsoleOutput, CONSOLE_QUEUE_SIZE, MAX_TX_BYTES_PER_REQUEST,
};

#[cfg(test)]
mod tests;
