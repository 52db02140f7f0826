//! Entering a pod's network namespace without leaking it into other work.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* only.
//! Doing it on a tokio worker (or a blocking-pool thread, which tokio
//! reuses) would silently move unrelated tasks into the pod's namespace, so
//! the work runs on a fresh std thread that enters the namespace, does its
//! part and exits. What such a thread creates keeps its namespace after the
//! thread is gone: a netlink socket keeps talking to the pod's namespace and
//! a tap opened there stays there, so the threads only need to *create*
//! sockets and devices; everything else runs on the caller's runtime.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, linux/nsfs.h): the namespace's
/// CLONE_NEW* type.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

/// Errors opening or entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace path {path:?} is not absolute")]
    NotAbsolute { path: PathBuf },
    #[error("network namespace {path:?} does not exist")]
    Missing { path: PathBuf },
    #[error("network namespace {path:?}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "network namespace {path:?} is not a namespace file (a bind mount of /proc/PID/ns/net)"
    )]
    NotNamespace { path: PathBuf },
    #[error("network namespace {path:?} is another kind of namespace")]
    NotNetwork { path: PathBuf },
    #[error("network namespace {path:?}: cannot enter (no CAP_SYS_ADMIN?)")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("network namespace {path:?}: cannot start a thread")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {path:?}: the work in it panicked")]
    Panicked { path: PathBuf },
}

impl NetnsError {
    /// True when the namespace path does not exist (teardown after the pod's
    /// namespace was already removed has nothing left to do).
    pub fn is_missing(&self) -> bool {
        matches!(self, NetnsError::Missing { .. })
    }
}

/// An open, validated network namespace (`/var/run/netns/NAME` or
/// `/proc/PID/ns/net`). Holding the file keeps the namespace alive even if
/// its path is unmounted meanwhile, so every step of a setup sees the same
/// namespace.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Opens `path` and checks that it is a network namespace file (whether
    /// we may enter it shows at the first [`Self::run`]).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        if !path.is_absolute() {
            return Err(NetnsError::NotAbsolute {
                path: path.to_path_buf(),
            });
        }
        let file = File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NetnsError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                NetnsError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let is_nsfs = fstatfs(file.as_fd()).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC);
        if !is_nsfs {
            return Err(NetnsError::NotNamespace {
                path: path.to_path_buf(),
            });
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd,
        // which `file` keeps open across the call.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetwork {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a new thread inside the namespace and returns its
    /// result; blocks the caller until the thread ends.
    pub fn run<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (file, path) = self.for_thread()?;
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || enter_and_run(&file, &path, work))
            .map_err(|source| NetnsError::Thread {
                path: self.path.clone(),
                source,
            })?;
        thread.join().map_err(|_| NetnsError::Panicked {
            path: self.path.clone(),
        })?
    }

    /// [`Self::run`] for async callers: the caller's task waits without
    /// blocking its worker thread.
    pub async fn run_async<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (file, path) = self.for_thread()?;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                // The receiver only goes away if the caller was cancelled.
                let _ = sender.send(enter_and_run(&file, &path, work));
            })
            .map_err(|source| NetnsError::Thread {
                path: self.path.clone(),
                source,
            })?;
        // A dropped sender means the thread panicked before sending.
        receiver.await.map_err(|_| NetnsError::Panicked {
            path: self.path.clone(),
        })?
    }

    fn for_thread(&self) -> Result<(File, PathBuf), NetnsError> {
        let file = self.file.try_clone().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        Ok((file, self.path.clone()))
    }
}

/// The body of a namespace thread: enter, then work. The thread ends right
/// after, so nothing else ever runs in the namespace on it.
fn enter_and_run<T>(file: &File, path: &Path, work: impl FnOnce() -> T) -> Result<T, NetnsError> {
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(work())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_with_relative_path_names_it() {
        let err = NetNs::open(Path::new("var/run/netns/x")).unwrap_err();
        assert!(matches!(err, NetnsError::NotAbsolute { .. }));
        assert!(err.to_string().contains("var/run/netns/x"), "{err}");
    }

    #[test]
    fn open_of_missing_path_is_missing_and_names_it() {
        let err = NetNs::open(Path::new("/nonexistent/netns/pod-x")).unwrap_err();
        assert!(err.is_missing(), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/netns/pod-x"),
            "{err}"
        );
    }

    #[test]
    fn open_of_regular_file_is_not_a_namespace() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = NetNs::open(file.path()).unwrap_err();
        assert!(matches!(err, NetnsError::NotNamespace { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&file.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn open_of_another_namespace_type_is_not_network() {
        // The mount namespace file is on nsfs too.
        let err = NetNs::open(Path::new("/proc/self/ns/mnt")).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetwork { .. }), "{err:?}");
        assert!(err.to_string().contains("/proc/self/ns/mnt"), "{err}");
        assert!(NetNs::open(Path::new("/proc/self/ns/net")).is_ok());
    }

    #[test]
    fn run_in_own_namespace_returns_the_result_and_leaves_caller_alone() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: setns needs root");
            return;
        }
        let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let netns = NetNs::open(Path::new("/proc/self/ns/net")).unwrap();
        let inside = netns
            .run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
            .unwrap();
        assert_eq!(inside, before);
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            before
        );
    }
}
