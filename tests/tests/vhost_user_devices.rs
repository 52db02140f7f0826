//! The rng and block devices served by `cloister-vmm vhost-user` to a real
//! guest under QEMU/TCG (`vhost-user-rng`, `vhost-user-blk` on `-M
//! microvm`), in one boot: the guest (the vsock probe's rng and block
//! modes) reads 4 KiB from `/dev/hwrng`, checksums the whole 8 MiB disk
//! and overwrites its first MiB; the host checks the guest's checksum
//! against the image it wrote and the image against what the guest wrote.

use std::path::Path;
use std::time::Duration;

use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::qemu::{qemu_available, QEMU_BINARY};
use cloister_e2e::vhost_user::{probe_initramfs, DeviceProbe};
use cloister_guest_image::paths;
use cloister_vsock_probe::stream::pattern_hash;
use cloister_vsock_probe::{
    Pattern, BLOCK_READ_MARKER, BLOCK_WRITE_SEED, BLOCK_WRITTEN_MARKER, DONE_MARKER, RNG_MARKER,
};

const DISK_MIB: u32 = 8;
const DISK_SEED: u64 = 0x6469_736b;
const WRITE_KIB: u32 = 1024;
const RNG_BYTES: u32 = 4096;

#[test]
fn guest_reads_rng_and_reads_and_writes_block_over_vhost_user_under_qemu_tcg() {
    if !qemu_available(Path::new(QEMU_BINARY)) {
        eprintln!("SKIP: {QEMU_BINARY} not found (apt-get install qemu-system-x86)");
        return;
    }
    let image = match GuestImage::locate_in(&paths::kernel_dir(), &probe_initramfs()) {
        Ok(image) => image,
        Err(e) => {
            eprintln!(
                "SKIP: {e} (kernel-config/build-initramfs.sh --package cloister-vsock-probe)"
            );
            return;
        }
    };
    let Some(binary) = find_cloister_vmm() else {
        eprintln!(
            "SKIP: cloister-vmm not built next to the tests (cargo build -p cloister-vmm, or set CLOISTER_VMM)"
        );
        return;
    };
    let probe = DeviceProbe::new(DISK_MIB, DISK_SEED).unwrap();

    let report = probe
        .run(
            &binary,
            &image.vmlinux,
            &image.initramfs,
            RNG_BYTES,
            WRITE_KIB,
            Duration::from_secs(300),
        )
        .unwrap();

    let transcript = report.transcript();
    assert!(
        report.console.find(DONE_MARKER).is_some(),
        "the guest did not pass:\n{transcript}"
    );
    let rng = report
        .console
        .find(RNG_MARKER)
        .expect("rng line")
        .text
        .clone();
    let distinct: usize = rng
        .split(", ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {rng:?}"));
    // 4096 uniform bytes miss a given value with probability ~1e-7.
    assert!(distinct > 250, "{rng}");
    let read = report
        .console
        .find(BLOCK_READ_MARKER)
        .and_then(|line| line.text.split(BLOCK_READ_MARKER).nth(1))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no block checksum:\n{transcript}"));
    assert_eq!(
        read,
        pattern_hash(DISK_SEED, u64::from(DISK_MIB) << 20, 64 * 1024),
        "the guest read other data than the image holds"
    );
    assert!(report.console.find(BLOCK_WRITTEN_MARKER).is_some());
    let status = report.console.status.expect("QEMU exit status");
    assert!(status.success(), "QEMU exited with {status}:\n{transcript}");
    for (name, clean, log) in &report.backends {
        assert!(
            clean,
            "the {name} back end did not exit 0 after QEMU:\n{log}"
        );
    }
    let disk = std::fs::read(&probe.disk).unwrap();
    let written = (WRITE_KIB as usize) << 10;
    let mut expected_head = vec![0u8; written];
    Pattern::new(BLOCK_WRITE_SEED).fill(&mut expected_head);
    let mut original = vec![0u8; (DISK_MIB as usize) << 20];
    Pattern::new(DISK_SEED).fill(&mut original);
    assert!(
        disk[..written] == expected_head[..],
        "the guest's write did not reach the image"
    );
    assert!(
        disk[written..] == original[written..],
        "data after the write changed"
    );
    eprintln!(
        "{rng}; block: {DISK_MIB} MiB read, {WRITE_KIB} KiB written and synced; VM ran {:.1} s",
        report.console.elapsed.as_secs_f64()
    );
}
