//! Process resource limits the VMM needs raised.
//!
//! Every file or directory a guest looks up through a virtio-fs share is
//! held open (an `O_PATH` descriptor) until the guest forgets it, and each
//! vsock connection holds a socket: a busy guest needs far more than the
//! usual soft limit of 1024 descriptors. Raising the soft limit to the hard
//! one is what an unprivileged process may always do; the hard limit (set
//! by whoever starts the VMM, e.g. the shim's systemd unit or the coming
//! jail) stays the bound a guest cannot pass.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit now
/// in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass; no memory is shared.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_file_soft_limit_is_raised_to_the_hard_limit() {
        let now = raise_open_file_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we own.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(rc, 0);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(now, limit.rlim_cur);
        // Raising again is a no-op.
        assert_eq!(raise_open_file_limit().unwrap(), now);
    }
}
