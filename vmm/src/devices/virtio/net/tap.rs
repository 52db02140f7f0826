//! The host side of the device: a Linux tap opened by name or adopted from
//! an inherited fd, behind [`NetBackend`] so device tests can use a
//! socket pair instead.
//!
//! The tap always carries the 12-byte virtio-net header
//! (`IFF_VNET_HDR` + `TUNSETVNETHDRSZ`), has no packet-information prefix
//! (`IFF_NO_PI`) and is non-blocking.

use std::ffi::c_int;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::{NetError, NET_HDR_LEN};

/// `IFNAMSIZ`: interface names are at most 15 bytes plus a NUL.
const IFNAMSIZ: usize = 16;
const TUN_DEVICE: &str = "/dev/net/tun";
/// The flags every tap we use has.
const TAP_FLAGS: c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Where frames go and come from: a tap, or in tests a socket pair. Frames
/// carry the 12-byte virtio-net header in front.
pub trait NetBackend: Send {
    /// Names it in logs and errors (`tap0`).
    fn name(&self) -> &str;
    /// Readable when a frame waits; the device polls it.
    fn fd(&self) -> RawFd;
    /// Reads one frame; `WouldBlock` when none waits. A frame longer than
    /// `buf` is truncated.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// `TUNSETOFFLOAD`: the `TUN_F_*` offloads the host may hand us in
    /// frames (partial checksums, TSO). Refused flags fail the call.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and the flags
/// (padded to the union's 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: c_int) -> Self {
        let mut req = Self {
            name: [0; IFNAMSIZ],
            // The TUN flags all fit the 16-bit field.
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..len]).into_owned()
    }
}

/// A Linux tap device carrying virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can name an interface: 1 to 15 bytes, no `/` or NUL
/// (the kernel's `dev_valid_name` also refuses whitespace, `.` and `..`;
/// TUNSETIFF reports those).
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty() && name.len() < IFNAMSIZ && !name.contains(['/', '\0'])
}

fn last_error(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens (creating it if needed, which needs CAP_NET_ADMIN) the tap
    /// `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> Result<Self, NetError> {
        if !valid_tap_name(name) {
            return Err(NetError::BadTapName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| NetError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq::new(name, TAP_FLAGS);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // is (same layout, 40 bytes), on the tun fd we own.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        last_error(ret).map_err(|source| NetError::SetIff {
            name: name.to_string(),
            source,
        })?;
        let tap = Self {
            file,
            name: req.name(),
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Takes over `fd`, a tap a parent process opened (in the pod's network
    /// namespace) and left open across exec. It must be a tap with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; it is made non-blocking and
    /// close-on-exec. Nothing happens to `fd` if it is refused, so a wrong
    /// number cannot close a descriptor this process uses.
    pub fn adopt_fd(fd: RawFd) -> Result<Self, NetError> {
        // SAFETY: F_GETFD only asks whether `fd` is open.
        let ret = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        last_error(ret).map_err(|source| NetError::BadFd { fd, source })?;
        // SAFETY: `fd` is open (checked above) and only borrowed for the
        // duration of the TUNGETIFF call below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq`, which `req` is; on a
        // file that is not a tun device it fails with ENOTTY or EBADFD
        // without writing.
        let ret = unsafe { ioctl_with_mut_ref(&borrowed, libc::TUNGETIFF, &mut req) };
        last_error(ret).map_err(|source| NetError::NotTap { fd, source })?;
        let flags = c_int::from(req.flags);
        let is_tap = flags & (libc::IFF_TUN | libc::IFF_TAP) == libc::IFF_TAP;
        if !is_tap || flags & TAP_FLAGS != TAP_FLAGS {
            return Err(NetError::WrongTapFlags {
                fd,
                name: req.name(),
                flags: req.flags as u16,
            });
        }
        // SAFETY: `fd` is an open tun/tap fd (TUNGETIFF succeeded) that the
        // parent handed to this process for the device; from here on the
        // Tap owns it and closes it when dropped.
        let file = unsafe { File::from_raw_fd(fd) };
        let tap = Self {
            file,
            name: req.name(),
        };
        let setup = |what, source| NetError::Setup {
            name: tap.name.clone(),
            what,
            source,
        };
        // SAFETY: fcntl on the fd the Tap owns, with plain integer flags.
        let ret = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        last_error(ret).map_err(|e| setup("set close-on-exec", e))?;
        // SAFETY: as above.
        let status = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        last_error(status).map_err(|e| setup("read file status flags", e))?;
        // SAFETY: as above.
        let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK) };
        last_error(ret).map_err(|e| setup("set O_NONBLOCK", e))?;
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// The interface name the kernel reports.
    pub fn if_name(&self) -> &str {
        &self.name
    }

    fn set_vnet_hdr_size(&self) -> Result<(), NetError> {
        // NET_HDR_LEN is 12.
        let size = NET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // `size` is, on the tap fd we own.
        let ret = unsafe { ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ, &size) };
        last_error(ret).map_err(|source| NetError::Setup {
            name: self.name.clone(),
            what: "TUNSETVNETHDRSZ 12",
            source,
        })
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is the
        // tap we own.
        let ret =
            unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        last_error(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_follow_the_kernel_limits() {
        assert!(valid_tap_name("tap0"));
        assert!(valid_tap_name(&"t".repeat(15)));
        for bad in ["", &"t".repeat(16), "a/b", "a\0b"] {
            assert!(!valid_tap_name(bad), "{bad:?}");
            assert!(matches!(Tap::open(bad), Err(NetError::BadTapName(_))));
        }
    }

    #[test]
    fn adopt_fd_of_a_closed_fd_names_it() {
        let err = Tap::adopt_fd(987_654).unwrap_err();
        assert!(
            err.to_string().starts_with("fd 987654 is not an open"),
            "{err}"
        );
    }

    #[test]
    fn adopt_fd_of_a_regular_file_refuses_it_and_leaves_it_open() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();

        let err = Tap::adopt_fd(fd).unwrap_err();

        assert!(
            err.to_string()
                .starts_with(&format!("fd {fd} is not an attached tun/tap device")),
            "{err}"
        );
        // SAFETY: F_GETFD only asks whether the fd is still open.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
        drop(file);
    }
}
