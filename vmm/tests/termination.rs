//! `cloister-vmm` stopped by the host: SIGTERM (what the shim sends) ends
//! the VM in order — exit status 143 as a shell reports it, the exit
//! metrics printed, the vsock device's Unix socket removed. The guest is a
//! payload that halts forever, so the VM is running whatever the host's
//! speed when the signal comes. Needs `/dev/kvm`; skips with the reason
//! otherwise.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloister_vmm::vstate::kvm::KvmContext;

// Shared with jail.rs: this test needs one payload of several.
#[allow(dead_code)]
#[path = "support/payload_elf.rs"]
mod payload_elf;
use payload_elf::{elf_kernel, HALT_FOREVER};

#[test]
fn sigterm_stops_vm_with_metrics_and_removes_vsock_socket() {
    if let Err(e) = KvmContext::open() {
        eprintln!("SKIP: needs a usable /dev/kvm: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let kernel = dir.path().join("halt.elf");
    std::fs::write(&kernel, elf_kernel(HALT_FOREVER)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cloister-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "128", "--serial", "none", "--print-metrics"])
        .arg("--vsock")
        .arg(format!("guest_cid=3,uds_path={}", uds.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The socket exists once the device is built; the guest is halted.
    let started = Instant::now();
    while !uds.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "vsock socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its vCPU is in the guest by now (a signal before that works too).
    std::thread::sleep(Duration::from_millis(500));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let signalled = Instant::now();
    let output = child.wait_with_output().unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("stopped {:?} after SIGTERM", signalled.elapsed());
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(stderr.contains("\"devices\""), "no exit metrics:\n{stderr}");
    assert!(!uds.exists(), "vsock socket left behind");
    assert!(signalled.elapsed() < Duration::from_secs(10));
}
