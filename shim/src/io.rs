//! A process's stdio: containerd's FIFOs on the host copied to and from the
//! agent's stdio streams (one vsock connection per stream, see
//! `cloister_protocol::stdio`).
//!
//! Order matters for "nothing lost": the streams are attached right after
//! CreateContainer/ExecProcess, before the process starts, and the service
//! publishes a process's TaskExit only after [`ProcessIo::wait_output`] saw
//! its stdout/stderr streams end (the agent ends them after the last byte).
//!
//! FIFO opens block until the other side opens (containerd's client opens
//! its ends around Create/Start), so they run on the blocking pool; a
//! pending open is released by opening the other end ourselves
//! ([`release_fifo`]) when the process is gone.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::agent_client::{AgentClient, AgentError};
use crate::container::StdioPaths;

/// Errors copying stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("open fifo {path}: {source}")]
    OpenFifo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("copy {kind} of {path}: {source}")]
    Copy {
        kind: StreamKind,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Which streams to ask the agent for, from containerd's paths.
pub fn requested_streams(paths: &StdioPaths) -> agent::Stdio {
    let mut stdio = agent::Stdio::new();
    stdio.stdin = !paths.stdin.is_empty();
    stdio.stdout = !paths.stdout.is_empty();
    // A terminal merges stderr into stdout.
    stdio.stderr = !paths.stderr.is_empty() && !paths.terminal;
    stdio.terminal = paths.terminal;
    stdio
}

/// Opens a FIFO on the blocking pool (the open waits for the peer).
async fn open_fifo(path: &Path, write: bool) -> Result<std::fs::File, StdioError> {
    let owned = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || {
        let mut options = OpenOptions::new();
        if write {
            options.write(true);
        } else {
            options.read(true);
        }
        options.custom_flags(libc::O_CLOEXEC).open(&owned)
    })
    .await
    .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())));
    result.map_err(|source| StdioError::OpenFifo {
        path: path.to_path_buf(),
        source,
    })
}

/// Wakes a blocked open of `path` by opening the opposite end without
/// blocking; harmless when nobody waits.
pub fn release_fifo(path: &Path, blocked_open_writes: bool) {
    let mut options = OpenOptions::new();
    if blocked_open_writes {
        options.read(true);
    } else {
        options.write(true);
    }
    // ENXIO (no reader for a write open) just means nobody is blocked.
    let _ = options
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
}

/// containerd's stdin FIFO → the agent's stdin stream, until the FIFO's
/// writer closes it or `close` is notified (CloseIO); either ends in a
/// half-close, which the process reads as EOF. On `close`, what the writer
/// already put into the FIFO is forwarded first.
pub async fn copy_fifo_to_stream<W>(
    path: PathBuf,
    mut to: W,
    close: std::sync::Arc<tokio::sync::Notify>,
) -> Result<u64, StdioError>
where
    W: AsyncWrite + Unpin,
{
    let copy_error = |source| StdioError::Copy {
        kind: StreamKind::Stdin,
        path: path.clone(),
        source,
    };
    let open = open_fifo(&path, false);
    tokio::pin!(open);
    let mut closing = false;
    let file = tokio::select! {
        biased;
        file = &mut open => file?,
        _ = close.notified() => {
            // The open may be blocked (no writer yet) or just done: make
            // sure it returns, then forward whatever a writer left.
            closing = true;
            release_fifo(&path, false);
            open.await?
        }
    };
    let mut from = pipe::Receiver::from_file(file).map_err(|source| StdioError::OpenFifo {
        path: path.clone(),
        source,
    })?;
    let mut buffer = vec![0u8; 32 * 1024];
    let mut copied = 0u64;
    while !closing {
        tokio::select! {
            biased;
            _ = close.notified() => closing = true,
            read = from.read(&mut buffer) => match read.map_err(copy_error)? {
                0 => break,
                n => {
                    to.write_all(&buffer[..n]).await.map_err(copy_error)?;
                    copied += n as u64;
                }
            },
        }
    }
    if closing {
        // read(2) directly on the non-blocking fd: tokio's try_read trusts
        // cached readiness and would report an unpolled pipe as empty.
        loop {
            match nix::unistd::read(&from, &mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    to.write_all(&buffer[..n]).await.map_err(copy_error)?;
                    copied += n as u64;
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(copy_error(e.into())),
            }
        }
    }
    to.shutdown().await.map_err(copy_error)?;
    Ok(copied)
}

/// The stdin copy of one process.
#[derive(Debug)]
pub struct StdinCopy {
    path: PathBuf,
    close: std::sync::Arc<tokio::sync::Notify>,
    task: JoinHandle<Result<u64, StdioError>>,
}

impl StdinCopy {
    /// Ends stdin after forwarding what is already in the FIFO; waits at
    /// most `limit` for the agent to take it.
    pub async fn close(mut self, limit: Duration) {
        self.close.notify_one();
        match tokio::time::timeout(limit, &mut self.task).await {
            Ok(Ok(Ok(bytes))) => {
                tracing::debug!(path = %self.path.display(), bytes, "stdin closed")
            }
            Ok(Ok(Err(e))) => tracing::warn!("{e}"),
            Ok(Err(join)) => tracing::warn!(path = %self.path.display(), "stdin copy: {join}"),
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "stdin not closed within {limit:?}");
                self.task.abort();
            }
        }
    }

    /// Ends the copy at once (the process is gone).
    fn abort(self) {
        self.task.abort();
        release_fifo(&self.path, false);
    }
}

/// The agent's stdout/stderr stream → containerd's FIFO, until the agent
/// ends the stream; then the FIFO closes and containerd's reader sees EOF.
pub async fn copy_stream_to_fifo<R>(
    mut from: R,
    path: PathBuf,
    kind: StreamKind,
) -> Result<u64, StdioError>
where
    R: AsyncRead + Unpin,
{
    let file = open_fifo(&path, true).await?;
    let mut to = pipe::Sender::from_file(file).map_err(|source| StdioError::OpenFifo {
        path: path.clone(),
        source,
    })?;
    let copied = tokio::io::copy(&mut from, &mut to)
        .await
        .map_err(|source| StdioError::Copy {
            kind,
            path: path.clone(),
            source,
        })?;
    Ok(copied)
}

/// The copy tasks of one process.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Option<StdinCopy>,
    outputs: Vec<(PathBuf, JoinHandle<Result<u64, StdioError>>)>,
}

impl ProcessIo {
    /// Attaches every stream `paths` names and starts copying.
    pub async fn attach(
        agent: &dyn AgentClient,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> Result<Self, StdioError> {
        let wanted = requested_streams(paths);
        let mut io = ProcessIo::default();
        let outputs = [
            (wanted.stdout, StreamKind::Stdout, &paths.stdout),
            (wanted.stderr, StreamKind::Stderr, &paths.stderr),
        ];
        for (wanted, kind, path) in outputs {
            if !wanted {
                continue;
            }
            let stream = agent.open_stdio(container_id, exec_id, kind).await?;
            let path = PathBuf::from(path);
            let task = tokio::spawn(copy_stream_to_fifo(stream, path.clone(), kind));
            io.outputs.push((path, task));
        }
        if wanted.stdin {
            let stream = agent
                .open_stdio(container_id, exec_id, StreamKind::Stdin)
                .await?;
            let path = PathBuf::from(&paths.stdin);
            let close = std::sync::Arc::new(tokio::sync::Notify::new());
            let task = tokio::spawn(copy_fifo_to_stream(path.clone(), stream, close.clone()));
            io.stdin = Some(StdinCopy { path, close, task });
        }
        Ok(io)
    }

    /// Waits until stdout/stderr have been copied to the end, at most
    /// `limit` (a daemon that inherited the process's stdout may keep the
    /// stream open forever). Returns whether every stream ended.
    pub async fn wait_output(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut all_done = true;
        for (path, task) in &mut self.outputs {
            match tokio::time::timeout_at(deadline, &mut *task).await {
                Ok(Ok(Ok(bytes))) => {
                    tracing::debug!(path = %path.display(), bytes, "output copied")
                }
                Ok(Ok(Err(e))) => tracing::warn!("{e}"),
                Ok(Err(join)) => tracing::warn!(path = %path.display(), "copy task: {join}"),
                Err(_) => {
                    all_done = false;
                    tracing::warn!(path = %path.display(), "output still open after {limit:?}");
                }
            }
        }
        all_done
    }

    /// The stdin copy, for CloseIO (see [`StdinCopy::close`]).
    pub fn take_stdin(&mut self) -> Option<StdinCopy> {
        self.stdin.take()
    }

    /// Ends every copy (delete, VM gone): pending FIFO opens are released
    /// so no blocking-pool thread stays behind.
    pub fn shutdown(&mut self) {
        if let Some(stdin) = self.stdin.take() {
            stdin.abort();
        }
        for (path, task) in self.outputs.drain(..) {
            if !task.is_finished() {
                task.abort();
                release_fifo(&path, true);
            }
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    #[test]
    fn requested_streams_follow_paths_and_terminal() {
        let paths = StdioPaths {
            stdin: "/in".into(),
            stdout: "/out".into(),
            stderr: "/err".into(),
            terminal: false,
        };
        let s = requested_streams(&paths);
        assert!(s.stdin && s.stdout && s.stderr && !s.terminal);
        let tty = StdioPaths {
            terminal: true,
            ..paths
        };
        let s = requested_streams(&tty);
        assert!(s.stdin && s.stdout && !s.stderr && s.terminal);
        let s = requested_streams(&StdioPaths::default());
        assert!(!s.stdin && !s.stdout && !s.stderr);
    }

    #[tokio::test]
    async fn stream_to_fifo_delivers_everything_then_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdout");
        let (mut agent_side, shim_side) = UnixStream::pair().unwrap();
        let copy = tokio::spawn(copy_stream_to_fifo(
            shim_side,
            path.clone(),
            StreamKind::Stdout,
        ));
        // containerd's reader, opened after the copy started.
        let reader = tokio::task::spawn_blocking(move || {
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::open(path).unwrap(), &mut text).unwrap();
            text
        });
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        agent_side.write_all(&payload).await.unwrap();
        // The process exits at once: the agent ends the stream right away.
        drop(agent_side);
        assert_eq!(copy.await.unwrap().unwrap(), payload.len() as u64);
        assert_eq!(reader.await.unwrap(), payload);
    }

    #[tokio::test]
    async fn fifo_to_stream_copies_and_half_closes_on_writer_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (shim_side, mut agent_side) = UnixStream::pair().unwrap();
        let copy = tokio::spawn(copy_fifo_to_stream(
            path.clone(),
            shim_side,
            Default::default(),
        ));
        tokio::task::spawn_blocking(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            std::io::Write::write_all(&mut w, b"line 1\nline 2\n").unwrap();
        })
        .await
        .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), agent_side.read_to_end(&mut got))
            .await
            .expect("agent side saw no EOF")
            .unwrap();
        assert_eq!(got, b"line 1\nline 2\n");
        assert_eq!(copy.await.unwrap().unwrap(), 14);
    }

    #[tokio::test]
    async fn release_unblocks_a_pending_fifo_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (shim_side, _agent_side) = UnixStream::pair().unwrap();
        let copy = tokio::spawn(copy_fifo_to_stream(
            path.clone(),
            shim_side,
            Default::default(),
        ));
        // Nobody opens the write end; the copy's open is blocked.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!copy.is_finished());
        release_fifo(&path, false);
        let copied = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("open stayed blocked")
            .unwrap()
            .unwrap();
        assert_eq!(copied, 0);

        let out = fifo(dir.path(), "stdout");
        let (_agent, shim_side) = UnixStream::pair().unwrap();
        let copy = tokio::spawn(copy_stream_to_fifo(
            shim_side,
            out.clone(),
            StreamKind::Stdout,
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!copy.is_finished());
        release_fifo(&out, true);
        // Open released; the copy then waits on the agent stream.
        tokio::time::sleep(Duration::from_millis(100)).await;
        copy.abort();
    }

    #[tokio::test]
    async fn close_forwards_what_was_written_while_the_writer_stays_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (shim_side, mut agent_side) = UnixStream::pair().unwrap();
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let copy = StdinCopy {
            path: path.clone(),
            close: close.clone(),
            task: tokio::spawn(copy_fifo_to_stream(path.clone(), shim_side, close)),
        };
        // containerd's writer writes and keeps the FIFO open.
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            std::io::Write::write_all(&mut w, b"typed before CloseIO").unwrap();
            w
        })
        .await
        .unwrap();
        copy.close(Duration::from_secs(5)).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), agent_side.read_to_end(&mut got))
            .await
            .expect("no EOF after CloseIO")
            .unwrap();
        assert_eq!(got, b"typed before CloseIO");
        drop(writer);
    }

    #[tokio::test]
    async fn close_before_any_writer_ends_with_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "stdin");
        let (shim_side, mut agent_side) = UnixStream::pair().unwrap();
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let copy = StdinCopy {
            path: path.clone(),
            close: close.clone(),
            task: tokio::spawn(copy_fifo_to_stream(path, shim_side, close)),
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        copy.close(Duration::from_secs(5)).await;
        let mut got = Vec::new();
        agent_side.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn missing_fifo_names_path() {
        let (_a, b) = UnixStream::pair().unwrap();
        let err = copy_stream_to_fifo(b, PathBuf::from("/nonexistent/fifo"), StreamKind::Stderr)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/fifo"), "{err}");
    }
}
