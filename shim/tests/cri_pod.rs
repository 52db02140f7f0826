//! A Kubernetes-style pod through containerd's CRI, as kubelet drives it:
//! RuntimeClass handler `cloister` (runtime option `ConfigPath` naming our
//! runtime config), a CNI bridge network, a pause image and a workload
//! image built here and imported into `k8s.io`. Two containers of the pod
//! run in the same microVM (same guest boot id, not the host's), their
//! output reaches CRI's log files complete, and stopping and removing the
//! pod leaves nothing behind. Runs under Debian's containerd 1.6 and 2.x
//! from sid. Needs root, QEMU, the guest image, busybox-static and the CNI
//! plugins (containernetworking-plugins).

mod guest_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloister_e2e::containerd::{
    available_containerds, busybox_rootfs, ContainerdBinaries, CriSettings, PrivateContainerd,
};
use cloister_e2e::cri::{cri_log_text, CniBridge, CriClient};
use cloister_e2e::oci_image::{write_image_archive, ImageSpec};
use k8s_cri::v1 as cri;

const BUSYBOX: &str = "/bin/busybox";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const IMAGE: &str = "docker.io/library/busybox:cloister-cri";
const PAUSE_IMAGE: &str = "docker.io/library/busybox:cloister-pause";
const HANDLER: &str = "cloister";
const CONTAINER_DEADLINE: Duration = Duration::from_secs(120);

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("a private containerd needs root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("{BUSYBOX} missing (Debian package busybox-static)"));
    }
    if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
        return Some(format!(
            "{CNI_BIN_DIR}/bridge missing (Debian package containernetworking-plugins)"
        ));
    }
    None
}

/// Both images, from one busybox rootfs: the workload and a pause image
/// that sleeps until killed.
fn image_archives(dir: &Path) -> Vec<PathBuf> {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).unwrap();
    let mut archives = Vec::new();
    for (name, cmd) in [
        (IMAGE, vec!["sh"]),
        (PAUSE_IMAGE, vec!["sleep", "2147483647"]),
    ] {
        let archive = dir.join(format!("{}.tar", archives.len()));
        let spec = ImageSpec {
            name: name.into(),
            cmd: cmd.into_iter().map(String::from).collect(),
            env: vec!["PATH=/bin".into()],
        };
        write_image_archive(&rootfs, &spec, &archive).unwrap();
        archives.push(archive);
    }
    archives
}

/// The CNI bridge, deleted on drop (the only thing CNI makes outside the
/// test folder besides the pod's own netns, which CRI removes).
struct BridgeGuard(String);

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

/// What kubelet asks for a pod without hostNetwork or
/// shareProcessNamespace: the pod's network and IPC, a PID namespace per
/// container.
fn kubelet_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn pod_config(dir: &Path, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "cri-pod".into(),
        log_directory: dir.join("logs").display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Waits until the container exited; returns its exit code.
async fn wait_exited(client: &mut CriClient, id: &str) -> i32 {
    let started = Instant::now();
    loop {
        let status = client
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e}"))
            .into_inner()
            .status
            .unwrap_or_else(|| panic!("ContainerStatus {id}: no status"));
        if status.state == cri::ContainerState::ContainerExited as i32 {
            return status.exit_code;
        }
        assert!(
            started.elapsed() < CONTAINER_DEADLINE,
            "container {id} still {:?} after {CONTAINER_DEADLINE:?}",
            status.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates and starts container `name` of the pod; returns its id.
async fn create_and_start(
    client: &mut CriClient,
    sandbox_id: &str,
    config: &cri::PodSandboxConfig,
    name: &str,
    script: &str,
) -> String {
    let id = client
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(container_config(name, script)),
            sandbox_config: Some(config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
        .into_inner()
        .container_id;
    client
        .runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    id
}

/// Waits for container `name` (`id`) to exit and removes it; returns its
/// exit code and the text of its CRI log.
async fn finish(client: &mut CriClient, dir: &Path, name: &str, id: String) -> (i32, String) {
    let code = wait_exited(client, &id).await;
    let log = std::fs::read_to_string(dir.join("logs").join(format!("{name}.log")))
        .unwrap_or_else(|e| panic!("log of {name}: {e}"));
    client
        .runtime
        .remove_container(cri::RemoveContainerRequest { container_id: id })
        .await
        .unwrap();
    (code, cri_log_text(&log))
}

async fn drive_pod(
    containerd: &PrivateContainerd,
    dir: &Path,
    host_boot_id: &str,
    bridge: &str,
) -> String {
    let mut client = CriClient::connect(&containerd.socket()).await.unwrap();
    let version = client
        .runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap_or_else(|e| panic!("CRI Version: {e}\n{}", containerd.log()))
        .into_inner();
    eprintln!("CRI: {} {}", version.runtime_name, version.runtime_version);

    let config = pod_config(dir, "pod-a");
    let sandbox_id = client
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: HANDLER.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log()))
        .into_inner()
        .pod_sandbox_id;
    let status = client
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let pod_ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(!pod_ip.is_empty(), "CNI gave the pod no address");

    // The guest sits on the pod's network: it has the pod's address and
    // reaches the CNI bridge (given an address here: the config makes no
    // gateway) through the tap and the tc redirects.
    let gateway = format!("{}.254", pod_ip.rsplit_once('.').unwrap().0);
    let added = std::process::Command::new("ip")
        .args(["addr", "add", &format!("{gateway}/24"), "dev", bridge])
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let script = format!("ip -4 -o addr show; ping -c 2 -W 10 {gateway}");
    let id = create_and_start(&mut client, &sandbox_id, &config, "net", &script).await;
    let (code, out) = finish(&mut client, dir, "net", id).await;
    println!("pod network from inside the guest:\n{out}");
    assert!(out.contains(&format!("inet {pod_ip}/")), "{out}");
    assert_eq!(code, 0, "ping {gateway} failed: {out}");
    assert!(out.contains("2 packets received"), "{out}");

    // Two containers; each prints the guest's boot id: equal means one VM.
    let script = "echo boot $(cat /proc/sys/kernel/random/boot_id); echo kernel $(uname -r); \
                  echo last line without newline | tr -d '\\n'";
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        ids.push((
            name,
            create_and_start(&mut client, &sandbox_id, &config, name, script).await,
        ));
    }
    let mut boot_ids = Vec::new();
    for (name, id) in ids {
        let (code, text) = finish(&mut client, dir, name, id).await;
        assert_eq!(code, 0, "{name} failed: {text}");
        let boot_id = text
            .lines()
            .find_map(|l| l.strip_prefix("boot "))
            .unwrap_or_else(|| panic!("{name} printed no boot id: {text}"))
            .to_string();
        assert!(
            text.ends_with("last line without newline"),
            "{name}'s log lost its last line: {text:?}"
        );
        boot_ids.push(boot_id);
    }
    assert_eq!(
        boot_ids[0], boot_ids[1],
        "the pod's containers ran in different VMs"
    );
    assert_ne!(boot_ids[0], host_boot_id, "the containers ran on the host");

    client
        .runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sandbox_id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}"));
    client
        .runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: sandbox_id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    sandbox_id
}

fn run_pod_under(binaries: &ContainerdBinaries, index: usize) {
    let dir = tempfile::tempdir().unwrap();
    let runtime_config = match guest_support::qemu_runtime_config(dir.path()) {
        Ok(path) => path,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let bridge = format!("clst{}x{index}", std::process::id() % 100_000);
    let _bridge_guard = BridgeGuard(bridge.clone());
    let cni = CniBridge {
        name: format!("cloister-cri-{index}"),
        bridge,
        subnet: format!("10.199.{index}.0/24"),
        conf_dir: dir.path().join("cni"),
        ipam_dir: dir.path().join("ipam"),
    };
    cni.write().unwrap();
    let settings = CriSettings {
        handler: HANDLER.into(),
        runtime_type: "io.containerd.cloister.v2".into(),
        runtime_config: Some(runtime_config),
        sandbox_image: PAUSE_IMAGE.into(),
        cni_conf_dir: cni.conf_dir.clone(),
        cni_bin_dir: CNI_BIN_DIR.into(),
    };
    // containerd finds the shim on its own PATH.
    let shim_dir = Path::new(env!("CARGO_BIN_EXE_containerd-shim-cloister-v2"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = cloister_e2e::runtime::path_with([shim_dir]).unwrap();
    let containerd =
        PrivateContainerd::start_with_cri(binaries, &[("PATH", Path::new(&path))], Some(&settings))
            .unwrap();
    eprintln!("private {} with CRI", binaries.describe());
    for archive in image_archives(dir.path()) {
        let import = containerd.ctr(&[
            "-n",
            "k8s.io",
            "images",
            "import",
            &archive.display().to_string(),
        ]);
        assert!(
            import.status.success(),
            "import: {}",
            String::from_utf8_lossy(&import.stderr)
        );
    }
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(drive_pod(
            &containerd,
            dir.path(),
            &host_boot_id,
            &cni.bridge,
        ))
    }));
    let sandbox_id = match outcome {
        Ok(id) => id,
        Err(panic) => {
            eprintln!("containerd log:\n{}", containerd.log());
            std::panic::resume_unwind(panic);
        }
    };
    guest_support::assert_nothing_left(&containerd, "k8s.io", &sandbox_id);
}

#[test]
fn cri_pod_runs_two_containers_in_one_microvm_and_leaves_nothing_behind() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIP: {reason}");
        return;
    }
    for (index, binaries) in available_containerds().iter().enumerate() {
        run_pod_under(binaries, index);
    }
}
