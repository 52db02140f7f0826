//! The ACPI tables an SNP guest of cloister-vmm gets (`boot::acpi`), read
//! by the real guest kernel: QEMU/TCG boots it on `microvm` with QEMU's
//! own ACPI and command-line devices off, and our page loaded at 0xE0000,
//! where Linux finds an RSDP without firmware. The kernel must take both
//! vCPUs and the I/O APIC from our MADT, bring the second vCPU up, and
//! drive the serial console (its init's output) and a virtio-blk disk
//! found only in our DSDT (the partition it reads needs its interrupt).
//! (Under SNP the same page is measured and reached through
//! `boot_params.acpi_rsdp_addr`; there is no SNP hardware here.)
//!
//! Skipped, with the reason printed, without QEMU or a built image.

use std::time::Duration;

use cloister_e2e::console::WaitPolicy;
use cloister_e2e::guest_image::{GuestImage, TEST_INIT_MARKER};
use cloister_e2e::qemu::{qemu_available, Accel, QemuConfig, QemuMicrovm};
use cloister_vmm::boot::acpi::{build_acpi_tables, VirtioMmioWindow};

/// Where Linux scans for an RSDP when nothing tells it where one is.
const LEGACY_RSDP_AREA: u64 = 0xe0000;
/// QEMU microvm's last virtio-mmio transport, the one its first device
/// takes.
const QEMU_VIRTIO_WINDOW: VirtioMmioWindow = VirtioMmioWindow {
    base: 0xfeb0_0e00,
    len: 0x200,
    irq: 12,
};
/// Seconds to init under TCG here; the margin is for a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(300);

/// A 1 MiB disk with an MBR holding one Linux partition.
fn disk_with_one_partition(path: &std::path::Path) {
    let mut disk = vec![0u8; 1 << 20];
    let entry = &mut disk[0x1be..0x1ce];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&1u32.to_le_bytes());
    entry[12..16].copy_from_slice(&100u32.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    std::fs::write(path, disk).unwrap();
}

#[test]
fn guest_kernel_runs_every_vcpu_the_ioapic_and_the_dsdt_devices_from_our_tables() {
    let image = match GuestImage::locate() {
        Ok(image) => image,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return;
        }
    };
    let mut config = QemuConfig::new(Accel::Tcg, &image.bz_image, Some(&image.initramfs));
    if !qemu_available(&config.binary) {
        eprintln!("SKIP: no {}", config.binary.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("acpi.bin");
    let page = build_acpi_tables(LEGACY_RSDP_AREA, 2, &[QEMU_VIRTIO_WINDOW]).unwrap();
    std::fs::write(&tables, page).unwrap();
    let disk = dir.path().join("disk.img");
    disk_with_one_partition(&disk);
    config.vcpus = 2;
    config.extra_args.extend([
        // Merged into the machine's other options.
        "-machine".into(),
        "auto-kernel-cmdline=off".into(),
        "-device".into(),
        format!(
            "loader,file={},addr={LEGACY_RSDP_AREA:#x},force-raw=on",
            tables.display()
        ),
        "-drive".into(),
        format!("file={},if=none,id=disk,format=raw", disk.display()),
        "-device".into(),
        "virtio-blk-device,drive=disk".into(),
    ]);

    let run = QemuMicrovm::spawn(&config)
        .expect("qemu starts")
        .wait_until(
            &WaitPolicy {
                end_marker: Some((TEST_INIT_MARKER, Duration::from_secs(2))),
                ..WaitPolicy::timeout(TIMEOUT)
            },
            |_| {},
        );

    let transcript = run.transcript();
    assert!(
        !transcript.contains("virtio_mmio.device="),
        "QEMU put the device on the command line:\n{transcript}"
    );
    for needle in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id 3,",
        "smp: Brought up 1 node, 2 CPUs",
        // COM1 as the ACPI PNP device 00:00 (its IRQ from our _CRS).
        "00:00: ttyS0 at I/O 0x3f8",
        "[vda] 2048 512-byte logical blocks",
        " vda: vda1",
        TEST_INIT_MARKER,
    ] {
        assert!(
            transcript.contains(needle),
            "\"{needle}\" not on the console:\n{transcript}"
        );
    }
}
