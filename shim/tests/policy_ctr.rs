//! A pod's agent policy on the whole path: `ctr run --annotation
//! io.cloister.policy=<base64>` through a private containerd, our shim
//! (which installs the policy with SetPolicy before SetupSandbox), a
//! QEMU/TCG microVM and the agent in it. The allowed command runs; another
//! command and an exec are refused with the rule that denied them, and
//! nothing is left behind. Needs root, containerd, QEMU and the guest
//! image (SKIP with the reason otherwise).

use std::path::Path;

use base64::Engine as _;

mod guest_support;

use cloister_e2e::containerd::{available_containerds, busybox_rootfs, PrivateContainerd};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-cloister-v2");
const BUSYBOX: &str = "/bin/busybox";

/// Lets the pod start and run one command; refuses every exec.
const POLICY: &str = r#"
package agent_policy

default CreateContainerRequest := false
CreateContainerRequest if input.oci.process.args in allowed
allowed := [["/bin/sh", "-c", "echo allowed; exit 4"], ["sleep", "3600"]]
deny_reasons contains sprintf("command %v is not allowed", [input.oci.process.args]) if {
	not input.oci.process.args in allowed
}

default ExecProcessRequest := false
deny_reasons contains "no exec in this pod" if input.process

default SetPolicyRequest := false

default SetupSandboxRequest := true
default UpdateInterfacesRequest := true
default UpdateRoutesRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default PauseContainerRequest := true
default ResumeContainerRequest := true
default UpdateContainerRequest := true
default StatsContainerRequest := true
default ListProcessesRequest := true
default SignalProcessRequest := true
default WaitProcessRequest := true
default ResizeTtyRequest := true
default CloseStdinRequest := true
default ReadStreamRequest := true
default WriteStreamRequest := true
default EventsRequest := true
default GuestDetailsRequest := true
default HealthCheckRequest := true
default ShutdownRequest := true
"#;

fn annotation() -> String {
    format!(
        "io.cloister.policy={}",
        base64::engine::general_purpose::STANDARD.encode(POLICY)
    )
}

fn ctr_run(
    containerd: &PrivateContainerd,
    rootfs: &Path,
    extra: &[&str],
    id: &str,
    args: &[&str],
) -> std::process::Output {
    let rootfs = rootfs.display().to_string();
    let annotation = annotation();
    // `--rootfs` is a switch: the rootfs path is the first positional.
    let mut all = vec!["run", "--runtime", SHIM, "--annotation", &annotation];
    all.extend_from_slice(extra);
    all.push("--rootfs");
    all.push(&rootfs);
    all.push(id);
    all.extend_from_slice(args);
    containerd.ctr(&all)
}

#[test]
fn pod_policy_annotation_allows_its_command_and_refuses_others_through_containerd() {
    if !nix::unistd::geteuid().is_root() || !Path::new(BUSYBOX).exists() {
        eprintln!("SKIP: needs root and {BUSYBOX} (Debian busybox-static)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = match guest_support::qemu_runtime_config(dir.path()) {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).unwrap();
    let Some(binaries) = available_containerds().into_iter().next() else {
        eprintln!("SKIP: no containerd on PATH");
        return;
    };
    let containerd =
        PrivateContainerd::start(&binaries, &[("CLOISTER_CONFIG", config.as_path())]).unwrap();
    let pid = std::process::id();

    let allowed_id = format!("policy-allowed-{pid}");
    let allowed = ctr_run(
        &containerd,
        &rootfs,
        &["--rm"],
        &allowed_id,
        &["/bin/sh", "-c", "echo allowed; exit 4"],
    );
    let refused_id = format!("policy-refused-{pid}");
    let refused = ctr_run(
        &containerd,
        &rootfs,
        &["--rm"],
        &refused_id,
        &["/bin/sh", "-c", "cat /proc/cmdline"],
    );
    let exec_id = format!("policy-exec-{pid}");
    let sleeping = ctr_run(&containerd, &rootfs, &["-d"], &exec_id, &["sleep", "3600"]);
    let exec = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "shell",
        &exec_id,
        "/bin/sh",
        "-c",
        "true",
    ]);

    let text = |o: &std::process::Output| {
        format!(
            "stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let log = containerd.log();
    assert_eq!(allowed.status.code(), Some(4), "{}\n{log}", text(&allowed));
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "allowed\n");
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains(
            "CreateContainerRequest denied by policy rule data.agent_policy.CreateContainerRequest: \
             command [\"/bin/sh\", \"-c\", \"cat /proc/cmdline\"] is not allowed"
        ),
        "{}\n{log}",
        text(&refused)
    );
    assert!(sleeping.status.success(), "{}\n{log}", text(&sleeping));
    assert!(!exec.status.success(), "{}", text(&exec));
    assert!(
        text(&exec).contains(
            "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: no exec in this pod"
        ),
        "{}",
        text(&exec)
    );

    containerd.ctr(&["task", "kill", "-s", "SIGKILL", &exec_id]);
    for _ in 0..600 {
        let ls = containerd.ctr(&["task", "ls"]);
        let listing = String::from_utf8_lossy(&ls.stdout).into_owned();
        if !listing
            .lines()
            .any(|l| l.starts_with(&exec_id) && l.contains("RUNNING"))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    containerd.ctr(&["task", "delete", &exec_id]);
    containerd.ctr(&["containers", "delete", &exec_id]);
    containerd.ctr(&["containers", "delete", &refused_id]);
    for id in [&allowed_id, &refused_id, &exec_id] {
        guest_support::assert_nothing_left(&containerd, "default", id);
    }
}
