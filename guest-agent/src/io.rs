//! A process's stdio: pipes or a pseudo-terminal on the process side, and
//! on the agent side endpoints that stdio stream connections attach to.
//!
//! Copies use a fixed buffer and await each write, so a slow reader stops
//! the copy and the kernel pipe stops the process: back-pressure, never an
//! unbounded buffer. Output streams end with a half-close after the last
//! byte; an input stream's EOF closes the process's stdin.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::process::HelperFds;

/// Errors attaching or setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("create stdio {what}: {source}")]
    Create {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{kind} was not requested for this process or is already attached")]
    NotAvailable { kind: StreamKind },
    #[error("process has no terminal")]
    NoTerminal,
    #[error("resize terminal: {0}")]
    Resize(io::Error),
}

const COPY_BUFFER: usize = 128 * 1024;

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The agent's side of one process's stdio.
pub struct ProcessStdio {
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Mutex<Option<OwnedFd>>,
    stderr: Mutex<Option<OwnedFd>>,
    /// The pty master, kept for resizes.
    terminal: Mutex<Option<OwnedFd>>,
    /// Whether the host attaches stdin to the terminal.
    wants_terminal_stdin: bool,
    stdin_closed: Notify,
}

/// Creates the process-side fds (for the helper) and the agent side.
/// `sync` is the helper's end of the sync socket.
pub fn create_stdio(
    request: &agent::Stdio,
    sync: OwnedFd,
) -> Result<(HelperFds, ProcessStdio), StdioError> {
    let err = |what| move |source| StdioError::Create { what, source };
    if request.terminal {
        // The helper allocates the terminal inside the container (its own
        // devpts instance, so ttyname works there) and passes the master
        // back with `set_terminal`. Until then the helper holds /dev/null.
        let null = || dev_null().map_err(err("/dev/null"));
        return Ok((
            HelperFds {
                stdin: null()?,
                stdout: null()?,
                stderr: null()?,
                sync,
            },
            ProcessStdio {
                stdin: Mutex::new(None),
                stdout: Mutex::new(None),
                stderr: Mutex::new(None),
                terminal: Mutex::new(None),
                wants_terminal_stdin: request.stdin,
                stdin_closed: Notify::new(),
            },
        ));
    }
    let (child_stdin, agent_stdin) = if request.stdin {
        let (r, w) = pipe().map_err(err("stdin pipe"))?;
        (r, Some(w))
    } else {
        (dev_null().map_err(err("/dev/null"))?, None)
    };
    let output = |wanted: bool, what| -> Result<(OwnedFd, Option<OwnedFd>), StdioError> {
        if wanted {
            let (r, w) = pipe().map_err(err(what))?;
            Ok((w, Some(r)))
        } else {
            Ok((dev_null().map_err(err("/dev/null"))?, None))
        }
    };
    let (child_stdout, agent_stdout) = output(request.stdout, "stdout pipe")?;
    let (child_stderr, agent_stderr) = output(request.stderr, "stderr pipe")?;
    Ok((
        HelperFds {
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
            sync,
        },
        ProcessStdio {
            stdin: Mutex::new(agent_stdin),
            stdout: Mutex::new(agent_stdout),
            stderr: Mutex::new(agent_stderr),
            terminal: Mutex::new(None),
            wants_terminal_stdin: false,
            stdin_closed: Notify::new(),
        },
    ))
}

impl ProcessStdio {
    /// Takes the endpoint of `kind` (each attaches once).
    pub fn take(&self, kind: StreamKind) -> Result<OwnedFd, StdioError> {
        let slot = match kind {
            StreamKind::Stdin => &self.stdin,
            StreamKind::Stdout => &self.stdout,
            StreamKind::Stderr => &self.stderr,
        };
        slot.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(StdioError::NotAvailable { kind })
    }

    /// Closes stdin: drops the unattached endpoint or ends the attached copy.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.stdin_closed.notify_one();
    }

    pub fn is_terminal(&self) -> bool {
        self.terminal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Installs the pty master received from the helper: stdout (and stdin
    /// when requested) attach to it.
    pub fn set_terminal(&self, master: OwnedFd) -> Result<(), StdioError> {
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| StdioError::Create {
                what: "pty",
                source,
            })
        };
        if self.wants_terminal_stdin {
            *self.stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(dup(&master)?);
        }
        *self.stdout.lock().unwrap_or_else(|e| e.into_inner()) = Some(dup(&master)?);
        *self.terminal.lock().unwrap_or_else(|e| e.into_inner()) = Some(master);
        Ok(())
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, columns: u16) -> Result<(), StdioError> {
        let terminal = self.terminal.lock().unwrap_or_else(|e| e.into_inner());
        let master = terminal.as_ref().ok_or(StdioError::NoTerminal)?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a valid winsize on the pty master.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(StdioError::Resize(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Copies `stream` into the process's stdin until EOF or CloseStdin.
    pub async fn pump_stdin<S: AsyncRead + Unpin>(
        &self,
        fd: OwnedFd,
        mut stream: S,
    ) -> io::Result<u64> {
        set_nonblocking(&fd)?;
        let terminal = self.is_terminal();
        let mut sink = tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(fd)?;
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut total = 0u64;
        loop {
            let n = tokio::select! {
                n = stream.read(&mut buf) => n?,
                () = self.stdin_closed.notified() => 0,
            };
            if n == 0 {
                break;
            }
            sink.write_all(&buf[..n]).await?;
            total += n as u64;
        }
        if terminal {
            // A terminal cannot be half-closed: send the EOF character.
            let _ = sink.write_all(&[4]).await;
        }
        Ok(total)
    }
}

/// Copies a process's output fd into `stream` until the process side is
/// closed, then half-closes `stream`.
pub async fn pump_output<S: AsyncWrite + Unpin>(fd: OwnedFd, mut stream: S) -> io::Result<u64> {
    set_nonblocking(&fd)?;
    let mut source = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd)?;
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match source.read(&mut buf).await {
            Ok(n) => n,
            // A pty master reads EIO once the last slave fd is closed.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    stream.shutdown().await?;
    Ok(total)
}
