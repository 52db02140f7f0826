//! KVM test: a hand-assembled payload reads the virtio-mmio registers of
//! the rng device in a real KVM VM built by `cloister-vmm`'s builder and
//! prints them on the serial port. Proves the device window sits where
//! the kernel command line says, that MMIO exits reach the transport, and
//! that register writes take effect. Skipped, with the reason printed,
//! where `/dev/kvm` cannot be opened.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cloister_vmm::boot::layout::VIRTIO_MMIO_START;
use cloister_vmm::builder::{run_vm, BootSource, VmSpec};
use cloister_vmm::config::{NetConfig, VirtioDevicesConfig};
use cloister_vmm::exit::VmExit;
use cloister_vmm::vstate::kvm::KvmContext;

const LOAD_ADDR: u64 = 0x10_0000;

#[derive(Clone, Default)]
struct SerialCapture(Arc<Mutex<Vec<u8>>>);

impl Write for SerialCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The boot page tables map only the first GiB: the payload maps the 2 MiB
/// page at 0xd0000000 through a new page directory at 0xc000 (PDPT entry
/// 3 covers 3-4 GiB; PD entry 0x80 is 0xd0000000), then prints the magic
/// ("virt") and vendor ("CLST") bytes, version and device id as digits,
/// writes ACKNOWLEDGE to Status and prints Status read back, and resets.
const READ_VIRTIO_REGISTERS: &[u8] = &[
    0x48, 0xc7, 0x04, 0x25, 0x18, 0xa0, 0x00, 0x00, 0x03, 0xc0, 0x00,
    0x00, // mov qword [0xa018], 0xc003
    0xb8, 0x83, 0x00, 0x00, 0xd0, //                        mov eax, 0xd0000083
    0x48, 0x89, 0x04, 0x25, 0x00, 0xc4, 0x00, 0x00, //       mov [0xc400], rax
    0x0f, 0x20, 0xd8, //                                     mov rax, cr3
    0x0f, 0x22, 0xd8, //                                     mov cr3, rax
    0x66, 0xba, 0xf8, 0x03, //                               mov dx, 0x3f8
    0xbe, 0x00, 0x00, 0x00, 0xd0, //                         mov esi, 0xd0000000
    0x8b, 0x06, //                                           mov eax, [rsi]       (MagicValue)
    0xee, 0xc1, 0xe8, 0x08, //                               out dx, al; shr eax, 8
    0xee, 0xc1, 0xe8, 0x08, //                               out dx, al; shr eax, 8
    0xee, 0xc1, 0xe8, 0x08, //                               out dx, al; shr eax, 8
    0xee, //                                                 out dx, al
    0x8b, 0x46, 0x04, //                                     mov eax, [rsi + 4]   (Version)
    0x04, 0x30, 0xee, //                                     add al, '0'; out dx, al
    0x8b, 0x46, 0x08, //                                     mov eax, [rsi + 8]   (DeviceID)
    0x04, 0x30, 0xee, //                                     add al, '0'; out dx, al
    0x8b, 0x46, 0x0c, //                                     mov eax, [rsi + 0xc] (VendorID)
    0xee, 0xc1, 0xe8, 0x08, //                               out dx, al; shr eax, 8
    0xee, 0xc1, 0xe8, 0x08, //                               out dx, al; shr eax, 8
    0xee, 0xc1, 0xe8, 0x08, //                               out dx, al; shr eax, 8
    0xee, //                                                 out dx, al
    0xc7, 0x46, 0x70, 0x01, 0x00, 0x00,
    0x00, //             mov dword [rsi + 0x70], 1 (Status = ACKNOWLEDGE)
    0x8b, 0x46, 0x70, //                                     mov eax, [rsi + 0x70]
    0x04, 0x30, 0xee, //                                     add al, '0'; out dx, al
    0xb0, 0x0a, 0xee, //                                     mov al, '\n'; out dx, al
    0xb0, 0xfe, //                                           mov al, 0xfe
    0xe6,
    0x64, //                                           out 0x64, al         (i8042 reset)
    0xf4, //                                               1: hlt
    0xeb, 0xfd, //                                           jmp 1b
];

#[test]
fn payload_reads_rng_device_registers_over_virtio_mmio() {
    if let Err(e) = KvmContext::open() {
        eprintln!("SKIP: KVM test needs a usable /dev/kvm: {e}");
        return;
    }
    assert_eq!(VIRTIO_MMIO_START, 0xd000_0000, "the payload hard-codes it");
    let serial = SerialCapture::default();
    let spec = VmSpec {
        boot: BootSource::RawLongMode {
            code: READ_VIRTIO_REGISTERS.to_vec(),
            load_addr: LOAD_ADDR,
        },
        vcpus: 1,
        memory_mib: 32,
        hugepages: false,
        cpu_template: None,
        devices: VirtioDevicesConfig {
            rng: true,
            ..Default::default()
        },
        metrics_interval: None,
        stop_on_termination_signals: false,
    };
    let run = run_vm(&spec, Box::new(serial.clone()), Instant::now()).expect("VM builds and runs");
    let text = String::from_utf8_lossy(&serial.0.lock().unwrap()).into_owned();
    assert_eq!(text, "virt24CLST1\n");
    assert_eq!(run.exit, VmExit::Reset);
    let rng = &run.devices[0];
    assert_eq!(
        (rng.name.as_str(), rng.mmio_base, rng.irq),
        ("rng", 0xd000_0000, 5)
    );
    assert_eq!(rng.transport.status, 1);
    assert_eq!(rng.transport.refused_register_accesses, 0);
    let json = run.metrics_json();
    assert_eq!(json["devices"][0]["name"], "rng");
    assert!(json["mmio_exits"].as_u64().unwrap() >= 6);
}

/// The same payload against a virtio-net device (id 1) on a tap: one made
/// by name and, for the second VM, one adopted from an inherited fd, both
/// in a network namespace of the test's own. Needs root for the taps.
#[test]
fn payload_reads_net_device_registers_on_a_tap_by_name_or_fd() {
    if let Err(e) = KvmContext::open() {
        eprintln!("SKIP: KVM test needs a usable /dev/kvm: {e}");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: a tap needs root");
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare of this thread's network namespace only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIP: unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            return;
        }
        let by_name: NetConfig = "tap=clpayload0,mac=02:00:00:00:00:07".parse().unwrap();
        let by_fd: NetConfig = format!("fd={}", open_tap("clpayload1")).parse().unwrap();
        for nic in [by_name, by_fd] {
            let serial = SerialCapture::default();
            let spec = VmSpec {
                boot: BootSource::RawLongMode {
                    code: READ_VIRTIO_REGISTERS.to_vec(),
                    load_addr: LOAD_ADDR,
                },
                vcpus: 1,
                memory_mib: 32,
                hugepages: false,
                cpu_template: None,
                devices: VirtioDevicesConfig {
                    net: vec![nic.clone()],
                    ..Default::default()
                },
                metrics_interval: None,
                stop_on_termination_signals: false,
            };
            let run = run_vm(&spec, Box::new(serial.clone()), Instant::now())
                .unwrap_or_else(|e| panic!("VM with {nic} builds and runs: {e}"));
            let text = String::from_utf8_lossy(&serial.0.lock().unwrap()).into_owned();
            assert_eq!(text, "virt21CLST1\n", "{nic}");
            assert_eq!(run.exit, VmExit::Reset);
            let net = &run.devices[0];
            assert_eq!((net.name.as_str(), net.irq), ("net0", 5));
        }
    })
    .join()
    .unwrap();
}

/// Opens the tap `name` as a parent process would before handing the fd to
/// cloister-vmm; the fd is left open for the VM to adopt.
fn open_tap(name: &str) -> i32 {
    use std::os::fd::IntoRawFd;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::TUNSETIFF,
            &mut req,
        )
    };
    assert_eq!(ret, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
    file.into_raw_fd()
}
