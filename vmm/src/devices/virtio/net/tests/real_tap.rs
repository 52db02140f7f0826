//! The device on a real tap, in a network namespace of its own (made with
//! `unshare(CLONE_NEWNET)` on a dedicated thread, so the host's interfaces
//! never see the test). The test talks to the interface side of the tap
//! through an `AF_PACKET` socket bound to it. Needs root (CAP_NET_ADMIN
//! and /dev/net/tun); skips with the reason otherwise.

use std::ffi::c_int;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::*;

const TAP: &str = "cltest0";
/// IEEE 802 "local experimental" EtherType: nothing else on the tap uses
/// it, so stray frames (IPv6 router solicitations) are told apart.
const ETHERTYPE: u16 = 0x88b5;

/// Runs `test` on a thread in a fresh network namespace; `None` (after
/// printing why) when this process may not make one or has no tun device.
fn in_fresh_netns<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: real tap tests need root (CAP_NET_ADMIN)");
        return None;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: /dev/net/tun is missing");
        return None;
    }
    thread::spawn(move || {
        // SAFETY: unshare of the calling thread's network namespace only;
        // the thread ends with the test, the namespace with its last fd.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIP: unshare(CLONE_NEWNET) failed: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        Some(test())
    })
    .join()
    .unwrap()
}

/// `struct ifreq` with the flags member, for SIOCGIFFLAGS/SIOCSIFFLAGS and
/// SIOCGIFINDEX (whose int shares the union's first bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    value: c_int,
    _pad: [u8; 20],
}

fn if_req(name: &str) -> IfReq {
    let mut req = IfReq {
        name: [0; 16],
        value: 0,
        _pad: [0; 20],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

fn check(ret: c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", io::Error::last_os_error());
}

/// Brings `name` up (without IPv6, whose router solicitations would
/// otherwise appear on it) and returns its ifindex.
fn bring_up(name: &str) -> c_int {
    // Best effort: a kernel without IPv6 has no such file.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    // SAFETY: a plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket");
    // SAFETY: `fd` was just returned by socket(2).
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = if_req(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of an ifreq, which `req` is.
    check(
        unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) },
        "SIOCGIFFLAGS",
    );
    req.value |= libc::IFF_UP;
    // SAFETY: SIOCSIFFLAGS reads an ifreq.
    check(
        unsafe { ioctl_with_mut_ref(&sock, libc::SIOCSIFFLAGS, &mut req) },
        "SIOCSIFFLAGS",
    );
    let mut req = if_req(name);
    // SAFETY: SIOCGIFINDEX fills the ifindex of an ifreq.
    check(
        unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFINDEX, &mut req) },
        "SIOCGIFINDEX",
    );
    req.value
}

/// An `AF_PACKET` socket on the tap's interface side, for [`ETHERTYPE`].
struct Wire {
    fd: OwnedFd,
    ifindex: c_int,
}

impl Wire {
    fn new(ifindex: c_int) -> Self {
        let protocol = ETHERTYPE.to_be();
        // SAFETY: a plain socket(2) call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                c_int::from(protocol),
            )
        };
        check(fd, "socket(AF_PACKET)");
        // SAFETY: `fd` was just returned by socket(2).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = Self::address(ifindex);
        // SAFETY: bind with a valid sockaddr_ll and its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        check(ret, "bind(AF_PACKET)");
        Self { fd, ifindex }
    }

    fn address(ifindex: c_int) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE.to_be();
        addr.sll_ifindex = ifindex;
        addr
    }

    /// Transmits `frame` (a whole Ethernet frame) on the interface: the tap
    /// hands it to the device.
    fn send(&self, frame: &[u8]) {
        let addr = Self::address(self.ifindex);
        // SAFETY: sendto with a live buffer and a valid sockaddr_ll.
        let ret = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            ret,
            frame.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame the interface received (from the device), waiting up
    /// to 5 s.
    fn recv(&self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < deadline {
            // SAFETY: recv into a live buffer of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                buf.truncate(n.unsigned_abs());
                return Some(buf);
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

/// An Ethernet frame of our EtherType with `len` payload bytes.
fn ethernet(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = dst.to_vec();
    bytes.extend_from_slice(&src);
    bytes.extend_from_slice(&ETHERTYPE.to_be_bytes());
    bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    bytes
}

const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// A device on a fresh tap, the tap up, and a wire on it.
fn tap_device() -> (NetDevice, Wire) {
    let tap = Tap::open(TAP).unwrap();
    assert_eq!(tap.if_name(), TAP);
    let dev = NetDevice::new("net0", Box::new(tap), Some(MacAddress::new(MAC).unwrap())).unwrap();
    let wire = Wire::new(bring_up(TAP));
    (dev, wire)
}

/// Waits until the device's host event fd is readable (the tap got a
/// frame), up to 5 s.
fn wait_readable(f: &Fixture) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f.host_event_readable() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    true
}

#[test]
fn real_tap_offers_offloads_and_carries_a_guest_frame_to_the_interface() {
    in_fresh_netns(|| {
        let (dev, wire) = tap_device();
        let offloads = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            dev.features() & offloads,
            offloads,
            "a Linux tap offloads TSO"
        );
        let mem = guest_memory(MEM_SIZE);
        let mut f = Fixture::on(&mem, dev, BASIC);
        let sent = ethernet(PEER_MAC, MAC, 1400, 1);
        let mut chain = vec![0u8; NET_HDR_LEN];
        chain.extend_from_slice(&sent);
        f.add_tx_frame(&chain, &[NET_HDR_LEN, 300]);

        f.kick(1);

        assert_eq!(wire.recv(), Some(sent));
        assert_eq!(f.dev.net_metrics().tx_frames, 1);
    });
}

#[test]
fn real_tap_frame_from_the_interface_reaches_an_rx_buffer() {
    in_fresh_netns(|| {
        let (dev, wire) = tap_device();
        let mem = guest_memory(MEM_SIZE);
        let mut f = Fixture::on(&mem, dev, BASIC | bit(VIRTIO_NET_F_MRG_RXBUF));
        let addr = f.add_rx_buffer(4096);
        let sent = ethernet(MAC, PEER_MAC, 1000, 2);

        wire.send(&sent);
        assert!(wait_readable(&f), "the tap never became readable");
        f.host_event();

        let used = f.used(0);
        assert_eq!(used.len(), 1);
        let len = used[0].1 as usize;
        let got = f.read(addr, len);
        // A plain frame: no offload flags, num_buffers 1.
        assert_eq!(got[..NET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(got[NET_HDR_LEN..], sent);
    });
}

#[test]
fn real_tap_without_rx_buffers_parks_and_delivers_after_the_kick() {
    in_fresh_netns(|| {
        let (dev, wire) = tap_device();
        let mem = guest_memory(MEM_SIZE);
        let mut f = Fixture::on(&mem, dev, BASIC);
        let frames: Vec<Vec<u8>> = (0..4).map(|i| ethernet(MAC, PEER_MAC, 64, i)).collect();
        for sent in &frames {
            wire.send(sent);
        }
        assert!(wait_readable(&f));

        f.host_event();

        assert!(f.used(0).is_empty());
        assert!(
            !f.host_event_readable(),
            "a readable tap must not wake the loop"
        );
        let addrs: Vec<u64> = (0..4).map(|_| f.add_rx_buffer(2048)).collect();
        f.kick(0);

        assert_eq!(f.used(0).len(), 4);
        for (addr, sent) in addrs.iter().zip(&frames) {
            assert_eq!(f.read(*addr + NET_HDR_LEN as u64, sent.len()), *sent);
        }
    });
}

/// Opens a tun/tap with `flags` the way a parent process would, returning
/// the raw fd for the device to adopt.
fn open_raw(name: &str, flags: c_int) -> i32 {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = if_req(name);
    req.value = flags;
    // SAFETY: TUNSETIFF reads and writes an ifreq (name, then the flags in
    // the union's first bytes, as `req` has them).
    check(
        unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) },
        "TUNSETIFF",
    );
    file.into_raw_fd()
}

#[test]
fn real_tap_adopted_from_an_inherited_fd_works_and_wrong_kinds_are_refused() {
    in_fresh_netns(|| {
        let fd = open_raw(
            "adopt0",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        let tap = Tap::adopt_fd(fd).unwrap();
        assert_eq!(tap.if_name(), "adopt0");
        assert_eq!(tap.fd(), fd);
        // Non-blocking now: nothing to read is WouldBlock, not a hang.
        let mut tap = tap;
        let err = tap.read_frame(&mut [0u8; 64]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        for (name, flags) in [
            ("nohdr0", libc::IFF_TAP | libc::IFF_NO_PI),
            ("tun0", libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR),
        ] {
            let fd = open_raw(name, flags);
            let err = Tap::adopt_fd(fd).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("fd {fd} is tap {name} with flags")),
                "{err}"
            );
            // Refused: still ours to close.
            // SAFETY: `fd` is open and owned by nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    });
}
