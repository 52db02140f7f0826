//! The shim's agent client against the real agent on the host (root only;
//! each test prints SKIP with the reason when it cannot run).

mod support;

use std::time::Duration;

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::AgentClient;
use support::*;
use tokio::io::AsyncReadExt;

async fn next_exit(events: &mut tokio::sync::mpsc::Receiver<agent::Event>) -> agent::ProcessExited {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("no event within 30 s")
            .expect("event stream closed");
        if event.has_exited() {
            return event.exited().clone();
        }
    }
}

#[tokio::test]
async fn client_creates_starts_reads_stdout_and_sees_exit_event() {
    skip_unless_host_ready!();
    let (host, client) = HostAgent::start().await;
    let mut events = client.events().await.unwrap();

    let request = create_request(
        "shim-echo",
        &host.rootfs,
        &spec(&["sh", "-c", "echo hello; echo oops >&2; exit 3"], false),
        false,
        false,
    );
    let pid = client.create_container(request).await.unwrap();
    assert!(pid > 0);
    let mut out = client
        .open_stdio("shim-echo", "", StreamKind::Stdout)
        .await
        .unwrap();
    let mut err = client
        .open_stdio("shim-echo", "", StreamKind::Stderr)
        .await
        .unwrap();
    client.start_container("shim-echo").await.unwrap();

    let (mut out_text, mut err_text) = (String::new(), String::new());
    out.read_to_string(&mut out_text).await.unwrap();
    err.read_to_string(&mut err_text).await.unwrap();
    assert_eq!(
        (out_text.as_str(), err_text.as_str()),
        ("hello\n", "oops\n")
    );

    let exit = next_exit(&mut events).await;
    assert_eq!(exit.container_id, "shim-echo");
    assert_eq!(exit.exec_id, "");
    assert_eq!(exit.exit_status, 3, "agent log:\n{}", host.log());
    assert!(exit.exited_at_ns > 0);
    client.remove_container("shim-echo", false).await.unwrap();
}

#[tokio::test]
async fn client_errors_carry_the_agents_status() {
    skip_unless_host_ready!();
    let (_host, client) = HostAgent::start().await;
    let err = client.start_container("no-such").await.unwrap_err();
    assert!(err.code().is_some(), "{err}");
    assert!(err.to_string().contains("StartContainer"), "{err}");
    let err = client
        .open_stdio("no-such", "", StreamKind::Stdout)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn signal_of_running_container_reports_128_plus_signal() {
    skip_unless_host_ready!();
    let (host, client) = HostAgent::start().await;
    let mut events = client.events().await.unwrap();
    let mut request = create_request(
        "shim-sleep",
        &host.rootfs,
        &spec(&["sleep", "1000"], false),
        false,
        false,
    );
    request.stdio = Some(agent::Stdio::new()).into();
    client.create_container(request).await.unwrap();
    client.start_container("shim-sleep").await.unwrap();
    let processes = client.list_processes("shim-sleep").await.unwrap();
    assert!(!processes.is_empty());
    client
        .signal_process("shim-sleep", "", 9, false)
        .await
        .unwrap();
    let exit = next_exit(&mut events).await;
    assert_eq!(exit.exit_status, 137);
    client.remove_container("shim-sleep", false).await.unwrap();
}
