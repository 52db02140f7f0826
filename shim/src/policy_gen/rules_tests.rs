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
            "namespaces": container_namespaces(),
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "resources": {"devices": device_rules()}
        }
    })
}

/// A container's namespaces as CRI names them and the shim passes them
/// on: its own pid and mount namespaces, the sandbox container's (its
/// init is guest pid 42, SANDBOX_PID) ipc and uts; CRI's network
/// namespace path is dropped.
fn container_namespaces() -> Value {
    json!([
        {"type": "pid"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "mount"}
    ])
}

/// The sandbox (pause) container as containerd 2 makes it: its own
/// namespaces, its own sysctls, deny-all device rules.
fn pause_spec() -> Value {
    json!({
        "ociVersion": "1.1.0",
        "annotations": {"io.kubernetes.cri.container-type": "sandbox"},
        "hostname": "web",
        "process": {
            "args": ["/pause"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_CHOWN"]}
        },
        "root": {"path": "rootfs", "readonly": true},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "sysctl": {
                "net.ipv4.ip_unprivileged_port_start": "0",
                "net.ipv4.ping_group_range": "0 2147483647"
            },
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "resources": {"devices": [{"allow": false, "access": "rwm"}]}
        }
    })
}

/// The guest pid of the sandbox container's init (what CRI's namespace
/// paths name).
const SANDBOX_PID: i32 = 42;
/// The guest pid of the workload container `app`'s init.
const APP_PID: i32 = 43;

/// The agent's policy store under the policy generated from `pod_yaml`,
/// with the pod's sandbox container created (its init is SANDBOX_PID).
fn policy_from(pod_yaml: &str, options: GenerateOptions) -> AgentPolicy {
    let sources = Sources {
        kubernetes: vec![serde_yaml::from_str(pod_yaml).unwrap()],
        oci: Vec::new(),
    };
    let generated = generate(&sources, &options).unwrap();
    let policy = AgentPolicy::built_in().unwrap();
    // Created under the built-in policy: these tests are about the
    // requests after it, and a hostPID/hostIPC pod's sandbox differs.
    let mut pause = agent::CreateContainerRequest::new();
    pause.container_id = "pause".into();
    pause.oci_spec_json = serde_json::to_vec(&pause_spec()).unwrap();
    let created = policy.check_create(&pause).unwrap();
    policy.remember_created("pause", created, SANDBOX_PID);
    let mut set = agent::SetPolicyRequest::new();
    set.policy = generated.rego;
    policy.set_from_host(&set).unwrap();
    policy
}

/// The CreateContainer decision on `spec`.
fn create(policy: &AgentPolicy, spec: &Value) -> Result<(), PolicyDenial> {
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = "c".into();
    request.oci_spec_json = serde_json::to_vec(spec).unwrap();
    policy.check(&request)
}

/// The agent's policy store under the policy generated from POD, with the
/// manifest's container `app` created.
fn policy_with_app(options: GenerateOptions) -> AgentPolicy {
    let policy = policy_from(POD, options);
    let mut create = agent::CreateContainerRequest::new();
    create.container_id = "app".into();
    create.oci_spec_json = serde_json::to_vec(&app_spec()).unwrap();
    let created = policy.check_create(&create).unwrap();
    policy.remember_created("app", created, APP_PID);
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

/// `spec` with `edit` applied to its linux section.
fn edited(mut spec: Value, edit: impl FnOnce(&mut Value)) -> Value {
    edit(&mut spec["linux"]);
    spec
}

const CREATE_DENIED: &str =
    "CreateContainerRequest denied by policy rule data.agent_policy.CreateContainerRequest: ";

#[test]
fn namespaces_must_be_the_ones_cri_gives_a_pod_container() {
    let policy = policy_from(POD, GenerateOptions::default());
    let pid_shared_with_guest = edited(app_spec(), |l| {
        l["namespaces"].as_array_mut().unwrap().remove(0);
    });
    let guest_pid_namespace = edited(app_spec(), |l| {
        l["namespaces"][0]["path"] = "/proc/1/ns/pid".into();
    });
    let other_path = edited(app_spec(), |l| {
        l["namespaces"][1]["path"] = "/run/netns/other".into();
    });
    let network_by_path = edited(app_spec(), |l| {
        l["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "network", "path": "/var/run/netns/cni-1"}));
    });
    let twice = edited(app_spec(), |l| {
        l["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "pid"}));
    });
    let with_cgroup = edited(app_spec(), |l| {
        l["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "cgroup"}));
    });

    assert_eq!(create(&policy, &app_spec()), Ok(()));
    assert_eq!(create(&policy, &with_cgroup), Ok(()));
    assert_eq!(create(&policy, &pause_spec()), Ok(()));
    assert_eq!(
        denied(create(&policy, &pid_shared_with_guest)),
        format!(
            "{CREATE_DENIED}the pid namespace is missing: the manifest gives the container its own"
        )
    );
    assert_eq!(
        denied(create(&policy, &guest_pid_namespace)),
        format!("{CREATE_DENIED}namespace pid (path \"/proc/1/ns/pid\") is not allowed")
    );
    assert!(
        denied(create(&policy, &other_path))
            .ends_with(": namespace ipc (path \"/run/netns/other\") is not allowed"),
        "ipc path"
    );
    assert!(
        denied(create(&policy, &network_by_path))
            .ends_with(": namespace network (path \"/var/run/netns/cni-1\") is not allowed"),
        "network"
    );
    assert!(
        denied(create(&policy, &twice)).contains(": namespace pid is listed twice"),
        "twice"
    );
}

#[test]
fn joined_namespaces_must_be_the_sandbox_containers() {
    let policy = policy_with_app(GenerateOptions::default());
    let guest_ipc = edited(app_spec(), |l| {
        l["namespaces"][1]["path"] = "/proc/1/ns/ipc".into();
    });
    let apps_uts = edited(app_spec(), |l| {
        l["namespaces"][2]["path"] = format!("/proc/{APP_PID}/ns/uts").into();
    });
    let unknown_pid = edited(app_spec(), |l| {
        l["namespaces"][1]["path"] = "/proc/4242/ns/ipc".into();
    });

    assert_eq!(create(&policy, &app_spec()), Ok(()));
    assert_eq!(
        denied(create(&policy, &guest_ipc)),
        format!(
            "{CREATE_DENIED}namespace ipc path \"/proc/1/ns/ipc\" is not the pod's sandbox \
             container's: its pid is no container's init"
        )
    );
    assert_eq!(
        denied(create(&policy, &apps_uts)),
        format!(
            "{CREATE_DENIED}namespace uts path \"/proc/43/ns/uts\" is not the pod's sandbox \
             container's: it is container \"app\"'s"
        )
    );
    assert!(
        denied(create(&policy, &unknown_pid)).ends_with("its pid is no container's init"),
        "unknown pid"
    );
    // Once the sandbox container is removed its pid names nothing.
    policy.forget_created("pause");
    assert!(
        denied(create(&policy, &app_spec())).contains(
            "namespace ipc path \"/proc/42/ns/ipc\" is not the pod's sandbox container's"
        ),
        "after removal"
    );
}

#[test]
fn host_namespaces_in_the_manifest_let_the_sandbox_container_go_without() {
    let host_pod = POD.replace("spec:\n", "spec:\n  hostPID: true\n  hostIPC: true\n");
    let host = policy_from(&host_pod, GenerateOptions::default());
    let normal = policy_from(POD, GenerateOptions::default());
    let sandbox_on_the_guest = edited(pause_spec(), |l| {
        l["namespaces"] = json!([{"type": "uts"}, {"type": "mount"}]);
    });

    assert_eq!(create(&host, &sandbox_on_the_guest), Ok(()));
    // What CRI sends for hostPID and hostIPC: no pid or ipc namespace of
    // the sandbox's own.
    assert_eq!(
        denied(create(&host, &pause_spec())),
        format!(
            "{CREATE_DENIED}namespace ipc (new) is not allowed; namespace pid (new) is not allowed"
        )
    );
    let refused = denied(create(&normal, &sandbox_on_the_guest));
    assert!(
        refused.contains("the ipc namespace is missing: the manifest gives the container its own")
            && refused.contains("the pid namespace is missing"),
        "{refused}"
    );
}

const SYSCTL_POD: &str = r#"
kind: Pod
metadata:
  name: web
spec:
  securityContext:
    sysctls:
    - name: kernel.shm_rmid_forced
      value: "1"
    seccompProfile:
      type: RuntimeDefault
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

/// containerd's default seccomp profile, abridged: a list allowed, the
/// rest refused.
fn runtime_default_profile() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]
    })
}

fn confined(spec: Value) -> Value {
    edited(spec, |l| l["seccomp"] = runtime_default_profile())
}

#[test]
fn sysctls_are_the_manifests_with_its_values() {
    let policy = policy_from(SYSCTL_POD, GenerateOptions::default());
    let with_pods = |value: &str| {
        edited(confined(app_spec()), |l| {
            l["sysctl"] = json!({"kernel.shm_rmid_forced": value});
        })
    };
    let pause_with_pods = edited(confined(pause_spec()), |l| {
        l["sysctl"]["kernel.shm_rmid_forced"] = "1".into();
    });
    let extra = edited(with_pods("1"), |l| {
        l["sysctl"]["kernel.core_pattern"] = "|/bin/sh".into();
    });
    let normal = policy_from(POD, GenerateOptions::default());

    assert_eq!(create(&policy, &with_pods("1")), Ok(()));
    assert_eq!(create(&policy, &pause_with_pods), Ok(()));
    assert_eq!(
        denied(create(&policy, &with_pods("0"))),
        format!("{CREATE_DENIED}sysctl kernel.shm_rmid_forced=\"0\" is not allowed")
    );
    assert_eq!(
        denied(create(&policy, &extra)),
        format!("{CREATE_DENIED}sysctl kernel.core_pattern=\"|/bin/sh\" is not allowed")
    );
    // containerd's own sysctls are the sandbox container's, not others'.
    let app_with_containerds = edited(app_spec(), |l| {
        l["sysctl"] = pause_spec()["linux"]["sysctl"].clone();
    });
    assert!(
        denied(create(&normal, &app_with_containerds))
            .contains(": sysctl net.ipv4.ip_unprivileged_port_start=\"0\" is not allowed"),
        "containerd's sysctls on a workload container"
    );
}

#[test]
fn device_rules_and_devices_are_only_the_defaults() {
    let policy = policy_from(POD, GenerateOptions::default());
    let all_devices = edited(app_spec(), |l| {
        l["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(json!({"allow": true, "type": "a", "access": "rwm"}));
    });
    let disk = edited(app_spec(), |l| {
        l["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(json!({"allow": true, "type": "b", "major": 253, "minor": 0, "access": "rw"}));
    });
    let no_rules = edited(app_spec(), |l| l["resources"] = json!({}));
    let node = edited(app_spec(), |l| {
        l["devices"] = json!([{"path": "/dev/vda", "type": "b", "major": 253, "minor": 0}]);
    });

    assert_eq!(create(&policy, &no_rules), Ok(()));
    assert_eq!(
        denied(create(&policy, &all_devices)),
        format!("{CREATE_DENIED}device cgroup rule a *:* rwm (allow) is not allowed")
    );
    assert_eq!(
        denied(create(&policy, &disk)),
        format!("{CREATE_DENIED}device cgroup rule b 253:0 rw (allow) is not allowed")
    );
    assert_eq!(
        denied(create(&policy, &node)),
        format!("{CREATE_DENIED}device /dev/vda is not allowed")
    );
}

#[test]
fn runtime_default_seccomp_needs_a_refusing_profile() {
    let policy = policy_from(SYSCTL_POD, GenerateOptions::default());
    let with_pods = |spec: Value| {
        edited(spec, |l| {
            l["sysctl"] = json!({"kernel.shm_rmid_forced": "1"});
        })
    };
    let allow_all = edited(with_pods(app_spec()), |l| {
        l["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"});
    });
    let unconfined_pod = SYSCTL_POD.replace("RuntimeDefault", "Unconfined");
    let unconfined = policy_from(&unconfined_pod, GenerateOptions::default());

    assert_eq!(create(&policy, &confined(with_pods(app_spec()))), Ok(()));
    assert_eq!(
        denied(create(&policy, &with_pods(app_spec()))),
        format!(
            "{CREATE_DENIED}the container must have a seccomp profile whose default action \
             refuses (seccompProfile RuntimeDefault)"
        )
    );
    assert!(
        denied(create(&policy, &allow_all)).ends_with("(seccompProfile RuntimeDefault)"),
        "allow-all profile"
    );
    assert_eq!(create(&unconfined, &with_pods(app_spec())), Ok(()));
}

#[test]
fn allow_env_patterns_match_whole_names() {
    let policy = policy_from(
        POD,
        GenerateOptions {
            allow_env: vec!["PRE".into(), "LANG|LC_.*".into()],
            ..GenerateOptions::default()
        },
    );
    let with_env = |extra: &str| {
        let mut spec = app_spec();
        spec["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!(extra));
        spec
    };

    assert_eq!(create(&policy, &with_env("PRE=1")), Ok(()));
    assert_eq!(create(&policy, &with_env("LANG=C")), Ok(()));
    assert_eq!(create(&policy, &with_env("LC_ALL=C")), Ok(()));
    // Unanchored, "PRE" would have let in LD_PRELOAD.
    assert!(create(&policy, &with_env("LD_PRELOAD=/tmp/x.so")).is_err());
    assert!(create(&policy, &with_env("XLANG=C")).is_err());
}
