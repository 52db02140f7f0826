use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::qemu::{milestones, Accel, QemuConfig, QemuMicrovm};
use std::time::Duration;
#[test]
fn probe() {
    let image = GuestImage::locate().unwrap();
    let config = QemuConfig::new(Accel::Kvm, &image.vmlinux, Some(&image.initramfs));
    eprintln!("{:?}", config.args());
    let run = QemuMicrovm::spawn(&config)
        .unwrap()
        .wait(Duration::from_secs(110));
    for (m, at) in milestones(&run.console) {
        eprintln!("{:>18}: {:?}", m.name, at);
    }
    eprintln!(
        "timed_out={} status={:?} elapsed={:?}",
        run.timed_out, run.status, run.elapsed
    );
    for l in run.console.iter().rev().take(3) {
        eprintln!("{:?} {}", l.at, l.text);
    }
    eprintln!(
        "stderr: {}",
        run.stderr.lines().take(3).collect::<Vec<_>>().join(" | ")
    );
}
