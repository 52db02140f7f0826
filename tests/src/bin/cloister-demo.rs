//! `cloister-demo`: a container in a microVM through containerd, with
//! nothing but this machine: a private containerd (2.x when
//! `scripts/install-containerd2.sh` fetched it, else Debian's 1.6), a
//! busybox image built here and imported (no registry), and our shim as
//! runtime `io.containerd.cloister.v2`. Prints what the container printed
//! (from inside the guest: its kernel is ours, not the host's) and how long
//! `ctr run` took. What `scripts/demo.sh` runs.
//!
//! The hypervisor is `cloister-vmm` where the host can boot a Linux guest;
//! on nested, paravirtualized KVM (`kvm_pvm`, where a guest's kernel mode is
//! emulated and crawls) it is QEMU/TCG with our vsock and virtio-fs
//! back ends, and the demo says so.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use cloister_e2e::agent_guest::AgentGuestFixture;
use cloister_e2e::containerd::{busybox_rootfs, ContainerdBinaries, PrivateContainerd};
use cloister_e2e::oci_image::{write_image_archive, ImageSpec};
use cloister_e2e::runtime::{path_with, shim_dir, HostRuntimeConfig, SHIM_BINARY};

const RUNTIME: &str = "io.containerd.cloister.v2";
const IMAGE: &str = "docker.io/library/busybox:cloister-demo";
const BUSYBOX: &str = "/bin/busybox";
const SCRIPT: &str = "echo \"Hello from a container in a cloister microVM\"; \
    echo \"guest kernel: $(uname -r)  host name: $(hostname)\"; \
    echo \"cpus: $(grep -c ^processor /proc/cpuinfo)  memory: $(grep MemTotal /proc/meminfo)\"";

fn run() -> Result<i32, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("run as root: containerd and the shim mount file systems".into());
    }
    let fixture = AgentGuestFixture::locate()?;
    let shim_dir = shim_dir()?;
    if !Path::new(BUSYBOX).exists() {
        return Err(format!(
            "{BUSYBOX} missing (apt-get install busybox-static)"
        ));
    }
    let binaries = ContainerdBinaries::containerd2()
        .or_else(ContainerdBinaries::system)
        .ok_or("no containerd (apt-get install containerd, or scripts/install-containerd2.sh)")?;

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = HostRuntimeConfig::for_this_host(&fixture, 512)?;
    let hypervisor = config.hypervisor;
    let config_path = dir.path().join("cloister.toml");
    std::fs::write(&config_path, config.toml).map_err(|e| e.to_string())?;
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).map_err(|e| e.to_string())?;
    let archive = dir.path().join("busybox.tar");
    let spec = ImageSpec {
        name: IMAGE.into(),
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
    };
    write_image_archive(&rootfs, &spec, &archive).map_err(|e| e.to_string())?;

    // containerd finds `containerd-shim-cloister-v2` on its own PATH.
    let path = path_with([shim_dir.clone()])?;
    let containerd = PrivateContainerd::start(
        &binaries,
        &[
            ("CLOISTER_CONFIG", config_path.as_path()),
            ("PATH", Path::new(&path)),
        ],
    )
    .map_err(|e| e.to_string())?;
    println!(
        "containerd:  {} (private, in {})",
        binaries.describe(),
        containerd.dir().display()
    );
    println!(
        "runtime:     {RUNTIME} ({})",
        shim_dir.join(SHIM_BINARY).display()
    );
    println!("hypervisor:  {hypervisor}");
    println!(
        "guest:       {} + {}",
        fixture.image.vmlinux.display(),
        fixture.initramfs.display()
    );
    let import = containerd.ctr(&["images", "import", &archive.display().to_string()]);
    if !import.status.success() {
        return Err(format!(
            "ctr images import: {}",
            String::from_utf8_lossy(&import.stderr)
        ));
    }
    println!("image:       {IMAGE} (built here from {BUSYBOX}, imported)");
    let host = nix::sys::utsname::uname().map_err(|e| e.to_string())?;
    println!("host kernel: {}", host.release().to_string_lossy());
    let id = format!("cloister-demo-{}", std::process::id());
    println!("\n$ ctr run --rm --runtime {RUNTIME} {IMAGE} {id} sh -c '…'");
    let started = Instant::now();
    let status = containerd
        .ctr_command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            &id,
            "sh",
            "-c",
            SCRIPT,
        ])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("ctr run: {e}"))?;
    println!(
        "\nctr run: {status} after {:.2} s (VM boot, container, VM shutdown)",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        eprintln!("containerd log:\n{}", containerd.log());
    }
    Ok(status.code().unwrap_or(1))
}

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(reason) => {
            eprintln!("cloister-demo: {reason}");
            ExitCode::FAILURE
        }
    }
}
