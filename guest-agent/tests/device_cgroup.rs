//! Host integration tests of the cgroup v2 device program: the real agent
//! runs busybox containers whose `linux.resources.devices` decide which
//! device nodes they may open. Root only, and only where cgroup device
//! programs load (each test prints SKIP with the reason otherwise).
//!
//! The kernel checks the device cgroup before the driver's open, so a node
//! with an unassigned number (c 240:0, "local/experimental use") tells the
//! two apart without any driver: refused by the program → "Operation not
//! permitted", let through → "No such device or address" from the driver
//! lookup. /dev/kmsg (c 1:11) opened write-only needs no capability.

mod support;

use std::os::fd::AsFd;

use cloister_agent::device_filter::kernel;
use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use support::*;

const DENIED: &str = "Operation not permitted";
const PASSED_TO_DRIVER: &str = "No such device or address";

/// Makes the nodes, then tries each open in its own subshell so one failure
/// does not end the script.
const PROBE: &str = "echo x > /dev/null && echo null=ok; \
    head -c 3 /dev/zero | wc -c; \
    mknod /dev/k c 1 11 && echo mknod=ok; \
    mknod /dev/x c 240 0; \
    (: > /dev/k) 2>&1; echo kmsg_write=$?; \
    (: < /dev/x) 2>&1; echo x_read=$?; \
    (: > /dev/x) 2>&1; echo x_write=$?";

async fn ready() -> Option<TestAgent> {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIP: {reason}");
        return None;
    }
    if let Some(reason) = kernel::probe() {
        eprintln!("SKIP: cgroup device programs cannot be loaded here: {reason}");
        return None;
    }
    let agent = TestAgent::start().await;
    if agent.cgroup_root.is_none() {
        eprintln!("SKIP: no cgroup v2 mount on this host");
        return None;
    }
    Some(agent)
}

fn spec_with_devices(args: &[&str], devices: serde_json::Value) -> serde_json::Value {
    let mut s = spec(args);
    s["linux"]["resources"] = serde_json::json!({ "devices": devices });
    s
}

/// Runs `spec` to completion: (stdout with stderr merged by the script,
/// exit status).
async fn run(agent: &TestAgent, id: &str, spec: &serde_json::Value) -> (String, u32) {
    let request = create_request(id, &agent.rootfs, spec, stdio(false, true, false, false));
    agent
        .client
        .create_container(ctx(), &request)
        .await
        .map_err(|e| format!("{}\n{}", error_text(&e), agent.log()))
        .unwrap();
    let out = agent.attach(id, "", StreamKind::Stdout).await.unwrap();
    let mut start = agent::StartContainerRequest::new();
    start.container_id = id.into();
    agent.client.start_container(ctx(), &start).await.unwrap();
    let out = String::from_utf8_lossy(&read_all(out).await).into_owned();
    eprintln!("--- {id}:\n{out}");
    let status = wait(agent, id, "").await;
    remove(agent, id).await;
    (out, status)
}

async fn wait(agent: &TestAgent, id: &str, exec_id: &str) -> u32 {
    let mut request = agent::WaitProcessRequest::new();
    request.container_id = id.into();
    request.exec_id = exec_id.into();
    agent
        .client
        .wait_process(ctx(), &request)
        .await
        .unwrap()
        .exit_status
}

async fn remove(agent: &TestAgent, id: &str) {
    let mut request = agent::RemoveContainerRequest::new();
    request.container_id = id.into();
    request.force = true;
    agent
        .client
        .remove_container(ctx(), &request)
        .await
        .unwrap();
}

/// Runs `script` as an exec in container `id`; its output.
async fn exec_script(agent: &TestAgent, id: &str, exec_id: &str, script: &str) -> String {
    let mut request = agent::ExecProcessRequest::new();
    request.container_id = id.into();
    request.exec_id = exec_id.into();
    request.process_json = serde_json::to_vec(&spec(&["sh", "-c", script])["process"]).unwrap();
    request.stdio = Some(stdio(false, true, false, false)).into();
    agent
        .client
        .exec_process(ctx(), &request)
        .await
        .map_err(|e| error_text(&e))
        .unwrap();
    let out = read_all(agent.attach(id, exec_id, StreamKind::Stdout).await.unwrap()).await;
    wait(agent, id, exec_id).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn update_devices(
    agent: &TestAgent,
    id: &str,
    devices: serde_json::Value,
) -> Result<(), String> {
    let mut update = agent::UpdateContainerRequest::new();
    update.container_id = id.into();
    update.resources_json = serde_json::to_vec(&serde_json::json!({ "devices": devices })).unwrap();
    agent
        .client
        .update_container(ctx(), &update)
        .await
        .map(drop)
        .map_err(|e| error_text(&e))
}

fn attached_programs(agent: &TestAgent, id: &str) -> usize {
    let dir = std::fs::File::open(agent.cgroup_dir(id).expect("container cgroup")).unwrap();
    kernel::attached_device_programs(dir.as_fd()).unwrap().len()
}

/// The line of `out` about `what` (the open's error, if any, precedes it).
fn outcome<'a>(out: &'a str, what: &str) -> &'a str {
    let lines: Vec<&str> = out.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(&format!("{what}=")))
        .unwrap_or_else(|| panic!("no {what}= in {out}"));
    if lines[at].ends_with("=0") || at == 0 {
        "ok"
    } else {
        lines[at - 1]
    }
}

#[tokio::test]
async fn deny_all_spec_refuses_unlisted_devices_and_keeps_defaults() {
    let Some(agent) = ready().await else { return };
    let s = spec_with_devices(
        &["sh", "-c", PROBE],
        serde_json::json!([{ "allow": false, "access": "rwm" }]),
    );
    let (out, _) = run(&agent, "denyall", &s).await;
    assert!(out.contains("null=ok\n3\nmknod=ok\n"), "{out}");
    assert!(outcome(&out, "kmsg_write").contains(DENIED), "{out}");
    assert!(outcome(&out, "x_read").contains(DENIED), "{out}");
    assert!(outcome(&out, "x_write").contains(DENIED), "{out}");
}

#[tokio::test]
async fn spec_without_device_rules_gets_runc_defaults_only() {
    let Some(agent) = ready().await else { return };
    let (out, _) = run(&agent, "norules", &spec(&["sh", "-c", PROBE])).await;
    assert!(out.contains("null=ok\n3\nmknod=ok\n"), "{out}");
    assert!(outcome(&out, "x_read").contains(DENIED), "{out}");
}

#[tokio::test]
async fn allow_rules_grant_exactly_their_access() {
    let Some(agent) = ready().await else { return };
    let s = spec_with_devices(
        &["sh", "-c", PROBE],
        serde_json::json!([
            { "allow": false, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "w" },
            { "allow": true, "type": "c", "major": 240, "access": "r" }
        ]),
    );
    let (out, _) = run(&agent, "allow", &s).await;
    assert_eq!(outcome(&out, "kmsg_write"), "ok", "{out}");
    assert!(outcome(&out, "x_read").contains(PASSED_TO_DRIVER), "{out}");
    assert!(outcome(&out, "x_write").contains(DENIED), "{out}");
}

#[tokio::test]
async fn later_deny_rule_wins_over_earlier_allow_all() {
    let Some(agent) = ready().await else { return };
    let s = spec_with_devices(
        &["sh", "-c", PROBE],
        serde_json::json!([
            { "allow": true, "access": "rwm" },
            { "allow": false, "type": "c", "major": 240, "minor": 0, "access": "w" }
        ]),
    );
    let (out, _) = run(&agent, "allowall", &s).await;
    assert_eq!(outcome(&out, "kmsg_write"), "ok", "{out}");
    assert!(outcome(&out, "x_read").contains(PASSED_TO_DRIVER), "{out}");
    assert!(outcome(&out, "x_write").contains(DENIED), "{out}");
}

#[tokio::test]
async fn update_container_replaces_the_device_program() {
    let Some(agent) = ready().await else { return };
    let s = spec_with_devices(
        &["sleep", "1000"],
        serde_json::json!([{ "allow": false, "access": "rwm" }]),
    );
    let request = create_request("upd", &agent.rootfs, &s, stdio(false, false, false, false));
    agent
        .client
        .create_container(ctx(), &request)
        .await
        .unwrap();
    let mut start = agent::StartContainerRequest::new();
    start.container_id = "upd".into();
    agent.client.start_container(ctx(), &start).await.unwrap();
    assert_eq!(attached_programs(&agent, "upd"), 1);

    let probe = "(: < /dev/x) 2>&1; echo x_read=$?";
    exec_script(&agent, "upd", "mk", "mknod /dev/x c 240 0").await;
    let out = exec_script(&agent, "upd", "e1", probe).await;
    assert!(outcome(&out, "x_read").contains(DENIED), "{out}");

    update_devices(
        &agent,
        "upd",
        serde_json::json!([{ "allow": true, "type": "c", "major": 240, "access": "r" }]),
    )
    .await
    .unwrap();
    assert_eq!(
        attached_programs(&agent, "upd"),
        1,
        "old program left attached"
    );
    let out = exec_script(&agent, "upd", "e2", probe).await;
    assert!(outcome(&out, "x_read").contains(PASSED_TO_DRIVER), "{out}");

    // An update without device rules keeps the program.
    update_devices(&agent, "upd", serde_json::json!([]))
        .await
        .unwrap();
    let out = exec_script(&agent, "upd", "e3", probe).await;
    assert!(outcome(&out, "x_read").contains(PASSED_TO_DRIVER), "{out}");

    update_devices(
        &agent,
        "upd",
        serde_json::json!([{ "allow": false, "access": "rwm" }]),
    )
    .await
    .unwrap();
    assert_eq!(attached_programs(&agent, "upd"), 1);
    let out = exec_script(&agent, "upd", "e4", probe).await;
    assert!(outcome(&out, "x_read").contains(DENIED), "{out}");

    let err = update_devices(
        &agent,
        "upd",
        serde_json::json!([{ "allow": true, "type": "q", "access": "r" }]),
    )
    .await
    .unwrap_err();
    assert!(err.contains("linux.resources.devices[0].type"), "{err}");
    remove(&agent, "upd").await;
}

#[tokio::test]
async fn invalid_device_rules_fail_create_naming_field_and_value() {
    let Some(agent) = ready().await else { return };
    for (id, devices, field, value) in [
        (
            "badaccess",
            serde_json::json!([{ "allow": false, "access": "rwm" }, { "allow": true, "type": "c", "access": "rwx" }]),
            "linux.resources.devices[1].access",
            "rwx",
        ),
        (
            "badtype",
            serde_json::json!([{ "allow": true, "type": "z", "access": "r" }]),
            "linux.resources.devices[0].type",
            "z",
        ),
    ] {
        let s = spec_with_devices(&["true"], devices);
        let request = create_request(id, &agent.rootfs, &s, stdio(false, false, false, false));
        let err = agent
            .client
            .create_container(ctx(), &request)
            .await
            .unwrap_err();
        let text = error_text(&err);
        assert!(text.contains(field) && text.contains(value), "{text}");
        assert!(agent.cgroup_dir(id).is_none(), "cgroup of {id} left behind");
    }
    // The agent still serves.
    let (out, status) = run(&agent, "after", &spec(&["echo", "fine"])).await;
    assert_eq!((out.as_str(), status), ("fine\n", 0));
}
