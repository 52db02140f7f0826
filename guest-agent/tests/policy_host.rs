//! The agent API policy on real requests through the real agent (host
//! test mode; root only, each test prints SKIP otherwise): every RPC is
//! decided by its rule, each kind of restriction a stricter policy can
//! express allows what it should and denies the rest with
//! PERMISSION_DENIED naming the rule and the reason, and SetPolicy is
//! itself decided. (The cost of a decision is measured in
//! `policy::engine`'s unit tests.)

mod support;

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use support::*;
use ttrpc::Code;

/// A policy restricting every aspect the tests exercise: one image, two
/// commands, no bind mounts or /secret, no devices, no CAP_SYS_ADMIN, not
/// privileged, exec of `ls /` only, no reading stderr, no SetPolicy.
const STRICT: &str = r#"
package agent_policy

default CreateContainerRequest := false
CreateContainerRequest if {
	input.image == "docker.io/library/busybox:1.36"
	input.oci.process.args in allowed_commands
	every m in object.get(input.oci, "mounts", []) { mount_ok(m) }
	count(object.get(input.oci.linux, "devices", [])) == 0
	not "CAP_SYS_ADMIN" in input.oci.process.capabilities.bounding
	not privileged
}

allowed_commands := [["sh", "-c", "echo allowed"], ["sleep", "30"]]

mount_ok(m) if {
	m.type != "bind"
	m.destination != "/secret"
}

privileged if count(object.get(input.oci.linux, "maskedPaths", [])) == 0

deny_reasons contains sprintf("image %q is not allowed", [input.image]) if {
	input.oci
	input.image != "docker.io/library/busybox:1.36"
}
deny_reasons contains sprintf("command %v is not allowed", [input.oci.process.args]) if {
	not input.oci.process.args in allowed_commands
}
deny_reasons contains sprintf("mount %v is not allowed", [m.destination]) if {
	some m in input.oci.mounts
	not mount_ok(m)
}
deny_reasons contains sprintf("device %v is not allowed", [d.path]) if {
	some d in input.oci.linux.devices
}
deny_reasons contains "capability CAP_SYS_ADMIN is not allowed" if {
	"CAP_SYS_ADMIN" in input.oci.process.capabilities.bounding
}
deny_reasons contains "privileged containers are not allowed" if {
	input.oci
	privileged
}

default ExecProcessRequest := false
ExecProcessRequest if input.process.args == ["ls", "/"]
deny_reasons contains sprintf("exec of %v is not allowed", [input.process.args]) if {
	input.process.args != ["ls", "/"]
}

default ReadStreamRequest := false
ReadStreamRequest if input.stream == "stdout"
deny_reasons contains sprintf("the host may not read %v", [input.stream]) if {
	input.stream == "stderr"
}
default WriteStreamRequest := true

default SetPolicyRequest := false

default StartContainerRequest := true
default RemoveContainerRequest := true
default WaitProcessRequest := true
default SignalProcessRequest := true
default StatsContainerRequest := true
default HealthCheckRequest := true
"#;

const BUSYBOX: &str = "docker.io/library/busybox:1.36";

async fn set_policy(agent: &TestAgent, rego: &str) -> Result<(), ttrpc::Error> {
    let mut request = agent::SetPolicyRequest::new();
    request.policy = rego.into();
    agent.client.set_policy(ctx(), &request).await.map(drop)
}

fn image_spec(args: &[&str], image: &str) -> serde_json::Value {
    let mut spec = spec(args);
    spec["annotations"] = serde_json::json!({ "io.kubernetes.cri.image-name": image });
    spec
}

async fn create(
    agent: &TestAgent,
    id: &str,
    spec: &serde_json::Value,
) -> Result<u32, ttrpc::Error> {
    let request = create_request(id, &agent.rootfs, spec, stdio(false, true, true, false));
    agent
        .client
        .create_container(ctx(), &request)
        .await
        .map(|r| r.pid)
}

/// The denial's code and message, or a panic naming what came instead.
fn denial(result: Result<impl std::fmt::Debug, ttrpc::Error>) -> String {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(
                status.code(),
                Code::PERMISSION_DENIED,
                "{}",
                status.message()
            );
            status.message().to_owned()
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
}

async fn strict_agent() -> TestAgent {
    let agent = TestAgent::start().await;
    set_policy(&agent, STRICT).await.unwrap();
    agent
}

#[tokio::test]
async fn strict_policy_allows_its_image_and_command_and_denies_another_image() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;

    let pid = create(
        &agent,
        "ok",
        &image_spec(&["sh", "-c", "echo allowed"], BUSYBOX),
    )
    .await;
    let other = create(
        &agent,
        "other",
        &image_spec(&["sh", "-c", "echo allowed"], "docker.io/library/alpine:3"),
    )
    .await;

    assert!(pid.unwrap() > 0);
    assert_eq!(
        denial(other),
        "CreateContainerRequest denied by policy rule data.agent_policy.CreateContainerRequest: \
         image \"docker.io/library/alpine:3\" is not allowed"
    );
}

#[tokio::test]
async fn container_without_image_annotation_is_denied_by_an_image_rule() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;

    let result = create(&agent, "noimage", &spec(&["sh", "-c", "echo allowed"])).await;

    assert!(denial(result).contains("image \"\" is not allowed"));
}

#[tokio::test]
async fn changed_command_is_denied() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;

    let result = create(
        &agent,
        "cmd",
        &image_spec(&["sh", "-c", "cat /etc/shadow"], BUSYBOX),
    )
    .await;

    assert_eq!(
        denial(result),
        "CreateContainerRequest denied by policy rule data.agent_policy.CreateContainerRequest: \
         command [\"sh\", \"-c\", \"cat /etc/shadow\"] is not allowed"
    );
}

#[tokio::test]
async fn bind_mount_and_forbidden_destination_are_denied() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;
    let mut with_bind = image_spec(&["sleep", "30"], BUSYBOX);
    with_bind["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind"]}));
    let mut with_secret = image_spec(&["sleep", "30"], BUSYBOX);
    with_secret["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"destination": "/secret", "type": "tmpfs", "source": "tmpfs"}));

    let bind = create(&agent, "bind", &with_bind).await;
    let secret = create(&agent, "secret", &with_secret).await;

    assert!(denial(bind).ends_with("mount /host is not allowed"));
    assert!(denial(secret).ends_with("mount /secret is not allowed"));
}

#[tokio::test]
async fn device_capability_and_privileged_specs_are_denied() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;
    let mut with_device = image_spec(&["sleep", "30"], BUSYBOX);
    with_device["linux"]["devices"] = serde_json::json!([
        {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}
    ]);
    let mut with_cap = image_spec(&["sleep", "30"], BUSYBOX);
    with_cap["process"]["capabilities"]["bounding"]
        .as_array_mut()
        .unwrap()
        .push("CAP_SYS_ADMIN".into());
    let mut privileged = image_spec(&["sleep", "30"], BUSYBOX);
    privileged["linux"]["maskedPaths"] = serde_json::json!([]);

    let device = create(&agent, "dev", &with_device).await;
    let cap = create(&agent, "cap", &with_cap).await;
    let privileged = create(&agent, "priv", &privileged).await;

    assert!(denial(device).ends_with("device /dev/sda is not allowed"));
    assert!(denial(cap).ends_with("capability CAP_SYS_ADMIN is not allowed"));
    assert!(denial(privileged).ends_with("privileged containers are not allowed"));
}

fn exec_request(container: &str, exec: &str, args: &[&str]) -> agent::ExecProcessRequest {
    let mut request = agent::ExecProcessRequest::new();
    request.container_id = container.into();
    request.exec_id = exec.into();
    request.process_json = serde_json::to_vec(&serde_json::json!({
        "args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
    }))
    .unwrap();
    request.stdio = Some(stdio(false, false, false, false)).into();
    request
}

#[tokio::test]
async fn exec_is_allowed_only_for_the_listed_command() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;
    create(&agent, "box", &image_spec(&["sleep", "30"], BUSYBOX))
        .await
        .unwrap();
    let mut start = agent::StartContainerRequest::new();
    start.container_id = "box".into();
    agent.client.start_container(ctx(), &start).await.unwrap();

    let allowed = agent
        .client
        .exec_process(ctx(), &exec_request("box", "ls", &["ls", "/"]))
        .await;
    let denied = agent
        .client
        .exec_process(ctx(), &exec_request("box", "sh", &["sh"]))
        .await;

    assert!(allowed.unwrap().pid > 0);
    assert_eq!(
        denial(denied),
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec of [\"sh\"] is not allowed"
    );
}

#[tokio::test]
async fn host_may_read_stdout_but_not_stderr() {
    skip_unless_host_ready!();
    let agent = strict_agent().await;
    create(
        &agent,
        "io",
        &image_spec(&["sh", "-c", "echo allowed"], BUSYBOX),
    )
    .await
    .unwrap();

    let stdout = agent.attach("io", "", StreamKind::Stdout).await;
    let stderr = agent.attach("io", "", StreamKind::Stderr).await;

    assert!(stdout.is_ok(), "{:?}", stdout.err());
    assert_eq!(
        stderr.err().as_deref(),
        Some(
            "ReadStreamRequest denied by policy rule data.agent_policy.ReadStreamRequest: \
             the host may not read stderr"
        )
    );
}

#[tokio::test]
async fn set_policy_is_decided_by_the_policy_in_force_and_bad_text_is_invalid() {
    skip_unless_host_ready!();
    let agent = TestAgent::start().await;

    let broken = set_policy(&agent, "package agent_policy\nx := \n").await;
    let first = set_policy(&agent, STRICT).await;
    let second = set_policy(
        &agent,
        "package agent_policy\ndefault CreateContainerRequest := true\n",
    )
    .await;

    match broken {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(
                status.code(),
                Code::INVALID_ARGUMENT,
                "{}",
                status.message()
            );
            assert!(status
                .message()
                .starts_with("new policy refused: policy does not parse"));
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    first.unwrap();
    assert_eq!(
        denial(second),
        "SetPolicyRequest denied by policy rule data.agent_policy.SetPolicyRequest"
    );
}

#[tokio::test]
async fn every_rpc_is_decided_by_its_own_rule() {
    skip_unless_host_ready!();
    let agent = TestAgent::start().await;
    // No rules at all: every request is undefined, so denied.
    set_policy(&agent, "package agent_policy\n").await.unwrap();
    let c = &agent.client;
    let id = |s: &str| s.to_owned();

    let mut results: Vec<(&str, String)> = Vec::new();
    macro_rules! call {
        ($rule:literal, $call:expr) => {
            results.push(($rule, denial($call.await)));
        };
    }
    let mut create = agent::CreateContainerRequest::new();
    create.oci_spec_json = b"{}".to_vec();
    let mut update = agent::UpdateContainerRequest::new();
    update.resources_json = b"{}".to_vec();
    let mut exec = agent::ExecProcessRequest::new();
    exec.process_json = b"{}".to_vec();
    call!(
        "SetupSandboxRequest",
        c.setup_sandbox(ctx(), &agent::SetupSandboxRequest::new())
    );
    call!("CreateContainerRequest", c.create_container(ctx(), &create));
    call!(
        "StartContainerRequest",
        c.start_container(
            ctx(),
            &agent::StartContainerRequest {
                container_id: id("x"),
                ..Default::default()
            }
        )
    );
    call!(
        "RemoveContainerRequest",
        c.remove_container(ctx(), &agent::RemoveContainerRequest::new())
    );
    call!("ExecProcessRequest", c.exec_process(ctx(), &exec));
    call!(
        "SignalProcessRequest",
        c.signal_process(ctx(), &agent::SignalProcessRequest::new())
    );
    call!(
        "WaitProcessRequest",
        c.wait_process(ctx(), &agent::WaitProcessRequest::new())
    );
    call!(
        "PauseContainerRequest",
        c.pause_container(ctx(), &agent::PauseContainerRequest::new())
    );
    call!(
        "ResumeContainerRequest",
        c.resume_container(ctx(), &agent::ResumeContainerRequest::new())
    );
    call!("UpdateContainerRequest", c.update_container(ctx(), &update));
    call!(
        "ListProcessesRequest",
        c.list_processes(ctx(), &agent::ListProcessesRequest::new())
    );
    call!(
        "StatsContainerRequest",
        c.stats_container(ctx(), &agent::StatsContainerRequest::new())
    );
    call!(
        "ResizeTtyRequest",
        c.resize_tty(ctx(), &agent::ResizeTtyRequest::new())
    );
    call!(
        "CloseStdinRequest",
        c.close_stdin(ctx(), &agent::CloseStdinRequest::new())
    );
    call!(
        "UpdateInterfacesRequest",
        c.update_interfaces(ctx(), &agent::UpdateInterfacesRequest::new())
    );
    call!(
        "UpdateRoutesRequest",
        c.update_routes(ctx(), &agent::UpdateRoutesRequest::new())
    );
    call!(
        "GuestDetailsRequest",
        c.guest_details(ctx(), &agent::GuestDetailsRequest::new())
    );
    call!(
        "HealthCheckRequest",
        c.health_check(ctx(), &agent::HealthCheckRequest::new())
    );
    call!(
        "ShutdownRequest",
        c.shutdown(ctx(), &agent::ShutdownRequest::new())
    );
    call!(
        "SetPolicyRequest",
        c.set_policy(ctx(), &agent::SetPolicyRequest::new())
    );
    let events = async {
        let mut stream = c.events(ctx(), &agent::EventsRequest::new()).await?;
        stream.recv().await
    };
    call!("EventsRequest", events);
    let stdin = agent.attach("x", "", StreamKind::Stdin).await;

    for (rule, message) in &results {
        assert_eq!(
            message,
            &format!(
                "{rule} denied: policy rule data.agent_policy.{rule} is undefined for this \
                 input (the policy lacks the rule or its default)"
            )
        );
    }
    assert_eq!(results.len(), 21);
    assert!(stdin.unwrap_err().starts_with("WriteStreamRequest denied"));
}

#[tokio::test]
async fn failing_rule_denies_with_the_evaluation_error() {
    skip_unless_host_ready!();
    let agent = TestAgent::start().await;
    let policy =
        "package agent_policy\nStatsContainerRequest := 1 / count(input.container_id) > 0\n";
    set_policy(&agent, policy).await.unwrap();
    let mut request = agent::StatsContainerRequest::new();
    request.container_id = String::new();

    let message = denial(agent.client.stats_container(ctx(), &request).await);

    assert!(
        message.starts_with(
            "StatsContainerRequest denied: policy rule data.agent_policy.StatsContainerRequest"
        ),
        "{message}"
    );
}
