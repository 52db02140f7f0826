//! KVM tests: tiny guest payloads (machine code assembled by hand, the
//! assembly beside each byte) run in a real KVM VM through the same
//! builder `cloister-vmm` uses. Each asserts what the serial port printed
//! and how the VM ended. Skipped, with the reason printed, where
//! `/dev/kvm` cannot be opened.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cloister_vmm::builder::{run_vm, BootSource, VmRun, VmSpec};
use cloister_vmm::exit::VmExit;
use cloister_vmm::metrics::VmmMetrics;
use cloister_vmm::vstate::kvm::KvmContext;

/// Where payloads are loaded: 1 MiB, inside the identity-mapped first GiB.
const LOAD_ADDR: u64 = 0x10_0000;

/// Prints the serial output of a payload to the console for a test.
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

impl SerialCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn kvm_available() -> bool {
    match KvmContext::open() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP: KVM test needs a usable /dev/kvm: {e}");
            false
        }
    }
}

fn run_payload(code: &[u8], vcpus: u8) -> (VmRun, String) {
    run_payload_with(code, vcpus, false)
}

fn run_payload_with(code: &[u8], vcpus: u8, hugepages: bool) -> (VmRun, String) {
    let serial = SerialCapture::default();
    let spec = VmSpec {
        boot: BootSource::RawLongMode {
            code: code.to_vec(),
            load_addr: LOAD_ADDR,
        },
        vcpus,
        memory_mib: 32,
        hugepages,
        cpu_template: None,
        devices: Default::default(),
        metrics_interval: None,
        stop_on_termination_signals: false,
    };
    let run = run_vm(&spec, Box::new(serial.clone()), Instant::now()).expect("VM builds and runs");
    (run, serial.text())
}

/// Prints a message through the 8250, signals the boot timer, resets
/// through the i8042.
const HELLO_THEN_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, //             mov dx, 0x3f8
    0x48, 0x8d, 0x35, 0x17, 0x00, 0x00, 0x00, // lea rsi, [rip + msg]
    0xb9, 0x15, 0x00, 0x00, 0x00, //       mov ecx, 21
    0xac, //                              1: lodsb
    0xee, //                                 out dx, al
    0xe2, 0xfc, //                           loop 1b
    0x66, 0xba, 0x40, 0x04, //             mov dx, 0x440      (boot timer)
    0xb0, 0x7b, //                         mov al, 123
    0xee, //                               out dx, al
    0xb0, 0xfe, //                         mov al, 0xfe       (i8042 reset)
    0xe6, 0x64, //                         out 0x64, al
    0xf4, //                              2: hlt
    0xeb, 0xfd, //                           jmp 2b
    // msg:
    b'h', b'e', b'l', b'l', b'o', b' ', b'f', b'r', b'o', b'm', b' ', b'l', b'o', b'n', b'g', b' ',
    b'm', b'o', b'd', b'e', b'\n',
];

/// Prints 'F', then executes an undefined instruction. The boot IDT is
/// empty, so #UD escalates to a triple fault.
const PRINT_THEN_TRIPLE_FAULT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x46, //             mov al, 'F'
    0xee, //                   out dx, al
    0x0f, 0x0b, //             ud2
];

/// Every vCPU prints its CPUID APIC id and counts itself in at 0x5000;
/// vCPU 0 waits for both, prints a newline and resets; the others halt.
const SMP_APIC_IDS_THEN_RESET: &[u8] = &[
    0xb8, 0x01, 0x00, 0x00, 0x00, //       mov eax, 1
    0x0f, 0xa2, //                         cpuid
    0xc1, 0xeb, 0x18, //                   shr ebx, 24        (APIC id)
    0x66, 0xba, 0xf8, 0x03, //             mov dx, 0x3f8
    0x88, 0xd8, //                         mov al, bl
    0x04, 0x30, //                         add al, '0'
    0xee, //                               out dx, al
    0xf0, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // lock inc dword [0x5000]
    0x84, 0xdb, //                         test bl, bl
    0x75, 0x13, //                         jnz 3f
    0xf3, 0x90, //                        2: pause
    0x83, 0x3c, 0x25, 0x00, 0x50, 0x00, 0x00, 0x02, // cmp dword [0x5000], 2
    0x75, 0xf4, //                           jne 2b
    0xb0, 0x0a, //                         mov al, '\n'
    0xee, //                               out dx, al
    0xb0, 0xfe, //                         mov al, 0xfe
    0xe6, 0x64, //                         out 0x64, al
    0xfa, //                              3: cli
    0xf4, //                                 hlt
    0xeb, 0xfc, //                           jmp 3b
];

#[test]
fn long_mode_payload_prints_to_serial_and_resets_cleanly() {
    if !kvm_available() {
        return;
    }
    let (run, serial) = run_payload(HELLO_THEN_RESET, 1);
    assert_eq!(serial, "hello from long mode\n");
    assert_eq!(run.exit, VmExit::Reset);
    assert!(run.exit.is_clean());
    assert!(
        VmmMetrics::get(&run.metrics.boot_timer_us) > 0,
        "boot timer was not signalled"
    );
    assert_eq!(VmmMetrics::get(&run.metrics.serial_bytes_out), 21);
}

#[test]
fn payload_with_undefined_instruction_ends_in_triple_fault_with_registers() {
    if !kvm_available() {
        return;
    }
    let (run, serial) = run_payload(PRINT_THEN_TRIPLE_FAULT, 1);
    assert_eq!(serial, "F");
    match &run.exit {
        VmExit::TripleFault { vcpu: 0, registers } => {
            assert!(registers.contains("rip="), "{registers}");
            assert!(registers.contains("cr0="), "{registers}");
        }
        other => panic!("expected a triple fault, got {other}"),
    }
    assert!(!run.exit.is_clean());
}

#[test]
fn two_vcpus_each_see_their_own_apic_id() {
    if !kvm_available() {
        return;
    }
    let (run, serial) = run_payload(SMP_APIC_IDS_THEN_RESET, 2);
    let mut ids: Vec<char> = serial.trim_end().chars().collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!['0', '1'], "serial printed {serial:?}");
    assert!(serial.ends_with('\n'));
    assert_eq!(run.exit, VmExit::Reset);
}

/// Free 2 MiB pages in the host's hugetlb pool.
fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn payload_in_hugepage_backed_memory_runs() {
    if !kvm_available() {
        return;
    }
    let free = free_hugepages();
    if free < 16 {
        eprintln!("SKIP: needs 16 free 2 MiB hugepages, the host has {free} (echo 64 > /proc/sys/vm/nr_hugepages)");
        return;
    }
    let (run, serial) = run_payload_with(HELLO_THEN_RESET, 1, true);
    assert_eq!(serial, "hello from long mode\n");
    assert_eq!(run.exit, VmExit::Reset);
}
