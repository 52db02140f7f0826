//! The guest kernel and the boot-test initramfs, built by
//! `kernel-config/build-kernel.sh` and `kernel-config/build-initramfs.sh`,
//! boot under QEMU/TCG: the test init prints its marker and the guest powers
//! off cleanly. Proves the image independently of our own VMM.

use std::path::Path;
use std::time::Duration;

use cloister_e2e::guest_image::{GuestImage, TEST_INIT_MARKER, TEST_INIT_POWER_OFF};
use cloister_e2e::qemu::{milestones, qemu_available, Accel, QemuConfig, QemuMicrovm, QEMU_BINARY};

/// Generous: ~1-3 s here, but CI machines are shared.
const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn test_init_reaches_marker_and_powers_off_under_tcg() {
    if !qemu_available(Path::new(QEMU_BINARY)) {
        eprintln!("SKIP: {QEMU_BINARY} not found (apt-get install qemu-system-x86)");
        return;
    }
    let image = match GuestImage::locate() {
        Ok(image) => image,
        Err(err) => {
            eprintln!("SKIP: {err}");
            return;
        }
    };
    let config = QemuConfig::new(Accel::Tcg, &image.vmlinux, Some(&image.initramfs));

    let run = QemuMicrovm::spawn(&config).unwrap().wait(TIMEOUT);

    eprintln!(
        "QEMU/TCG boot of {} ({:?} total):",
        image.kernel_dir.display(),
        run.elapsed
    );
    for (milestone, at) in milestones(&run.console) {
        match at {
            Some(at) => eprintln!("  {:>18}: {:7.3} s", milestone.name, at.as_secs_f64()),
            None => eprintln!("  {:>18}: not reached", milestone.name),
        }
    }
    assert!(
        !run.timed_out,
        "no power-off within {TIMEOUT:?}:\n{}",
        run.transcript()
    );
    assert!(
        run.find(TEST_INIT_MARKER).is_some(),
        "no marker:\n{}",
        run.transcript()
    );
    assert!(
        run.find(TEST_INIT_POWER_OFF).is_some(),
        "no power-off:\n{}",
        run.transcript()
    );
    let status = run.status.expect("exit status when not timed out");
    assert!(
        status.success(),
        "qemu exited with {status}:\n{}",
        run.transcript()
    );
}
