//! The agent API policy in a real guest: the agent as PID 1 under
//! QEMU/TCG (the agent initramfs, our vsock device over vhost-user), the
//! host installing a pod policy with SetPolicy the way the shim does for
//! `io.cloister.policy`, then: the allowed container runs, a container with
//! another command and an exec are refused with PERMISSION_DENIED naming
//! the rule and the reason, a second SetPolicy is refused, and the guest
//! still shuts down cleanly.
//!
//! Skips, with the reason printed, when QEMU, the built kernel, the agent
//! initramfs or the `cloister-vmm` binary is missing.

use std::path::Path;

use cloister_e2e::agent_guest::{
    busybox_spec as spec, connect_agent, create_request, ctx, run_to_exit, shutdown, AgentGuest,
    AgentGuestFixture,
};
use cloister_protocol::agent;

const POLICY: &str = r#"
package agent_policy

default CreateContainerRequest := false
CreateContainerRequest if input.oci.process.args == ["sh", "-c", "echo allowed"]
deny_reasons contains sprintf("command %v is not allowed", [input.oci.process.args]) if {
	not CreateContainerRequest
}

default ExecProcessRequest := false
deny_reasons contains "exec is not allowed in this pod" if input.process

default SetPolicyRequest := false

default StartContainerRequest := true
default WaitProcessRequest := true
default RemoveContainerRequest := true
default ReadStreamRequest := true
default WriteStreamRequest := true
default ShutdownRequest := true
default HealthCheckRequest := true
"#;

fn denial<T: std::fmt::Debug>(step: &str, result: Result<T, ttrpc::Error>) -> String {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(
                status.code(),
                ttrpc::Code::PERMISSION_DENIED,
                "{step}: {}",
                status.message()
            );
            status.message().to_owned()
        }
        other => panic!("{step}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

async fn drive(uds: &Path) {
    let client = connect_agent(uds).await.expect("connect to the agent");
    let mut set = agent::SetPolicyRequest::new();
    set.policy = POLICY.into();
    client
        .set_policy(ctx(), &set)
        .await
        .expect("install the pod policy");

    let (out, status) = run_to_exit(
        &client,
        uds,
        create_request("allowed", &spec(&["sh", "-c", "echo allowed"]), true),
    )
    .await;
    assert_eq!((out.as_str(), status), ("allowed\n", 0));

    let other = client
        .create_container(
            ctx(),
            &create_request("other", &spec(&["sh", "-c", "cat /proc/cmdline"]), true),
        )
        .await;
    let message = denial("create with another command", other);
    println!("{message}");
    assert_eq!(
        message,
        "CreateContainerRequest denied by policy rule data.agent_policy.CreateContainerRequest: \
         command [\"sh\", \"-c\", \"cat /proc/cmdline\"] is not allowed"
    );

    let mut exec = agent::ExecProcessRequest::new();
    exec.container_id = "allowed".into();
    exec.exec_id = "shell".into();
    exec.process_json = br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec();
    let message = denial("exec", client.exec_process(ctx(), &exec).await);
    println!("{message}");
    assert_eq!(
        message,
        "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: \
         exec is not allowed in this pod"
    );

    set.policy = "package agent_policy\ndefault ExecProcessRequest := true\n".into();
    denial("second SetPolicy", client.set_policy(ctx(), &set).await);

    shutdown(&client).await;
}

#[test]
fn policy_in_guest_denies_create_and_exec_naming_the_rule() {
    let guest = match AgentGuestFixture::locate().and_then(AgentGuest::new) {
        Ok(guest) => guest,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    guest.run(|uds| async move { drive(&uds).await });
}
