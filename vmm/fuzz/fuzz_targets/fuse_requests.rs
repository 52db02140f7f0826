//! Fuzzes the virtio-fs device: a sequence of raw FUSE requests (headers,
//! lengths and arguments all fuzzed) as descriptor chains through the
//! device, against a share in a temp directory that holds a few files, a
//! directory, a FIFO and symlinks pointing out of the share. After each
//! input: nothing panicked or hung, the secret next to the share kept its
//! content and mode, nothing appeared next to the share, and the read-only
//! share is exactly as it was.
//!
//! Input format (missing bytes read as zero):
//!   byte 0      bit 0 read-only share, bit 1 EVENT_IDX
//!   then records, each:
//!     le16      request length L (bytes taken from the input, at most 8 KiB)
//!     le16      reply buffer length (0: no writable descriptor)
//!     u8        bit 7: hiprio queue; bits 0-6: where the request is split
//!               into two readable descriptors (0: not split)
//!     L bytes   the request: `fuse_in_header` and arguments, as the guest
//!               writes them
//! Every input starts from a reset device and an INIT, so node ids are
//! handed out from 2 in the order of the requests' LOOKUPs.
//!
//! Seeds: `python3 make_fuse_seeds.py` (one session per request kind); the
//! committed seeds are those merged with what 60 s of fuzzing found.
//! Run (see ../README.md):
//! `cd vmm/fuzz && mkdir -p corpus/fuse_requests && cargo +nightly fuzz run fuse_requests corpus/fuse_requests seeds/fuse_requests -- -max_total_time=60`.
#![no_main]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cloister_vmm::devices::virtio::device::{
    QueueContext, UsedNotifier, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
use cloister_vmm::devices::virtio::fs::{FsConfig, FsDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 0x4_0000;
const QUEUE_SIZE: u16 = 64;
/// Each queue's rings: descriptor table, available ring, used ring.
const RINGS: [u64; 2] = [0x0, 0x2000];
const AVAIL_OFFSET: u64 = 0x400;
const USED_OFFSET: u64 = 0x800;
const REQUEST: u64 = 0x1_0000;
const REPLY: u64 = 0x2_0000;
const MAX_REQUEST: usize = 0x2000;
const MAX_RECORDS: usize = 48;
/// Largest file the fuzzed guest may make (RLIMIT_FSIZE): writes at huge
/// offsets and FALLOCATE stay small.
const MAX_FILE_BYTES: u64 = 1 << 20;
const SECRET: &[u8] = b"outside the share";

struct Share {
    root: PathBuf,
    share: PathBuf,
    secret: PathBuf,
    device: FsDevice,
    read_only: bool,
    /// What the share held when the device was made (name -> size, mode).
    pristine: BTreeMap<PathBuf, (u64, u32)>,
}

/// `dir` itself (as "") and everything under it: relative path ->
/// (size, mode), not following symlinks.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, u32)> {
    let mut out = BTreeMap::new();
    let root_mode = std::fs::metadata(dir).map(|m| m.mode()).unwrap_or(0);
    out.insert(PathBuf::new(), (0, root_mode));
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                todo.push(path.clone());
            }
            let rel = path.strip_prefix(dir).expect("inside").to_path_buf();
            out.insert(rel, (if meta.is_dir() { 0 } else { meta.len() }, meta.mode()));
        }
    }
    out
}

/// Files, a directory, a FIFO and symlinks out of the share.
fn populate(share: &Path, secret: &Path) {
    std::fs::write(share.join("file"), b"hello from the host share").expect("file");
    std::fs::create_dir(share.join("dir")).expect("dir");
    std::fs::write(share.join("dir/inner"), vec![7u8; 5000]).expect("inner");
    std::os::unix::fs::symlink(secret, share.join("abs")).expect("abs link");
    std::os::unix::fs::symlink("../secret", share.join("rel")).expect("rel link");
    std::os::unix::fs::symlink("/proc/self/fd/0", share.join("procfd")).expect("fd link");
    let fifo = std::ffi::CString::new(share.join("fifo").as_os_str().as_encoded_bytes())
        .expect("fifo path");
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Puts the writable share back as `populate` left it.
fn restore(share: &Path, secret: &Path) {
    std::fs::set_permissions(share, std::fs::Permissions::from_mode(0o755)).expect("chmod share");
    // The guest may have chmod-ed directories so that they cannot be
    // listed or emptied.
    let mut dirs = vec![share.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if std::fs::symlink_metadata(&path).map(|m| m.is_dir()).unwrap_or(false) {
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
                dirs.push(path);
            }
        }
    }
    for entry in std::fs::read_dir(share).expect("list share").flatten() {
        let path = entry.path();
        let is_dir = std::fs::symlink_metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        let _ = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    populate(share, secret);
}

/// The temp directories, removed when libFuzzer exits (the device
/// re-opens its share by path on every reset, so they must live until
/// then).
static ROOTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_roots() {
    if let Ok(roots) = ROOTS.lock() {
        for root in roots.iter() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn share(read_only: bool) -> &'static Mutex<Share> {
    static SHARES: OnceLock<[Mutex<Share>; 2]> = OnceLock::new();
    let shares = SHARES.get_or_init(|| {
        // SAFETY: registers a function without arguments that only touches
        // a static behind a lock.
        unsafe { libc::atexit(remove_roots) };
        // Keep whatever the guest writes small, and survive the signal.
        // SAFETY: plain syscalls on values we own; SIGXFSZ ignored makes an
        // oversized write fail with EFBIG instead of killing the process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: MAX_FILE_BYTES,
                rlim_max: MAX_FILE_BYTES,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
        }
        let make = |read_only: bool| {
            // tmpfs where there is one: FSYNC on a disk file system costs
            // milliseconds, which would dominate every run.
            let base = match Path::new("/dev/shm") {
                shm if shm.is_dir() => shm.to_path_buf(),
                _ => std::env::temp_dir(),
            };
            let root = base.join(format!(
                "cloister-fuzz-fs-{}-{}",
                std::process::id(),
                if read_only { "ro" } else { "rw" }
            ));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("share")).expect("share dir");
            ROOTS.lock().expect("roots lock").push(root.clone());
            let share = root.join("share");
            let secret = root.join("secret");
            std::fs::write(&secret, SECRET).expect("secret");
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
                .expect("secret mode");
            populate(&share, &secret);
            let device = FsDevice::new(FsConfig {
                read_only,
                ..FsConfig::new("fuzz", &share)
            })
            .expect("fs device");
            Mutex::new(Share {
                pristine: snapshot(&share),
                root,
                share,
                secret,
                device,
                read_only,
            })
        };
        [make(false), make(true)]
    });
    &shares[usize::from(read_only)]
}

struct Notifier(Cell<u32>);

impl UsedNotifier for Notifier {
    fn notify_used(&self, _queue_index: usize) -> io::Result<()> {
        self.0.set(self.0.get() + 1);
        Ok(())
    }
}

/// Reads the input front to back; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
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

    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn queue(index: usize, event_idx: bool) -> Queue {
    let base = RINGS[index];
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(base as u32), Some(0));
    queue.set_avail_ring_address(Some((base + AVAIL_OFFSET) as u32), Some(0));
    queue.set_used_ring_address(Some((base + USED_OFFSET) as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

/// Writes descriptor `index` of queue `q`.
fn descriptor(mem: &GuestMemoryMmap, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(RINGS[q] + 16 * u64::from(index)))
        .expect("descriptor");
}

/// Serves one chain on queue `q`: the request (split at `split`) and a
/// reply buffer of `reply_len` bytes.
fn serve(
    dev: &mut FsDevice,
    mem: &GuestMemoryMmap,
    queues: &mut [Queue; 2],
    avail: &mut [u16; 2],
    q: usize,
    request: &[u8],
    split: usize,
    reply_len: u32,
) {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    mem.write_slice(request, GuestAddress(REQUEST)).expect("request");
    let len = request.len() as u32;
    let mut parts = Vec::new();
    if split > 0 && split < request.len() {
        parts.push((REQUEST, split as u32, 0));
        parts.push((REQUEST + split as u64, len - split as u32, 0));
    } else {
        parts.push((REQUEST, len, 0));
    }
    if reply_len > 0 {
        parts.push((REPLY, reply_len, WRITE));
    }
    for (i, (addr, len, flags)) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let i = i as u16;
        descriptor(mem, q, i, *addr, *len, flags | if last { 0 } else { NEXT }, if last { 0 } else { i + 1 });
    }
    let avail_ring = RINGS[q] + AVAIL_OFFSET;
    let slot = avail[q] % QUEUE_SIZE;
    mem.write_obj(0u16, GuestAddress(avail_ring + 4 + 2 * u64::from(slot)))
        .expect("avail entry");
    avail[q] = avail[q].wrapping_add(1);
    mem.write_obj(avail[q], GuestAddress(avail_ring + 2)).expect("avail idx");

    let notifier = Notifier(Cell::new(0));
    let [q0, q1] = queues;
    let mut refs = [q0, q1];
    let mut ctx = QueueContext {
        mem,
        queues: &mut refs,
        notifier: &notifier,
    };
    let _ = dev.process_queue(q, &mut ctx);
    let _ = dev.process_host_event(&mut ctx);
}

/// FUSE_INIT, as every session starts.
fn init_request() -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(&56u32.to_le_bytes());
    req.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    req.extend_from_slice(&1u64.to_le_bytes());
    req.extend_from_slice(&0u64.to_le_bytes());
    req.extend_from_slice(&[0u8; 16]);
    req.extend_from_slice(&7u32.to_le_bytes());
    req.extend_from_slice(&31u32.to_le_bytes());
    req.extend_from_slice(&0x2_0000u32.to_le_bytes());
    req.extend_from_slice(&0u32.to_le_bytes());
    req
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let read_only = mode & 1 != 0;
    let event_idx = mode & 2 != 0;
    let mut guard = share(read_only).lock().expect("share lock");
    let share = &mut *guard;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let dev = &mut share.device;
    dev.reset();
    let mut features = dev.features();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    dev.ack_features(features);
    let mut queues = [queue(0, event_idx), queue(1, event_idx)];
    let mut avail = [0u16; 2];
    serve(dev, &mem, &mut queues, &mut avail, 1, &init_request(), 0, 0x1000);

    for _ in 0..MAX_RECORDS {
        if input.0.is_empty() {
            break;
        }
        let len = usize::from(input.u16()).min(MAX_REQUEST);
        let reply_len = u32::from(input.u16());
        let route = input.u8();
        let request = input.take(len);
        let q = usize::from(route >> 7);
        let split = usize::from(route & 0x7f);
        serve(dev, &mem, &mut queues, &mut avail, q, request, split, reply_len);
    }

    assert_eq!(std::fs::read(&share.secret).expect("secret"), SECRET, "secret changed");
    let mode = std::fs::metadata(&share.secret).expect("secret").mode() & 0o7777;
    assert_eq!(mode, 0o600, "secret's mode changed");
    let beside: Vec<_> = std::fs::read_dir(&share.root)
        .expect("list root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(beside.len(), 2, "something appeared next to the share: {beside:?}");
    let now = snapshot(&share.share);
    if share.read_only {
        assert_eq!(now, share.pristine, "read-only share changed");
    } else if now != share.pristine {
        restore(&share.share, &share.secret);
    }
});
