//! The real guest kernel (built from `kernel-config/`, with the boot-test
//! init as `/init`) in `cloister-vmm`.
//!
//! - On a host with hardware virtualization the guest must reach its init
//!   (marker on the console, boot timer) and power off cleanly (exit 0).
//! - On nested paravirtualized KVM (`kvm_pvm`, our development machines) a
//!   guest's kernel mode is emulated and its user mode cannot make system
//!   calls, so no VMM gets a guest to print from init there. The test then
//!   boots the same files in `qemu-system-x86_64 -enable-kvm` at the same
//!   time and asserts that `cloister-vmm` reaches every console milestone
//!   QEMU reaches, printing both times for each.
//!
//! Skipped, with the reason printed, without `/dev/kvm` or a built image
//! (`kernel-config/build-kernel.sh`, `kernel-config/build-initramfs.sh`).

use std::path::Path;
use std::time::Duration;

use cloister_e2e::cloister_vmm::CloisterVmmConfig;
use cloister_e2e::console::{ConsoleRun, WaitPolicy};
use cloister_e2e::guest_image::{GuestImage, TEST_INIT_MARKER};
use cloister_e2e::qemu::{
    boot_wait_policy, milestones, qemu_available, Accel, QemuConfig, QemuMicrovm,
};
use cloister_guest_image::cmdline::host_is_nested_pvm;
use cloister_vmm::vstate::kvm::KvmContext;

/// A hardware-virtualized guest reaches init in well under a second; the
/// margin is for a loaded CI machine.
const HARDWARE_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Emulated kernel mode: 1.5-6 minutes to `Run /init` here, depending on
/// what else the 2 cores do.
const NESTED_BOOT_TIMEOUT: Duration = Duration::from_secs(720);
/// Console silence that ends a nested boot as stuck.
const NESTED_IDLE_LIMIT: Duration = Duration::from_secs(300);

fn prerequisites() -> Option<GuestImage> {
    if let Err(e) = KvmContext::open() {
        eprintln!("SKIP: needs a usable /dev/kvm: {e}");
        return None;
    }
    match GuestImage::locate() {
        Ok(image) => Some(image),
        Err(e) => {
            eprintln!("SKIP: {e}");
            None
        }
    }
}

fn vmm_config(image: &GuestImage) -> CloisterVmmConfig {
    CloisterVmmConfig::new(
        Path::new(env!("CARGO_BIN_EXE_cloister-vmm")),
        &image.vmlinux,
        Some(&image.initramfs),
    )
}

fn print_milestones(ours: &ConsoleRun, qemu: Option<&ConsoleRun>) {
    let fmt =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.3} s", d.as_secs_f64()));
    eprintln!("{:<20} {:>12} {:>12}", "milestone", "cloister-vmm", "qemu");
    let theirs = qemu.map(|q| milestones(&q.console));
    for (i, (milestone, at)) in milestones(&ours.console).into_iter().enumerate() {
        let q = theirs.as_ref().and_then(|t| t[i].1);
        eprintln!("{:<20} {:>12} {:>12}", milestone.name, fmt(at), fmt(q));
    }
}

#[test]
fn guest_kernel_in_cloister_vmm_reaches_init_or_every_milestone_qemu_reaches() {
    let Some(image) = prerequisites() else {
        return;
    };
    let vmm = vmm_config(&image);

    if !host_is_nested_pvm() {
        let run = vmm
            .spawn()
            .expect("cloister-vmm starts")
            .wait(HARDWARE_BOOT_TIMEOUT);
        print_milestones(&run, None);
        assert!(
            run.find(TEST_INIT_MARKER).is_some(),
            "no init marker:\n{}",
            run.transcript()
        );
        assert!(
            run.stderr.contains("guest init reached"),
            "boot timer not signalled:\n{}",
            run.stderr
        );
        assert!(
            run.status.is_some_and(|s| s.success()),
            "cloister-vmm did not exit 0:\n{}",
            run.transcript()
        );
        return;
    }

    let qemu_config = QemuConfig::new(Accel::Kvm, &image.vmlinux, Some(&image.initramfs));
    if !qemu_available(&qemu_config.binary) {
        eprintln!(
            "SKIP: nested KVM host and no {} to compare with",
            qemu_config.binary.display()
        );
        return;
    }
    eprintln!(
        "nested paravirtualized KVM: booting in cloister-vmm and QEMU side by side (minutes)"
    );
    let ours = vmm.spawn().expect("cloister-vmm starts");
    let qemu = QemuMicrovm::spawn(&qemu_config).expect("qemu starts");
    let (ours, qemu) = std::thread::scope(|s| {
        // Two emulated kernels share the cores: one may sit silent in a
        // slow initcall far longer than the default idle limit while the
        // other prints. The panic grace and the timeout still bound it.
        let policy = WaitPolicy {
            idle_limit: Some(NESTED_IDLE_LIMIT),
            ..boot_wait_policy(NESTED_BOOT_TIMEOUT)
        };
        let qemu = s.spawn(move || qemu.wait_until(&policy, |_| {}));
        let ours = ours.wait_until(&policy, |_| {});
        (ours, qemu.join().expect("qemu waiter"))
    });
    print_milestones(&ours, Some(&qemu));

    let reached_by_qemu: Vec<_> = milestones(&qemu.console)
        .into_iter()
        .filter(|(_, at)| at.is_some())
        .map(|(m, _)| m)
        .collect();
    assert!(
        !reached_by_qemu.is_empty(),
        "QEMU reached no milestone, nothing to compare with:\n{}",
        qemu.transcript()
    );
    for milestone in reached_by_qemu {
        assert!(
            ours.find(milestone.needle).is_some(),
            "QEMU reached \"{}\" but cloister-vmm did not.\ncloister-vmm:\n{}\nqemu:\n{}",
            milestone.name,
            ours.transcript(),
            qemu.transcript()
        );
    }
}

/// The built kernel's two formats load through the paths `cloister-vmm`
/// boots them with: vmlinux through its PVH note, bzImage through the
/// 64-bit entry 0x200 bytes into its protected-mode code. Needs no KVM.
#[test]
fn built_vmlinux_has_pvh_entry_and_bzimage_has_64bit_entry() {
    use cloister_vmm::boot::loader::load_kernel;
    use cloister_vmm::boot::regs::BootEntry;
    use cloister_vmm::vstate::memory::create_guest_memory;

    let image = match GuestImage::locate() {
        Ok(image) => image,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return;
        }
    };
    let mem = create_guest_memory(256, false).expect("guest memory");
    let vmlinux = load_kernel(&mem, &image.vmlinux).expect("vmlinux loads");
    assert!(
        matches!(vmlinux.entry, BootEntry::Pvh { entry } if entry >= 0x10_0000),
        "vmlinux entry {:?}",
        vmlinux.entry
    );
    assert!(vmlinux.kernel_end > 0x100_0000);

    let mem = create_guest_memory(256, false).expect("guest memory");
    let bz = load_kernel(&mem, &image.bz_image).expect("bzImage loads");
    assert_eq!(bz.entry, BootEntry::LongMode { entry: 0x10_0200 });
    assert!(bz.kernel_end > 0x10_0000);
}
