//! The console device's queues, configuration space and output.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader};
use vm_memory::GuestMemoryMmap;

use crate::devices::log_file::{BoundedLog, GUEST_LOG_FILE_LIMIT};
use crate::devices::virtio::device::{
    device_type, pop_chain, read_config_bytes, DeviceError, DeviceMetrics, QueueContext,
    VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Entries in each of the two queues.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// Most bytes taken from one transmit request; the rest of a larger chain
/// is dropped and counted as an error. Linux's hvc sends at most a page.
pub const MAX_TX_BYTES_PER_REQUEST: usize = 64 * 1024;

const RECEIVE_QUEUE: usize = 0;
const TRANSMIT_QUEUE: usize = 1;

/// `VIRTIO_CONSOLE_F_SIZE`: `cols` and `rows` are valid.
const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// `VIRTIO_CONSOLE_F_EMERG_WRITE`: `emerg_wr` is writable.
const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;

/// `struct virtio_console_config`: cols u16, rows u16, max_nr_ports u32,
/// emerg_wr u32.
const CONFIG_LEN: usize = 12;
const EMERG_WR_OFFSET: u64 = 8;
const COLS: u16 = 80;
const ROWS: u16 = 25;

/// Where the guest's console output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created if missing and appended to; at most
    /// [`GUEST_LOG_FILE_LIMIT`] bytes of it come from the guest.
    File(PathBuf),
    /// Discarded (counted in the metrics only).
    Sink,
}

/// Why the console cannot be created, or a transmit request was lost.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open console output {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("transmit descriptor chain points outside guest memory: {0}")]
    BadChain(virtio_queue::Error),
    #[error("transmit request has no device-readable bytes")]
    Empty,
    #[error(
        "transmit request of {len} bytes exceeds {MAX_TX_BYTES_PER_REQUEST}; the rest was dropped"
    )]
    TooLong { len: usize },
    #[error("cannot write console output: {0}")]
    Output(io::Error),
}

/// virtio-console with one port whose output goes to a [`ConsoleOutput`].
pub struct ConsoleDevice {
    output: Box<dyn Write + Send>,
    acked_features: u64,
    metrics: DeviceMetrics,
}

impl ConsoleDevice {
    pub fn new(output: ConsoleOutput) -> Result<Self, ConsoleError> {
        let output: Box<dyn Write + Send> = match output {
            ConsoleOutput::Stdout => Box::new(io::stdout()),
            ConsoleOutput::File(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| ConsoleError::Open { path, source })?;
                Box::new(BoundedLog::new(file, GUEST_LOG_FILE_LIMIT))
            }
            ConsoleOutput::Sink => Box::new(io::sink()),
        };
        Ok(Self {
            output,
            acked_features: 0,
            metrics: DeviceMetrics::default(),
        })
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Writes every available transmit request to the output; returns
    /// whether any buffer was used.
    fn transmit(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, DeviceError> {
        let queue_err = |source| DeviceError::Queue {
            index: TRANSMIT_QUEUE,
            source,
        };
        let mut used_any = false;
        // Each pass normally takes at least one request; the bound is for a
        // driver that keeps moving its index without adding any (requests
        // left then wait for the next kick).
        for _ in 0..CONSOLE_QUEUE_SIZE {
            queue.disable_notification(mem).map_err(queue_err)?;
            while let Some(chain) = pop_chain(queue, mem, TRANSMIT_QUEUE)? {
                let head = chain.head_index();
                DeviceMetrics::add(&self.metrics.requests, 1);
                match self.write_chain(mem, chain) {
                    Ok(n) => DeviceMetrics::add(&self.metrics.bytes_from_guest, n as u64),
                    Err(e) => {
                        DeviceMetrics::add(&self.metrics.errors, 1);
                        tracing::debug!("console transmit request {head}: {e}");
                    }
                }
                // The device writes nothing into transmit buffers.
                queue.add_used(mem, head, 0).map_err(queue_err)?;
                used_any = true;
            }
            if !queue.enable_notification(mem).map_err(queue_err)? {
                break;
            }
        }
        if let Err(e) = self.output.flush() {
            DeviceMetrics::add(&self.metrics.errors, 1);
            tracing::debug!("console output flush: {e}");
        }
        Ok(used_any)
    }

    /// Copies the chain's readable bytes (up to the per-request bound) to the
    /// output through `io::copy`'s fixed stack buffer.
    fn write_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, ConsoleError> {
        let mut reader = Reader::new(mem, chain).map_err(ConsoleError::BadChain)?;
        let len = reader.available_bytes();
        if len == 0 {
            return Err(ConsoleError::Empty);
        }
        let take = len.min(MAX_TX_BYTES_PER_REQUEST);
        let copied = io::copy(&mut (&mut reader).take(take as u64), &mut self.output)
            .map_err(ConsoleError::Output)?;
        if len > take {
            // Counted as an error; the bytes that fit were written.
            DeviceMetrics::add(&self.metrics.bytes_from_guest, copied);
            return Err(ConsoleError::TooLong { len });
        }
        // At most MAX_TX_BYTES_PER_REQUEST.
        Ok(usize::try_from(copied).unwrap_or(take))
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[0..2].copy_from_slice(&COLS.to_le_bytes());
        config[2..4].copy_from_slice(&ROWS.to_le_bytes());
        // max_nr_ports (4..8) is valid only with MULTIPORT; emerg_wr reads 0.
        config
    }
}

impl VirtioDevice for ConsoleDevice {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn name(&self) -> &str {
        "console"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_SIZE | VIRTIO_CONSOLE_F_EMERG_WRITE
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    /// Only `emerg_wr` is writable: its low byte is one character of output.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match (offset, data.first()) {
            (EMERG_WR_OFFSET, Some(&byte)) => {
                DeviceMetrics::add(&self.metrics.bytes_from_guest, 1);
                self.output
                    .write_all(&[byte])
                    .and_then(|()| self.output.flush())
                    .map_err(|e| {
                        DeviceMetrics::add(&self.metrics.errors, 1);
                        DeviceError::Backend(format!("console emergency write: {e}"))
                    })
            }
            _ => Err(DeviceError::Backend(format!(
                "console configuration is read-only except emerg_wr (offset {EMERG_WR_OFFSET:#x}): write of {} bytes at offset {offset:#x}",
                data.len()
            ))),
        }
    }

    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError> {
        match queue_index {
            // Input buffers stay posted until the host has input, which it
            // never has yet.
            RECEIVE_QUEUE => Ok(()),
            TRANSMIT_QUEUE => {
                ctx.serve_queue(TRANSMIT_QUEUE, |mem, queue| self.transmit(mem, queue))
            }
            other => Err(DeviceError::NoSuchQueue(other)),
        }
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }
}
