//! `cloister check` as a user runs it.

use std::process::Command;

const CLOISTER: &str = env!("CARGO_BIN_EXE_cloister");

fn check_with_config(config: &str) -> (String, bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(CLOISTER)
        .arg("check")
        .env("CLOISTER_CONFIG", &path)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        output.status.success(),
    )
}

#[test]
fn missing_kernel_fails_the_check_with_a_fix() {
    let (report, success) = check_with_config(
        "[guest]\nkernel = \"/nonexistent/vmlinux\"\ninitramfs = \"/nonexistent/initramfs\"\n",
    );
    assert!(!success, "{report}");
    let kernel = report.lines().find(|l| l.contains(" kernel ")).unwrap();
    assert!(
        kernel.starts_with("FAIL") && kernel.contains("fix:"),
        "{kernel}"
    );
    assert!(report.ends_with("a pod could not start on this host: apply the fixes above\n"));
    // One line per check, each with a status.
    assert!(report
        .lines()
        .take_while(|l| !l.starts_with("a pod") && !l.starts_with("this host"))
        .all(|l| l.starts_with("ok ") || l.starts_with("WARN") || l.starts_with("FAIL")));
}

#[test]
fn present_files_pass_their_checks() {
    let (report, _) = check_with_config(
        "[guest]\nkernel = \"/bin/sh\"\ninitramfs = \"/bin/sh\"\n[vmm]\npath = \"/bin/sh\"\n",
    );
    for name in [" kernel ", " initramfs ", " cloister-vmm "] {
        let line = report.lines().find(|l| l.contains(name)).unwrap();
        assert!(line.starts_with("ok"), "{line}");
    }
}

#[test]
fn broken_config_is_named() {
    let (report, success) = check_with_config("[resources]\nmax_vcpus = 0\n");
    assert!(!success);
    let line = report.lines().find(|l| l.contains(" config ")).unwrap();
    assert!(line.contains("resources.max_vcpus = 0"), "{line}");
}
