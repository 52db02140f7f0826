//! The tap device a pod's guest interface sits on.
//!
//! A tap is created by opening `/dev/net/tun` and `TUNSETIFF` with
//! `IFF_TAP`; it is born in the network namespace of the thread that opened
//! `/dev/net/tun`, so [`open_tap`] must run inside the pod's namespace (see
//! [`super::netns::NetNs::run`]). The tap is not persistent: it exists while
//! an fd refers to it, so if every holder (shim, VMM) dies it disappears by
//! itself; teardown deletes it explicitly all the same.
//!
//! Flags: `IFF_NO_PI` (frames without the 4-byte packet-info prefix) and
//! `IFF_VNET_HDR` (each frame carries a `virtio_net_hdr`, so checksum and
//! segmentation offloads reach the virtio-net device, which is what both
//! `cloister-vmm --net fd=N` and QEMU `-netdev tap,fd=N` expect).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The clone device of the tun/tap driver.
const TUN_CLONE_DEVICE: &str = "/dev/net/tun";
/// Every tap we create ends with this, so teardown finds ours by name.
pub const TAP_SUFFIX: &str = "_clst";
/// Interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Errors creating a tap or preparing its fd.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{TUN_CLONE_DEVICE}: cannot open (module tun loaded? CAP_NET_ADMIN?)")]
    OpenClone {
        #[source]
        source: std::io::Error,
    },
    #[error("tap {name}: TUNSETIFF failed (the name in use by another device?)")]
    Create {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd}: cannot clear FD_CLOEXEC")]
    ClearCloexec {
        fd: i32,
        #[source]
        source: std::io::Error,
    },
}

/// A checked tap name: 1-15 bytes of ASCII letters, digits, `_`, `-`, `.`,
/// not `.`/`..`, ending in [`TAP_SUFFIX`] (so it is recognisably ours).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TapName(String);

impl TapName {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, TapError> {
        let invalid = |reason| TapError::InvalidName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.len() > MAX_IFNAME_LEN {
            return Err(invalid("must be 1 to 15 bytes"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid("only ASCII letters, digits, '_', '-' and '.'"));
        }
        if !name.ends_with(TAP_SUFFIX) || name.len() == TAP_SUFFIX.len() {
            return Err(invalid("must end in \"_clst\" after a prefix"));
        }
        Ok(Self(name.to_string()))
    }

    /// The tap for the `n`th pod interface: `tap{n}_clst`.
    pub fn for_interface(n: usize) -> Result<Self, TapError> {
        Self::new(&format!("tap{n}{TAP_SUFFIX}"))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` is one of the names we give taps (`tap<N>_clst`).
    pub fn is_ours(name: &str) -> bool {
        name.strip_prefix("tap")
            .and_then(|rest| rest.strip_suffix(TAP_SUFFIX))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

impl std::fmt::Display for TapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the
/// rest of the 40-byte union is unused here).
#[repr(C)]
struct TunIfreq {
    name: [u8; 16],
    flags: libc::c_short,
    _unused: [u8; 22],
}

/// Creates the tap `name` in the calling thread's network namespace and
/// returns its queue fd (close-on-exec; see [`clear_cloexec`]).
pub fn open_tap(name: &TapName) -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // The fd is for the VMM alone; nothing else the shim spawns may
        // inherit it. Non-blocking: VMMs poll it.
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(TUN_CLONE_DEVICE)
        .map_err(|source| TapError::OpenClone { source })?;
    let mut request = TunIfreq {
        name: [0; 16],
        // The three flags fit in 16 bits (0x0002 | 0x1000 | 0x4000).
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _unused: [0; 22],
    };
    request.name[..name.as_str().len()].copy_from_slice(name.as_str().as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes) from the pointer;
    // `TunIfreq` is repr(C), 40 bytes, lives across the call, and its name
    // is NUL-terminated (TapName is at most 15 bytes).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(TapError::Create {
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file.into())
}

/// Clears `FD_CLOEXEC` on `fd` so that a child spawned next inherits it
/// (for `cloister-vmm --net fd=N` or QEMU `-netdev tap,fd=N`). Every child
/// spawned afterwards inherits it too: prefer clearing it in the child
/// (`CommandExt::pre_exec`) where that is possible.
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> Result<(), TapError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let error = |source: nix::Error| TapError::ClearCloexec {
        fd: fd.as_raw_fd(),
        source: source.into(),
    };
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).map_err(error)?);
    fcntl(fd, FcntlArg::F_SETFD(flags - FdFlag::FD_CLOEXEC)).map_err(error)?;
    Ok(())
}

/// Makes a child spawned from `command` inherit `fds` at the same numbers
/// (for `cloister-vmm --net fd=N` or QEMU `-netdev tap,fd=N`), while they
/// stay close-on-exec in this process, so no other child gets them. Keep
/// the fds open until `command` is spawned; once the child runs, this
/// process may close its copies: the tap lives as long as the child holds
/// it.
///
/// Plain fd numbers: nothing is done to them in this process, and in the
/// child a number that is not open makes the spawn fail with EBADF.
pub fn inherit_in_child(command: &mut std::process::Command, fds: &[RawFd]) {
    use std::os::unix::process::CommandExt;
    if fds.is_empty() {
        // No pre_exec hook: std can then spawn without a plain fork.
        return;
    }
    let raw = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls fcntl alone, on numbers
    // captured before the fork, and allocates nothing. (An fd closed before
    // the spawn makes fcntl fail with EBADF, which spawn then reports.)
    unsafe {
        command.pre_exec(move || {
            for &fd in &raw {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_for_interface_is_ours_and_short() {
        let name = TapName::for_interface(3).unwrap();
        assert_eq!(name.as_str(), "tap3_clst");
        assert!(TapName::is_ours(name.as_str()));
        assert!(TapName::for_interface(99_999).is_ok());
    }

    #[test]
    fn tap_name_too_long_is_rejected_naming_it() {
        assert!(TapName::new("tap1234567_clst").is_ok(), "15 bytes fit");
        let err = TapName::new("tap12345678_clst").unwrap_err();
        assert!(err.to_string().contains("tap12345678_clst"), "{err}");
        assert!(TapName::for_interface(10_000_000).is_err());
    }

    #[test]
    fn tap_name_with_slash_space_or_foreign_suffix_is_rejected() {
        for bad in [
            "a/b_clst",
            "t 0_clst",
            "",
            "_clst",
            "tap0",
            "..",
            "tap0_kata",
        ] {
            let err = TapName::new(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn is_ours_only_for_tap_number_suffix() {
        assert!(TapName::is_ours("tap0_clst"));
        assert!(TapName::is_ours("tap12_clst"));
        assert!(!TapName::is_ours("tap_clst"));
        assert!(!TapName::is_ours("tapx_clst"));
        assert!(!TapName::is_ours("eth0"));
        assert!(!TapName::is_ours("tap0_kata"));
    }

    #[test]
    fn inherit_in_child_passes_only_the_named_fds() {
        let passed = tempfile::tempfile().unwrap();
        let kept = tempfile::tempfile().unwrap();
        let (passed_fd, kept_fd) = (passed.as_raw_fd(), kept.as_raw_fd());
        let mut command = std::process::Command::new("sh");
        command.arg("-c").arg(format!(
            "test -e /proc/self/fd/{passed_fd} && ! test -e /proc/self/fd/{kept_fd}"
        ));
        inherit_in_child(&mut command, &[passed_fd]);
        let status = command.status().unwrap();
        assert!(
            status.success(),
            "fd {passed_fd} not inherited or {kept_fd} leaked"
        );
        // The parent's copy stays close-on-exec.
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let flags = FdFlag::from_bits_truncate(
            fcntl(std::os::fd::AsFd::as_fd(&passed), FcntlArg::F_GETFD).unwrap(),
        );
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    fn inherit_in_child_of_closed_fd_fails_the_spawn() {
        // Far above any fd this process has (tests run on threads that
        // open and close files: a just-closed number could be reused).
        let closed = i32::MAX - 1;
        let mut command = std::process::Command::new("true");
        inherit_in_child(&mut command, &[closed]);
        assert!(command.status().is_err());
    }

    #[test]
    fn clear_cloexec_clears_only_that_flag() {
        let file = tempfile::tempfile().unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let before = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(before.contains(FdFlag::FD_CLOEXEC));
        clear_cloexec(fd).unwrap();
        let after = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(!after.contains(FdFlag::FD_CLOEXEC));
    }
}
