//! Kernel command-line pieces for booting the cloister guest kernel, shared
//! by the QEMU tests and `cloister-vmm` so both boot the same way.
//!
//! Compose with [`guest_cmdline`]; the constants document why each piece is
//! there.

/// Always: serial console, no reboot loop after a panic, no speculation
/// mitigations (the kernel is built without them; the flag keeps a kernel
/// built elsewhere comparable). No `nokaslr`: the kernel has no KASLR, so it
/// would not know the word and would pass it to `/init` as an argument.
pub const BASE: &str = "console=ttyS0 panic=-1 mitigations=off";

/// The 8250 UART at 0x3f8 as early console: messages appear as they are
/// printed instead of in a burst when ttyS0 registers (at ~14 s of kernel
/// time on nested KVM), so console timestamps taken by the host are the
/// real milestone times. Costs nothing extra: the same lines would be
/// replayed on ttyS0 later.
pub const EARLY_CONSOLE: &str = "earlycon=uart8250,io,0x3f8";

/// How a guest `reboot(RB_AUTOBOOT)` reaches the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMethod {
    /// `reboot=t`: triple fault; QEMU with `-no-reboot` then exits 0.
    TripleFault,
    /// `reboot=k`: pulse the i8042 reset line; `cloister-vmm` exits 0.
    Keyboard,
}

impl RebootMethod {
    /// The `reboot=` parameter.
    pub fn param(self) -> &'static str {
        match self {
            Self::TripleFault => "reboot=t",
            Self::Keyboard => "reboot=k",
        }
    }
}

/// The kernel parameter added by `patches/0001-…`: skip the alternatives
/// INT3 self-test, which nested paravirtualized KVM cannot emulate.
pub const SKIP_INT3_SELFTEST: &str = "cloister_skip_int3_selftest";

/// TSC and delay-loop values measured on the project's machines
/// (2.445 GHz). They skip TSC and delay-loop calibration, which is slow when
/// emulated and can hang on `microvm` ("TSC unstable") without them.
/// `lpj` here is the measured runs' value, half of `tsc_khz * 1000 / HZ`
/// at HZ=250: early `udelay`s are shorter, which virtual hardware does not
/// mind. On other hosts [`timing`] with the host's frequency is more
/// accurate; a wrong value only skews early `udelay`s and the early clock.
pub const MEASURED_TIMING: &str = "tsc_early_khz=2445000 lpj=4890000 no_timer_check";

/// Timing parameters for a host whose TSC runs at `tsc_khz`: `lpj` is loops
/// per jiffy, `tsc_khz * 1000 / HZ` with the guest kernel's HZ=250.
pub fn timing(tsc_khz: u64) -> String {
    format!(
        "tsc_early_khz={tsc_khz} lpj={} no_timer_check",
        tsc_khz.saturating_mul(1000) / 250
    )
}

/// For a guest on nested, paravirtualized KVM (`kvm_pvm`): clear XSAVE,
/// SMAP, SMEP and POPCNT (that host cannot emulate them, and exposes
/// SMAP/SMEP even when CPUID hides them) and skip the INT3 self-test.
/// `clearcpuid=xsave` rather than the older `noxsave`, which 6.12 no longer
/// knows and would pass to `/init` as an argument.
pub const NESTED_KVM: &str = "clearcpuid=xsave,smap,smep,popcnt cloister_skip_int3_selftest";

/// QEMU `-cpu` model for nested, paravirtualized KVM: hides CMPXCHG16B,
/// XSAVE and POPCNT (not emulated), and claims Intel so the kernel skips
/// AMD's FXSAVE-leak workaround (FNCLEX, not emulated either).
pub const NESTED_KVM_QEMU_CPU: &str = "qemu64,-cx16,-xsave,-popcnt,vendor=GenuineIntel";

/// The full command line: [`BASE`], [`EARLY_CONSOLE`], the reboot method,
/// [`MEASURED_TIMING`] and, when `nested_kvm`, [`NESTED_KVM`].
pub fn guest_cmdline(reboot: RebootMethod, nested_kvm: bool) -> String {
    let mut cmdline = format!(
        "{BASE} {EARLY_CONSOLE} {} {MEASURED_TIMING}",
        reboot.param()
    );
    if nested_kvm {
        cmdline.push(' ');
        cmdline.push_str(NESTED_KVM);
    }
    cmdline
}

/// Whether this host's `/dev/kvm` is nested, paravirtualized KVM
/// (`kvm_pvm`), under which a guest kernel's mode is emulated.
pub fn host_is_nested_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cmdline_for_qemu_on_nested_kvm_has_every_piece() {
        let cmdline = guest_cmdline(RebootMethod::TripleFault, true);
        assert_eq!(
            cmdline,
            "console=ttyS0 panic=-1 mitigations=off earlycon=uart8250,io,0x3f8 reboot=t \
             tsc_early_khz=2445000 lpj=4890000 no_timer_check \
             clearcpuid=xsave,smap,smep,popcnt cloister_skip_int3_selftest"
        );
        assert!(cmdline.contains(SKIP_INT3_SELFTEST));
    }

    #[test]
    fn guest_cmdline_for_vmm_uses_keyboard_reset_and_no_nested_flags() {
        let cmdline = guest_cmdline(RebootMethod::Keyboard, false);
        assert!(cmdline.contains("reboot=k"));
        assert!(!cmdline.contains("clearcpuid"));
    }

    #[test]
    fn timing_computes_loops_per_jiffy_at_250_hz() {
        assert_eq!(
            timing(2_000_000),
            "tsc_early_khz=2000000 lpj=8000000 no_timer_check"
        );
    }
}
