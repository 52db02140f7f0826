//! Container cgroups on the cgroup v2 hierarchy: creation with resources,
//! the device program, freeze/thaw, kill, pids, stats, OOM counters,
//! removal.
//!
//! Layout: `<root>/cloister/<container id>`. The spec's cgroupsPath names a
//! host path and is ignored inside the guest.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use cloister_protocol::agent;

use crate::container::resources::CgroupWrite;
use crate::device_filter::kernel::{self, BpfError};
use crate::device_filter::program::{self, ProgramError};
use crate::device_filter::DeviceRules;

/// Errors managing a container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.resources: {file} needs the {controller} controller, which {root} does not offer (available: {available:?})")]
    ControllerMissing {
        file: String,
        controller: String,
        root: String,
        available: Vec<String>,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {0} did not freeze within 2 s")]
    FreezeTimeout(String),
    #[error("linux.resources.devices: {0}")]
    DeviceProgram(#[from] ProgramError),
    #[error("device rules of cgroup {path}: {source}")]
    DeviceFilter {
        path: String,
        #[source]
        source: BpfError,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `path` is the mount point of a cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Finds the cgroup v2 hierarchy: `/sys/fs/cgroup` on a pure v2 system
/// (the guest), `/sys/fs/cgroup/unified` on a hybrid host.
pub fn detect_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
}

/// Controllers offered at `dir` (its cgroup.controllers).
pub fn controllers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// One container's cgroup directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// The device program attached to the directory, replaced by the next
    /// `set_device_rules`; it is freed with the cgroup.
    device_program: Mutex<Option<OwnedFd>>,
}

impl Cgroup {
    /// Creates `<root>/cloister/<id>` and applies `writes`.
    pub fn create(root: &Path, id: &str, writes: &[CgroupWrite]) -> Result<Cgroup, CgroupError> {
        let parent = root.join("cloister");
        if !parent.exists() {
            std::fs::create_dir(&parent)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io_err("create cgroup", &parent))?;
        }
        // Enable every controller the root offers down to our parent, so a
        // container's resource files exist.
        let available = controllers(root);
        for dir in [root, parent.as_path()] {
            for controller in &available {
                // Failing to enable one (e.g. a v1-owned controller) only
                // matters if a write needs it, which is checked below.
                let _ =
                    std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
            }
        }
        let enabled = controllers(&parent);
        for w in writes {
            if !w.controller.is_empty() && !enabled.iter().any(|c| c == w.controller) {
                return Err(CgroupError::ControllerMissing {
                    file: w.file.clone(),
                    controller: w.controller.to_owned(),
                    root: root.display().to_string(),
                    available: enabled,
                });
            }
        }
        let path = parent.join(id);
        std::fs::create_dir(&path).map_err(io_err("create cgroup", &path))?;
        let cgroup = Cgroup {
            path,
            device_program: Mutex::new(None),
        };
        for w in writes {
            let file = cgroup.path.join(&w.file);
            if let Err(e) = std::fs::write(&file, &w.value) {
                let _ = cgroup.remove();
                return Err(CgroupError::Io {
                    action: "write",
                    path: format!("{} = {:?}", file.display(), w.value),
                    source: e,
                });
            }
        }
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory for clone3's CLONE_INTO_CGROUP.
    pub fn open_dir(&self) -> Result<File, CgroupError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(io_err("open cgroup", &self.path))
    }

    /// Enforces `rules` on every process of the cgroup from now on: loads
    /// their eBPF program and attaches it, replacing the one attached by
    /// the last call.
    pub fn set_device_rules(&self, rules: &DeviceRules) -> Result<(), CgroupError> {
        let insns = program::generate(rules)?;
        let filter_error = |source| CgroupError::DeviceFilter {
            path: self.path.display().to_string(),
            source,
        };
        let new = kernel::load_device_program(&insns).map_err(filter_error)?;
        let dir = self.open_dir()?;
        let mut current = self
            .device_program
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let attached = kernel::attach_device_program(
            dir.as_fd(),
            new.as_fd(),
            current.as_ref().map(|fd| fd.as_fd()),
        );
        match attached {
            Ok(()) => {
                tracing::debug!(
                    cgroup = %self.path.display(),
                    rules = rules.rules.len(),
                    default_allow = rules.default_allow,
                    instructions = insns.len(),
                    replaced = current.is_some(),
                    "device program attached"
                );
                *current = Some(new);
                Ok(())
            }
            // The new program is attached but the old one stayed: both
            // filter (never more than either allows); track the new one.
            Err(e @ BpfError::Detach { .. }) => {
                *current = Some(new);
                Err(filter_error(e))
            }
            Err(e) => Err(filter_error(e)),
        }
    }

    /// Applies more writes (UpdateContainer).
    pub fn update(&self, writes: &[CgroupWrite]) -> Result<(), CgroupError> {
        let enabled = controllers(&self.path);
        for w in writes {
            if !w.controller.is_empty() && !enabled.iter().any(|c| c == w.controller) {
                return Err(CgroupError::ControllerMissing {
                    file: w.file.clone(),
                    controller: w.controller.to_owned(),
                    root: self.path.display().to_string(),
                    available: enabled,
                });
            }
            let file = self.path.join(&w.file);
            std::fs::write(&file, &w.value).map_err(io_err("write", &file))?;
        }
        Ok(())
    }

    /// Freezes or thaws every process and waits until the kernel says so.
    pub async fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let file = self.path.join("cgroup.freeze");
        std::fs::write(&file, if frozen { "1" } else { "0" }).map_err(io_err("write", &file))?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for _ in 0..200 {
            let events =
                std::fs::read_to_string(self.path.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(CgroupError::FreezeTimeout(self.path.display().to_string()))
    }

    /// PIDs of every process in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs everything in the cgroup (cgroup.kill, works while frozen).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let file = self.path.join("cgroup.kill");
        std::fs::write(&file, "1").map_err(io_err("write", &file))
    }

    /// The `oom_kill` counter of memory.events (0 without the controller).
    pub fn oom_kills(&self) -> u64 {
        let text = std::fs::read_to_string(self.path.join("memory.events")).unwrap_or_default();
        flat_keyed(&text, "oom_kill")
    }

    /// Counters for StatsContainer; files of missing controllers read as 0.
    pub fn stats(&self) -> agent::StatsContainerResponse {
        let read = |f: &str| std::fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let single = |f: &str| read(f).trim().parse::<u64>().unwrap_or(0);
        let mut response = agent::StatsContainerResponse::new();

        let cpu_stat = read("cpu.stat");
        let mut cpu = agent::CpuStats::new();
        cpu.usage_usec = flat_keyed(&cpu_stat, "usage_usec");
        cpu.user_usec = flat_keyed(&cpu_stat, "user_usec");
        cpu.system_usec = flat_keyed(&cpu_stat, "system_usec");
        cpu.nr_periods = flat_keyed(&cpu_stat, "nr_periods");
        cpu.nr_throttled = flat_keyed(&cpu_stat, "nr_throttled");
        cpu.throttled_usec = flat_keyed(&cpu_stat, "throttled_usec");
        response.cpu = Some(cpu).into();

        let stat = read("memory.stat");
        let events = read("memory.events");
        let mut memory = agent::MemoryStats::new();
        memory.usage = single("memory.current");
        memory.usage_limit = single("memory.max");
        memory.swap_usage = single("memory.swap.current");
        memory.swap_limit = single("memory.swap.max");
        memory.anon = flat_keyed(&stat, "anon");
        memory.file = flat_keyed(&stat, "file");
        memory.kernel_stack = flat_keyed(&stat, "kernel_stack");
        memory.slab = flat_keyed(&stat, "slab");
        memory.sock = flat_keyed(&stat, "sock");
        memory.shmem = flat_keyed(&stat, "shmem");
        memory.file_mapped = flat_keyed(&stat, "file_mapped");
        memory.file_dirty = flat_keyed(&stat, "file_dirty");
        memory.file_writeback = flat_keyed(&stat, "file_writeback");
        memory.pgfault = flat_keyed(&stat, "pgfault");
        memory.pgmajfault = flat_keyed(&stat, "pgmajfault");
        memory.inactive_anon = flat_keyed(&stat, "inactive_anon");
        memory.active_anon = flat_keyed(&stat, "active_anon");
        memory.inactive_file = flat_keyed(&stat, "inactive_file");
        memory.active_file = flat_keyed(&stat, "active_file");
        memory.unevictable = flat_keyed(&stat, "unevictable");
        memory.low_events = flat_keyed(&events, "low");
        memory.high_events = flat_keyed(&events, "high");
        memory.max_events = flat_keyed(&events, "max");
        memory.oom_events = flat_keyed(&events, "oom");
        memory.oom_kill_events = flat_keyed(&events, "oom_kill");
        response.memory = Some(memory).into();

        let mut pids = agent::PidsStats::new();
        pids.current = match single("pids.current") {
            0 => u64::try_from(self.pids().len()).unwrap_or(0),
            n => n,
        };
        pids.limit = single("pids.max");
        response.pids = Some(pids).into();

        let mut io_stats = agent::IoStats::new();
        io_stats.usage = parse_io_stat(&read("io.stat"));
        response.io = Some(io_stats).into();
        response
    }

    /// Removes the cgroup directory (empty of processes by now).
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut last = None;
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(CgroupError::Io {
            action: "remove cgroup",
            path: self.path.display().to_string(),
            source: last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
        })
    }
}

/// A value of a flat-keyed cgroup file ("key value" lines).
pub fn flat_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next() == Some(key)).then(|| parts.next().and_then(|v| v.parse().ok()))?
        })
        .unwrap_or(0)
}

/// Parses io.stat ("MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..").
pub fn parse_io_stat(text: &str) -> Vec<agent::IoEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (major, minor) = parts.next()?.split_once(':')?;
            let mut entry = agent::IoEntry::new();
            entry.major = major.parse().ok()?;
            entry.minor = minor.parse().ok()?;
            for kv in parts {
                let (k, v) = kv.split_once('=')?;
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => entry.rbytes = v,
                    "wbytes" => entry.wbytes = v,
                    "rios" => entry.rios = v,
                    "wios" => entry.wios = v,
                    _ => {}
                }
            }
            Some(entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_reads_values() {
        let text = "low 0\nhigh 2\nmax 5\noom 1\noom_kill 1\n";
        assert_eq!(flat_keyed(text, "max"), 5);
        assert_eq!(flat_keyed(text, "oom_kill"), 1);
        assert_eq!(flat_keyed(text, "oom"), 1);
        assert_eq!(flat_keyed(text, "missing"), 0);
    }

    #[test]
    fn io_stat_parses_entries() {
        let entries =
            parse_io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].major, entries[0].minor), (254, 0));
        assert_eq!(entries[0].wbytes, 8192);
        assert_eq!(entries[0].wios, 2);
    }
}
