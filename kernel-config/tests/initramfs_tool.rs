//! `cloister-initramfs` end to end: packs a static ELF as /init, refuses a
//! dynamic one.

use std::process::Command;

use cloister_guest_image::cpio::{parse_newc, EntryKind};

const TOOL: &str = env!("CARGO_BIN_EXE_cloister-initramfs");

/// The smallest file `elf::interpreter` accepts as a static x86-64
/// executable: an ELF64 header with no program headers.
fn static_elf() -> Vec<u8> {
    let mut bytes = vec![0u8; 64];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 2; // 64-bit
    bytes[5] = 1; // little-endian
    bytes[6] = 1; // version
    bytes[0x10] = 2; // ET_EXEC
    bytes[0x12] = 62; // x86-64
    bytes
}

#[test]
fn packs_static_init_with_dev_console_and_extra_files() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init-bin");
    std::fs::write(&init, static_elf()).unwrap();
    let extra = dir.path().join("hello.txt");
    std::fs::write(&extra, b"hello").unwrap();
    let out = dir.path().join("out/image.cpio");

    let status = Command::new(TOOL)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&out)
        .arg("--file")
        .arg(format!("{}:/etc/hello.txt", extra.display()))
        .status()
        .unwrap();

    assert!(status.success());
    let entries = parse_newc(&std::fs::read(&out).unwrap()).unwrap();
    let find = |p: &str| entries.iter().find(|e| e.path == p);
    assert_eq!(find("init").unwrap().data, static_elf());
    assert_eq!(find("init").unwrap().permissions(), 0o755);
    assert_eq!(
        find("dev/console").unwrap().kind(),
        Some(EntryKind::CharDevice { major: 5, minor: 1 })
    );
    for dir in ["dev", "proc", "sys", "etc"] {
        assert_eq!(
            find(dir).unwrap().kind(),
            Some(EntryKind::Directory),
            "{dir}"
        );
    }
    assert_eq!(find("etc/hello.txt").unwrap().data, b"hello");
}

#[test]
fn refuses_dynamically_linked_init_naming_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image.cpio");
    // The tool itself is a dynamically linked glibc executable.
    let output = Command::new(TOOL)
        .args(["--init", TOOL, "--out"])
        .arg(&out)
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("dynamically linked"), "{stderr}");
    assert!(stderr.contains("ld-linux"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn refuses_file_spec_without_absolute_target() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init-bin");
    std::fs::write(&init, static_elf()).unwrap();
    let output = Command::new(TOOL)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(dir.path().join("x.cpio"))
        .args(["--file", "relative"])
        .output()
        .unwrap();

    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SRC:/ABSOLUTE/DST"));
}

#[test]
fn packs_directory_tree_with_symlinks_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init-bin");
    std::fs::write(&init, static_elf()).unwrap();
    let tree = dir.path().join("rootfs");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("proc")).unwrap();
    std::fs::write(tree.join("bin/busybox"), b"box").unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    let out = dir.path().join("image.cpio");

    let status = Command::new(TOOL)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&out)
        .arg("--tree")
        .arg(format!("{}:/rootfs/busybox", tree.display()))
        .status()
        .unwrap();

    assert!(status.success());
    let entries = parse_newc(&std::fs::read(&out).unwrap()).unwrap();
    let find = |p: &str| entries.iter().find(|e| e.path == p);
    for d in [
        "rootfs",
        "rootfs/busybox",
        "rootfs/busybox/bin",
        "rootfs/busybox/proc",
    ] {
        assert_eq!(find(d).unwrap().kind(), Some(EntryKind::Directory), "{d}");
    }
    assert_eq!(find("rootfs/busybox/bin/busybox").unwrap().data, b"box");
    let sh = find("rootfs/busybox/bin/sh").unwrap();
    assert_eq!(sh.kind(), Some(EntryKind::Symlink("busybox".into())));
}

#[test]
fn refuses_tree_source_that_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init-bin");
    std::fs::write(&init, static_elf()).unwrap();
    let out = dir.path().join("image.cpio");

    let output = Command::new(TOOL)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&out)
        .arg("--tree")
        .arg(format!("{}:/rootfs", init.display()))
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a directory"), "{stderr}");
    assert!(!out.exists());
}
