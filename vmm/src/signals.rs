//! Host signals that stop the VMM (SIGTERM from the shim, SIGINT from a
//! terminal, SIGHUP when the session ends). They become a VM exit like any
//! other, so the VM is torn down in order: vCPUs stopped, devices dropped
//! (the vsock device removes its Unix socket), metrics printed.
//!
//! The signals are blocked in every thread and taken by one thread with
//! `sigwait`, which needs no async-signal-safe handler.

use std::io;
use std::sync::Arc;

use crate::exit::{ExitSignal, VmExit};

/// The signals that end the VM.
pub const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set it is given; sigaddset
    // only adds valid signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread and so in every
/// thread it starts afterwards. Call it before any thread exists.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts a detached thread that reports the first termination signal as
/// [`VmExit::Terminated`]. The signals must already be blocked
/// ([`block_termination_signals`]), or the default action kills the
/// process first.
pub fn watch_termination_signals(exit: Arc<ExitSignal>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::jail::seccomp::apply_to_this_thread_or_abort(
                crate::jail::seccomp::ThreadKind::Helper,
            );
            loop {
                let set = termination_set();
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is initialised and `signal` is a valid place for
                // the result.
                let rc = unsafe { libc::sigwait(&set, &mut signal) };
                if rc == 0 {
                    tracing::info!("signal {signal}: stopping the VM");
                    exit.report(VmExit::Terminated { signal });
                    return;
                }
            }
        })?;
    Ok(())
}
