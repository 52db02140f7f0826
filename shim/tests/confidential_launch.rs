//! SNP/TDX pods through the real launcher and the real `cloister-vmm` on a
//! host without SEV-SNP or TDX: the launch fails with the VMM's reason in
//! the error the caller (containerd) gets, and leaves nothing behind; the
//! QEMU backend is refused naming the QEMU version needed; `cloister
//! measure` prints what `cloister-vmm --print-launch-digest` computes for
//! a hand-written vm.json of the same pod.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use cloister_e2e::cloister_vmm::find_cloister_vmm;
use cloister_e2e::containerd::processes_mentioning;
use cloister_guest_image::cmdline::{guest_cmdline, RebootMethod};
use cloister_shim::audit::{AuditLog, AuditSection};
use cloister_shim::config::{ConfigSource, RuntimeConfig};
use cloister_shim::sandbox::{mounts_below, SandboxDir, SandboxLauncher, VmLauncher};

const INIT_DATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = 'url = \"http://kbs.test:8080\"'\n";

fn vmm_or_skip() -> Option<PathBuf> {
    match find_cloister_vmm() {
        Some(vmm) if vmm.is_file() => Some(vmm),
        _ => {
            eprintln!("SKIP: cloister-vmm binary not found (cargo build -p cloister-vmm, or set CLOISTER_VMM)");
            None
        }
    }
}

fn pod_spec(init_data: &str) -> serde_json::Value {
    serde_json::json!({
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.cloister.init-data": base64::engine::general_purpose::STANDARD.encode(init_data),
        },
        "linux": {"namespaces": [{"type": "network"}, {"type": "pid"}]},
    })
}

fn load(path: &Path) -> RuntimeConfig {
    RuntimeConfig::load(&ConfigSource::RuntimeOption(path.to_path_buf())).unwrap()
}

async fn launch(
    config: &RuntimeConfig,
    state: &Path,
    id: &str,
) -> Result<(), cloister_shim::sandbox::SandboxError> {
    let launcher = VmLauncher {
        namespace: "default".into(),
        state_dir: state.to_path_buf(),
    };
    let audit = AuditLog::new("default");
    audit.configure(&AuditSection {
        enabled: false,
        ..Default::default()
    });
    launcher
        .launch(id, &pod_spec(INIT_DATA), config, &audit)
        .await
        .map(|_| ())
}

fn assert_nothing_left(state: &Path, id: &str) {
    let dir = SandboxDir::new(state, "default", id);
    assert!(!dir.path.exists(), "{} left behind", dir.path.display());
    assert!(mounts_below(state).is_empty(), "{:?}", mounts_below(state));
    let left = processes_mentioning(&state.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// An SNP pod on cloister-vmm: the shim writes the tee section and the
/// bzImage (seen by a wrapper that keeps a copy of vm.json, then execs the
/// real VMM), the VMM refuses the host, the error names why.
#[tokio::test]
async fn snp_pod_on_a_host_without_snp_fails_with_the_vmms_reason() {
    let Some(vmm) = vmm_or_skip() else { return };
    if Path::new("/dev/sev").exists() {
        eprintln!("SKIP: this host has /dev/sev: the launch could succeed");
        return;
    }
    let root = nix::unistd::Uid::effective().is_root();
    let work = tempfile::tempdir().unwrap();
    let seen = work.path().join("seen-vm.json");
    let wrapper = work.path().join("vmm-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncp \"$2\" {}\nexec {} \"$@\"\n",
            seen.display(),
            vmm.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config_path = work.path().join("snp.toml");
    std::fs::write(
        &config_path,
        format!(
            "[vmm]\npath = \"{}\"\njail = {root}\n[guest]\nkernel = \"{dir}/kernel/vmlinux\"\ninitramfs = \"{dir}/initramfs.cpio\"\n[confidential]\ntee = \"snp\"\nvcpu_type = \"EPYC-Milan\"\n",
            wrapper.display(),
            dir = work.path().display()
        ),
    )
    .unwrap();
    let config = load(&config_path);
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();

    let err = launch(&config, &state, "snp-pod")
        .await
        .unwrap_err()
        .to_string();

    assert!(
        err.starts_with("cloister-vmm exited during startup (exit code 2)"),
        "{err}"
    );
    let vm_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA.as_bytes())
        .unwrap()
        .digest();
    assert_eq!(
        vm_json["tee"],
        serde_json::json!({"type": "snp", "policy": "0x30000", "host_data": hex::encode(&digest[..32]), "vcpu_type": "EPYC-Milan"})
    );
    assert_eq!(
        vm_json["kernel"].as_str(),
        Some(work.path().join("kernel/bzImage").to_str().unwrap())
    );
    assert_eq!(vm_json["vsock"]["guest_cid"], 3);
    assert_eq!(vm_json["jail"].is_object(), root, "{vm_json}");
    assert_nothing_left(&state, "snp-pod");
    // Until cloister-vmm runs confidential guests jailed and with virtio
    // devices it refuses them before it looks at the host.
    if err.contains("cannot run jailed yet") || err.contains("without virtio devices") {
        eprintln!("SKIP (host check part): this cloister-vmm refuses a confidential guest's jail/devices first: {err}");
        return;
    }
    for fact in ["KVM_CAP_VM_TYPES", "SNP_VM", "kvm_amd", "/dev/sev"] {
        assert!(err.contains(fact), "no {fact} in: {err}");
    }
}

/// The QEMU backend with Debian's QEMU 7.2: refused before anything runs.
#[tokio::test]
async fn snp_pod_on_an_old_qemu_is_refused_naming_qemu_9_1() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        eprintln!("SKIP: {} missing (Debian qemu-system-x86)", qemu.display());
        return;
    }
    let help = Command::new(qemu)
        .args(["-object", "help"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&help.stdout)
        .lines()
        .any(|l| l.trim() == "sev-snp-guest")
    {
        eprintln!("SKIP: this QEMU has sev-snp-guest");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let config_path = work.path().join("snp-qemu.toml");
    std::fs::write(
        &config_path,
        format!(
            "hypervisor = \"qemu\"\n[qemu]\npath = \"{}\"\n[vmm]\njail = false\n[confidential]\ntee = \"snp\"\n",
            qemu.display()
        ),
    )
    .unwrap();
    let config = load(&config_path);
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();

    let err = launch(&config, &state, "snp-qemu-pod")
        .await
        .unwrap_err()
        .to_string();

    assert!(err.contains("has no `sev-snp-guest` object"), "{err}");
    assert!(err.contains("QEMU 9.1 or newer is needed"), "{err}");
    assert!(err.contains("found: QEMU emulator version"), "{err}");
    assert_nothing_left(&state, "snp-qemu-pod");
}

/// The guest image `cloister measure` needs: a real bzImage and initramfs.
fn kernel_or_skip() -> Option<(PathBuf, PathBuf)> {
    let kernel_dir = cloister_guest_image::paths::kernel_dir();
    let initramfs = cloister_guest_image::paths::cache_dir().join("initramfs/agent.cpio");
    let initramfs = if initramfs.is_file() {
        initramfs
    } else {
        cloister_guest_image::paths::test_initramfs()
    };
    if !kernel_dir.join("bzImage").is_file() || !initramfs.is_file() {
        eprintln!(
            "SKIP: no guest kernel/initramfs in {} (kernel-config/build-kernel.sh, build-initramfs.sh)",
            kernel_dir.display()
        );
        return None;
    }
    Some((kernel_dir.join("vmlinux"), initramfs))
}

struct MeasureOutput {
    digest: String,
    binding: String,
}

/// `cloister measure args…`, whatever its outcome.
fn run_cloister_measure(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloister"))
        .arg("measure")
        .args(args)
        .output()
        .unwrap()
}

/// `cloister measure args…`, which must succeed, parsed.
fn cloister_measure(args: &[&str]) -> MeasureOutput {
    let out = run_cloister_measure(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .to_owned()
    };
    let digest_name = if stdout.contains("tee: tdx") {
        "mrtd"
    } else {
        "launch_digest"
    };
    let binding_name = if stdout.contains("tee: tdx") {
        "mr_config_id"
    } else {
        "host_data"
    };
    MeasureOutput {
        digest: field(digest_name),
        binding: field(binding_name),
    }
}

/// `cloister-vmm --config vm_json --print-launch-digest`, whatever its
/// outcome.
fn run_print_launch_digest(vmm: &Path, vm_json: &Path) -> std::process::Output {
    Command::new(vmm)
        .arg("--config")
        .arg(vm_json)
        .arg("--print-launch-digest")
        .output()
        .unwrap()
}

/// The digest `cloister-vmm` prints for `vm_json` (it must succeed).
fn vmm_digest(vmm: &Path, vm_json: &Path) -> String {
    let out = run_print_launch_digest(vmm, vm_json);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A runtime config for a cloister-vmm class (`extra`: its sections
/// beyond `[vmm]` and `[guest]`) and an init-data file, in `dir`.
fn cloister_vmm_class(
    dir: &Path,
    vmm: &Path,
    vmlinux: &Path,
    initramfs: &Path,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let config = dir.join("class.toml");
    std::fs::write(
        &config,
        format!(
            "[vmm]\npath = \"{}\"\n[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\n{extra}",
            vmm.display(),
            vmlinux.display(),
            initramfs.display()
        ),
    )
    .unwrap();
    let init_data = dir.join("init-data.toml");
    std::fs::write(&init_data, INIT_DATA).unwrap();
    (config, init_data)
}

#[test]
fn cloister_measure_equals_the_vmms_digest_of_a_hand_written_vm_json() {
    let Some(vmm) = vmm_or_skip() else { return };
    let Some((vmlinux, initramfs)) = kernel_or_skip() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (config, init_data) = cloister_vmm_class(
        work.path(),
        &vmm,
        &vmlinux,
        &initramfs,
        "[resources]\ndefault_memory_mib = 512\ndefault_vcpus = 2\n[confidential]\ntee = \"snp\"\nsnp_policy = 0x30000\nvcpu_type = \"EPYC-Milan\"\n",
    );
    let config_arg = config.to_str().unwrap();

    let measured = cloister_measure(&[
        "--config",
        config_arg,
        "--init-data",
        init_data.to_str().unwrap(),
    ]);

    let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA.as_bytes())
        .unwrap()
        .digest();
    assert_eq!(measured.binding, hex::encode(&digest[..32]));
    // The same pod written by hand: the bzImage, the agent's TEE
    // parameter, vsock + rng + one NIC (no virtio-fs: nothing is shared).
    let bz_image = vmlinux.with_file_name("bzImage");
    let hand_written = serde_json::json!({
        "kernel": bz_image,
        "initrd": initramfs,
        "cmdline": format!("{} cloister.tee=snp", guest_cmdline(RebootMethod::Keyboard, false)),
        "vcpus": 2,
        "memory_mib": 512,
        "rng": true,
        "vsock": {"guest_cid": 3, "uds_path": work.path().join("v.sock")},
        "net": [{"fd": 9}],
        "tee": {"type": "snp", "policy": "0x30000", "host_data": hex::encode(&digest[..32]), "cpu_signature": "0xa00f11"},
    });
    let vm_json = work.path().join("vm.json");
    std::fs::write(&vm_json, hand_written.to_string()).unwrap();
    assert_eq!(measured.digest, vmm_digest(&vmm, &vm_json));
    assert_eq!(measured.digest.len(), 96);

    // The annotation path binds the same document the same way.
    let annotated = cloister_measure(&[
        "--config",
        config_arg,
        "--annotation",
        &base64::engine::general_purpose::STANDARD.encode(INIT_DATA),
    ]);
    assert_eq!(
        (annotated.digest.as_str(), annotated.binding.as_str()),
        (measured.digest.as_str(), measured.binding.as_str())
    );

    // Other init-data: HOST_DATA changes, the launch digest does not (SNP
    // reports HOST_DATA beside MEASUREMENT, it is not measured).
    std::fs::write(&init_data, INIT_DATA.replace("kbs.test", "kbs.other")).unwrap();
    let other = cloister_measure(&[
        "--config",
        config_arg,
        "--init-data",
        init_data.to_str().unwrap(),
    ]);
    assert_ne!(other.binding, measured.binding);
    assert_eq!(other.digest, measured.digest);
    // Without init-data HOST_DATA is zero.
    let bare = cloister_measure(&["--config", config_arg]);
    assert_eq!(bare.binding, "0".repeat(64));

    // What is measured changes it: the VM's size, its devices.
    let bigger = cloister_measure(&[
        "--config",
        config_arg,
        "--pod-annotation",
        "io.kubernetes.cri.sandbox-memory=268435456",
    ]);
    assert_ne!(bigger.digest, measured.digest);
    let no_nic = cloister_measure(&["--config", config_arg, "--nics", "0"]);
    assert_ne!(no_nic.digest, measured.digest);
}

/// A TDX class on cloister-vmm: `cloister measure` gives what the VMM
/// gives for the hand-written vm.json of the same pod, which is a refusal
/// (no virtio devices for a TD in cloister-vmm; TDX pods run on QEMU).
#[test]
fn cloister_measure_of_a_tdx_class_agrees_with_the_vmm() {
    let Some(vmm) = vmm_or_skip() else { return };
    let Some((vmlinux, initramfs)) = kernel_or_skip() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (config, init_data) = cloister_vmm_class(
        work.path(),
        &vmm,
        &vmlinux,
        &initramfs,
        "[confidential]\ntee = \"tdx\"\n",
    );
    let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA.as_bytes())
        .unwrap()
        .digest();
    let hand_written = serde_json::json!({
        "kernel": vmlinux.with_file_name("bzImage"),
        "initrd": initramfs,
        "cmdline": format!("{} cloister.tee=tdx", guest_cmdline(RebootMethod::Keyboard, false)),
        "vcpus": 1,
        "memory_mib": 256,
        "rng": true,
        "vsock": {"guest_cid": 3, "uds_path": work.path().join("v.sock")},
        "tee": {"type": "tdx", "mr_config_id": hex::encode(&digest)},
    });
    let vm_json = work.path().join("vm.json");
    std::fs::write(&vm_json, hand_written.to_string()).unwrap();
    let vmm_out = run_print_launch_digest(&vmm, &vm_json);
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--init-data",
        init_data.to_str().unwrap(),
        "--nics",
        "0",
    ];

    // cloister-vmm cannot give a TD virtio devices (split irqchip): it
    // refuses the reference value too, naming them, and `cloister measure`
    // hands the operator that same refusal instead of a digest.
    let reason = String::from_utf8_lossy(&vmm_out.stderr).trim().to_owned();
    assert_eq!(vmm_out.status.code(), Some(2), "{reason}");
    assert!(reason.contains("rng, vsock"), "{reason}");
    let out = run_cloister_measure(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&reason), "{stderr}\nwant: {reason}");
}

/// An SNP class on the qemu backend: OVMF with kernel hashes over the
/// bzImage, initramfs and `-append` QEMU gets. Equal to `cloister-kbs
/// snp-measurement` given the same inputs by hand, when an OVMF with an
/// SNP kernel-hashes section (`CLOISTER_SNP_OVMF`, or Ubuntu's
/// /usr/share/ovmf/OVMF.amdsev.fd) and cloister-kbs are there; a firmware
/// without that section is refused naming it.
#[test]
fn cloister_measure_of_an_snp_qemu_class_uses_ovmf_kernel_hashes() {
    let Some((vmlinux, initramfs)) = kernel_or_skip() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let config_for = |firmware: &Path| {
        let path = work.path().join("snp-qemu.toml");
        std::fs::write(
            &path,
            format!(
                "hypervisor = \"qemu\"\n[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\n[resources]\ndefault_vcpus = 2\n[confidential]\ntee = \"snp\"\nvcpu_type = \"EPYC-Milan\"\nfirmware = \"{}\"\n",
                vmlinux.display(),
                initramfs.display(),
                firmware.display()
            ),
        )
        .unwrap();
        path
    };
    let debian_ovmf = Path::new("/usr/share/OVMF/OVMF_CODE.fd");
    if debian_ovmf.is_file() {
        let config = config_for(debian_ovmf);
        let out = run_cloister_measure(&["--config", config.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("firmware /usr/share/OVMF/OVMF_CODE.fd: kernel hashes given but this ovmf has no snp_kernel_hashes section"),
            "{stderr}"
        );
    }
    let ovmf = std::env::var_os("CLOISTER_SNP_OVMF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/ovmf/OVMF.amdsev.fd"));
    let kbs = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("cloister-kbs"))
        .filter(|p| p.is_file());
    let (true, Some(kbs)) = (ovmf.is_file(), kbs) else {
        eprintln!("SKIP (digest part): needs an SNP OVMF with kernel hashes ({}, or CLOISTER_SNP_OVMF) and cloister-kbs (cargo build -p cloister-attestation --bin cloister-kbs)", ovmf.display());
        return;
    };
    let config = config_for(&ovmf);
    let measured = cloister_measure(&["--config", config.to_str().unwrap()]);
    let append = format!(
        "{} cloister.tee=snp",
        guest_cmdline(RebootMethod::TripleFault, false)
    );
    let out = Command::new(kbs)
        .args([
            "snp-measurement",
            "--vcpus",
            "2",
            "--vcpu-type",
            "EPYC-Milan",
            "--ovmf",
        ])
        .arg(&ovmf)
        .arg("--kernel")
        .arg(vmlinux.with_file_name("bzImage"))
        .arg("--initrd")
        .arg(&initramfs)
        .args(["--append", &append])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(measured.digest, String::from_utf8_lossy(&out.stdout).trim());
}

mod guest_support;

/// `ctr run` of an SNP pod through a private containerd and our shim: the
/// QEMU backend's refusal (QEMU 9.1 needed) and cloister-vmm's reason
/// reach the user, and nothing is left. Needs root and containerd.
#[test]
fn ctr_run_of_an_snp_pod_tells_the_user_why_it_cannot_start() {
    use cloister_e2e::containerd::{available_containerds, busybox_rootfs, PrivateContainerd};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: a private containerd needs root");
        return;
    }
    let busybox = Path::new("/bin/busybox");
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !busybox.exists() || !qemu.exists() {
        eprintln!(
            "SKIP: needs /bin/busybox (busybox-static) and {} (qemu-system-x86)",
            qemu.display()
        );
        return;
    }
    let Some(vmm) = vmm_or_skip() else { return };
    for binaries in available_containerds() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(busybox, &rootfs).unwrap();
        let cases = [
            (
                "qemu",
                format!(
                    "hypervisor = \"qemu\"\n[qemu]\npath = \"{}\"\n",
                    qemu.display()
                ),
                vec!["QEMU 9.1 or newer is needed"],
            ),
            (
                "vmm",
                format!("[vmm]\npath = \"{}\"\n", vmm.display()),
                vec!["cloister-vmm exited during startup (exit code 2)"],
            ),
        ];
        for (name, backend, wanted) in cases {
            let config = dir.path().join(format!("snp-{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "{backend}[agent]\nconnect_timeout_secs = 2\n[confidential]\ntee = \"snp\"\n{}",
                    cloister_e2e::runtime::audit_toml(&guest_support::audit_file(dir.path()))
                ),
            )
            .unwrap();
            let containerd =
                PrivateContainerd::start(&binaries, &[("CLOISTER_CONFIG", &config)]).unwrap();
            let id = format!(
                "cloister-snp-{name}-{}-{}",
                std::process::id(),
                binaries.version.0
            );
            let output = containerd.ctr(&[
                "run",
                "--rm",
                "--runtime",
                env!("CARGO_BIN_EXE_containerd-shim-cloister-v2"),
                "--rootfs",
                &rootfs.display().to_string(),
                &id,
                "/bin/true",
            ]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{stderr}");
            for text in wanted {
                assert!(
                    stderr.contains(text),
                    "{} {name}: no {text:?} in: {stderr}\ncontainerd log:\n{}",
                    binaries.describe(),
                    containerd.log()
                );
            }
            eprintln!("{} {name}: {}", binaries.describe(), stderr.trim());
            guest_support::assert_nothing_left(&containerd, "default", &id);
        }
    }
}
