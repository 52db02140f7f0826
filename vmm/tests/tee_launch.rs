//! Confidential launch through the `cloister-vmm` binary.
//!
//! - On every host: `--print-launch-digest` needs no KVM and is stable;
//!   `--tee snp|tdx` on a host without the hardware fails with exit code 2
//!   before creating anything, naming what it checked.
//! - On SEV-SNP / TDX hosts (`KVM_CAP_VM_TYPES` offers the type, the
//!   module parameter is on, /dev/sev for SNP) and with
//!   `CLOISTER_TEE_KERNEL` set: the real launch, then the guest kernel's
//!   banner on the serial console. Elsewhere it prints `SKIP:` with the
//!   reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use cloister_vmm::tee::host::{check_host, kvm_vm_types, HostRoot};
use cloister_vmm::tee::TeeKind;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloister-vmm"))
}

/// A minimal bzImage (2.15 header, two setup sectors, a small body).
fn bzimage(dir: &Path) -> PathBuf {
    let mut k = vec![0u8; 3 * 512 + 20_000];
    k[0x1f1] = 2;
    k[0x201] = 0x66;
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
    for (i, b) in k[3 * 512..].iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let path = dir.join("bzImage");
    std::fs::write(&path, k).unwrap();
    path
}

fn digest(args: &[&str]) -> String {
    let out = vmm().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn print_launch_digest_is_stable_and_follows_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = bzimage(dir.path());
    let k = kernel.to_str().unwrap();
    let json = dir.path().join("vm.json");
    std::fs::write(
        &json,
        format!(r#"{{"kernel": "{k}", "memory_mib": 64, "tee": {{"type": "snp", "vcpu_type": "EPYC-Milan"}}}}"#),
    )
    .unwrap();
    let j = json.to_str().unwrap();

    let snp = digest(&["--config", j, "--print-launch-digest"]);
    assert_eq!(snp.len(), 96, "{snp}");
    assert_eq!(snp, digest(&["--config", j, "--print-launch-digest"]));
    assert_ne!(
        snp,
        digest(&["--config", j, "--cmdline", "quiet", "--print-launch-digest"])
    );
    assert_ne!(
        snp,
        digest(&["--config", j, "--vcpus", "2", "--print-launch-digest"])
    );
    // The policy and HOST_DATA are reported, not measured.
    assert_eq!(
        snp,
        digest(&[
            "--config",
            j,
            "--tee-policy",
            "0x70000",
            "--print-launch-digest"
        ])
    );
    let tdx = digest(&[
        "--kernel",
        k,
        "--memory",
        "64",
        "--tee",
        "tdx",
        "--print-launch-digest",
    ]);
    assert_eq!(tdx.len(), 96);
    assert_ne!(tdx, snp);
}

/// A TD boots one vCPU: more is a config error naming the field, also
/// for the reference value (it would describe a TD that cannot run).
#[test]
fn tdx_with_two_vcpus_is_refused_by_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = bzimage(dir.path());
    for extra in [&["--print-launch-digest"][..], &[]] {
        let out = vmm()
            .arg("--kernel")
            .arg(&kernel)
            .args(["--tee", "tdx", "--vcpus", "2"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("vcpus = 2"), "{stderr}");
        assert!(stderr.contains("TDX"), "{stderr}");
    }
}

/// `cloister-vmm --tee KIND` of a kernel that does not exist, jailed
/// under `jail_root` if given: its stderr, once it exited 2; `None` (with
/// the reason printed) where this host can launch such guests.
fn launch_without_the_hardware(kind: TeeKind, jail_root: Option<&Path>) -> Option<String> {
    if check_host(kind, &HostRoot::real(), kvm_vm_types(Path::new("/dev/kvm"))).is_ok() {
        eprintln!("SKIP: this host can launch {kind} guests (see the hardware test)");
        return None;
    }
    let mut command = vmm();
    command.args([
        "--kernel",
        "/nonexistent/bzImage",
        "--tee",
        &kind.to_string(),
    ]);
    if let Some(jail_root) = jail_root {
        command.arg("--jail-root").arg(jail_root).args([
            "--jail-uid",
            "64000",
            "--jail-gid",
            "64000",
        ]);
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    Some(stderr)
}

#[test]
fn tee_launch_on_a_host_without_the_hardware_fails_cleanly_with_exit_2() {
    for kind in [TeeKind::Snp, TeeKind::Tdx] {
        let Some(stderr) = launch_without_the_hardware(kind, None) else {
            continue;
        };
        assert!(
            stderr.contains("KVM on this host does not offer VM type KVM_X86_"),
            "{stderr}"
        );
        assert!(stderr.contains("KVM_CAP_VM_TYPES"), "{stderr}");
        // The host was checked before the kernel was even read.
        assert!(!stderr.contains("/nonexistent/bzImage"), "{stderr}");
    }
}

/// Jailed, the host check still comes first with the same message: the
/// jail (which would hide /sys) is not even built.
#[test]
fn jailed_tee_launch_checks_the_host_before_the_jail() {
    let dir = tempfile::tempdir().unwrap();
    let jail_root = dir.path().join("jail");
    for kind in [TeeKind::Snp, TeeKind::Tdx] {
        let Some(stderr) = launch_without_the_hardware(kind, Some(&jail_root)) else {
            continue;
        };
        assert!(stderr.contains("KVM_CAP_VM_TYPES"), "{stderr}");
        assert!(!stderr.contains("jail"), "{stderr}");
        assert!(!jail_root.exists(), "the jail was not built");
    }
}

/// Real hardware: launch, then the guest kernel's first console line.
#[test]
fn hardware_launch_boots_to_the_kernel_console() {
    let Some(kernel) = std::env::var_os("CLOISTER_TEE_KERNEL") else {
        eprintln!("SKIP: set CLOISTER_TEE_KERNEL to a bzImage (console=ttyS0) to launch on SEV-SNP/TDX hardware");
        return;
    };
    let mut ran = false;
    for kind in [TeeKind::Snp, TeeKind::Tdx] {
        if let Err(why) = check_host(kind, &HostRoot::real(), kvm_vm_types(Path::new("/dev/kvm"))) {
            eprintln!("SKIP: {kind}: {why}");
            continue;
        }
        ran = true;
        let mut child = vmm()
            .arg("--kernel")
            .arg(&kernel)
            .args([
                "--memory",
                "512",
                "--vcpus",
                "1",
                "--tee",
                &kind.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("Linux version") {
                    let _ = tx.send(line);
                }
            }
        });
        let seen = rx.recv_timeout(std::time::Duration::from_secs(60));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        assert!(
            seen.is_ok(),
            "{kind}: no kernel banner within 60 s; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !ran {
        eprintln!("SKIP: no SEV-SNP or TDX on this host");
    }
}
