//! A real Linux guest (the kernel from `kernel-config/`, the vsock probe
//! from `kernel-config/vsock-probe` as `/init`) drives our virtio-vsock
//! device, asserted from the host:
//!
//! - guest→host: the guest connects to host port 5000 (`<uds>_5000`) and
//!   echoes 1000 timed round trips and 1 MiB; then it resets its vsock
//!   driver (unbind, bind: the device is stopped, renegotiated and started
//!   again, as on a reboot) and echoes once more;
//! - host→guest: 32 connections at once (`CONNECT 1234\n` → `OK …\n`), each
//!   echoing 64 KiB of its own data;
//! - bulk: 256 MiB each way with matching checksums, throughput printed.
//!
//! Over vhost-user (`cloister-vmm vhost-user --device vsock` behind QEMU/TCG
//! `-M microvm`'s `vhost-user-vsock-device`), which runs wherever QEMU does;
//! and in `cloister-vmm` over virtio-mmio, which needs a KVM that can run
//! guest user mode. One boot per test, every mode in it.

use std::path::Path;
use std::time::Duration;

use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::guest_image::GuestImage;
use cloister_e2e::hybrid_vsock::BulkReport;
use cloister_e2e::qemu::{qemu_available, QEMU_BINARY};
use cloister_e2e::vhost_user::{
    probe_initramfs, probe_started, run_vsock_probe, run_vsock_probe_in_cloister_vmm, ProbePlan,
    ProbeReport, VsockBackend,
};
use cloister_guest_image::cmdline::host_is_nested_pvm;
use cloister_guest_image::paths;
use cloister_vsock_probe::REBIND_MARKER;

/// The kernel and the probe initramfs, or why the test cannot run.
fn probe_image() -> Result<GuestImage, String> {
    GuestImage::locate_in(&paths::kernel_dir(), &probe_initramfs()).map_err(|e| {
        format!("{e} (kernel-config/build-initramfs.sh --package cloister-vsock-probe)")
    })
}

fn cloister_vmm() -> Result<std::path::PathBuf, String> {
    find_cloister_vmm().ok_or_else(|| {
        "cloister-vmm not built next to the tests (cargo build -p cloister-vmm, or set CLOISTER_VMM)"
            .to_string()
    })
}

/// Asserts that every step passed on both sides; prints the figures.
fn assert_probe_passed(report: &ProbeReport) {
    let figures = match &report.outcome {
        Ok(figures) => figures,
        Err(e) => panic!(
            "{}: host side failed: {e}{}\n{}",
            report.backend,
            if probe_started(report) {
                ""
            } else {
                " (the probe never started)"
            },
            report.transcript()
        ),
    };
    assert!(
        report.guest_passed(),
        "{}: the guest did not report success:\n{}",
        report.backend,
        report.transcript()
    );
    let status = report.console.status.expect("VM exit status");
    assert!(
        status.success(),
        "{}: the VM exited with {status}:\n{}",
        report.backend,
        report.transcript()
    );
    let mib = figures.bulk.bytes_each_way >> 20;
    eprintln!(
        "{}: echo RTT median {:.0} µs, p99 {:.0} µs; {} bytes over 32 concurrent connections in {:.0} ms; \
         {mib} MiB host→guest {:.1} MiB/s, guest→host {:.1} MiB/s; VM ran {:.1} s",
        report.backend,
        figures.latency.median().as_secs_f64() * 1e6,
        figures.latency.p99().as_secs_f64() * 1e6,
        figures.concurrent_bytes,
        figures.concurrent_time.as_secs_f64() * 1e3,
        figures.bulk.host_to_guest_mib_s(),
        figures.bulk.guest_to_host_mib_s(),
        report.console.elapsed.as_secs_f64(),
    );
    assert!(
        report.console.find(REBIND_MARKER).is_some(),
        "{}: the guest did not reset its vsock driver:\n{}",
        report.backend,
        report.transcript()
    );
    for line in report.backend_log.lines() {
        if line.contains("activated") || line.contains("reset") {
            eprintln!("  back end: {line}");
        }
    }
    assert_eq!(figures.concurrent_bytes, 32 * 64 * 1024);
    assert!(matches!(
        figures.bulk,
        BulkReport {
            bytes_each_way: 268_435_456,
            ..
        }
    ));
}

#[test]
fn guest_drives_our_vsock_device_over_vhost_user_under_qemu_tcg() {
    if !qemu_available(Path::new(QEMU_BINARY)) {
        eprintln!("SKIP: {QEMU_BINARY} not found (apt-get install qemu-system-x86)");
        return;
    }
    let (image, binary) = match (probe_image(), cloister_vmm()) {
        (Ok(image), Ok(binary)) => (image, binary),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("SKIP: {e}");
            return;
        }
    };
    // 64 KiB guest writes: Linux sends each as one packet whose data spans
    // several descriptors.
    let mut plan = ProbePlan::new(&image.vmlinux, &image.initramfs);
    plan.rebind = true;

    let report = run_vsock_probe(&VsockBackend::Cloister { binary }, &plan).unwrap();

    assert_probe_passed(&report);
    assert!(
        report.backend_exited_cleanly,
        "the back end did not exit 0 after QEMU disconnected:\n{}",
        report.backend_log
    );
}

#[test]
fn guest_drives_our_vsock_device_over_virtio_mmio_in_cloister_vmm() {
    if host_is_nested_pvm() {
        eprintln!(
            "SKIP: nested paravirtualized KVM (kvm_pvm): guest user mode cannot make system calls \
             here, so no guest program runs in cloister-vmm (vmm/tests/boot_kernel.rs checks the \
             boot as far as it goes); the vhost-user test drives the same device code"
        );
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm");
        return;
    }
    let (image, binary) = match (probe_image(), cloister_vmm()) {
        (Ok(image), Ok(binary)) => (image, binary),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("SKIP: {e}");
            return;
        }
    };
    let mut plan = ProbePlan::new(&image.vmlinux, &image.initramfs);
    plan.rebind = true;
    plan.timeout = Duration::from_secs(300);

    let report = run_vsock_probe_in_cloister_vmm(&binary, &plan).unwrap();

    assert_probe_passed(&report);
}
