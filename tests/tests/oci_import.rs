//! The locally built busybox image imports into a real, private containerd
//! (Debian's 1.6 and 2.x from sid) and unpacks into a root file system
//! containerd can mount: what the demo and the containerd tests run without
//! a registry. Needs root, containerd and busybox-static.

use std::path::Path;

use cloister_e2e::containerd::{busybox_rootfs, ContainerdBinaries, PrivateContainerd};
use cloister_e2e::oci_image::{write_image_archive, ImageSpec};

const BUSYBOX: &str = "/bin/busybox";
const IMAGE: &str = "docker.io/library/busybox:cloister-test";

#[test]
fn busybox_image_imports_and_unpacks_in_private_containerd() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: a private containerd needs root");
        return;
    }
    if !Path::new(BUSYBOX).exists() {
        eprintln!("SKIP: {BUSYBOX} missing (Debian package busybox-static)");
        return;
    }
    let mut all = Vec::new();
    match ContainerdBinaries::system() {
        Some(b) => all.push(b),
        None => eprintln!("SKIP (containerd 1.x): not on PATH (Debian package containerd)"),
    }
    match ContainerdBinaries::containerd2() {
        Some(b) => all.push(b),
        None => eprintln!("SKIP (containerd 2.x): not fetched (scripts/install-containerd2.sh)"),
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).unwrap();
    let archive = dir.path().join("busybox.tar");
    let spec = ImageSpec {
        name: IMAGE.into(),
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
    };
    write_image_archive(&rootfs, &spec, &archive).unwrap();

    for binaries in all {
        let containerd = PrivateContainerd::start(&binaries, &[]).unwrap();
        let what = binaries.describe();
        let import = containerd.ctr(&["images", "import", &archive.display().to_string()]);
        assert!(
            import.status.success(),
            "{what}: import failed: {}\n{}",
            String::from_utf8_lossy(&import.stderr),
            containerd.log()
        );
        let list = containerd.ctr(&["images", "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&list.stdout)
                .lines()
                .any(|l| l == IMAGE),
            "{what}: image not listed: {}",
            String::from_utf8_lossy(&list.stdout)
        );
        // The unpacked image mounts (a snapshot) and holds busybox.
        let mount = dir.path().join(format!("mnt-{}", binaries.version.0));
        std::fs::create_dir_all(&mount).unwrap();
        let view = containerd.ctr(&["images", "mount", IMAGE, &mount.display().to_string()]);
        assert!(
            view.status.success(),
            "{what}: images mount failed: {}",
            String::from_utf8_lossy(&view.stderr)
        );
        let busybox = std::fs::read(mount.join("bin/busybox")).unwrap_or_default();
        let _ = containerd.ctr(&["images", "unmount", &mount.display().to_string()]);
        assert_eq!(
            busybox,
            std::fs::read(BUSYBOX).unwrap(),
            "{what}: unpacked image lacks busybox"
        );
    }
}
