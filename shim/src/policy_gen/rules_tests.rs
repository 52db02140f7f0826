//! The fixed rules on the requests the shim and containerd send, decided
//! in-process by the agent's own policy store (as the agent does: the
//! exec and update inputs carry how the named container was created).
//! Needs no root; `shim/tests/policy_generate.rs` repeats the main cases
//! through a running agent.

use cloister_agent::policy::{AgentPolicy, PolicyDenial};
use cloister_protocol::agent;
use serde_json::{json, Value};

use super::data::ExecUser;
use super::{generate, GenerateOptions, Sources};

const POD: &str = r#"
kind: Pod
metadata:
  name: web
spec:
  containers:
  - name: app
    image: busybox:1.36
    command: ["sleep", "3600"]
    env:
    - name: MODE
      value: prod
    securityContext:
      runAsUser: 1000
      allowPrivilegeEscalation: false
      capabilities:
        drop: ["ALL"]
        add: ["NET_BIND_SERVICE"]
"#;

/// containerd's device rules for a container: deny all, allow the basics.
fn device_rules() -> Value {
    json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"}
    ])
}

/// The spec CRI sends for the manifest's container.
fn app_spec() -> Value {
    json!({
        "ociVersion": "1.1.0",
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"
        },
        "process": {
            "args": ["sleep", "3600"],
            "env": ["PATH=/bin", "HOSTNAME=web", "MODE=prod"],
            "cwd": "/",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [1000]},
            "capabilities": {"bounding": ["CAP_NET_BIND_SERVICE"], "permitted": ["CAP_NET_BIND_SERVICE"]},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "resources": {"devices": device_rules()}
        }
    })
}

/// The agent's policy store under the policy generated from POD, with the
/// manifest's container `app` created.
fn policy_with_app(options: GenerateOptions) -> AgentPolicy {
    let sources = Sources {
        kubernetes: vec![serde_yaml::from_str(POD).unwrap()],
        oci: Vec::new(),
    };
    let generated = generate(&sources, &options).unwrap();
    let policy = AgentPolicy::built_in().unwrap();
    let mut set = agent::SetPolicyRequest::new();
    set.policy = generated.rego;
    policy.set_from_host(&set).unwrap();
    let mut create = agent::CreateContainerRequest::new();
    create.container_id = "app".into();
    create.oci_spec_json = serde_json::to_vec(&app_spec()).unwrap();
    let created = policy.check_create(&create).unwrap();
    policy.remember_created("app", created);
    policy
}

fn exec_options() -> GenerateOptions {
    GenerateOptions {
        exec_commands: vec![vec!["ls".into(), "/".into()]],
        ..GenerateOptions::default()
    }
}

/// The denial's message, or a panic saying it was allowed.
fn denied(result: Result<(), PolicyDenial>) -> String {
    result.expect_err("allowed").to_string()
}

fn setup(edit: impl FnOnce(&mut agent::SetupSandboxRequest)) -> agent::SetupSandboxRequest {
    let mut request = crate::sandbox::setup_request("web");
    edit(&mut request);
    request
}

#[test]
fn sandbox_setup_allows_what_the_shim_sends_and_refuses_more() {
    let policy = policy_with_app(GenerateOptions::default());
    let mut block = agent::GuestMount::new();
    block.fstype = "ext4".into();
    block.source = "/dev/vdb".into();
    block.target = "/mnt".into();

    let shims = policy.check(&setup(|_| {}));
    let confidential_sharing_nothing = policy.check(&setup(|r| r.mounts.clear()));
    let extra_mount = policy.check(&setup(|r| r.mounts.push(block)));
    let twice = policy.check(&setup(|r| r.mounts.push(r.mounts[0].clone())));
    let sysctl = policy.check(&setup(|r| {
        r.sysctls
            .insert("kernel.core_pattern".into(), "|/bin/sh".into());
    }));
    let hostname = policy.check(&setup(|r| r.hostname = "other".into()));
    let dns = policy.check(&setup(|r| {
        let mut dns = agent::Dns::new();
        dns.nameservers.push("10.0.0.1".into());
        r.dns = Some(dns).into();
    }));

    assert_eq!(shims, Ok(()));
    assert_eq!(confidential_sharing_nothing, Ok(()));
    assert_eq!(
        denied(extra_mount),
        "SetupSandboxRequest denied by policy rule data.agent_policy.SetupSandboxRequest: \
         sandbox mount /mnt (ext4 from \"/dev/vdb\", options []) is not allowed"
    );
    assert!(
        denied(twice).ends_with(": sandbox mount target /run/cloister/shared is given twice"),
        "twice"
    );
    assert!(
        denied(sysctl).ends_with(": sysctl kernel.core_pattern=\"|/bin/sh\" is not allowed"),
        "sysctl"
    );
    assert!(
        denied(hostname).ends_with(": host name \"other\" is not allowed"),
        "hostname"
    );
    let dns = denied(dns);
    assert!(
        dns.contains(": DNS settings {") && dns.ends_with("} are not allowed"),
        "{dns}"
    );
}

fn update(id: &str, resources: Value) -> agent::UpdateContainerRequest {
    let mut request = agent::UpdateContainerRequest::new();
    request.container_id = id.into();
    request.resources_json = serde_json::to_vec(&resources).unwrap();
    request
}

#[test]
fn update_allows_limits_of_a_created_container_only() {
    let policy = policy_with_app(GenerateOptions::default());
    // What containerd sends for `crictl update --memory … --cpu-quota …`:
    // the container's whole linux.resources, device rules included.
    let limits = json!({
        "memory": {"limit": 268435456},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000},
        "unified": {"memory.oom.group": "1"},
        "devices": device_rules()
    });

    let allowed = policy.check(&update("app", limits.clone()));
    let without_devices = policy.check(&update("app", json!({"pids": {"limit": 64}})));
    let unknown = policy.check(&update("ghost", limits));
    let all_devices = policy.check(&update(
        "app",
        json!({"devices": [{"allow": true, "access": "rwm"}]}),
    ));
    let procs = policy.check(&update("app", json!({"unified": {"cgroup.procs": "1"}})));
    let block_io = policy.check(&update("app", json!({"blockIO": {"weight": 10}})));

    assert_eq!(allowed, Ok(()));
    assert_eq!(without_devices, Ok(()));
    assert_eq!(
        denied(unknown),
        "UpdateContainerRequest denied by policy rule data.agent_policy.UpdateContainerRequest: \
         container \"ghost\" was not created by this agent"
    );
    assert!(
        denied(all_devices).ends_with(": an update may not change the container's device rules"),
        "devices"
    );
    assert!(
        denied(procs).ends_with(": update of cgroup file \"cgroup.procs\" is not allowed"),
        "procs"
    );
    assert!(
        denied(block_io).ends_with(": update of linux.resources.blockIO is not allowed"),
        "blockIO"
    );
}

/// An exec of `args` as CRI sends it: the container's own process with
/// other args, then `edit`.
fn exec(id: &str, args: &[&str], edit: impl FnOnce(&mut Value)) -> agent::ExecProcessRequest {
    let mut process = app_spec()["process"].clone();
    process["args"] = json!(args);
    edit(&mut process);
    let mut request = agent::ExecProcessRequest::new();
    request.container_id = id.into();
    request.exec_id = "e".into();
    request.process_json = serde_json::to_vec(&process).unwrap();
    request
}

fn push_env(process: &mut Value, entry: &str) {
    process["env"].as_array_mut().unwrap().push(entry.into());
}

#[test]
fn exec_keeps_the_containers_environment_user_and_capabilities() {
    let policy = policy_with_app(exec_options());

    let as_cri_sends = policy.check(&exec("app", &["ls", "/"], |_| {}));
    let preload = policy.check(&exec("app", &["ls", "/"], |p| {
        push_env(p, "LD_PRELOAD=/tmp/evil.so")
    }));
    let pattern_named = policy.check(&exec("app", &["ls", "/"], |p| push_env(p, "TERM=xterm")));
    let as_root = policy.check(&exec("app", &["ls", "/"], |p| {
        p["user"] = json!({"uid": 0, "gid": 0})
    }));
    let extra_group = policy.check(&exec("app", &["ls", "/"], |p| {
        p["user"]["additionalGids"] = json!([1000, 0])
    }));
    let admin = policy.check(&exec("app", &["ls", "/"], |p| {
        p["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"])
    }));
    let escalating = policy.check(&exec("app", &["ls", "/"], |p| {
        p["noNewPrivileges"] = false.into()
    }));
    let unknown = policy.check(&exec("ghost", &["ls", "/"], |_| {}));

    assert_eq!(as_cri_sends, Ok(()));
    assert_eq!(pattern_named, Ok(()));
    assert_eq!(
        denied(preload),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec with environment variable \"LD_PRELOAD\" is not allowed"
    );
    assert_eq!(
        denied(as_root),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec as user 0:0 (groups []) is not allowed: the container runs as 1000:1000 \
         (groups [1000])"
    );
    assert!(
        denied(extra_group).ends_with("(groups [1000])"),
        "extra group"
    );
    assert!(
        denied(admin).ends_with(": exec with capability CAP_SYS_ADMIN is not allowed"),
        "admin"
    );
    assert!(
        denied(escalating).ends_with(": exec without noNewPrivileges is not allowed"),
        "nnp"
    );
    assert_eq!(
        denied(unknown),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         container \"ghost\" was not created by this agent"
    );
}

#[test]
fn exec_user_option_grants_that_user_in_every_container() {
    let options = GenerateOptions {
        exec_users: vec![ExecUser { uid: 0, gid: 0 }],
        ..exec_options()
    };
    let policy = policy_with_app(options);

    let as_root = policy.check(&exec("app", &["ls", "/"], |p| {
        p["user"] = json!({"uid": 0, "gid": 0})
    }));
    let root_with_other_gid = policy.check(&exec("app", &["ls", "/"], |p| {
        p["user"] = json!({"uid": 0, "gid": 5})
    }));

    assert_eq!(as_root, Ok(()));
    assert!(
        denied(root_with_other_gid).contains(": exec as user 0:5 (groups []) is not allowed"),
        "gid"
    );
}
