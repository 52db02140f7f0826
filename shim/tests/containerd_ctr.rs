//! The shim under a real, private containerd (whichever `containerd` is on
//! PATH: Debian's 1.6 takes the task API v2 path, 2.x the v3 path), driven
//! by `ctr run`. Until a VM can boot here the pod's VMM is a script that
//! refuses its config, so this checks everything up to the VM: containerd
//! starts our shim, Create reaches it, the VMM's complaint reaches the
//! user, and nothing is left behind. Needs root and containerd.

use std::path::Path;
use std::time::{Duration, Instant};

use cloister_e2e::containerd::{
    busybox_rootfs, processes_mentioning, ContainerdBinaries, PrivateContainerd,
};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-cloister-v2");
const BUSYBOX: &str = "/bin/busybox";

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("a private containerd needs root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("{BUSYBOX} missing (Debian package busybox-static)"));
    }
    None
}

/// Debian's containerd (1.6) and 2.x from sid, each when present; a
/// missing one is reported as a skip.
fn each_containerd() -> Vec<ContainerdBinaries> {
    let mut found = Vec::new();
    match ContainerdBinaries::system() {
        Some(binaries) => found.push(binaries),
        None => eprintln!(
            "SKIP (containerd 1.x): containerd and ctr not on PATH (Debian package containerd)"
        ),
    }
    match ContainerdBinaries::containerd2() {
        Some(binaries) => found.push(binaries),
        None => eprintln!("SKIP (containerd 2.x): not fetched (scripts/install-containerd2.sh)"),
    }
    found
}

/// A private containerd whose shims get a runtime config naming a VMM that
/// refuses its config.
fn containerd_with_refusing_vmm(binaries: &ContainerdBinaries, dir: &Path) -> PrivateContainerd {
    let vmm = dir.join("vmm.sh");
    std::fs::write(
        &vmm,
        "#!/bin/sh\necho 'vm.json: VMM refuses this config (test)' >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.join("cloister.toml");
    std::fs::write(
        &config,
        format!(
            "[vmm]\npath = \"{}\"\n[agent]\nconnect_timeout_secs = 2\n",
            vmm.display()
        ),
    )
    .unwrap();
    eprintln!("private {}", binaries.describe());
    PrivateContainerd::start(binaries, &[("CLOISTER_CONFIG", &config)]).unwrap()
}

#[test]
fn ctr_run_reaches_the_shim_and_a_refused_vm_leaves_nothing_behind() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIP: {reason}");
        return;
    }
    for binaries in each_containerd() {
        refused_vm_leaves_nothing_behind(&binaries);
    }
}

fn refused_vm_leaves_nothing_behind(binaries: &ContainerdBinaries) {
    let dir = tempfile::tempdir().unwrap();
    let containerd = containerd_with_refusing_vmm(binaries, dir.path());
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).unwrap();
    let id = format!("cloister-ctr-{}-{}", std::process::id(), binaries.version.0);

    let output = containerd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        SHIM,
        "--rootfs",
        &rootfs.display().to_string(),
        &id,
        "/bin/sh",
        "-c",
        "echo hello",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("exited during startup") && stderr.contains("VMM refuses this config"),
        "ctr said: {stderr}\ncontainerd log:\n{}",
        containerd.log()
    );

    // containerd cleans up the dead task; the shim exits after it.
    let started = Instant::now();
    while !processes_mentioning(&id).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "left running: {:?}",
            processes_mentioning(&id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sandbox = cloister_shim::sandbox::SandboxDir::new(
        Path::new(cloister_shim::lifecycle::STATE_DIR),
        "default",
        &id,
    )
    .path;
    assert!(!sandbox.exists(), "{} left behind", sandbox.display());
    let containers = containerd.ctr(&["containers", "list", "-q"]);
    assert!(
        !String::from_utf8_lossy(&containers.stdout).contains(&id),
        "container record left behind"
    );
}
