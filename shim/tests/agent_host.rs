//! The shim's agent client against the real agent on the host (root only;
//! each test prints SKIP with the reason when it cannot run).

mod support;

use std::time::Duration;

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use cloister_shim::agent_client::AgentClient;
use support::*;
use tokio::io::AsyncReadExt;

async fn next_exit(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<agent::Event>,
) -> agent::ProcessExited {
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

fn fifo(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    path
}

/// containerd's reader of an output FIFO, on a plain thread: a failing
/// test must not hang in the runtime's shutdown on a blocked open.
fn read_fifo(path: std::path::PathBuf) -> tokio::sync::oneshot::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut data = Vec::new();
        if let Ok(mut file) = std::fs::File::open(path) {
            let _ = std::io::Read::read_to_end(&mut file, &mut data);
        }
        let _ = tx.send(data);
    });
    rx
}

#[tokio::test]
async fn fifos_carry_stdin_to_cat_and_back_with_eof_both_ways() {
    skip_unless_host_ready!();
    let (host, client) = HostAgent::start().await;
    let mut events = client.events().await.unwrap();
    let dir = host.dir.path().to_path_buf();
    let paths = cloister_shim::container::StdioPaths {
        stdin: fifo(&dir, "in").display().to_string(),
        stdout: fifo(&dir, "out").display().to_string(),
        stderr: fifo(&dir, "err").display().to_string(),
        terminal: false,
    };
    let mut request = create_request(
        "shim-cat",
        &host.rootfs,
        &spec(&["cat"], false),
        true,
        false,
    );
    request.stdio = Some(cloister_shim::io::requested_streams(&paths)).into();
    client.create_container(request).await.unwrap();
    let stdout = read_fifo(paths.stdout.clone().into());
    let stderr = read_fifo(paths.stderr.clone().into());
    let mut io = cloister_shim::io::ProcessIo::attach(&client, "shim-cat", "", &paths)
        .await
        .unwrap();
    client.start_container("shim-cat").await.unwrap();
    let input: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let writer_input = input.clone();
    let stdin_path = paths.stdin.clone();
    std::thread::spawn(move || {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(stdin_path)
            .unwrap();
        std::io::Write::write_all(&mut w, &writer_input).unwrap();
        // Closing the FIFO is containerd's EOF: cat must then exit.
    });
    let exit = next_exit(&mut events).await;
    assert_eq!(exit.exit_status, 0, "agent log:\n{}", host.log());
    assert!(io.wait_output(Duration::from_secs(10)).await);
    assert_eq!(stdout.await.unwrap(), input);
    assert!(stderr.await.unwrap().is_empty());
    client.remove_container("shim-cat", false).await.unwrap();
}

#[tokio::test]
async fn output_of_a_process_that_exits_at_once_is_complete() {
    skip_unless_host_ready!();
    let (host, client) = HostAgent::start().await;
    let mut events = client.events().await.unwrap();
    let dir = host.dir.path().to_path_buf();
    let paths = cloister_shim::container::StdioPaths {
        stdin: String::new(),
        stdout: fifo(&dir, "out").display().to_string(),
        stderr: fifo(&dir, "err").display().to_string(),
        terminal: false,
    };
    let mut request = create_request(
        "shim-burst",
        &host.rootfs,
        &spec(
            &["sh", "-c", "head -c 1048576 /dev/zero; echo tail >&2"],
            false,
        ),
        false,
        false,
    );
    request.stdio = Some(cloister_shim::io::requested_streams(&paths)).into();
    client.create_container(request).await.unwrap();
    let mut io = cloister_shim::io::ProcessIo::attach(&client, "shim-burst", "", &paths)
        .await
        .unwrap();
    // containerd's readers are open before Start, as with ctr and CRI.
    let stdout = read_fifo(paths.stdout.clone().into());
    let stderr = read_fifo(paths.stderr.clone().into());
    client.start_container("shim-burst").await.unwrap();
    // The exit event may overtake the output still in flight: wait_output
    // is what the service waits for before it publishes TaskExit.
    let exit = next_exit(&mut events).await;
    assert_eq!(exit.exit_status, 0);
    assert!(io.wait_output(Duration::from_secs(10)).await);
    assert_eq!(stdout.await.unwrap().len(), 1 << 20);
    assert_eq!(stderr.await.unwrap(), b"tail\n");
    client.remove_container("shim-burst", false).await.unwrap();
}
