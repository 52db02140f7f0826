//! The host side of hybrid vsock (Firecracker's protocol, also spoken by
//! Cloud Hypervisor and rust-vmm's `vhost-device-vsock`) and of the vsock
//! probe's modes (`kernel-config/vsock-probe`).
//!
//! - Host → guest: connect to the device's Unix socket, write
//!   `CONNECT <port>\n`, read `OK <n>\n` (Firecracker puts the host-side
//!   port there, `vhost-device-vsock` the guest port: any number is
//!   accepted); the stream is then the guest connection.
//! - Guest → host port P: the device connects to the Unix socket
//!   `<path>_P`, which the host listens on.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use cloister_vsock_probe::stream::pattern_hash;
use cloister_vsock_probe::{
    Pattern, StreamHash, BULK_CHUNK, GUEST_PATTERN_SEED, HOST_PATTERN_SEED,
};

/// Errors talking to a guest through hybrid vsock.
#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    #[error("{what} on {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("CONNECT {port} through {path} refused: {reply:?}")]
    Refused {
        port: u32,
        path: PathBuf,
        reply: String,
    },
    #[error("no connection to guest port {port} through {path} within {waited:?}: {last}")]
    NotListening {
        port: u32,
        path: PathBuf,
        waited: Duration,
        last: Box<HybridVsockError>,
    },
    #[error("{0}")]
    Mismatch(String),
}

fn io_error(what: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> HybridVsockError {
    let what = what.into();
    let path = path.to_path_buf();
    move |source| HybridVsockError::Io { what, path, source }
}

/// How long a read from the guest may block: a stuck guest fails the
/// test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Echoed data goes in steps of this size, each read back before the next
/// is sent (see [`concurrent_echo`]).
pub const ECHO_STEP: usize = 16 * 1024;

/// The Unix socket on which the device delivers guest connections to host
/// port `port`.
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Listens for guest connections to host port `port` (a stale socket file
/// is replaced).
pub fn listen_host_port(uds: &Path, port: u32) -> Result<UnixListener, HybridVsockError> {
    let path = host_port_path(uds, port);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(io_error("listen", &path))
}

/// Waits up to `wait` for the guest to connect to `listener`.
pub fn accept_guest(
    listener: &UnixListener,
    wait: Duration,
) -> Result<UnixStream, HybridVsockError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default();
    listener
        .set_nonblocking(true)
        .map_err(io_error("set non-blocking", &path))?;
    let started = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
                    .map_err(io_error("set up accepted stream", &path))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if started.elapsed() >= wait {
                    return Err(io_error(
                        format!("no guest connection within {wait:?}"),
                        &path,
                    )(io::ErrorKind::TimedOut.into()));
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_error("accept", &path)(e)),
        }
    }
}

/// Opens a connection to guest port `port` (one attempt).
pub fn connect_guest(uds: &Path, port: u32) -> Result<UnixStream, HybridVsockError> {
    let mut stream = UnixStream::connect(uds).map_err(io_error("connect", uds))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(io_error("set read timeout", uds))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_error("send CONNECT", uds))?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: what follows the newline is already guest data.
    while reply.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("read CONNECT reply", uds)(e)),
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let accepted = reply
        .strip_prefix("OK ")
        .is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if accepted {
        Ok(stream)
    } else {
        Err(HybridVsockError::Refused {
            port,
            path: uds.to_path_buf(),
            reply,
        })
    }
}

/// [`connect_guest`], retried every 20 ms for up to `wait` (the guest may
/// not listen yet: the device then answers with a reset and closes).
pub fn connect_guest_retrying(
    uds: &Path,
    port: u32,
    wait: Duration,
) -> Result<UnixStream, HybridVsockError> {
    let started = Instant::now();
    loop {
        match connect_guest(uds, port) {
            Ok(stream) => return Ok(stream),
            Err(last) if started.elapsed() >= wait => {
                return Err(HybridVsockError::NotListening {
                    port,
                    path: uds.to_path_buf(),
                    waited: started.elapsed(),
                    last: Box::new(last),
                })
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Round-trip times of small messages.
#[derive(Debug, Clone)]
pub struct Latency {
    pub samples: Vec<Duration>,
}

impl Latency {
    /// The `q` quantile (0.0–1.0), nearest rank.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    pub fn median(&self) -> Duration {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }
}

fn read_exact(stream: &mut UnixStream, buf: &mut [u8], what: &str) -> Result<(), HybridVsockError> {
    stream
        .read_exact(buf)
        .map_err(|source| HybridVsockError::Io {
            what: what.to_string(),
            path: PathBuf::from("<guest stream>"),
            source,
        })
}

fn write_all(stream: &mut UnixStream, buf: &[u8], what: &str) -> Result<(), HybridVsockError> {
    stream
        .write_all(buf)
        .map_err(|source| HybridVsockError::Io {
            what: what.to_string(),
            path: PathBuf::from("<guest stream>"),
            source,
        })
}

/// Drives an echoing guest connection: `rounds` round trips of
/// `message_len` bytes (timed), then `block_len` bytes through in 16 KiB
/// steps, then shuts down and expects the guest to close with nothing more.
pub fn echo_session(
    stream: &mut UnixStream,
    rounds: usize,
    message_len: usize,
    block_len: usize,
) -> Result<Latency, HybridVsockError> {
    let mut samples = Vec::with_capacity(rounds);
    let mut message = vec![0u8; message_len];
    let mut back = vec![0u8; message_len];
    let mut pattern = Pattern::new(0x1234);
    for round in 0..rounds {
        pattern.fill(&mut message);
        let started = Instant::now();
        write_all(stream, &message, "send echo message")?;
        read_exact(stream, &mut back, "read echo")?;
        samples.push(started.elapsed());
        if back != message {
            return Err(HybridVsockError::Mismatch(format!(
                "echo round {round}: {message_len} bytes came back different"
            )));
        }
    }
    let step = ECHO_STEP;
    let mut block = vec![0u8; step];
    let mut block_back = vec![0u8; step];
    let mut done = 0;
    while done < block_len {
        let n = step.min(block_len - done);
        pattern.fill(&mut block[..n]);
        write_all(stream, &block[..n], "send echo block")?;
        read_exact(stream, &mut block_back[..n], "read echo block")?;
        if block[..n] != block_back[..n] {
            return Err(HybridVsockError::Mismatch(format!(
                "echo block at byte {done}: data came back different"
            )));
        }
        done += n;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(io_error("shutdown", Path::new("<guest stream>")))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .map_err(io_error("read to end", Path::new("<guest stream>")))?;
    if !rest.is_empty() {
        return Err(HybridVsockError::Mismatch(format!(
            "guest sent {} unexpected bytes after the echo",
            rest.len()
        )));
    }
    Ok(Latency { samples })
}

/// Opens `connections` connections to the echoing guest port `port` at
/// once (each waits up to `wait` for the guest to listen) and checks that
/// each echoes `bytes_each` bytes of its own data. Returns the total bytes
/// echoed.
pub fn concurrent_echo(
    uds: &Path,
    port: u32,
    connections: u32,
    bytes_each: usize,
    wait: Duration,
) -> Result<u64, HybridVsockError> {
    // Connect all first, so the guest really has them open at once.
    let mut streams = Vec::new();
    for _ in 0..connections {
        streams.push(connect_guest_retrying(uds, port, wait)?);
    }
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            thread::spawn(move || -> Result<u64, HybridVsockError> {
                let mut data = vec![0u8; bytes_each];
                Pattern::new(1000 + i as u64).fill(&mut data);
                let mut back = vec![0u8; bytes_each];
                // In steps, each read back before the next is sent:
                // vhost-device-vsock 0.3.0 stalls the guest's replies while
                // the host is still streaming into the same connection.
                for (sent, back) in data.chunks(ECHO_STEP).zip(back.chunks_mut(ECHO_STEP)) {
                    write_all(&mut stream, sent, "send")?;
                    read_exact(&mut stream, back, &format!("connection {i}: read echo"))?;
                }
                // Then close: a half-close (shutdown of the write side) is
                // not something every hybrid-vsock device forwards.
                if back != data {
                    return Err(HybridVsockError::Mismatch(format!(
                        "connection {i}: the {bytes_each} echoed bytes differ from those sent"
                    )));
                }
                Ok(bytes_each as u64)
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker
            .join()
            .map_err(|_| HybridVsockError::Mismatch("echo worker panicked".into()))??;
    }
    Ok(total)
}

/// Result of a bulk transfer: time for each direction, as the host saw it.
#[derive(Debug, Clone, Copy)]
pub struct BulkReport {
    pub bytes_each_way: u64,
    /// From the first byte sent until the guest's checksum of them arrived.
    pub host_to_guest: Duration,
    /// From then until the guest's last byte and checksum arrived.
    pub guest_to_host: Duration,
}

impl BulkReport {
    pub fn mib_per_s(bytes: u64, time: Duration) -> f64 {
        bytes as f64 / f64::from(1 << 20) / time.as_secs_f64().max(1e-9)
    }

    pub fn host_to_guest_mib_s(&self) -> f64 {
        Self::mib_per_s(self.bytes_each_way, self.host_to_guest)
    }

    pub fn guest_to_host_mib_s(&self) -> f64 {
        Self::mib_per_s(self.bytes_each_way, self.guest_to_host)
    }
}

/// The host side of the probe's bulk mode on an accepted connection.
pub fn bulk_session(mut stream: UnixStream, mib: u32) -> Result<BulkReport, HybridVsockError> {
    let len = u64::from(mib) << 20;
    let mut writer = stream
        .try_clone()
        .map_err(io_error("clone stream", Path::new("<guest stream>")))?;
    let started = Instant::now();
    let sender = thread::spawn(move || -> io::Result<()> {
        let mut pattern = Pattern::new(HOST_PATTERN_SEED);
        let mut buf = vec![0u8; BULK_CHUNK];
        let mut sent = 0u64;
        while sent < len {
            let n = usize::try_from(len - sent)
                .unwrap_or(BULK_CHUNK)
                .min(BULK_CHUNK);
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            sent += n as u64;
        }
        Ok(())
    });
    let mut word = [0u8; 8];
    read_exact(&mut stream, &mut word, "read guest's rx checksum")?;
    let host_to_guest = started.elapsed();
    sender
        .join()
        .map_err(|_| HybridVsockError::Mismatch("bulk sender panicked".into()))?
        .map_err(io_error("send bulk data", Path::new("<guest stream>")))?;
    let expected = pattern_hash(HOST_PATTERN_SEED, len, BULK_CHUNK);
    let guest_rx = u64::from_le_bytes(word);
    if guest_rx != expected {
        return Err(HybridVsockError::Mismatch(format!(
            "host→guest: guest checksum {guest_rx:#018x}, sent {expected:#018x}"
        )));
    }
    let started = Instant::now();
    let mut received = StreamHash::new();
    let mut buf = vec![0u8; BULK_CHUNK];
    while received.len() < len {
        let n = usize::try_from(len - received.len())
            .unwrap_or(BULK_CHUNK)
            .min(BULK_CHUNK);
        let got = stream
            .read(&mut buf[..n])
            .map_err(io_error("read bulk data", Path::new("<guest stream>")))?;
        if got == 0 {
            return Err(HybridVsockError::Mismatch(format!(
                "guest→host: stream ended after {} of {len} bytes",
                received.len()
            )));
        }
        received.update(&buf[..got]);
    }
    read_exact(&mut stream, &mut word, "read guest's tx checksum")?;
    let guest_to_host = started.elapsed();
    let ours = received.finish();
    let guest_tx = u64::from_le_bytes(word);
    let expected = pattern_hash(GUEST_PATTERN_SEED, len, BULK_CHUNK);
    if ours != guest_tx || ours != expected {
        return Err(HybridVsockError::Mismatch(format!(
            "guest→host: received checksum {ours:#018x}, guest sent {guest_tx:#018x}, pattern {expected:#018x}"
        )));
    }
    Ok(BulkReport {
        bytes_each_way: len,
        host_to_guest,
        guest_to_host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_path_appends_underscore_and_port() {
        assert_eq!(
            host_port_path(Path::new("/run/vm/vsock.sock"), 1024),
            PathBuf::from("/run/vm/vsock.sock_1024")
        );
    }

    #[test]
    fn latency_quantiles_use_nearest_rank() {
        let latency = Latency {
            samples: (1..=100).rev().map(Duration::from_micros).collect(),
        };
        assert_eq!(latency.median(), Duration::from_micros(50));
        assert_eq!(latency.p99(), Duration::from_micros(99));
    }

    /// A fake device end: answers CONNECT as `reply` says, then echoes.
    fn fake_device(dir: &Path, reply: &'static str) -> PathBuf {
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 77");
            stream.write_all(reply.as_bytes()).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).unwrap();
            }
        });
        uds
    }

    #[test]
    fn connect_and_echo_session_against_a_fake_device() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_device(dir.path(), "OK 1073741824\n");
        let mut stream = connect_guest(&uds, 77).unwrap();
        let latency = echo_session(&mut stream, 10, 64, 100_000).unwrap();
        assert_eq!(latency.samples.len(), 10);
    }

    #[test]
    fn connect_refused_names_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake_device(dir.path(), "NOPE\n");
        let err = connect_guest(&uds, 77).unwrap_err();
        assert!(err.to_string().contains("NOPE"), "{err}");
    }
}
