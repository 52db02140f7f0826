//! Block device throughput, side by side with its peers on the same file.
//!
//! Pushes `--mib` MiB of sequential requests of each `--block-size` through
//! `BlockDevice` (split-ring requests written into real guest memory, served
//! by `process_queue` as the transport would), then does the same transfer
//! with plain `pread`/`pwrite` of the same block size from a user buffer and
//! with `dd bs=<block size>`, and prints MiB/s and the ratios. The image
//! stays in the page cache, so this measures what the device adds on top of
//! the system calls, not the disk. Rounds alternate between the three and
//! the median is printed. Run with `scripts/bench-block.sh`.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use cloister_vmm::devices::virtio::block::{BlockConfig, BlockDevice};
use cloister_vmm::devices::virtio::device::{QueueContext, UsedNotifier, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADERS: u64 = 0x1_0000;
const STATUSES: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const MIB: u64 = 1 << 20;

#[derive(Parser)]
#[command(about = "virtio-blk throughput against pread/pwrite and dd on the same file")]
struct Args {
    /// MiB moved per run (and the image size).
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Request sizes in KiB.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    block_kib: Vec<u64>,
    /// Requests put in the ring per kick (the driver's queue depth).
    #[arg(long, default_value_t = 16)]
    depth: u64,
    /// Bytes of guest memory per data descriptor, in KiB (a request's data
    /// spans block/segment descriptors).
    #[arg(long, default_value_t = 128)]
    segment_kib: u64,
    /// Rounds per measurement; the median is printed.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print every round's figures, not just the medians.
    #[arg(long)]
    verbose: bool,
    /// Directory for the image (default: a temp directory under $TMPDIR).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

struct NoopNotifier(Cell<u64>);

impl UsedNotifier for NoopNotifier {
    fn notify_used(&self, _queue_index: usize) -> io::Result<()> {
        self.0.set(self.0.get() + 1);
        Ok(())
    }
}

/// The driver half of a split virtqueue, just enough to post requests.
struct Driver {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
    used_idx: u16,
    block: u64,
    segment: u64,
    depth: u64,
}

impl Driver {
    fn new(block: u64, segment: u64, depth: u64) -> Result<Self, Box<dyn std::error::Error>> {
        let descs_per_request = 2 + block.div_ceil(segment);
        if descs_per_request * depth > u64::from(QUEUE_SIZE) {
            return Err(format!(
                "{depth} requests of {descs_per_request} descriptors do not fit a {QUEUE_SIZE}-entry ring; raise --segment-kib or lower --depth"
            )
            .into());
        }
        let mem_size = usize::try_from(DATA + block * depth)?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)])?;
        let mut queue = Queue::new(QUEUE_SIZE)?;
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        // Touch all guest pages once, as a running guest's would be.
        let pattern: Vec<u8> = (0..block * depth).map(|i| (i % 253) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA))?;
        Ok(Self {
            mem,
            queue,
            avail_idx: 0,
            used_idx: 0,
            block,
            segment,
            depth,
        })
    }

    /// Posts `count` requests for consecutive blocks from `first_block` on.
    fn post(
        &mut self,
        op: Op,
        first_block: u64,
        count: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut desc = 0u16;
        for k in 0..count {
            let header = HEADERS + 16 * k;
            let request_type: u32 = if op == Op::Read { 0 } else { 1 };
            let sector = (first_block + k) * self.block / 512;
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&request_type.to_le_bytes());
            raw[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&raw, GuestAddress(header))?;

            let head = desc;
            desc = self.put_desc(desc, header, 16, VIRTQ_DESC_F_NEXT)?;
            let data_flags = VIRTQ_DESC_F_NEXT
                | if op == Op::Read {
                    VIRTQ_DESC_F_WRITE
                } else {
                    0
                };
            let data = DATA + self.block * k;
            let mut off = 0;
            while off < self.block {
                let len = self.segment.min(self.block - off);
                desc = self.put_desc(desc, data + off, len as u32, data_flags)?;
                off += len;
            }
            let status = STATUSES + k;
            self.mem.write_obj(0xffu8, GuestAddress(status))?;
            desc = self.put_desc(desc, status, 1, VIRTQ_DESC_F_WRITE)?;

            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem
                .write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
    }

    /// Writes descriptor `index`, chained to the next; returns the next index.
    fn put_desc(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
    ) -> Result<u16, vm_memory::GuestMemoryError> {
        let next = index + 1;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        let chained = if flags & VIRTQ_DESC_F_NEXT != 0 {
            next
        } else {
            0
        };
        raw[14..].copy_from_slice(&chained.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(DESC_TABLE + 16 * u64::from(index)))?;
        Ok(next)
    }

    /// Lets the device serve the ring; checks every request completed OK.
    fn kick(
        &mut self,
        dev: &mut BlockDevice,
        count: u64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let notifier = NoopNotifier(Cell::new(0));
        {
            let mut queues = [&mut self.queue];
            let mut ctx = QueueContext {
                mem: &self.mem,
                queues: &mut queues,
                notifier: &notifier,
            };
            dev.process_queue(0, &mut ctx)?;
            // The device serves a bounded round per call and asks to be
            // called back (its host event) for the rest, as the event loop
            // would after serving the other devices.
            while completed(&self.mem, self.used_idx)? < count {
                dev.process_host_event(&mut ctx)?;
            }
        }
        let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2))?;
        let done = u16::from_le(used).wrapping_sub(self.used_idx);
        if u64::from(done) != count {
            return Err(format!("device completed {done} of {count} requests").into());
        }
        self.used_idx = u16::from_le(used);
        for k in 0..count {
            let status: u8 = self.mem.read_obj(GuestAddress(STATUSES + k))?;
            if status != 0 {
                return Err(format!("request {k} completed with status {status}").into());
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        dev: &mut BlockDevice,
        op: Op,
        total: u64,
    ) -> Result<Duration, Box<dyn std::error::Error>> {
        let blocks = total / self.block;
        let start = Instant::now();
        let mut block = 0;
        while block < blocks {
            let count = self.depth.min(blocks - block);
            self.post(op, block, count)?;
            self.kick(dev, count)?;
            block += count;
        }
        Ok(start.elapsed())
    }
}

/// Requests the device completed since the used index was `last_used`.
fn completed(mem: &GuestMemoryMmap, last_used: u16) -> Result<u64, vm_memory::GuestMemoryError> {
    let used: u16 = mem.read_obj(GuestAddress(USED_RING + 2))?;
    Ok(u64::from(u16::from_le(used).wrapping_sub(last_used)))
}

/// The same transfer with one pread/pwrite per block from a user buffer.
fn run_syscalls(file: &File, op: Op, block: u64, depth: u64, total: u64) -> io::Result<Duration> {
    let mut buf: Vec<u8> = (0..block * depth).map(|i| (i % 253) as u8).collect();
    let blocks = total / block;
    let block_len = usize::try_from(block).map_err(io::Error::other)?;
    let start = Instant::now();
    for b in 0..blocks {
        let slot = usize::try_from(b % depth).map_err(io::Error::other)? * block_len;
        let chunk = &mut buf[slot..slot + block_len];
        match op {
            Op::Write => file.write_all_at(chunk, b * block)?,
            Op::Read => file.read_exact_at(chunk, b * block)?,
        }
    }
    Ok(start.elapsed())
}

fn run_dd(
    image: &Path,
    op: Op,
    block: u64,
    total: u64,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let count = format!("count={}", total / block);
    let bs = format!("bs={block}");
    let image_arg = image.display();
    let args: Vec<String> = match op {
        Op::Write => vec![
            "if=/dev/zero".into(),
            format!("of={image_arg}"),
            "conv=notrunc".into(),
            bs,
            count,
            "status=none".into(),
        ],
        Op::Read => vec![
            format!("if={image_arg}"),
            "of=/dev/null".into(),
            bs,
            count,
            "status=none".into(),
        ],
    };
    let start = Instant::now();
    let status = Command::new("dd").args(&args).status()?;
    let elapsed = start.elapsed();
    if !status.success() {
        return Err(format!("dd {} failed: {status}", args.join(" ")).into());
    }
    Ok(elapsed)
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn make_image(path: &Path, bytes: u64) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 241) as u8).collect();
    for _ in 0..bytes / MIB {
        file.write_all(&chunk)?;
    }
    file.sync_all()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let image = dir.join("bench-block.img");
    let total = args.mib * MIB;
    make_image(&image, total)?;
    let peer_file = OpenOptions::new().read(true).write(true).open(&image)?;
    let mut dev = BlockDevice::new(BlockConfig {
        path: image.clone(),
        read_only: false,
        serial: None,
    })?;
    dev.ack_features(dev.features());

    println!(
        "image {} ({} MiB, page cache hot), {} requests per kick, data in {} KiB descriptors, median of {} rounds",
        image.display(),
        args.mib,
        args.depth,
        args.segment_kib,
        args.rounds
    );
    println!(
        "{:>6} {:>5} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "block", "op", "cloister", "pread/pwrite", "dd", "vs pread", "vs dd"
    );
    for &kib in &args.block_kib {
        let block = kib * 1024;
        if block == 0 || !total.is_multiple_of(block) {
            return Err(
                format!("--mib {} is not a multiple of a {kib} KiB block", args.mib).into(),
            );
        }
        let mut driver = Driver::new(block, args.segment_kib * 1024, args.depth)?;
        for op in [Op::Write, Op::Read] {
            // One unmeasured round warms the page cache and guest memory.
            driver.run(&mut dev, op, total)?;
            let (mut ours, mut syscalls, mut dd) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.rounds {
                ours.push(mib_per_s(total, driver.run(&mut dev, op, total)?));
                syscalls.push(mib_per_s(
                    total,
                    run_syscalls(&peer_file, op, block, args.depth, total)?,
                ));
                dd.push(mib_per_s(total, run_dd(&image, op, block, total)?));
            }
            if args.verbose {
                eprintln!("{kib}K rounds MiB/s: cloister {ours:.0?} pread/pwrite {syscalls:.0?} dd {dd:.0?}");
            }
            let (ours, syscalls, dd) = (median(ours), median(syscalls), median(dd));
            println!(
                "{:>4}K {:>5} {:>7.0} MiB/s {:>7.0} MiB/s {:>7.0} MiB/s {:>12.2} {:>10.2}",
                kib,
                if op == Op::Write { "write" } else { "read" },
                ours,
                syscalls,
                dd,
                ours / syscalls,
                ours / dd
            );
        }
    }
    let m = dev.metrics().snapshot();
    println!(
        "device metrics: {} requests, {} MiB from guest, {} MiB to guest, {} errors",
        m.requests,
        m.bytes_from_guest / MIB,
        m.bytes_to_guest / MIB,
        m.errors
    );
    Ok(())
}
