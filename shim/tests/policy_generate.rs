//! `cloister policy generate` against the real agent (host test mode, root
//! only; SKIP otherwise): the policy generated from a pod manifest lets
//! that pod's own requests through and denies a changed command, an extra
//! capability, a missing variable, an exec it does not list, and its own
//! replacement; a sandbox set-up with more than the shim's mounts; an
//! update of a container the agent did not create or of more than resource
//! limits; an exec with another environment or user than its container's.
//! The one generated from an OCI config.json pins that spec. Joined
//! namespaces must be the pod's sandbox container's: the agent resolves
//! each `/proc/<pid>/ns/...` path to the container whose init it is.

mod support;

use base64::Engine as _;
use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::{AgentClient, AgentError, TtrpcAgentClient};
use cloister_shim::policy_gen::{self, GenerateOptions, Sources};
use support::*;
use tokio::io::AsyncReadExt;

const POD_YAML: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  containers:
  - name: app
    image: busybox:1.36
    command: ["sh", "-c"]
    args: ["echo generated"]
    env:
    - name: MODE
      value: prod
    securityContext:
      runAsUser: 0
      allowPrivilegeEscalation: false
      capabilities:
        drop: ["NET_RAW"]
"#;

/// containerd's default capabilities less NET_RAW, as the manifest asks.
const CAPS: [&str; 13] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The spec CRI would send for the manifest's container, as the shim
/// passes it on: no host name (the sandbox container's uts namespace has
/// it), its own pid and mount namespaces, the ipc and uts namespaces of
/// the sandbox container whose init is `sandbox_pid` by path, no network
/// namespace.
fn pod_spec(args: &[&str], sandbox_pid: u32) -> serde_json::Value {
    let mut spec = spec(args, false);
    spec.as_object_mut().unwrap().remove("hostname");
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"},
        {"type": "ipc", "path": format!("/proc/{sandbox_pid}/ns/ipc")},
        {"type": "uts", "path": format!("/proc/{sandbox_pid}/ns/uts")},
        {"type": "mount"}
    ]);
    spec["linux"]["resources"] =
        serde_json::json!({"devices": [{"allow": false, "access": "rwm"}]});
    spec["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "pod1",
        "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36",
    });
    spec["process"]["env"] = serde_json::json!(["PATH=/bin", "HOSTNAME=web", "MODE=prod"]);
    spec["process"]["capabilities"] =
        serde_json::json!({"bounding": CAPS, "effective": CAPS, "permitted": CAPS});
    spec["linux"]["maskedPaths"] = serde_json::json!(["/proc/kcore"]);
    spec["linux"]["readonlyPaths"] = serde_json::json!(["/proc/sys"]);
    spec
}

fn generated_from_pod(exec: &[&str]) -> String {
    generated_from(POD_YAML, exec)
}

fn generated_from(pod_yaml: &str, exec: &[&str]) -> String {
    let manifest: serde_json::Value = serde_yaml::from_str(pod_yaml).unwrap();
    let options = GenerateOptions {
        exec_commands: exec
            .iter()
            .map(|c| policy_gen::parse_exec_command(c))
            .collect(),
        ..GenerateOptions::default()
    };
    let sources = Sources {
        kubernetes: vec![manifest],
        oci: Vec::new(),
    };
    policy_gen::generate(&sources, &options).unwrap().rego
}

/// The PERMISSION_DENIED message, or a panic naming what came instead.
fn denial<T: std::fmt::Debug>(result: Result<T, AgentError>) -> String {
    match result {
        Err(AgentError::Rpc {
            code: Some(ttrpc::Code::PERMISSION_DENIED),
            message,
            ..
        }) => message,
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
}

async fn run_to_output(client: &TtrpcAgentClient, id: &str) -> String {
    let mut out = client.open_stdio(id, "", StreamKind::Stdout).await.unwrap();
    client.start_container(id).await.unwrap();
    let mut text = String::new();
    out.read_to_string(&mut text).await.unwrap();
    text
}

/// An exec as CRI sends it: the container's process (as `pod_spec` makes
/// it) with other args.
fn exec_request(id: &str, exec: &str, args: &[&str]) -> agent::ExecProcessRequest {
    exec_request_with(id, exec, args, |_| {})
}

fn exec_request_with(
    id: &str,
    exec: &str,
    args: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> agent::ExecProcessRequest {
    let mut process = serde_json::json!({
        "args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "noNewPrivileges": true
    });
    edit(&mut process);
    let mut request = agent::ExecProcessRequest::new();
    request.container_id = id.into();
    request.exec_id = exec.into();
    request.process_json = serde_json::to_vec(&process).unwrap();
    request
}

/// A host agent with the pod's sandbox (pause) container `pause` created,
/// under the built-in policy (the generated one is about what follows);
/// returns its init's pid, which the pod's containers join.
async fn agent_with_sandbox() -> (HostAgent, TtrpcAgentClient, u32) {
    let (host, client) = HostAgent::start().await;
    let mut pause = spec(&["sleep", "120"], false);
    pause["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": "pod1",
    });
    let request = create_request("pause", &host.rootfs, &pause, false, false);
    let pid = client.create_container(request).await.unwrap();
    (host, client, pid)
}

/// A host agent under the policy generated from the pod (exec of `ls /`
/// listed), with the pod's sandbox and own container `app` created.
async fn agent_with_the_pods_policy_and_container() -> (HostAgent, TtrpcAgentClient, u32) {
    agent_with_policy_and_app(generated_from_pod(&["ls /"]), |_| {}).await
}

/// agent_with_sandbox, then `rego` in force and `app` (pod_spec edited by
/// `edit`) created; returns the sandbox's init pid.
async fn agent_with_policy_and_app(
    rego: String,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (HostAgent, TtrpcAgentClient, u32) {
    let (host, client, sandbox) = agent_with_sandbox().await;
    client.set_policy(rego).await.unwrap();
    let mut app = pod_spec(&["sh", "-c", "echo generated"], sandbox);
    edit(&mut app);
    let own = create_request("app", &host.rootfs, &app, false, false);
    client.create_container(own).await.unwrap();
    (host, client, sandbox)
}

/// Passed the policy: allowed, or refused by the agent for another reason
/// (a host agent makes no sandbox; an exec needs a started container).
fn passed_policy<T: std::fmt::Debug>(result: Result<T, AgentError>) {
    if let Err(e) = result {
        assert_ne!(e.code(), Some(ttrpc::Code::PERMISSION_DENIED), "{e}");
    }
}

#[tokio::test]
async fn pod_policy_allows_the_shims_sandbox_setup_and_refuses_an_extra_mount() {
    skip_unless_host_ready!();
    let (_host, client, _) = agent_with_the_pods_policy_and_container().await;
    let shims = cloister_shim::sandbox::setup_request("web");
    let mut extra = shims.clone();
    let mut disk = agent::GuestMount::new();
    disk.fstype = "ext4".into();
    disk.source = "/dev/vdb".into();
    disk.target = "/mnt".into();
    extra.mounts.push(disk);

    let shims = client.setup_sandbox(shims).await;
    let extra = client.setup_sandbox(extra).await;

    // The host agent refuses any set-up after the policy: it is no guest.
    assert_eq!(
        shims.unwrap_err().code(),
        Some(ttrpc::Code::FAILED_PRECONDITION)
    );
    assert_eq!(
        denial(extra),
        "SetupSandboxRequest denied by policy rule data.agent_policy.SetupSandboxRequest: \
         sandbox mount /mnt (ext4 from \"/dev/vdb\", options []) is not allowed"
    );
}

#[tokio::test]
async fn pod_policy_allows_limit_updates_of_its_own_containers_only() {
    skip_unless_host_ready!();
    let (_host, client, _) = agent_with_the_pods_policy_and_container().await;
    let limits = |id: &str| {
        let resources = serde_json::json!({"memory": {"limit": 268435456}, "pids": {"limit": 64}});
        (id.to_owned(), serde_json::to_vec(&resources).unwrap())
    };
    let (app, app_limits) = limits("app");
    let (ghost, ghost_limits) = limits("ghost");
    let block_io = serde_json::to_vec(&serde_json::json!({"blockIO": {"weight": 10}})).unwrap();
    let all_devices =
        serde_json::to_vec(&serde_json::json!({"devices": [{"allow": true, "access": "rwm"}]}))
            .unwrap();

    let allowed = client.update_container(&app, app_limits).await;
    let unknown = client.update_container(&ghost, ghost_limits).await;
    let block_io = client.update_container("app", block_io).await;
    let all_devices = client.update_container("app", all_devices).await;

    passed_policy(allowed);
    assert_eq!(
        denial(unknown),
        "UpdateContainerRequest denied by policy rule data.agent_policy.UpdateContainerRequest: \
         container \"ghost\" was not created by this agent"
    );
    assert!(
        denial(block_io).ends_with(": update of linux.resources.blockIO is not allowed"),
        "blockIO"
    );
    assert!(
        denial(all_devices).ends_with(": an update may not change the container's device rules"),
        "devices"
    );
}

#[tokio::test]
async fn pod_policy_exec_refuses_ld_preload_and_another_user() {
    skip_unless_host_ready!();
    let rego = generated_from(
        &POD_YAML.replace("runAsUser: 0", "runAsUser: 1000"),
        &["ls /"],
    );
    let (_host, client, _) = agent_with_policy_and_app(rego, |app| {
        app["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    })
    .await;
    let as_app =
        |p: &mut serde_json::Value| p["user"] = serde_json::json!({"uid": 1000, "gid": 1000});

    let own_user = client
        .exec_process(exec_request_with("app", "own", &["ls", "/"], as_app))
        .await;
    let preload = client
        .exec_process(exec_request_with("app", "preload", &["ls", "/"], |p| {
            as_app(p);
            p["env"] = serde_json::json!(["PATH=/bin", "LD_PRELOAD=/tmp/evil.so"]);
        }))
        .await;
    let as_root = client
        .exec_process(exec_request("app", "root", &["ls", "/"]))
        .await;

    passed_policy(own_user);
    assert_eq!(
        denial(preload),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec with environment variable \"LD_PRELOAD\" is not allowed"
    );
    assert_eq!(
        denial(as_root),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec as user 0:0 (groups []) is not allowed: the container runs as 1000:1000 (groups [])"
    );
}

#[tokio::test]
async fn pod_policy_allows_the_pods_own_requests_and_denies_changes() {
    skip_unless_host_ready!();
    // The pod's own container runs and its output can be read.
    let (host, client, sandbox) = agent_with_the_pods_policy_and_container().await;
    assert_eq!(run_to_output(&client, "app").await, "generated\n");
    let pod_spec = |args: &[&str]| pod_spec(args, sandbox);

    let changed = create_request(
        "changed",
        &host.rootfs,
        &pod_spec(&["sh", "-c", "cat /etc/passwd"]),
        false,
        false,
    );
    let mut with_admin = pod_spec(&["sh", "-c", "echo generated"]);
    with_admin["process"]["capabilities"]["bounding"]
        .as_array_mut()
        .unwrap()
        .push("CAP_SYS_ADMIN".into());
    let with_admin = create_request("admin", &host.rootfs, &with_admin, false, false);
    let mut with_hook = pod_spec(&["sh", "-c", "echo generated"]);
    with_hook["hooks"] =
        serde_json::json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "id"]}]});
    let with_hook = create_request("hook", &host.rootfs, &with_hook, false, false);
    let mut as_user = pod_spec(&["sh", "-c", "echo generated"]);
    as_user["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    let as_user = create_request("user", &host.rootfs, &as_user, false, false);
    let mut escalating = pod_spec(&["sh", "-c", "echo generated"]);
    escalating["process"]["noNewPrivileges"] = false.into();
    let escalating = create_request("nnp", &host.rootfs, &escalating, false, false);
    let mut without_mode = pod_spec(&["sh", "-c", "echo generated"]);
    without_mode["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    let without_mode = create_request("nomode", &host.rootfs, &without_mode, false, false);

    let changed = denial(client.create_container(changed).await);
    let with_admin = denial(client.create_container(with_admin).await);
    let without_mode = denial(client.create_container(without_mode).await);
    let with_hook = denial(client.create_container(with_hook).await);
    let as_user = denial(client.create_container(as_user).await);
    let escalating = denial(client.create_container(escalating).await);

    assert_eq!(
        changed,
        "CreateContainerRequest denied by policy rule data.agent_policy.CreateContainerRequest: \
         command [\"sh\", \"-c\", \"cat /etc/passwd\"] is not allowed for image \
         \"docker.io/library/busybox:1.36\""
    );
    assert!(
        with_admin.ends_with(": capability CAP_SYS_ADMIN is not allowed"),
        "{with_admin}"
    );
    assert!(
        without_mode.ends_with(": environment variable \"MODE\" is missing or changed"),
        "{without_mode}"
    );
    assert!(
        with_hook.ends_with(": OCI hooks are not allowed"),
        "{with_hook}"
    );
    assert!(as_user.ends_with(": user 1000 is not allowed"), "{as_user}");
    assert!(
        escalating.ends_with(": noNewPrivileges must be set"),
        "{escalating}"
    );
}

#[tokio::test]
async fn pod_policy_allows_listed_exec_only_and_cannot_be_replaced() {
    skip_unless_host_ready!();
    let (_host, client, _) = agent_with_the_pods_policy_and_container().await;

    let listed = client
        .exec_process(exec_request("app", "ls", &["ls", "/"]))
        .await;
    let other = client
        .exec_process(exec_request("app", "sh", &["sh"]))
        .await;
    let replaced = client.set_policy(base64_roundtrip(policy_gen::RULES)).await;

    passed_policy(listed);
    assert_eq!(
        denial(other),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec of [\"sh\"] is not allowed"
    );
    assert_eq!(
        denial(replaced),
        "SetPolicyRequest denied by policy rule data.agent_policy.SetPolicyRequest: \
         this pod's policy cannot be replaced"
    );
}

/// POD_YAML with a pod-level sysctl and the runtime's seccomp profile.
fn confined_pod_yaml() -> String {
    POD_YAML.replace(
        "spec:\n  containers:",
        "spec:\n  securityContext:\n    sysctls:\n    - name: kernel.shm_rmid_forced\n      \
         value: \"1\"\n    seccompProfile:\n      type: RuntimeDefault\n  containers:",
    )
}

/// pod_spec with the confined pod's sysctl and a profile that refuses
/// what it does not list, joining `sandbox`'s namespaces.
fn confined_pod_spec(args: &[&str], sandbox: u32) -> serde_json::Value {
    let mut spec = pod_spec(args, sandbox);
    spec["linux"]["sysctl"] = serde_json::json!({"kernel.shm_rmid_forced": "1"});
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]
    });
    spec
}

#[tokio::test]
async fn pod_policy_refuses_other_namespaces_sysctls_device_rules_and_no_seccomp() {
    skip_unless_host_ready!();
    // The pod's sysctl lands in the sandbox container's ipc namespace,
    // not this host's.
    let (host, client, sandbox_pid) = agent_with_sandbox().await;
    let args = ["sh", "-c", "echo generated"];
    client
        .set_policy(generated_from(&confined_pod_yaml(), &[]))
        .await
        .unwrap();
    let own = create_request(
        "app",
        &host.rootfs,
        &confined_pod_spec(&args, sandbox_pid),
        false,
        false,
    );
    let app_pid = client.create_container(own).await.unwrap();
    let variant = |id: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut spec = confined_pod_spec(&args, sandbox_pid);
        edit(&mut spec["linux"]);
        create_request(id, &host.rootfs, &spec, false, false)
    };
    let without_pid = variant("nopid", &|l| {
        l["namespaces"].as_array_mut().unwrap().remove(0);
    });
    let guest_pid = variant("guestpid", &|l| {
        l["namespaces"][0]["path"] = "/proc/1/ns/pid".into();
    });
    let guest_ipc = variant("guestipc", &|l| {
        l["namespaces"][1]["path"] = "/proc/1/ns/ipc".into();
    });
    let apps_uts = variant("apputs", &|l| {
        l["namespaces"][2]["path"] = format!("/proc/{app_pid}/ns/uts").into();
    });
    let changed_sysctl = variant("sysctl0", &|l| {
        l["sysctl"]["kernel.shm_rmid_forced"] = "0".into();
    });
    let extra_sysctl = variant("sysctlx", &|l| {
        l["sysctl"]["kernel.core_pattern"] = "|/bin/sh".into();
    });
    let all_devices = variant("devices", &|l| {
        l["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"allow": true, "type": "a", "access": "rwm"}));
    });
    let unconfined = variant("unconfined", &|l| {
        l.as_object_mut().unwrap().remove("seccomp");
    });

    let refusals = [
        (
            without_pid,
            "the pid namespace is missing: the manifest gives the container its own",
        ),
        (
            guest_pid,
            "namespace pid (path \"/proc/1/ns/pid\") is not allowed",
        ),
        (
            guest_ipc,
            "namespace ipc path \"/proc/1/ns/ipc\" is not the pod's sandbox container's: \
             its pid is no container's init",
        ),
        (
            apps_uts,
            &format!(
                "namespace uts path \"/proc/{app_pid}/ns/uts\" is not the pod's sandbox \
                 container's: it is container \"app\"'s"
            ),
        ),
        (
            changed_sysctl,
            "sysctl kernel.shm_rmid_forced=\"0\" is not allowed",
        ),
        (
            extra_sysctl,
            "sysctl kernel.core_pattern=\"|/bin/sh\" is not allowed",
        ),
        (
            all_devices,
            "device cgroup rule a *:* rwm (allow) is not allowed",
        ),
        (
            unconfined,
            "the container must have a seccomp profile whose default action refuses \
             (seccompProfile RuntimeDefault)",
        ),
    ];
    for (request, reason) in refusals {
        let id = request.container_id.clone();
        assert_eq!(
            denial(client.create_container(request).await),
            format!(
                "CreateContainerRequest denied by policy rule \
                 data.agent_policy.CreateContainerRequest: {reason}"
            ),
            "{id}"
        );
    }
}

fn base64_roundtrip(text: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(text);
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn oci_policy_pins_the_spec_and_stdio_read_can_be_refused() {
    skip_unless_host_ready!();
    let (host, client, sandbox) = agent_with_sandbox().await;
    let spec = pod_spec(&["sh", "-c", "echo exact"], sandbox);
    let options = GenerateOptions {
        allow_stdio_read: false,
        ..GenerateOptions::default()
    };
    let sources = Sources {
        kubernetes: Vec::new(),
        oci: vec![spec.clone()],
    };
    let generated = policy_gen::generate(&sources, &options).unwrap();
    client.set_policy(generated.rego).await.unwrap();
    let mut extra_mount = spec.clone();
    extra_mount["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind"]}));

    let exact = client
        .create_container(create_request("exact", &host.rootfs, &spec, false, false))
        .await;
    let mounted = client
        .create_container(create_request(
            "mounted",
            &host.rootfs,
            &extra_mount,
            false,
            false,
        ))
        .await;
    let stdout = client.open_stdio("exact", "", StreamKind::Stdout).await;

    assert!(exact.unwrap() > 0);
    assert!(
        denial(mounted).ends_with(": mount /host (bind from \"/\") is not allowed"),
        "mount"
    );
    let refused = stdout.unwrap_err().to_string();
    assert!(
        refused.contains(
            "ReadStreamRequest denied by policy rule data.agent_policy.ReadStreamRequest: \
             the host may not read stdout"
        ),
        "{refused}"
    );
}

#[test]
fn cli_prints_the_same_policy_and_its_base64() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pod.yaml");
    std::fs::write(&manifest, POD_YAML).unwrap();
    let cli = env!("CARGO_BIN_EXE_cloister");

    let rego = std::process::Command::new(cli)
        .args(["policy", "generate", "--exec", "ls /"])
        .arg(&manifest)
        .output()
        .unwrap();
    let encoded = std::process::Command::new(cli)
        .args(["policy", "generate", "--exec", "ls /", "--base64"])
        .arg(&manifest)
        .output()
        .unwrap();

    assert!(rego.status.success(), "{rego:?}");
    assert_eq!(
        String::from_utf8(rego.stdout.clone()).unwrap(),
        generated_from_pod(&["ls /"])
    );
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8(encoded.stdout).unwrap().trim())
        .unwrap();
    assert_eq!(decoded, rego.stdout);
}

/// In-process, with the agent's own engine and input conversion: what one
/// decision of a generated policy costs, allowed and denied (the denial
/// also evaluates deny_reasons). Printed, not a gate.
#[test]
fn generated_policy_decision_cost_is_printed() {
    use cloister_agent::policy::{PolicyEngine, PolicyRequest};
    let engine = PolicyEngine::from_rego(&generated_from_pod(&["ls /"])).unwrap();
    let rootfs = std::path::Path::new("/rootfs");
    let own = create_request(
        "app",
        rootfs,
        &pod_spec(&["sh", "-c", "echo generated"], 42),
        false,
        false,
    );
    let changed = create_request(
        "x",
        rootfs,
        &pod_spec(&["sh", "-c", "id"], 42),
        false,
        false,
    );
    // What the agent adds once it has resolved pid 42 to the sandbox.
    let pause = serde_json::json!({"container_id": "pause", "sandbox": true});
    let owners = serde_json::json!({"/proc/42/ns/ipc": pause, "/proc/42/ns/uts": pause});
    let rounds = 300u32;

    for (label, request, allowed) in [("allowed", &own, true), ("denied", &changed, false)] {
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            let mut input = request.policy_input().unwrap();
            input["namespace_owners"] = owners.clone();
            let decision = engine.decide("CreateContainerRequest", &input);
            assert_eq!(decision.is_ok(), allowed, "{decision:?}");
        }
        eprintln!(
            "generated policy, CreateContainerRequest {label}: {:?} per decision (input conversion + evaluation)",
            start.elapsed() / rounds
        );
    }
}
