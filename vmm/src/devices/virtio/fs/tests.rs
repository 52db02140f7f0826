//! virtio-fs device tests: real FUSE requests, as a Linux guest would send
//! them, through `MockSplitQueue` chains in real guest memory, against a
//! share in a temp directory. The host side is checked with std::fs.

use std::ffi::CString;
use std::fs;
use std::mem::size_of;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, FsyncIn, GetattrIn, InHeader, InitIn, LinkIn, MkdirIn, MknodIn,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, WriteIn,
    WriteOut,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::device::{QueueContext, VirtioDevice};
use crate::devices::virtio::test_utils::{guest_memory, readable, writable, CountingNotifier};

const MEM_SIZE: usize = 0x40_0000;
/// The request queue's rings at 0, the hiprio queue's at 0x8000; the
/// request from 1 MiB, the reply buffer from 2 MiB.
const HIPRIO_RINGS: u64 = 0x8000;
const REQUEST: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;
const REPLY_LEN: u32 = 0x10_0000;
const ROOT: u64 = 1;
const FATTR_MODE: u32 = 1 << 0;
const FATTR_SIZE: u32 = 1 << 3;
const FUSE_RENAME_FLAGS_NONE: u32 = 0;
const SECRET: &[u8] = b"host secret outside the share";

/// A FUSE reply: `error` is 0 or a negative errno.
#[derive(Debug)]
struct Reply {
    error: i32,
    body: Vec<u8>,
}

impl Reply {
    fn errno(&self) -> i32 {
        assert_ne!(self.error, i32::MIN, "no reply");
        -self.error
    }

    fn obj<T: ByteValued>(&self) -> T {
        assert_eq!(self.error, 0, "expected success, got errno {}", -self.error);
        *T::from_slice(&self.body[..size_of::<T>()]).unwrap()
    }
}

/// A share, a secret next to (outside) it, and a driver for the device.
struct Guest {
    dev: FsDevice,
    mem: GuestMemoryMmap,
    unique: u64,
    _tmp: tempfile::TempDir,
    share: PathBuf,
    secret: PathBuf,
}

fn bytes<T: ByteValued>(value: &T) -> Vec<u8> {
    value.as_slice().to_vec()
}

fn name(text: &str) -> Vec<u8> {
    CString::new(text).unwrap().into_bytes_with_nul()
}

fn names(a: &str, b: &str) -> Vec<u8> {
    [name(a), name(b)].concat()
}

impl Guest {
    fn new(read_only: bool) -> Self {
        Self::with(|cfg| cfg.read_only = read_only)
    }

    fn with(adjust: impl FnOnce(&mut FsConfig)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        fs::create_dir(&share).unwrap();
        let secret = tmp.path().join("secret");
        fs::write(&secret, SECRET).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let mut cfg = FsConfig::new("myfs", &share);
        adjust(&mut cfg);
        let mut dev = FsDevice::new(cfg).unwrap();
        dev.ack_features(dev.features());
        let mut guest = Guest {
            dev,
            mem: guest_memory(MEM_SIZE),
            unique: 0,
            _tmp: tmp,
            share,
            secret,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: 0,
        };
        let reply = guest.call(Opcode::Init, 0, &bytes(&init));
        assert_eq!(reply.error, 0, "INIT failed");
        guest
    }

    /// Runs the chains on queue `queue_index` (1: request, 0: hiprio);
    /// returns the used lengths.
    fn serve(&mut self, queue_index: usize, chains: &[Vec<RawDescriptor>]) -> Vec<u32> {
        let mem = &self.mem;
        let request = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let hiprio = MockSplitQueue::create(mem, GuestAddress(HIPRIO_RINGS), 256);
        let vq = if queue_index == 0 { &hiprio } else { &request };
        let mut offset = 0u16;
        for chain in chains {
            let linked = link(chain, offset);
            vq.add_desc_chains(&linked, offset).unwrap();
            offset += chain.len() as u16;
        }
        let mut q0: Queue = hiprio.create_queue().unwrap();
        let mut q1: Queue = request.create_queue().unwrap();
        let notifier = CountingNotifier::default();
        {
            let mut queues = [&mut q0, &mut q1];
            let mut ctx = QueueContext {
                mem,
                queues: &mut queues,
                notifier: &notifier,
            };
            self.dev.process_queue(queue_index, &mut ctx).unwrap();
            for _ in 0..4 {
                self.dev.process_host_event(&mut ctx).unwrap();
            }
        }
        let used = vq.used().idx().load();
        (0..used)
            .map(|i| vq.used().ring().ref_at(i as usize).unwrap().load().len())
            .collect()
    }

    /// Sends one request with `args` after the header; returns the reply.
    fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[u8]) -> Reply {
        self.call_with_len(opcode, nodeid, args, None)
    }

    /// As [`Self::call`], with the header's length field set to `len`.
    fn call_with_len(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        args: &[u8],
        len: Option<u32>,
    ) -> Reply {
        self.unique += 1;
        let total = (size_of::<InHeader>() + args.len()) as u32;
        let header = InHeader {
            len: len.unwrap_or(total),
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let request = [bytes(&header), args.to_vec()].concat();
        self.mem
            .write_slice(&request, GuestAddress(REQUEST))
            .unwrap();
        self.mem
            .write_slice(&vec![0u8; REPLY_LEN as usize], GuestAddress(REPLY))
            .unwrap();
        let used = self.serve(
            1,
            &[vec![readable(REQUEST, total), writable(REPLY, REPLY_LEN)]],
        );
        assert_eq!(used.len(), 1, "one chain, one used entry");
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).unwrap();
        if used[0] == 0 {
            return Reply {
                error: i32::MIN,
                body: Vec::new(),
            };
        }
        assert_eq!(out.unique, self.unique, "reply to another request");
        assert_eq!(out.len, used[0], "used length is the reply's length");
        let mut body = vec![0u8; out.len as usize - size_of::<OutHeader>()];
        self.mem
            .read_slice(
                &mut body,
                GuestAddress(REPLY + size_of::<OutHeader>() as u64),
            )
            .unwrap();
        Reply {
            error: out.error,
            body,
        }
    }

    fn lookup(&mut self, parent: u64, entry: &str) -> Result<EntryOut, i32> {
        self.entry_reply(Opcode::Lookup, parent, &name(entry))
    }

    fn entry_reply(&mut self, opcode: Opcode, node: u64, args: &[u8]) -> Result<EntryOut, i32> {
        let reply = self.call(opcode, node, args);
        if reply.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.obj())
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let args = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let reply = self.call(Opcode::Open, node, &bytes(&args));
        if reply.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.obj::<OpenOut>().fh)
    }

    fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let args = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let reply = self.call(Opcode::Read, node, &bytes(&args));
        if reply.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.body)
    }

    fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let args = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let reply = self.call(Opcode::Write, node, &[bytes(&args), data.to_vec()].concat());
        if reply.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.obj::<WriteOut>().size)
    }

    fn create(
        &mut self,
        parent: u64,
        entry: &str,
        flags: i32,
        mode: u32,
    ) -> Result<(EntryOut, u64), i32> {
        let args = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        let reply = self.call(
            Opcode::Create,
            parent,
            &[bytes(&args), name(entry)].concat(),
        );
        if reply.error != 0 {
            return Err(reply.errno());
        }
        let entry: EntryOut = reply.obj();
        let open =
            *OpenOut::from_slice(&reply.body[size_of::<EntryOut>()..][..size_of::<OpenOut>()])
                .unwrap();
        Ok((entry, open.fh))
    }

    fn mkdir(&mut self, parent: u64, entry: &str) -> Result<EntryOut, i32> {
        let args = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        self.entry_reply(Opcode::Mkdir, parent, &[bytes(&args), name(entry)].concat())
    }

    fn getattr(&mut self, node: u64) -> Result<AttrOut, i32> {
        let reply = self.call(Opcode::Getattr, node, &bytes(&GetattrIn::default()));
        if reply.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.obj())
    }

    fn setattr(&mut self, node: u64, args: SetattrIn) -> i32 {
        self.call(Opcode::Setattr, node, &bytes(&args)).errno()
    }

    fn fsync(&mut self, node: u64, fh: u64) -> i32 {
        let args = FsyncIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Fsync, node, &bytes(&args)).errno()
    }

    fn release(&mut self, node: u64, fh: u64) -> i32 {
        let args = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(Opcode::Release, node, &bytes(&args)).errno()
    }

    fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> i32 {
        let args = Rename2In {
            newdir,
            flags: FUSE_RENAME_FLAGS_NONE,
            padding: 0,
        };
        self.call(
            Opcode::Rename2,
            olddir,
            &[bytes(&args), names(old, new)].concat(),
        )
        .errno()
    }

    fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        let reply = self.call(Opcode::Readlink, node, &[]);
        if reply.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.body)
    }

    fn host(&self, rel: &str) -> PathBuf {
        self.share.join(rel)
    }

    fn metrics(&self) -> FsMetricsSnapshot {
        self.dev.fs_metrics().snapshot()
    }
}

/// Links a chain's descriptors with NEXT, placed from table index `offset`.
fn link(chain: &[RawDescriptor], offset: u16) -> Vec<RawDescriptor> {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    chain
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let last = i + 1 == chain.len();
            let flags = if last {
                d.flags()
            } else {
                d.flags() | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { offset + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
        })
        .collect()
}

fn secret_unchanged(guest: &Guest) {
    assert_eq!(fs::read(&guest.secret).unwrap(), SECRET);
    let meta = fs::metadata(&guest.secret).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600, "secret's mode changed");
}

// --- configuration ---

#[test]
fn config_space_holds_tag_and_request_queue_count() {
    let guest = Guest::with(|cfg| {
        cfg.tag = "rootfs".into();
        cfg.request_queues = 3;
    });
    let mut config = [0xffu8; CONFIG_LEN];
    guest.dev.read_config(0, &mut config);

    assert_eq!(&config[..6], b"rootfs");
    assert!(config[6..MAX_TAG_BYTES].iter().all(|b| *b == 0));
    assert_eq!(config[MAX_TAG_BYTES..], 3u32.to_le_bytes());
    assert_eq!(guest.dev.device_type(), 26);
    assert_eq!(guest.dev.queue_max_sizes(), &[FS_QUEUE_SIZE; 4]);
}

#[test]
fn bad_tag_queue_count_or_directory_names_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let long = "t".repeat(MAX_TAG_BYTES + 1);
    for (tag, want) in [("", "\"\""), (long.as_str(), "37 bytes"), ("a\0b", "NUL")] {
        let err = FsDevice::new(FsConfig::new(tag, dir.path()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    let exactly = "t".repeat(MAX_TAG_BYTES);
    FsDevice::new(FsConfig::new(exactly, dir.path())).unwrap();

    let mut cfg = FsConfig::new("t", dir.path());
    cfg.request_queues = 0;
    let err = FsDevice::new(cfg).err().unwrap().to_string();
    assert!(err.contains("request queues = 0"), "{err}");

    let missing = dir.path().join("nope");
    let err = FsDevice::new(FsConfig::new("t", &missing))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = FsDevice::new(FsConfig::new("t", &file))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is not a directory"), "{err}");
}

// --- what a guest does, seen on the host ---

#[test]
fn create_write_fsync_rename_read_round_trip_is_visible_on_the_host() {
    let mut g = Guest::new(false);
    let dir = g.mkdir(ROOT, "d").unwrap();
    let (file, fh) = g
        .create(dir.nodeid, "new.txt", libc::O_RDWR, 0o640)
        .unwrap();
    assert_eq!(g.write(file.nodeid, fh, 0, b"hello ").unwrap(), 6);
    assert_eq!(g.write(file.nodeid, fh, 6, b"virtio-fs").unwrap(), 9);
    assert_eq!(g.fsync(file.nodeid, fh), 0);
    assert_eq!(fs::read(g.host("d/new.txt")).unwrap(), b"hello virtio-fs");
    assert_eq!(
        fs::metadata(g.host("d/new.txt")).unwrap().mode() & 0o777,
        0o640
    );

    assert_eq!(g.rename(dir.nodeid, "new.txt", ROOT, "moved.txt"), 0);
    assert!(!g.host("d/new.txt").exists());
    assert_eq!(fs::read(g.host("moved.txt")).unwrap(), b"hello virtio-fs");
    assert_eq!(g.read(file.nodeid, fh, 6, 100).unwrap(), b"virtio-fs");
    assert_eq!(g.release(file.nodeid, fh), 0);

    // The host changes a file; the guest reads what the host wrote.
    fs::write(g.host("moved.txt"), b"from the host").unwrap();
    let entry = g.lookup(ROOT, "moved.txt").unwrap();
    assert_eq!(entry.nodeid, file.nodeid, "same file, same node id");
    let fh = g.open(entry.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(entry.nodeid, fh, 0, 4096).unwrap(), b"from the host");
    assert_eq!(g.getattr(entry.nodeid).unwrap().attr.size, 13);

    let m = g.metrics();
    assert_eq!((m.writes, m.reads, m.malformed), (2, 2, 0));
    assert_eq!(g.dev.metrics().snapshot().errors, 0);
}

#[test]
fn init_does_not_change_the_process_umask() {
    // A thread started before the device's INIT shares the process's
    // fs_struct; INIT runs on this thread.
    let (ask, asked) = std::sync::mpsc::channel::<()>();
    let (tell, told) = std::sync::mpsc::channel::<String>();
    let watcher = std::thread::spawn(move || {
        while asked.recv().is_ok() {
            let status = fs::read_to_string("/proc/thread-self/status").unwrap();
            let umask = status
                .lines()
                .find(|l| l.starts_with("Umask:"))
                .unwrap()
                .to_string();
            tell.send(umask).unwrap();
        }
    });
    ask.send(()).unwrap();
    let before = told.recv().unwrap();

    let _guest = Guest::new(false);
    ask.send(()).unwrap();
    let after = told.recv().unwrap();
    drop(ask);
    watcher.join().unwrap();

    assert_eq!(before, after);
    let own = fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(
        own.contains("Umask:\t0000"),
        "the device thread has umask 0"
    );
}

// --- confinement ---

#[test]
fn dotdot_at_the_root_stays_at_the_root() {
    let mut g = Guest::new(false);
    let root_ino = fs::metadata(&g.share).unwrap().ino();

    let up = g.lookup(ROOT, "..").unwrap();
    assert_eq!(up.nodeid, ROOT);
    assert_eq!(up.attr.ino, root_ino);
    assert_eq!(g.lookup(up.nodeid, "secret").unwrap_err(), libc::ENOENT);

    let sub = g.mkdir(ROOT, "sub").unwrap();
    let up = g.lookup(sub.nodeid, "..").unwrap();
    assert_eq!(up.nodeid, ROOT, "the root has one node id");
    let upup = g.lookup(up.nodeid, "..").unwrap();
    assert_eq!(upup.nodeid, ROOT);
    assert_eq!(g.lookup(upup.nodeid, "secret").unwrap_err(), libc::ENOENT);
    let dot = g.lookup(ROOT, ".").unwrap();
    assert_eq!(dot.nodeid, ROOT);
}

#[test]
fn names_with_slash_nul_or_dots_are_refused() {
    let mut g = Guest::new(false);
    fs::write(g.host("a"), b"in the share").unwrap();

    for bad in ["../secret", "a/../../secret", "/etc/passwd", "sub/"] {
        assert_eq!(g.lookup(ROOT, bad).unwrap_err(), libc::EINVAL, "{bad}");
    }
    // A NUL inside would otherwise cut the name to "a".
    let inner_nul = b"a\0/../secret\0".to_vec();
    assert_eq!(
        g.call(Opcode::Lookup, ROOT, &inner_nul).errno(),
        libc::EINVAL
    );
    assert_eq!(g.call(Opcode::Lookup, ROOT, b"\0").errno(), libc::EINVAL);
    for bad in [".", "..", "x/y"] {
        assert_eq!(g.mkdir(ROOT, bad).unwrap_err(), libc::EINVAL, "mkdir {bad}");
        assert_eq!(
            g.create(ROOT, bad, libc::O_RDWR, 0o644).unwrap_err(),
            libc::EINVAL,
            "create {bad}"
        );
    }
    assert_eq!(g.rename(ROOT, "a", ROOT, "../escaped"), libc::EINVAL);
    assert_eq!(g.rename(ROOT, "a", ROOT, ".."), libc::EINVAL);
    assert_eq!(
        g.call(Opcode::Unlink, ROOT, &name("..")).errno(),
        libc::EINVAL
    );
    let args = LinkIn { oldnodeid: ROOT };
    assert_eq!(
        g.call(Opcode::Link, ROOT, &[bytes(&args), name("../l")].concat())
            .errno(),
        libc::EINVAL
    );
    assert!(!g.share.parent().unwrap().join("escaped").exists());
    assert_eq!(fs::read(g.host("a")).unwrap(), b"in the share");
    assert!(g.metrics().bad_names >= 2);
}

/// Symlinks in the share pointing out of it, planted by the host or made
/// by the guest: looked up, opened, read, written, chmod-ed by inode, none
/// reaches the target.
#[test]
fn symlinks_out_of_the_share_are_never_followed() {
    let mut g = Guest::new(false);
    let secret_fd = fs::File::open(&g.secret).unwrap();
    let fd_path = format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&secret_fd)
    );
    std::os::unix::fs::symlink(&g.secret, g.host("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", g.host("rel")).unwrap();
    std::os::unix::fs::symlink(&fd_path, g.host("procfd")).unwrap();
    std::os::unix::fs::symlink("/etc", g.host("etcdir")).unwrap();
    let made = [bytes(&0u8)[..0].to_vec(), names("guestmade", "/etc/passwd")].concat();
    let guest_link = g.entry_reply(Opcode::Symlink, ROOT, &made).unwrap();
    assert_eq!(
        fs::read_link(g.host("guestmade")).unwrap(),
        Path::new("/etc/passwd")
    );

    for link_name in ["abs", "rel", "procfd", "guestmade"] {
        let link = g.lookup(ROOT, link_name).unwrap();
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{link_name}");
        // READLINK gives the text; the guest resolves it in its own view.
        assert!(!g.readlink(link.nodeid).unwrap().is_empty());
        for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
            let err = g.open(link.nodeid, flags).unwrap_err();
            assert!(
                [libc::EBADF, libc::ELOOP].contains(&err),
                "open {link_name} {flags:#o}: errno {err}"
            );
        }
        // Handles are per inode: one of another file does not read it.
        let (other, fh) = g
            .create(ROOT, &format!("f-{link_name}"), libc::O_RDWR, 0o644)
            .unwrap();
        assert_eq!(g.read(link.nodeid, fh, 0, 4096).unwrap_err(), libc::EBADF);
        assert_eq!(g.write(link.nodeid, fh, 0, b"x").unwrap_err(), libc::EBADF);
        assert_eq!(g.release(other.nodeid, fh), 0);
        // chmod and truncate by inode act on the link, never the target.
        let chmod = SetattrIn {
            valid: FATTR_MODE,
            mode: 0o666,
            ..Default::default()
        };
        let _ = g.setattr(link.nodeid, chmod);
        let truncate = SetattrIn {
            valid: FATTR_SIZE,
            size: 0,
            ..Default::default()
        };
        assert_ne!(g.setattr(link.nodeid, truncate), 0, "truncate {link_name}");
        // CREATE over the link's name must not open its target either.
        let err = g.create(ROOT, link_name, libc::O_RDWR, 0o644).unwrap_err();
        assert!(
            [libc::EBADF, libc::EEXIST, libc::ELOOP].contains(&err),
            "{err}"
        );
        secret_unchanged(&g);
    }
    assert_eq!(guest_link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    // A symlink to a directory is not a directory to look into.
    let etc = g.lookup(ROOT, "etcdir").unwrap();
    assert_eq!(g.lookup(etc.nodeid, "passwd").unwrap_err(), libc::ENOTDIR);
    let opendir = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    assert_ne!(
        g.call(Opcode::Opendir, etc.nodeid, &bytes(&opendir))
            .errno(),
        0
    );
}

#[test]
fn node_ids_and_handles_never_handed_out_are_ebadf() {
    let mut g = Guest::new(false);
    fs::write(g.host("f"), b"data").unwrap();
    let f = g.lookup(ROOT, "f").unwrap();
    let fh = g.open(f.nodeid, libc::O_RDONLY).unwrap();

    for node in [0u64, 2 + f.nodeid, 12345, u64::MAX] {
        assert_eq!(g.getattr(node).unwrap_err(), libc::EBADF, "getattr {node}");
        assert_eq!(
            g.open(node, libc::O_RDONLY).unwrap_err(),
            libc::EBADF,
            "open {node}"
        );
        assert_eq!(
            g.lookup(node, "f").unwrap_err(),
            libc::EBADF,
            "lookup in {node}"
        );
        assert_eq!(
            g.read(node, fh, 0, 10).unwrap_err(),
            libc::EBADF,
            "read {node}"
        );
    }
    assert_eq!(g.read(f.nodeid, fh + 100, 0, 10).unwrap_err(), libc::EBADF);
    assert_eq!(g.release(f.nodeid, fh + 100), libc::EBADF);
    // FORGET of unknown nodes (hiprio, no reply), then the file still reads.
    let forget = [
        bytes(&InHeader {
            len: (size_of::<InHeader>() + 8) as u32,
            opcode: Opcode::Forget as u32,
            unique: 999,
            nodeid: 777,
            ..Default::default()
        }),
        5u64.to_le_bytes().to_vec(),
    ]
    .concat();
    g.mem.write_slice(&forget, GuestAddress(REQUEST)).unwrap();
    let used = g.serve(0, &[vec![readable(REQUEST, forget.len() as u32)]]);
    assert_eq!(used, vec![0]);
    assert_eq!(g.read(f.nodeid, fh, 0, 10).unwrap(), b"data");
    assert_eq!(g.metrics().forgets, 1);
}

#[test]
fn fifos_are_never_opened_and_device_nodes_never_made() {
    let mut g = Guest::new(false);
    let fifo = MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    let fifo = g
        .entry_reply(Opcode::Mknod, ROOT, &[bytes(&fifo), name("fifo")].concat())
        .unwrap();
    // Opening a FIFO on the host would block the device thread.
    assert_eq!(
        g.open(fifo.nodeid, libc::O_RDONLY).unwrap_err(),
        libc::EBADF
    );
    assert_eq!(
        g.open(fifo.nodeid, libc::O_WRONLY).unwrap_err(),
        libc::EBADF
    );

    for kind in [libc::S_IFCHR, libc::S_IFBLK] {
        let dev = MknodIn {
            mode: kind | 0o666,
            rdev: (1 << 8) | 3, // /dev/null's and a disk's kind of numbers
            ..Default::default()
        };
        let err = g
            .entry_reply(Opcode::Mknod, ROOT, &[bytes(&dev), name("dev")].concat())
            .unwrap_err();
        assert_eq!(err, libc::EPERM);
    }
    assert!(!g.host("dev").exists());
    assert_eq!(g.metrics().device_node_refusals, 2);
}

// --- read-only shares ---

#[test]
fn read_only_share_refuses_every_change_with_erofs() {
    let mut g = Guest::new(true);
    fs::write(g.host("f"), b"keep").unwrap();
    fs::create_dir(g.host("d")).unwrap();
    let f = g.lookup(ROOT, "f").unwrap();
    let d = g.lookup(ROOT, "d").unwrap();
    let fh = g.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(f.nodeid, fh, 0, 100).unwrap(), b"keep");

    let mut errnos = vec![
        ("write", g.write(f.nodeid, fh, 0, b"x").unwrap_err()),
        (
            "create",
            g.create(ROOT, "n", libc::O_RDWR, 0o644).unwrap_err(),
        ),
        ("mkdir", g.mkdir(ROOT, "n").unwrap_err()),
        ("rename", g.rename(ROOT, "f", ROOT, "g")),
        ("open rdwr", g.open(f.nodeid, libc::O_RDWR).unwrap_err()),
        ("open wronly", g.open(f.nodeid, libc::O_WRONLY).unwrap_err()),
        (
            "open trunc",
            g.open(f.nodeid, libc::O_RDONLY | libc::O_TRUNC)
                .unwrap_err(),
        ),
    ];
    let mknod = MknodIn {
        mode: libc::S_IFREG | 0o644,
        ..Default::default()
    };
    let calls: Vec<(&str, Opcode, u64, Vec<u8>)> = vec![
        (
            "mknod",
            Opcode::Mknod,
            ROOT,
            [bytes(&mknod), name("n")].concat(),
        ),
        ("unlink", Opcode::Unlink, ROOT, name("f")),
        ("rmdir", Opcode::Rmdir, ROOT, name("d")),
        (
            "rename v1",
            Opcode::Rename,
            ROOT,
            [bytes(&RenameIn { newdir: ROOT }), names("f", "g")].concat(),
        ),
        (
            "link",
            Opcode::Link,
            ROOT,
            [
                bytes(&LinkIn {
                    oldnodeid: f.nodeid,
                }),
                name("l"),
            ]
            .concat(),
        ),
        ("symlink", Opcode::Symlink, ROOT, names("s", "f")),
        (
            "setattr",
            Opcode::Setattr,
            f.nodeid,
            bytes(&SetattrIn {
                valid: FATTR_SIZE,
                ..Default::default()
            }),
        ),
        (
            "setxattr",
            Opcode::Setxattr,
            f.nodeid,
            [
                1u32.to_le_bytes().to_vec(),
                vec![0u8; 4],
                name("user.x"),
                b"v".to_vec(),
            ]
            .concat(),
        ),
        ("removexattr", Opcode::Removexattr, f.nodeid, name("user.x")),
        (
            "fallocate",
            Opcode::Fallocate,
            f.nodeid,
            [
                fh.to_le_bytes().to_vec(),
                vec![0u8; 8],
                10u64.to_le_bytes().to_vec(),
                vec![0u8; 8],
            ]
            .concat(),
        ),
    ];
    for (what, opcode, node, args) in calls {
        errnos.push((what, g.call(opcode, node, &args).errno()));
    }
    let _ = d;

    for (what, errno) in &errnos {
        assert_eq!(*errno, libc::EROFS, "{what}");
    }
    assert_eq!(fs::read(g.host("f")).unwrap(), b"keep");
    let mut listing: Vec<_> = fs::read_dir(&g.share)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    listing.sort();
    assert_eq!(listing, [b"d".to_vec(), b"f".to_vec()]);
    assert_eq!(g.metrics().read_only_refusals, errnos.len() as u64);
}

// --- malformed requests ---

#[test]
fn malformed_chains_complete_with_zero_bytes_or_an_errno_and_are_counted() {
    let mut g = Guest::new(false);
    fs::write(g.host("f"), b"still works").unwrap();
    let errors_before = g.dev.metrics().snapshot().errors;

    // Unknown opcode: ENOSYS.
    g.mem
        .write_slice(&[0u8; 64], GuestAddress(REQUEST))
        .unwrap();
    let unknown = InHeader {
        len: 40,
        opcode: 9999,
        unique: 5,
        ..Default::default()
    };
    g.mem.write_obj(unknown, GuestAddress(REQUEST)).unwrap();
    let used = g.serve(1, &[vec![readable(REQUEST, 40), writable(REPLY, 4096)]]);
    assert_eq!(used, vec![16]);
    let out: OutHeader = g.mem.read_obj(GuestAddress(REPLY)).unwrap();
    assert_eq!((out.error, out.unique), (-libc::ENOSYS, 5));

    let lookup = InHeader {
        len: 40 + 2,
        opcode: Opcode::Lookup as u32,
        unique: 6,
        nodeid: ROOT,
        ..Default::default()
    };
    g.mem.write_obj(lookup, GuestAddress(REQUEST)).unwrap();
    g.mem
        .write_slice(b"f\0", GuestAddress(REQUEST + 40))
        .unwrap();
    let chains = vec![
        // Truncated header.
        vec![readable(REQUEST, 10), writable(REPLY, 4096)],
        // No buffers at all for the reply.
        vec![readable(REQUEST, 42)],
        // Reply buffer too small for a header.
        vec![readable(REQUEST, 42), writable(REPLY, 8)],
        // Buffers outside guest memory.
        vec![
            readable(MEM_SIZE as u64 + 0x1000, 42),
            writable(REPLY, 4096),
        ],
        vec![readable(REQUEST, 42), writable(MEM_SIZE as u64 - 8, 4096)],
        // A readable descriptor running past the end of memory.
        vec![readable(MEM_SIZE as u64 - 16, 64), writable(REPLY, 4096)],
        // Only device-writable buffers.
        vec![writable(REPLY, 4096)],
    ];
    let used = g.serve(1, &chains);
    assert_eq!(
        used,
        vec![0; chains.len()],
        "each completed, with nothing written"
    );
    assert!(g.dev.metrics().snapshot().errors >= errors_before + chains.len() as u64 - 1);

    // Header lengths that lie, in both directions, and truncated arguments.
    for len in [0u32, 39, 41, 4096, u32::MAX] {
        let _ = g.call_with_len(Opcode::Lookup, ROOT, &name("f"), Some(len));
    }
    for opcode in [
        Opcode::Read,
        Opcode::Write,
        Opcode::Setattr,
        Opcode::Rename2,
        Opcode::Init,
    ] {
        let reply = g.call(opcode, ROOT, &[1, 2, 3]);
        assert_ne!(reply.error, 0, "{opcode:?} with 3 bytes of arguments");
    }
    // A READ asking for more than the reply buffer holds.
    let fh = {
        let f = g.lookup(ROOT, "f").unwrap();
        (f.nodeid, g.open(f.nodeid, libc::O_RDONLY).unwrap())
    };
    let _ = g.read(fh.0, fh.1, 0, u32::MAX);

    // And the device still serves a well-formed request.
    let f = g.lookup(ROOT, "f").unwrap();
    let handle = g.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(f.nodeid, handle, 0, 100).unwrap(), b"still works");
    assert!(g.metrics().malformed >= 4);
}

#[test]
fn a_full_ring_is_served_over_several_rounds() {
    let mut g = Guest::new(false);
    let total = MAX_REQUESTS_PER_ROUND as usize + 10;
    let request = InHeader {
        len: 40 + 16,
        opcode: Opcode::Getattr as u32,
        unique: 1,
        nodeid: ROOT,
        ..Default::default()
    };
    g.mem
        .write_slice(
            &[bytes(&request), vec![0u8; 16]].concat(),
            GuestAddress(REQUEST),
        )
        .unwrap();
    let chains: Vec<_> = (0..total as u64)
        .map(|i| vec![readable(REQUEST, 56), writable(REPLY + i * 0x1000, 0x1000)])
        .collect();

    let used = g.serve(1, &chains);

    assert_eq!(used.len(), total, "the resume event served the rest");
    let expected = (size_of::<OutHeader>() + size_of::<AttrOut>()) as u32;
    assert!(used.iter().all(|len| *len == expected), "{used:?}");
}

#[test]
fn reset_forgets_the_drivers_node_ids() {
    let mut g = Guest::new(false);
    fs::write(g.host("f"), b"x").unwrap();
    let f = g.lookup(ROOT, "f").unwrap();
    g.dev.reset();
    g.dev.ack_features(g.dev.features());
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    assert_eq!(g.call(Opcode::Init, 0, &bytes(&init)).error, 0);

    assert_eq!(g.getattr(f.nodeid).unwrap_err(), libc::EBADF);
    assert_eq!(g.lookup(ROOT, "f").unwrap().attr.size, 1);
}
