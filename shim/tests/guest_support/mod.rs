//! What the guest tests need: QEMU, the built kernel, the agent
//! initramfs (agent as PID 1, busybox rootfs at `/rootfs/busybox`) and the
//! `cloister-vmm` binary, and a runtime config for the QEMU/TCG backend.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloister_e2e::agent_guest::AgentGuestFixture;
use cloister_e2e::containerd::{processes_mentioning, PrivateContainerd};
use cloister_e2e::qemu::QEMU_BINARY;
use cloister_e2e::runtime;
use cloister_shim::config::{
    GuestSection, HypervisorKind, PodVm, QemuAccel, QemuSection, RuntimeConfig, VmmSection,
};

pub use cloister_e2e::agent_guest::{AGENT_DEADLINE, GUEST_ROOTFS};

/// A runtime config for QEMU/TCG with the agent image, or why there is none.
pub fn guest_config() -> Result<RuntimeConfig, String> {
    let AgentGuestFixture {
        image,
        initramfs,
        vmm,
    } = AgentGuestFixture::locate()?;
    let defaults = RuntimeConfig::default();
    Ok(RuntimeConfig {
        hypervisor: HypervisorKind::Qemu,
        qemu: QemuSection {
            path: PathBuf::from(QEMU_BINARY),
            accel: QemuAccel::Tcg,
        },
        vmm: VmmSection {
            path: vmm,
            ..Default::default()
        },
        guest: GuestSection {
            kernel: image.vmlinux,
            initramfs,
            ..defaults.guest.clone()
        },
        ..defaults
    })
}

/// One vCPU, 512 MiB, no shared folder (the VMM has no virtio-fs yet).
pub fn guest_vm() -> PodVm {
    PodVm {
        hypervisor: HypervisorKind::Qemu,
        vcpus: 1,
        memory_mib: 512,
        kernel_params: String::new(),
        shared_fs: false,
        nics: Vec::new(),
        cgroups_path: None,
    }
}

pub fn fifo(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    path.display().to_string()
}

/// containerd's reader of an output FIFO. A plain thread, not the
/// runtime's blocking pool: a test that fails while the open still waits
/// must not hang in the runtime's shutdown.
pub fn read_fifo(path: String) -> tokio::sync::oneshot::Receiver<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(path) {
            let _ = std::io::Read::read_to_string(&mut file, &mut text);
        }
        let _ = tx.send(text);
    });
    rx
}

/// A writer that opens containerd's stdin FIFO and keeps it open, like a
/// client that has not finished (a plain thread, as for [`read_fifo`]).
pub fn open_writer(path: String) -> tokio::sync::oneshot::Receiver<std::fs::File> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = tx.send(file);
        }
    });
    rx
}

/// A spec running `args` in the busybox rootfs.
pub fn spec(args: &[&str]) -> serde_json::Value {
    cloister_e2e::agent_guest::busybox_spec(args)
}

/// Whether `pid` is gone (or a zombie about to be reaped).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.contains(") Z "),
        Err(_) => true,
    }
}

/// containerd cleaned up the task, the shim (and any VMM) exited, and the
/// sandbox folder and container record are gone.
pub fn assert_nothing_left(containerd: &PrivateContainerd, namespace: &str, id: &str) {
    let started = Instant::now();
    while !processes_mentioning(id).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "left running: {:?}",
            processes_mentioning(id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sandbox = cloister_shim::sandbox::SandboxDir::new(
        Path::new(cloister_shim::lifecycle::STATE_DIR),
        namespace,
        id,
    )
    .path;
    assert!(!sandbox.exists(), "{} left behind", sandbox.display());
    let containers = containerd.ctr(&["-n", namespace, "containers", "list", "-q"]);
    assert!(
        !String::from_utf8_lossy(&containers.stdout).contains(id),
        "container record left behind"
    );
}

/// A runtime config for the default backend, `cloister-vmm`, with the agent
/// image, as TOML for `CLOISTER_CONFIG`; `Err` says why this host cannot
/// run a Linux guest in it (no KVM, or nested `kvm_pvm`).
pub fn cloister_vmm_runtime_config(dir: &Path) -> Result<PathBuf, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("cloister-vmm pods need /dev/kvm".into());
    }
    if cloister_guest_image::cmdline::host_is_nested_pvm() {
        return Err("cloister-vmm pods: this host's KVM is nested kvm_pvm, where a guest's user mode cannot make system calls (the QEMU/TCG runs cover the pod path)".into());
    }
    let fixture = AgentGuestFixture::locate()?;
    let path = dir.join("cloister-vmm.toml");
    let toml = runtime::cloister_vmm_toml(&fixture, 512) + &runtime::audit_toml(&audit_file(dir));
    std::fs::write(&path, toml).map_err(|e| e.to_string())?;
    Ok(path)
}

/// A runtime config for the QEMU/TCG backend with the agent image, as TOML
/// for `CLOISTER_CONFIG`.
pub fn qemu_runtime_config(dir: &Path) -> Result<PathBuf, String> {
    let fixture = AgentGuestFixture::locate()?;
    let qemu =
        runtime::find_on_path(QEMU_BINARY).ok_or_else(|| format!("{QEMU_BINARY} not on PATH"))?;
    let path = dir.join("cloister.toml");
    let toml =
        runtime::qemu_tcg_toml(&fixture, 512, &qemu) + &runtime::audit_toml(&audit_file(dir));
    std::fs::write(&path, toml).map_err(|e| e.to_string())?;
    Ok(path)
}

/// The audit file the runtime configs made in `dir` name.
pub fn audit_file(dir: &Path) -> PathBuf {
    dir.join("audit.jsonl")
}

/// The records of pod `pod` in the audit file at `path`.
pub fn audit_records(path: &Path, pod: &str) -> Vec<cloister_shim::audit::AuditRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            serde_json::from_str::<cloister_shim::audit::AuditRecord>(line)
                .unwrap_or_else(|e| panic!("audit line {line:?}: {e}"))
        })
        .filter(|r| r.pod == pod)
        .collect()
}

/// The task API calls of `pod` whose operation is one of `operations`, in
/// the file's order, as `operation` or `operation exec_id`, each with its
/// decision.
pub fn audited_task_calls(path: &Path, pod: &str, operations: &[&str]) -> Vec<String> {
    use cloister_shim::audit::RecordKind;
    audit_records(path, pod)
        .into_iter()
        .filter(|r| r.kind == RecordKind::Task && operations.contains(&r.operation.as_str()))
        .map(|r| {
            let exec = if r.exec_id.is_empty() {
                String::new()
            } else {
                format!(" {}", r.exec_id)
            };
            format!("{}{exec} {}", r.operation, r.decision)
        })
        .collect()
}
