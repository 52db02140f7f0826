//! One uid/gid per pod for jailed VMMs (`[vmm] jail_uid`, `jail_gid`,
//! `jail_id_count`). Two pods whose VMMs share a uid can signal, ptrace
//! (were it allowed) and read each other's `/proc` and sockets: a guest
//! that escapes its device code would reach the next pod. Firecracker's
//! jailer leaves the uid to its caller; we allocate it.
//!
//! A pod leases `jail_uid + n` (and `jail_gid + n`) with an exclusive
//! `flock` on `<leases>/<uid>`, held by its shim for the pod's life: a
//! shim that dies, however it dies, frees its lease with its fds. A uid
//! some process still runs as (a VMM that outlived its shim, or an
//! unrelated process someone gave that uid) is skipped, so a lease is
//! never handed out while the uid or gid is alive (as far as the shim's
//! PID namespace shows: run it in the host's). Each lease file names its
//! pod (`namespace/id`), for an operator asking who holds which uid.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where the shims of every pod on the host keep their leases.
pub const JAIL_ID_LEASES: &str = "/run/cloister/jail-ids";

/// Why no uid could be leased.
#[derive(Debug, thiserror::Error)]
pub enum JailIdError {
    #[error(
        "all {count} jail uids from vmm.jail_uid = {first} are in use (raise vmm.jail_id_count)"
    )]
    Exhausted { first: u32, count: u32 },
    #[error("jail uid lease {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot tell which uids are in use: read /proc: {0}")]
    Proc(std::io::Error),
}

/// A uid/gid pair leased to one pod; the lease ends when this is dropped.
#[derive(Debug)]
pub struct JailIdLease {
    pub uid: u32,
    pub gid: u32,
    /// The locked lease file; emptied, unlocked and closed on drop. It
    /// stays in place: removing a file others may have open and be about
    /// to lock would let two pods lock two different files of one uid.
    lock: Flock<File>,
}

impl Drop for JailIdLease {
    fn drop(&mut self) {
        // Still locked here: no new holder's name is erased.
        if let Err(e) = self.lock.set_len(0) {
            tracing::warn!(uid = self.uid, "cannot empty the jail uid lease: {e}");
        }
    }
}

/// The first ids and how many there are: `[vmm] jail_uid`, `jail_gid`,
/// `jail_id_count` (checked at config load to fit in a u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIdRange {
    pub first_uid: u32,
    pub first_gid: u32,
    pub count: u32,
}

impl JailIdRange {
    /// Leases a free id pair for `pod` (its name goes into the lease
    /// file). The search starts at an offset derived from the name, so
    /// pods starting together rarely contend for the same file.
    pub fn lease(&self, leases: &Path, pod: &str) -> Result<JailIdLease, JailIdError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailIdError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(leases)
            .map_err(io(leases))?;
        let count = self.count.max(1);
        let start = fnv1a(pod.as_bytes()) % count;
        let busy = ids_in_use().map_err(JailIdError::Proc)?;
        for step in 0..count {
            let offset = (start + step) % count;
            let (uid, gid) = (self.first_uid + offset, self.first_gid + offset);
            if busy.uids.contains(&uid) || busy.gids.contains(&gid) {
                continue;
            }
            let path = leases.join(uid.to_string());
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))?;
            let Ok(mut lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            // A process may have taken the ids between the scan and the
            // lock (a VMM of a pod whose lease was just dropped cannot: its
            // shim stops it before the lease goes).
            let now = ids_in_use().map_err(JailIdError::Proc)?;
            if now.uids.contains(&uid) || now.gids.contains(&gid) {
                continue;
            }
            lock.set_len(0).map_err(io(&path))?;
            writeln!(*lock, "{pod}").map_err(io(&path))?;
            return Ok(JailIdLease { uid, gid, lock });
        }
        Err(JailIdError::Exhausted {
            first: self.first_uid,
            count,
        })
    }
}

/// How many leases in `leases` a shim holds now (for `cloister check`):
/// a file whose lock cannot be taken. A missing folder holds none.
pub fn held_leases(leases: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(leases) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            File::open(entry.path()).is_ok_and(|file| {
                // Taken and at once released again on drop when free.
                Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
            })
        })
        .count()
}

/// 32-bit FNV-1a: a stable spread of pod names over the range.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The uids and gids (real, effective, saved, file system) of every
/// process on the host.
#[derive(Debug, Default)]
struct IdsInUse {
    uids: std::collections::HashSet<u32>,
    gids: std::collections::HashSet<u32>,
}

/// Fails rather than answer "none" when /proc cannot be read: an id
/// handed out then might be a running VMM's.
fn ids_in_use() -> std::io::Result<IdsInUse> {
    let mut ids = IdsInUse::default();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // /proc/PID is owned by root once a process changed credentials
        // (not dumpable): the status lines are what tell its ids.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let (set, rest) = if let Some(rest) = line.strip_prefix("Uid:") {
                (&mut ids.uids, rest)
            } else if let Some(rest) = line.strip_prefix("Gid:") {
                (&mut ids.gids, rest)
            } else {
                continue;
            };
            set.extend(
                rest.split_whitespace()
                    .filter_map(|id| id.parse::<u32>().ok()),
            );
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u32, count: u32) -> JailIdRange {
        JailIdRange {
            first_uid: first,
            first_gid: first + 100,
            count,
        }
    }

    /// A range no process on this host runs in (above what tests and
    /// daemons use, below the overflow uid).
    const FREE: u32 = 3_900_000_000;

    #[test]
    fn pods_get_different_ids_and_a_dropped_lease_is_reused() {
        let leases = tempfile::tempdir().unwrap();
        let range = range(FREE, 2);

        let a = range.lease(leases.path(), "default/a").unwrap();
        let b = range.lease(leases.path(), "default/b").unwrap();
        assert_ne!(a.uid, b.uid);
        assert_eq!(b.gid - 100, b.uid);
        let err = range.lease(leases.path(), "default/c").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "all 2 jail uids from vmm.jail_uid = {FREE} are in use (raise vmm.jail_id_count)"
            )
        );
        let a_uid = a.uid;
        let file = leases.path().join(a_uid.to_string());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "default/a\n");

        drop(a);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
        let c = range.lease(leases.path(), "default/c").unwrap();
        assert_eq!(c.uid, a_uid);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "default/c\n");
    }

    #[test]
    fn a_lease_held_by_another_process_is_skipped() {
        let leases = tempfile::tempdir().unwrap();
        let range = range(FREE + 10, 1);
        let path = leases.path().join((FREE + 10).to_string());
        std::fs::write(&path, "").unwrap();
        // flock locks belong to the open file, so a second open in this
        // process contends like another shim's would.
        let held = Flock::lock(File::open(&path).unwrap(), FlockArg::LockExclusive).unwrap();

        let err = range.lease(leases.path(), "default/x").unwrap_err();
        assert!(
            matches!(err, JailIdError::Exhausted { count: 1, .. }),
            "{err}"
        );

        drop(held);
        assert_eq!(
            range.lease(leases.path(), "default/x").unwrap().uid,
            FREE + 10
        );
    }

    #[test]
    fn a_uid_a_process_runs_as_is_never_leased() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP: not root (cannot start a process as another uid)");
            return;
        }
        use std::os::unix::process::CommandExt;
        let uid = FREE + 20;
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap();
        let range = range(FREE + 20, 1);
        let leases = tempfile::tempdir().unwrap();

        let while_running = range.lease(leases.path(), "default/x");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();

        let err = while_running.unwrap_err();
        assert!(
            matches!(err, JailIdError::Exhausted { count: 1, .. }),
            "{err}"
        );
        assert_eq!(range.lease(leases.path(), "default/x").unwrap().uid, uid);
    }

    #[test]
    fn held_leases_are_counted_and_released_ones_are_not() {
        let leases = tempfile::tempdir().unwrap();
        let range = range(FREE + 30, 3);
        let a = range.lease(leases.path(), "default/a").unwrap();
        let b = range.lease(leases.path(), "default/b").unwrap();
        assert_eq!(held_leases(leases.path()), 2);
        drop(a);
        assert_eq!(held_leases(leases.path()), 1);
        drop(b);
        assert_eq!(held_leases(leases.path()), 0);
        assert_eq!(held_leases(&leases.path().join("none")), 0);
    }

    #[test]
    fn the_lease_folder_that_cannot_be_made_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();

        let err = range(FREE, 1)
            .lease(&file.join("leases"), "default/x")
            .unwrap_err();

        assert!(
            err.to_string()
                .starts_with(&format!("jail uid lease {}/leases: ", file.display())),
            "{err}"
        );
    }
}
