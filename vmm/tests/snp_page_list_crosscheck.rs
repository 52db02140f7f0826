//! The SNP page list cloister-vmm loads — normal, zero, CPUID and secrets
//! pages in GPA order, then the VMSAs — measured by us and by AMD's
//! reference tool `sev-snp-measure` (PyPI), whose `GCTX` is driven page by
//! page from a manifest of the very same list.
//!
//! Needs python3 with `python3-venv` and PyPI (it installs
//! sev-snp-measure 0.0.13 into a venv under Cargo's target tmpdir), or
//! `CLOISTER_SEV_SNP_MEASURE_VENV` naming a venv that has it. Without
//! them it prints `SKIP:` and passes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use cloister_attestation::measure::snp::LaunchPage;
use cloister_vmm::boot::acpi::VirtioMmioWindow;
use cloister_vmm::tee::snp::direct_boot::{snp_direct_boot, SnpBootInputs};

const TOOL_VERSION: &str = "0.0.13";

fn has_tool(venv: &Path) -> bool {
    Command::new(venv.join("bin/python3"))
        .args(["-c", "import sevsnpmeasure.gctx"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn venv() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CLOISTER_SEV_SNP_MEASURE_VENV") {
        let dir = PathBuf::from(dir);
        return if has_tool(&dir) {
            Ok(dir)
        } else {
            Err(format!("{} has no sevsnpmeasure", dir.display()))
        };
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sev-snp-measure-venv");
    if has_tool(&dir) {
        return Ok(dir);
    }
    let venv = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .map_err(|e| format!("python3 not runnable: {e}"))?;
    if !venv.status.success() {
        return Err("python3 -m venv failed (Debian package python3-venv missing?)".into());
    }
    let pip = Command::new(dir.join("bin/pip"))
        .args(["install", "-q", &format!("sev-snp-measure=={TOOL_VERSION}")])
        .output()
        .map_err(|e| format!("pip not runnable: {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip could not install sev-snp-measure (PyPI unreachable?): {}",
            String::from_utf8_lossy(&pip.stderr).trim()
        ));
    }
    Ok(dir)
}

/// A bzImage-shaped file: 2.15 header, two setup sectors, a body.
fn bzimage(body: usize) -> Vec<u8> {
    let mut k = vec![0u8; 3 * 512 + body];
    k[0x1f1] = 2;
    k[0x201] = 0x66;
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    k[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
    for (i, b) in k[3 * 512..].iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    k
}

const DRIVER: &str = r#"
import sys
from sevsnpmeasure.gctx import GCTX
d = sys.argv[1]
g = GCTX()
for line in open(d + "/manifest"):
    kind, *rest = line.split()
    if kind == "normal":
        g.update_normal_pages(int(rest[0], 16), open(d + "/" + rest[1], "rb").read())
    elif kind == "zero":
        g.update_zero_pages(int(rest[0], 16), int(rest[1], 16))
    elif kind == "unmeasured":
        g.update_unmeasured_pages(int(rest[0], 16), int(rest[1], 16))
    elif kind == "secrets":
        g.update_secrets_page(int(rest[0], 16))
    elif kind == "cpuid":
        g.update_cpuid_page(int(rest[0], 16))
    elif kind == "vmsa":
        g.update_vmsa_page(open(d + "/" + rest[0], "rb").read())
print(g.hex_ld())
"#;

#[test]
fn our_direct_boot_page_list_measures_the_same_in_sev_snp_measure() {
    let venv = match venv() {
        Ok(v) => v,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let kernel = bzimage(9 * 4096 + 77);
    let initrd: Vec<u8> = (0..20_000u32).map(|i| (i % 7) as u8).collect();
    let boot = snp_direct_boot(&SnpBootInputs {
        kernel: &kernel,
        initrd: Some(&initrd),
        cmdline: "console=hvc0 quiet",
        memory_mib: 64,
        vcpus: 3,
        virtio_devices: &[VirtioMmioWindow {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }],
        cpu_signature: 0x00A0_0F11,
        vmsa_features: 0,
    })
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut manifest = String::new();
    for (i, page) in boot.pages.iter().enumerate() {
        match page {
            LaunchPage::Normal { gpa, data } => {
                std::fs::write(dir.path().join(format!("p{i}")), data).unwrap();
                writeln!(manifest, "normal {gpa:x} p{i}").unwrap();
            }
            LaunchPage::Zero { gpa, len } => writeln!(manifest, "zero {gpa:x} {len:x}").unwrap(),
            LaunchPage::Unmeasured { gpa, len } => {
                writeln!(manifest, "unmeasured {gpa:x} {len:x}").unwrap()
            }
            LaunchPage::Secrets { gpa } => writeln!(manifest, "secrets {gpa:x}").unwrap(),
            LaunchPage::Cpuid { gpa } => writeln!(manifest, "cpuid {gpa:x}").unwrap(),
            LaunchPage::Vmsa(vmsa) => {
                std::fs::write(dir.path().join(format!("p{i}")), &vmsa[..]).unwrap();
                writeln!(manifest, "vmsa p{i}").unwrap();
            }
        }
    }
    std::fs::write(dir.path().join("manifest"), &manifest).unwrap();

    let out = Command::new(venv.join("bin/python3"))
        .arg("-c")
        .arg(DRIVER)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(hex::encode(boot.launch_digest()), theirs);

    // An AP's VMSA (reset state) is the one the tool builds for a QEMU/KVM
    // vCPU at the reset vector.
    let script = "import sys\nfrom sevsnpmeasure.vmsa import VMSA\nfrom sevsnpmeasure.sev_mode import SevMode\nfrom sevsnpmeasure.vmm_types import VMMType\nv = VMSA(SevMode.SEV_SNP, 0xFFFFFFF0, 0xA00F11, 1, VMMType.QEMU)\nsys.stdout.write(next(iter(v.pages(1))).hex())\n";
    let out = Command::new(venv.join("bin/python3"))
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(LaunchPage::Vmsa(ap)) = boot.pages.last() else {
        panic!("the list must end with the VMSAs");
    };
    assert_eq!(hex::encode(&ap[..]), String::from_utf8(out.stdout).unwrap());
    eprintln!(
        "{} page-list entries ({} manifest lines) agree with sev-snp-measure {TOOL_VERSION}: {theirs}",
        boot.pages.len(),
        manifest.lines().count()
    );
}
