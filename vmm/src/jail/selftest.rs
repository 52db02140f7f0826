//! Test-only actions of a jailed VMM, compiled only with the
//! `jail-selftest` feature (never in a release build): the jail tests make
//! the jailed process try what the jail must stop, through
//! `CLOISTER_VMM_JAIL_SELFTEST`:
//! - `open:PATH` opens PATH for reading, prints the outcome on stderr, and
//!   goes on to run the VM;
//! - `exec:PATH` installs the main thread's seccomp filter and execs PATH
//!   (seccomp kills the process with SIGSYS);
//! - `forbidden` installs the main thread's filter and calls `ptrace`,
//!   which no list allows (SIGSYS);
//! - `map-exec` installs the main thread's filter, maps a read-write page
//!   (allowed) and then an executable one (SIGSYS).
//!
//! Everything runs inside the jail, after privileges are dropped: the
//! actions can show what the jail allows, never widen it.

use std::ffi::CString;

use super::seccomp::{apply_to_this_thread, ThreadKind};
use super::JailError;

pub const SELFTEST_ENV: &str = "CLOISTER_VMM_JAIL_SELFTEST";

/// Runs the action the environment names, if any.
pub fn run_from_env() -> Result<(), JailError> {
    let Ok(action) = std::env::var(SELFTEST_ENV) else {
        return Ok(());
    };
    if let Some(path) = action.strip_prefix("open:") {
        match std::fs::File::open(path) {
            Ok(_) => eprintln!("selftest: open {path}: opened"),
            Err(e) => eprintln!("selftest: open {path}: {e}"),
        }
        return Ok(());
    }
    apply_to_this_thread(ThreadKind::Main)?;
    if let Some(path) = action.strip_prefix("exec:") {
        let program = CString::new(path).unwrap_or_default();
        let argv = [program.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated program and NULL-terminated argv/envp that
        // live across the call.
        unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        eprintln!(
            "selftest: exec {path} returned: {}",
            std::io::Error::last_os_error()
        );
    } else if action == "forbidden" {
        // SAFETY: PTRACE_TRACEME takes no pointers.
        let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        eprintln!("selftest: ptrace returned {rc}");
    } else if action == "map-exec" {
        for (name, prot) in [
            ("read-write", libc::PROT_READ | libc::PROT_WRITE),
            ("executable", libc::PROT_READ | libc::PROT_EXEC),
        ] {
            // SAFETY: a new anonymous private page at no fixed address.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            let mapped = addr != libc::MAP_FAILED;
            eprintln!("selftest: mmap {name} page: mapped={mapped}");
        }
    }
    Ok(())
}
