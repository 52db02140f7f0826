//! The virtio-fs device: configuration space, the hiprio and request
//! queues, and each chain handed to the FUSE server.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{peek, Peeked};
use super::share::{ShareCounters, ShareFs};
use crate::devices::virtio::device::{
    device_type, pop_chain, read_config_bytes, DeviceError, DeviceMetrics, QueueContext,
    VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Entries in each queue (virtiofsd's size; Linux keeps up to one FUSE
/// request per entry in flight).
pub const FS_QUEUE_SIZE: u16 = 1024;
/// Most request queues a share may have. All are served on the one device
/// thread; more queues only spread the guest's own locking.
pub const MAX_REQUEST_QUEUES: u16 = 8;
/// `tag` in `struct virtio_fs_config`.
pub const MAX_TAG_BYTES: usize = 36;
/// `struct virtio_fs_config`: tag and `num_request_queues`.
pub const CONFIG_LEN: usize = MAX_TAG_BYTES + 4;
/// `VIRTIO_RING_F_INDIRECT_DESC`: Linux puts a FUSE request's many
/// buffers in an indirect table.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Requests served in one round before the device yields the thread it
/// shares with the other devices.
pub const MAX_REQUESTS_PER_ROUND: u32 = 64;

/// How much the guest may cache (virtiofsd's `--cache`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Nothing: every access goes to the host (direct I/O, no attribute
    /// or entry caching). For directories the host changes under the
    /// guest.
    None,
    /// Close-to-open: data cached while a file is open, attributes and
    /// names for one second.
    #[default]
    Auto,
    /// Everything, for a day: only for directories nobody but this guest
    /// changes (a container's own rootfs).
    Always,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        }
    }

    /// The passthrough file system's policy and entry/attribute timeout.
    fn policy(self) -> (CachePolicy, Duration) {
        match self {
            CacheMode::None => (CachePolicy::Never, Duration::ZERO),
            CacheMode::Auto => (CachePolicy::Auto, Duration::from_secs(1)),
            CacheMode::Always => (CachePolicy::Always, Duration::from_secs(86_400)),
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(CacheMode::None),
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            _ => Err(format!(
                "{s:?} is not a cache mode: expected none, auto or always"
            )),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// What the guest mounts (`mount -t virtiofs TAG`).
    pub tag: String,
    pub shared_dir: PathBuf,
    pub read_only: bool,
    pub cache: CacheMode,
    pub request_queues: u16,
}

impl FsConfig {
    /// A writable share with the default cache mode and one request queue.
    pub fn new(tag: impl Into<String>, shared_dir: impl Into<PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            shared_dir: shared_dir.into(),
            read_only: false,
            cache: CacheMode::default(),
            request_queues: 1,
        }
    }
}

/// Why a share cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {tag:?}: {reason}")]
    Tag { tag: String, reason: String },
    #[error("virtio-fs shared directory {path}: {source}")]
    SharedDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("virtio-fs shared directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("virtio-fs shared directory {path} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("virtio-fs request queues = {count}: must be between 1 and {MAX_REQUEST_QUEUES}")]
    RequestQueues { count: u16 },
    #[error("cannot start the passthrough file system on {path}: {source}")]
    Passthrough {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the fs device's resume eventfd: {0}")]
    ResumeEvent(std::io::Error),
}

/// Checks a tag: 1 to 36 bytes of UTF-8 without NUL.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    let reason = if tag.is_empty() {
        "is empty".to_string()
    } else if tag.len() > MAX_TAG_BYTES {
        format!("is {} bytes, at most {MAX_TAG_BYTES} fit", tag.len())
    } else if tag.contains('\0') {
        "contains a NUL byte".to_string()
    } else {
        return Ok(());
    };
    Err(FsError::Tag {
        tag: tag.to_string(),
        reason,
    })
}

/// fs-specific counters, next to the common [`DeviceMetrics`].
#[derive(Debug, Default)]
pub struct FsMetrics {
    pub lookups: AtomicU64,
    pub opens: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub forgets: AtomicU64,
    /// Replies that carried an errno (the FUSE operation failed).
    pub errno_replies: AtomicU64,
    /// Chains that were not a FUSE request at all and completed with 0
    /// bytes (also counted in `errors`).
    pub malformed: AtomicU64,
    /// Requests refused for names with a NUL inside or empty names.
    pub bad_names: AtomicU64,
    share: Arc<ShareCounters>,
}

/// A point-in-time copy of [`FsMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FsMetricsSnapshot {
    pub lookups: u64,
    pub opens: u64,
    pub reads: u64,
    pub writes: u64,
    pub forgets: u64,
    pub errno_replies: u64,
    pub malformed: u64,
    pub bad_names: u64,
    pub read_only_refusals: u64,
    pub device_node_refusals: u64,
}

impl FsMetrics {
    pub fn snapshot(&self) -> FsMetricsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FsMetricsSnapshot {
            lookups: load(&self.lookups),
            opens: load(&self.opens),
            reads: load(&self.reads),
            writes: load(&self.writes),
            forgets: load(&self.forgets),
            errno_replies: load(&self.errno_replies),
            malformed: load(&self.malformed),
            bad_names: load(&self.bad_names),
            read_only_refusals: load(&self.share.read_only_refusals),
            device_node_refusals: load(&self.share.device_node_refusals),
        }
    }

    fn count_opcode(&self, opcode: u32) {
        let counter = match opcode {
            x if x == Opcode::Lookup as u32 => &self.lookups,
            x if x == Opcode::Open as u32 || x == Opcode::Create as u32 => &self.opens,
            x if x == Opcode::Read as u32 => &self.reads,
            x if x == Opcode::Write as u32 => &self.writes,
            x if x == Opcode::Forget as u32 || x == Opcode::BatchForget as u32 => &self.forgets,
            _ => return,
        };
        DeviceMetrics::add(counter, 1);
    }
}

/// virtio-fs over one host directory.
pub struct FsDevice {
    name: String,
    config: [u8; CONFIG_LEN],
    queue_sizes: Vec<u16>,
    features: u64,
    acked_features: u64,
    server: Server<Arc<ShareFs>>,
    share: Arc<ShareFs>,
    metrics: DeviceMetrics,
    fs_metrics: FsMetrics,
    /// Written when a round ends with requests left over (see the block
    /// device); `pending` says on which queues.
    resume: EventFd,
    pending: Vec<bool>,
}

impl FsDevice {
    pub fn new(config: FsConfig) -> Result<Self, FsError> {
        validate_tag(&config.tag)?;
        if config.request_queues == 0 || config.request_queues > MAX_REQUEST_QUEUES {
            return Err(FsError::RequestQueues {
                count: config.request_queues,
            });
        }
        let shared_dir = canonical_dir(&config.shared_dir)?;
        let root_dir = shared_dir
            .to_str()
            .ok_or_else(|| FsError::NotUtf8 {
                path: shared_dir.clone(),
            })?
            .to_string();
        let (cache_policy, timeout) = config.cache.policy();
        let passthrough = PassthroughFs::new(PassthroughConfig {
            root_dir,
            cache_policy,
            entry_timeout: timeout,
            attr_timeout: timeout,
            // Lookups and names are validated by the passthrough itself,
            // not a VFS layer above it.
            do_import: true,
            xattr: false,
            writeback: false,
            ..Default::default()
        })
        .map_err(|source| FsError::Passthrough {
            path: shared_dir.clone(),
            source,
        })?;
        let counters = Arc::new(ShareCounters::default());
        let share = Arc::new(ShareFs::new(
            passthrough,
            config.read_only,
            counters.clone(),
        ));
        let resume = EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::ResumeEvent)?;
        let queues = usize::from(config.request_queues) + 1;
        tracing::debug!(
            tag = config.tag,
            dir = %shared_dir.display(),
            read_only = config.read_only,
            cache = %config.cache,
            request_queues = config.request_queues,
            "virtio-fs share opened"
        );
        Ok(Self {
            name: "fs".to_string(),
            config: config_space(&config.tag, config.request_queues),
            queue_sizes: vec![FS_QUEUE_SIZE; queues],
            features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC,
            acked_features: 0,
            server: Server::new(share.clone()),
            share,
            metrics: DeviceMetrics::default(),
            fs_metrics: FsMetrics {
                share: counters,
                ..Default::default()
            },
            resume,
            pending: vec![false; queues],
        })
    }

    /// Names the device in logs and metrics (`fs0`, `fs1`, ...); `fs` by
    /// default.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn fs_metrics(&self) -> &FsMetrics {
        &self.fs_metrics
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Serves available requests of queue `index`, at most one round's
    /// worth; returns whether any was completed.
    fn serve_requests(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let queue_err = |source| DeviceError::Queue { index, source };
        let mut used_any = false;
        let mut served = 0u32;
        for _ in 0..MAX_REQUESTS_PER_ROUND {
            queue.disable_notification(mem).map_err(queue_err)?;
            while let Some(chain) = pop_chain(queue, mem, index)? {
                let head = chain.head_index();
                let used_len = self.handle_chain(mem, chain);
                queue.add_used(mem, head, used_len).map_err(queue_err)?;
                used_any = true;
                served += 1;
                if served >= MAX_REQUESTS_PER_ROUND {
                    self.pending[index] = true;
                    self.resume.write(1).map_err(DeviceError::Io)?;
                    return Ok(used_any);
                }
            }
            if !queue.enable_notification(mem).map_err(queue_err)? {
                return Ok(used_any);
            }
        }
        self.pending[index] = true;
        self.resume.write(1).map_err(DeviceError::Io)?;
        Ok(used_any)
    }

    /// Runs one FUSE request; returns the used length (reply bytes). Never
    /// fails: a chain that is no request completes with 0 bytes.
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        DeviceMetrics::add(&self.metrics.requests, 1);
        let reply_at = chain.clone().writable().next().map(|d| (d.addr(), d.len()));
        let buffers = Reader::from_descriptor_chain(mem, chain.clone())
            .and_then(|reader| VirtioFsWriter::new(mem, chain).map(|writer| (reader, writer)));
        let (reader, mut writer) = match buffers {
            Ok(buffers) => buffers,
            Err(e) => return self.malformed(&format!("buffers: {e}")),
        };
        let Some(Peeked { header, bad_names }) = peek(reader.clone()) else {
            return self.malformed("shorter than a FUSE header");
        };
        DeviceMetrics::add(
            &self.metrics.bytes_from_guest,
            reader.available_bytes() as u64,
        );
        self.fs_metrics.count_opcode(header.opcode);
        if bad_names {
            DeviceMetrics::add(&self.fs_metrics.bad_names, 1);
            DeviceMetrics::add(&self.fs_metrics.errno_replies, 1);
            let reply = OutHeader {
                len: std::mem::size_of::<OutHeader>() as u32,
                error: -libc::EINVAL,
                unique: header.unique,
            };
            return match writer.write_obj(reply) {
                Ok(()) => self.replied(reply.len as usize),
                Err(e) => self.malformed(&format!("no room for the reply: {e}")),
            };
        }
        match self
            .server
            .handle_message(reader, writer.into(), None, None)
        {
            Ok(written) => {
                if written >= std::mem::size_of::<OutHeader>() {
                    let errno = reply_at
                        .and_then(|(addr, _)| mem.read_obj::<OutHeader>(addr).ok())
                        .is_some_and(|out| out.error != 0);
                    if errno {
                        DeviceMetrics::add(&self.fs_metrics.errno_replies, 1);
                    }
                }
                self.replied(written)
            }
            Err(e) => {
                DeviceMetrics::add(&self.metrics.errors, 1);
                tracing::debug!(
                    device = self.name,
                    opcode = header.opcode,
                    "FUSE request failed: {e}"
                );
                0
            }
        }
    }

    fn replied(&self, written: usize) -> u32 {
        DeviceMetrics::add(&self.metrics.bytes_to_guest, written as u64);
        u32::try_from(written).unwrap_or(u32::MAX)
    }

    fn malformed(&self, why: &str) -> u32 {
        DeviceMetrics::add(&self.metrics.errors, 1);
        DeviceMetrics::add(&self.fs_metrics.malformed, 1);
        tracing::debug!(device = self.name, "virtio-fs chain dropped: {why}");
        0
    }
}

/// The canonical path of an existing directory.
fn canonical_dir(path: &Path) -> Result<PathBuf, FsError> {
    let canonical = path.canonicalize().map_err(|source| FsError::SharedDir {
        path: path.to_path_buf(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(FsError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    Ok(canonical)
}

/// `struct virtio_fs_config` (virtio 1.2, 5.11.4).
fn config_space(tag: &str, request_queues: u16) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    let tag = tag.as_bytes();
    let n = tag.len().min(MAX_TAG_BYTES);
    config[..n].copy_from_slice(&tag[..n]);
    config[MAX_TAG_BYTES..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
    config
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Backend(format!(
            "virtio-fs configuration is read-only: write of {} bytes at offset {offset:#x}",
            data.len()
        )))
    }

    fn process_queue(
        &mut self,
        queue_index: usize,
        ctx: &mut QueueContext<'_, '_>,
    ) -> Result<(), DeviceError> {
        if queue_index >= self.queue_sizes.len() {
            return Err(DeviceError::NoSuchQueue(queue_index));
        }
        ctx.serve_queue(queue_index, |mem, queue| {
            self.serve_requests(queue_index, mem, queue)
        })
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.resume.as_raw_fd())
    }

    /// A previous round left requests in one or more rings.
    fn process_host_event(&mut self, ctx: &mut QueueContext<'_, '_>) -> Result<(), DeviceError> {
        // WouldBlock: nothing pending (a reset drained it).
        let _ = self.resume.read();
        for index in 0..self.pending.len() {
            if std::mem::take(&mut self.pending[index]) {
                self.process_queue(index, ctx)?;
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        let _ = self.resume.read();
        self.pending.fill(false);
        // The driver's node ids and file handles die with it; the next
        // INIT starts from the root again.
        self.share.destroy();
    }

    fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    fn device_specific_metrics(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.fs_metrics.snapshot()).ok()
    }
}
