//! The shim under a real, private containerd (whichever `containerd` is on
//! PATH: Debian's 1.6 takes the task API v2 path, 2.x the v3 path), driven
//! by `ctr run`. Until a VM can boot here the pod's VMM is a script that
//! refuses its config, so this checks everything up to the VM: containerd
//! starts our shim, Create reaches it, the VMM's complaint reaches the
//! user, and nothing is left behind. Needs root and containerd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-cloister-v2");

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("a private containerd needs root".into());
    }
    for program in ["containerd", "ctr"] {
        if find_on_path(program).is_none() {
            return Some(format!("{program} not on PATH (Debian package containerd)"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (Debian package busybox-static)".into());
    }
    None
}

struct PrivateContainerd {
    dir: tempfile::TempDir,
    child: Child,
}

impl PrivateContainerd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let version = Command::new("containerd")
            .arg("--version")
            .output()
            .unwrap();
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        eprintln!("private {}", version.trim());
        let major = cloister_shim::compat::parse_containerd_version(&version)
            .map(|(major, _)| major)
            .unwrap_or(2);
        // 1.x reads config version 2, 2.x version 3; NRI's socket is global.
        let config = if major >= 2 {
            format!(
                "version = 3\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n[debug]\n  address = \"{d}/debug.sock\"\n[plugins.'io.containerd.internal.v1.opt']\n  path = \"{d}/opt\"\n[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n"
            )
        } else {
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n[debug]\n  address = \"{d}/debug.sock\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
            )
        };
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let vmm = dir.path().join("vmm.sh");
        std::fs::write(
            &vmm,
            "#!/bin/sh\necho 'vm.json: VMM refuses this config (test)' >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(
            dir.path().join("cloister.toml"),
            format!(
                "[vmm]\npath = \"{}\"\n[agent]\nconnect_timeout_secs = 2\n",
                vmm.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .env("CLOISTER_CONFIG", dir.path().join("cloister.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !dir.path().join("containerd.sock").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "containerd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { dir, child }
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn processes_mentioning(word: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(word) {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn ctr_run_reaches_the_shim_and_a_refused_vm_leaves_nothing_behind() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIP: {reason}");
        return;
    }
    let containerd = PrivateContainerd::start();
    let rootfs = containerd.dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let id = format!("cloister-ctr-{}", std::process::id());

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
