//! TDX quotes: a guest's `TDG.VP.VMCALL<GetQuote>` reaches the VMM as
//! `KVM_EXIT_TDX` (nr `TDVMCALL_GET_QUOTE`, a shared buffer's GPA and
//! size). The buffer (GHCI 1.5, "GetQuote") holds
//!
//! ```text
//! 0x00 version u64 = 1   0x08 status u64   0x10 in_len u32   0x14 out_len u32
//! 0x18 data: TDREPORT (in_len bytes) in, quote (out_len bytes) out
//! ```
//!
//! The VMM hands the TDREPORT to a quote service — Intel's Quote
//! Generation Service (QGS) on a Unix or vsock socket, framed as a 4-byte
//! big-endian length and a `qgs_msg` (header: major 1, minor 0, type,
//! size, error code) — and writes the quote back with status SUCCESS.
//! The request is served on the vCPU thread: the guest waits for it
//! anyway (Linux's `tdx-guest` polls the status).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::uapi::{TDVMCALL_STATUS_INVALID_OPERAND, TDVMCALL_STATUS_SUCCESS};

/// GetQuote buffer status values.
pub const GET_QUOTE_SUCCESS: u64 = 0;
pub const GET_QUOTE_ERROR: u64 = 0x8000_0000_0000_0000;
pub const GET_QUOTE_SERVICE_UNAVAILABLE: u64 = 0x8000_0000_0000_0001;
const HEADER: u64 = 24;
/// A TDREPORT is 1024 bytes; quotes are a few KiB. Bound what we read.
const MAX_QUOTE: usize = 64 * 1024;
const QGS_MSG_GET_QUOTE_REQ: u32 = 0;
const QGS_MSG_GET_QUOTE_RESP: u32 = 1;
const QGS_HEADER: usize = 16;

/// Where the quote service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuoteServiceAddr {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
}

impl FromStr for QuoteServiceAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or("expected vsock:CID:PORT")?;
            return Ok(Self::Vsock {
                cid: cid.parse().map_err(|e| format!("cid {cid}: {e}"))?,
                port: port.parse().map_err(|e| format!("port {port}: {e}"))?,
            });
        }
        Err("expected unix:PATH or vsock:CID:PORT".into())
    }
}

/// Why a quote could not be had.
#[derive(Debug, thiserror::Error)]
pub enum QuoteError {
    #[error("cannot reach the quote service at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("quote service i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("quote service answered {0}")]
    Protocol(String),
}

/// Turns a TDREPORT into a quote.
pub trait QuoteService {
    fn get_quote(&mut self, tdreport: &[u8]) -> Result<Vec<u8>, QuoteError>;
}

/// A client of Intel's QGS.
#[derive(Debug, Clone)]
pub struct QgsClient {
    pub addr: QuoteServiceAddr,
    pub timeout: Duration,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl QgsClient {
    pub fn new(addr: QuoteServiceAddr) -> Self {
        Self {
            addr,
            timeout: Duration::from_secs(30),
        }
    }

    fn connect(&self) -> Result<Box<dyn Stream>, QuoteError> {
        match &self.addr {
            QuoteServiceAddr::Unix(path) => {
                let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                    QuoteError::Connect {
                        addr: format!("unix:{}", path.display()),
                        source,
                    }
                })?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                Ok(Box::new(s))
            }
            QuoteServiceAddr::Vsock { cid, port } => {
                let s = vsock_connect(*cid, *port)?;
                // As for the Unix socket: a hung QGS must not hold the
                // vCPU thread that asked for the quote forever.
                set_timeouts(&s, self.timeout)?;
                Ok(Box::new(s))
            }
        }
    }
}

/// SO_RCVTIMEO and SO_SNDTIMEO of a socket held as a `File`.
fn set_timeouts(socket: &std::fs::File, timeout: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: a valid socket fd and a timeval of the given size.
        let ret = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn vsock_connect(cid: u32, port: u32) -> Result<std::fs::File, QuoteError> {
    let addr = format!("vsock:{cid}:{port}");
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(QuoteError::Connect {
            addr,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a new socket we own.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sa = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    };
    // SAFETY: `sa` is a valid sockaddr_vm of the given length.
    let ret = unsafe {
        libc::connect(
            fd,
            &sa as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(QuoteError::Connect {
            addr,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// `qgs_msg_get_quote_req` for `tdreport`, framed.
pub fn qgs_request(tdreport: &[u8]) -> Vec<u8> {
    let size = (QGS_HEADER + 8 + tdreport.len()) as u32;
    let mut msg = Vec::with_capacity(size as usize + 4);
    msg.extend_from_slice(&size.to_be_bytes());
    msg.extend_from_slice(&1u16.to_le_bytes()); // major
    msg.extend_from_slice(&0u16.to_le_bytes()); // minor
    msg.extend_from_slice(&QGS_MSG_GET_QUOTE_REQ.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // error_code
    msg.extend_from_slice(&(tdreport.len() as u32).to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // id_list_size
    msg.extend_from_slice(tdreport);
    msg
}

/// The quote out of a `qgs_msg_get_quote_resp` (without its frame).
pub fn parse_qgs_response(msg: &[u8]) -> Result<Vec<u8>, QuoteError> {
    let u32_at = |o: usize| -> Result<u32, QuoteError> {
        msg.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| {
                QuoteError::Protocol(format!("a truncated message ({} bytes)", msg.len()))
            })
    };
    let kind = u32_at(4)?;
    if kind != QGS_MSG_GET_QUOTE_RESP {
        return Err(QuoteError::Protocol(format!(
            "message type {kind}, expected GET_QUOTE_RESP"
        )));
    }
    let error = u32_at(12)?;
    if error != 0 {
        return Err(QuoteError::Protocol(format!("error code {error:#x}")));
    }
    let id_size = u32_at(QGS_HEADER)? as usize;
    let quote_size = u32_at(QGS_HEADER + 4)? as usize;
    let start = QGS_HEADER + 8 + id_size;
    msg.get(start..start + quote_size)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            QuoteError::Protocol(format!(
                "a quote of {quote_size} bytes past the message end"
            ))
        })
}

impl QuoteService for QgsClient {
    fn get_quote(&mut self, tdreport: &[u8]) -> Result<Vec<u8>, QuoteError> {
        let mut stream = self.connect()?;
        stream.write_all(&qgs_request(tdreport))?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_QUOTE + 4096 {
            return Err(QuoteError::Protocol(format!("a {len}-byte message")));
        }
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg)?;
        parse_qgs_response(&msg)
    }
}

/// Serves one GetQuote exit: returns the TDVMCALL status for `ret`.
/// Everything in the buffer is the guest's: sizes are checked against the
/// buffer, the buffer against guest RAM (`ram`).
pub fn handle_get_quote(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    gpa: u64,
    size: u64,
    service: Option<&mut dyn QuoteService>,
) -> u64 {
    let in_ram = gpa
        .checked_add(size)
        .is_some_and(|end| ram.iter().any(|&(s, l)| gpa >= s && end <= s + l));
    if !gpa.is_multiple_of(4096) || size < HEADER || !in_ram {
        return TDVMCALL_STATUS_INVALID_OPERAND;
    }
    let set_status = |status: u64, out_len: u32| {
        let _ = mem.write_obj(out_len, GuestAddress(gpa + 0x14));
        let _ = mem.write_obj(status, GuestAddress(gpa + 8));
    };
    let (Ok(version), Ok(in_len)) = (
        mem.read_obj::<u64>(GuestAddress(gpa)),
        mem.read_obj::<u32>(GuestAddress(gpa + 0x10)),
    ) else {
        return TDVMCALL_STATUS_INVALID_OPERAND;
    };
    if version != 1 || u64::from(in_len) > size - HEADER {
        set_status(GET_QUOTE_ERROR, 0);
        return TDVMCALL_STATUS_SUCCESS;
    }
    let Some(service) = service else {
        set_status(GET_QUOTE_SERVICE_UNAVAILABLE, 0);
        return TDVMCALL_STATUS_SUCCESS;
    };
    let mut report = vec![0u8; in_len as usize];
    if mem
        .read_slice(&mut report, GuestAddress(gpa + HEADER))
        .is_err()
    {
        return TDVMCALL_STATUS_INVALID_OPERAND;
    }
    match service.get_quote(&report) {
        Ok(quote) if (quote.len() as u64) <= size - HEADER => {
            if mem.write_slice(&quote, GuestAddress(gpa + HEADER)).is_err() {
                return TDVMCALL_STATUS_INVALID_OPERAND;
            }
            set_status(GET_QUOTE_SUCCESS, quote.len() as u32);
        }
        Ok(quote) => {
            tracing::warn!(
                "quote of {} bytes does not fit the guest's {size}-byte buffer",
                quote.len()
            );
            set_status(GET_QUOTE_ERROR, 0);
        }
        Err(e) => {
            tracing::warn!("GetQuote: {e}");
            set_status(GET_QUOTE_SERVICE_UNAVAILABLE, 0);
        }
    }
    TDVMCALL_STATUS_SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QGS that accepts and then says nothing lets the read end.
    #[test]
    fn socket_timeouts_end_a_silent_read() {
        use std::io::Read;
        let (ours, _silent_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut file = std::fs::File::from(std::os::fd::OwnedFd::from(ours));
        set_timeouts(&file, Duration::from_millis(50)).unwrap();
        let started = std::time::Instant::now();
        let err = file.read(&mut [0u8; 4]).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    use crate::vstate::memory::create_guest_memory;

    struct FakeService {
        reports: Vec<Vec<u8>>,
        quote: Result<Vec<u8>, ()>,
    }

    impl QuoteService for FakeService {
        fn get_quote(&mut self, tdreport: &[u8]) -> Result<Vec<u8>, QuoteError> {
            self.reports.push(tdreport.to_vec());
            self.quote
                .clone()
                .map_err(|()| QuoteError::Protocol("refused".into()))
        }
    }

    const BUF: u64 = 0x10_0000;
    const RAM: &[(u64, u64)] = &[(0, 16 << 20)];

    fn guest_buffer(in_len: u32) -> GuestMemoryMmap {
        let mem = create_guest_memory(16, false).unwrap();
        mem.write_obj(1u64, GuestAddress(BUF)).unwrap();
        mem.write_obj(u64::MAX, GuestAddress(BUF + 8)).unwrap(); // in flight
        mem.write_obj(in_len, GuestAddress(BUF + 0x10)).unwrap();
        mem.write_slice(&vec![0x77; in_len as usize], GuestAddress(BUF + 24))
            .unwrap();
        mem
    }

    #[test]
    fn quote_is_written_back_with_success() {
        let mem = guest_buffer(1024);
        let mut service = FakeService {
            reports: vec![],
            quote: Ok(vec![0xAA; 5000]),
        };
        let ret = handle_get_quote(&mem, RAM, BUF, 8192, Some(&mut service));
        assert_eq!(ret, TDVMCALL_STATUS_SUCCESS);
        assert_eq!(service.reports, [vec![0x77; 1024]]);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BUF + 8)).unwrap(),
            GET_QUOTE_SUCCESS
        );
        assert_eq!(mem.read_obj::<u32>(GuestAddress(BUF + 0x14)).unwrap(), 5000);
        let mut quote = vec![0u8; 5000];
        mem.read_slice(&mut quote, GuestAddress(BUF + 24)).unwrap();
        assert_eq!(quote, vec![0xAA; 5000]);
    }

    #[test]
    fn hostile_buffers_are_refused_without_asking_the_service() {
        let mut service = FakeService {
            reports: vec![],
            quote: Ok(vec![1]),
        };
        let mem = guest_buffer(1024);
        // Outside RAM, unaligned, too small, overflowing.
        for (gpa, size) in [(16 << 20, 4096), (BUF + 8, 4096), (BUF, 8), (BUF, u64::MAX)] {
            assert_eq!(
                handle_get_quote(&mem, RAM, gpa, size, Some(&mut service)),
                TDVMCALL_STATUS_INVALID_OPERAND
            );
        }
        // in_len beyond the buffer: the status says error.
        let mem = guest_buffer(5000);
        assert_eq!(
            handle_get_quote(&mem, RAM, BUF, 4096, Some(&mut service)),
            0
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BUF + 8)).unwrap(),
            GET_QUOTE_ERROR
        );
        assert!(service.reports.is_empty());
    }

    #[test]
    fn no_service_or_a_failing_one_reports_unavailable() {
        let mem = guest_buffer(1024);
        handle_get_quote(&mem, RAM, BUF, 8192, None);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BUF + 8)).unwrap(),
            GET_QUOTE_SERVICE_UNAVAILABLE
        );
        let mut failing = FakeService {
            reports: vec![],
            quote: Err(()),
        };
        let mem = guest_buffer(1024);
        handle_get_quote(&mem, RAM, BUF, 8192, Some(&mut failing));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BUF + 8)).unwrap(),
            GET_QUOTE_SERVICE_UNAVAILABLE
        );
        let mut big = FakeService {
            reports: vec![],
            quote: Ok(vec![0; 9000]),
        };
        let mem = guest_buffer(1024);
        handle_get_quote(&mem, RAM, BUF, 8192, Some(&mut big));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BUF + 8)).unwrap(),
            GET_QUOTE_ERROR
        );
    }

    /// The QGS client against a fake QGS on a Unix socket.
    #[test]
    fn qgs_client_speaks_the_framed_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qgs.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut req = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut req).unwrap();
            let report = req[24..].to_vec();
            let quote = [b"QUOTE:".as_slice(), &report[..4]].concat();
            let size = (QGS_HEADER + 8 + quote.len()) as u32;
            let mut resp = Vec::new();
            resp.extend_from_slice(&size.to_be_bytes());
            resp.extend_from_slice(&1u16.to_le_bytes());
            resp.extend_from_slice(&0u16.to_le_bytes());
            resp.extend_from_slice(&QGS_MSG_GET_QUOTE_RESP.to_le_bytes());
            resp.extend_from_slice(&size.to_le_bytes());
            resp.extend_from_slice(&0u32.to_le_bytes());
            resp.extend_from_slice(&0u32.to_le_bytes());
            resp.extend_from_slice(&(quote.len() as u32).to_le_bytes());
            resp.extend_from_slice(&quote);
            s.write_all(&resp).unwrap();
            (req[..16].to_vec(), req[16..24].to_vec())
        });

        let mut client = QgsClient::new(format!("unix:{}", path.display()).parse().unwrap());
        let quote = client.get_quote(&[1, 2, 3, 4, 5]).unwrap();

        assert_eq!(quote, b"QUOTE:\x01\x02\x03\x04");
        let (header, body) = server.join().unwrap();
        assert_eq!(&header[..8], &[1, 0, 0, 0, 0, 0, 0, 0]); // v1.0, GET_QUOTE_REQ
        assert_eq!(&body[..4], &5u32.to_le_bytes());
    }

    #[test]
    fn qgs_errors_and_addresses_are_named() {
        let mut msg = vec![0u8; 24];
        msg[4] = 1;
        msg[12] = 0x12;
        let err = parse_qgs_response(&msg).unwrap_err().to_string();
        assert!(err.contains("error code 0x12"), "{err}");
        assert_eq!(
            "vsock:2:4050".parse::<QuoteServiceAddr>().unwrap(),
            QuoteServiceAddr::Vsock { cid: 2, port: 4050 }
        );
        assert!("tcp:1".parse::<QuoteServiceAddr>().is_err());
        let mut client = QgsClient::new("unix:/nonexistent/qgs".parse().unwrap());
        let err = client.get_quote(&[0]).unwrap_err().to_string();
        assert!(err.contains("unix:/nonexistent/qgs"), "{err}");
    }
}
