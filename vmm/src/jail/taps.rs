//! Taps named in the config are opened before the jail, in the network
//! namespace it joined, as root (creating or attaching a tap needs
//! CAP_NET_ADMIN and `/dev/net/tun`, neither of which the jail keeps); the
//! VMM then adopts them as inherited fds, and its own network namespace is
//! a fresh, empty one.

use crate::config::NetConfig;
use crate::devices::virtio::net::{NetBackend, Tap};

use super::JailError;

/// Replaces each `tap=NAME` of `nics` by `fd=N` of the opened tap.
pub fn open_named_taps(nics: &mut [NetConfig]) -> Result<(), JailError> {
    for nic in nics.iter_mut() {
        let Some(name) = nic.tap.clone() else {
            continue;
        };
        let tap = Tap::open(&name).map_err(|e| JailError::Taps(e.to_string()))?;
        // SAFETY: F_DUPFD_CLOEXEC duplicates the tap's open fd; the copy is
        // owned by this process until the net device adopts it.
        let fd = unsafe { libc::fcntl(tap.fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(JailError::Step {
                step: "keep tap open",
                value: name,
                source: std::io::Error::last_os_error(),
            });
        }
        nic.tap = None;
        nic.fd = Some(fd);
    }
    Ok(())
}
