//! A tiny static `/init` for boot tests.
//!
//! Runs as PID 1 in the guest's initramfs, with `/dev/console` as stdio:
//! 1. prints [`MARKER`], which tests wait for on the serial console;
//! 2. writes [`BOOT_TIMER_VALUE`] to I/O port [`BOOT_TIMER_PORT`], where
//!    `cloister-vmm` logs the time from its start to "guest init reached"
//!    (Firecracker's boot timer does the same); on QEMU the port is unused;
//! 3. prints [`POWER_OFF_MARKER`], syncs and reboots. Without ACPI a guest
//!    cannot power off, so the VMMs treat a reboot as the end: the kernel is
//!    booted with `reboot=k` (i8042 reset, `cloister-vmm` exits 0) or
//!    `reboot=t` (triple fault, QEMU with `-no-reboot` exits 0).
//!
//! Build it static (glibc, the musl target is not available here):
//! `kernel-config/build-initramfs.sh` does that and packs it.

use std::io::Write;

/// Printed first: the sign that the kernel reached userspace.
pub const MARKER: &str = "cloister-test-init: reached /init";
/// Printed just before the reboot.
pub const POWER_OFF_MARKER: &str = "cloister-test-init: powering off";
/// The VMM's boot-timer port.
const BOOT_TIMER_PORT: u16 = 0x440;
/// The value the VMM expects on that port (Firecracker's magic as well).
const BOOT_TIMER_VALUE: u8 = 123;

fn main() {
    say(MARKER);
    signal_boot_timer();
    say(POWER_OFF_MARKER);
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot() with a valid command; as PID 1 we hold
    // CAP_SYS_BOOT. It only returns on failure.
    let rc = unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    say(&format!(
        "cloister-test-init: reboot failed (rc {rc}): {}",
        std::io::Error::last_os_error()
    ));
    // PID 1 must not exit (the kernel would panic, which also ends the VM,
    // but with a misleading message); wait for the VMM to be stopped.
    loop {
        // SAFETY: pause() takes no arguments and only returns on a signal.
        unsafe { libc::pause() };
    }
}

/// Writes one line to stdout (the console) and flushes it; errors are
/// ignored because there is nowhere else to report them.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn signal_boot_timer() {
    // SAFETY: ioperm() only changes this process's I/O permission bitmap
    // for one port; it needs CAP_SYS_RAWIO, which PID 1 has.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(BOOT_TIMER_PORT), 1, 1) };
    if rc != 0 {
        say(&format!(
            "cloister-test-init: ioperm({BOOT_TIMER_PORT:#x}) failed: {} (boot timer not signalled)",
            std::io::Error::last_os_error()
        ));
        return;
    }
    // SAFETY: ioperm() above granted access to exactly this port, so `out`
    // cannot fault; the write has no effect on memory. On the VMM it is an
    // I/O exit to the boot-timer device; elsewhere an unassigned port.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") BOOT_TIMER_PORT,
            in("al") BOOT_TIMER_VALUE,
            options(nomem, nostack, preserves_flags)
        );
    }
}
