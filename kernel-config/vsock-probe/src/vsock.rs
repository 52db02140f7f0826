//! `AF_VSOCK` stream sockets over libc (std has none).

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A connected vsock stream socket.
pub struct VsockStream {
    // read(2)/write(2) on a socket behave like recv/send without flags.
    file: File,
}

/// A listening vsock socket.
pub struct VsockListener {
    fd: OwnedFd,
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDRESS_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl VsockStream {
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = address(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDRESS_LEN bytes.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                ADDRESS_LEN,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file: File::from(fd),
        })
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on our own socket fd.
        let rc = unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl VsockListener {
    /// Listens on `port` of any local CID.
    pub fn bind(port: u32, backlog: u32) -> io::Result<Self> {
        let fd = socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of ADDRESS_LEN bytes.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                ADDRESS_LEN,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        // SAFETY: listen(2) on our bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// The next connection and the peer's `cid:port`.
    pub fn accept(&self) -> io::Result<(VsockStream, String)> {
        let mut addr = address(0, 0);
        let mut len = ADDRESS_LEN;
        loop {
            // SAFETY: accept4(2) writes at most `len` bytes into `addr`.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::from_mut(&mut addr).cast(),
                    &mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new fd owned by nobody else.
                let file = unsafe { File::from_raw_fd(fd) };
                let peer = format!("{}:{}", addr.svm_cid, addr.svm_port);
                return Ok((VsockStream { file }, peer));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}
