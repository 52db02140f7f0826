//! The `containerd-shim-cloister-v2` binary driven the way containerd
//! drives it — `start` (containerd 2.x and 1.6 forms), the task API over
//! ttrpc, `Shutdown`, `delete` — with a recording events service standing
//! in for containerd. No VM: the pod's VMM is a program that refuses to
//! start, which also checks that a failed sandbox start leaves nothing.
//! Needs root (shim sockets live in /run/containerd/s).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{create_events, Events, TaskClient};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-cloister-v2");

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the shim's sockets live in /run/containerd/s: needs root");
    }
    None
}

macro_rules! skip_unless_root {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

#[async_trait]
impl Events for Recorder {
    async fn forward(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: api::ForwardRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.0.lock().unwrap().push(req.envelope.topic.clone());
        Ok(api::Empty::new())
    }
}

/// A fake containerd: its folder, an events server, a runtime config whose
/// VMM exits at once.
struct FakeContainerd {
    dir: tempfile::TempDir,
    events_address: String,
    _server: ttrpc::r#async::Server,
    namespace: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

impl FakeContainerd {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let events_address = format!("unix://{}/containerd.sock.ttrpc", dir.path().display());
        let mut server = ttrpc::r#async::Server::new()
            .bind(&events_address)
            .unwrap()
            .register_service(create_events(Arc::new(Recorder::default())));
        server.start().await.unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                "[vmm]\npath = \"/bin/false\"\n[agent]\nconnect_timeout_secs = 1\n[audit]\npath = \"{}\"\n",
                dir.path().join("audit.jsonl").display()
            ),
        )
        .unwrap();
        Self {
            dir,
            events_address,
            _server: server,
            namespace: unique("cloister-test-ns"),
        }
    }

    fn bundle(&self, id: &str, annotations: serde_json::Value) -> PathBuf {
        let bundle = self.dir.path().join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"args": ["true"], "cwd": "/"},
            "root": {"path": "rootfs"},
            // A network namespace of its own, as `ctr run` gives (no
            // namespace entry would mean the host's network: refused).
            "linux": {"namespaces": [{"type": "network"}]},
            "annotations": annotations,
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        // containerd's log FIFO; a plain file here, so a failure can show it.
        std::fs::write(bundle.join("log"), "").unwrap();
        bundle
    }

    /// `containerd-shim-cloister-v2 … ACTION` as containerd runs it.
    fn run_shim(&self, id: &str, bundle: &Path, publish_binary: &str, action: &str) -> Vec<u8> {
        let output = Command::new(SHIM)
            .args(["-namespace", &self.namespace, "-address"])
            .arg(self.dir.path().join("containerd.sock"))
            .args(["-publish-binary", publish_binary, "-id", id])
            .arg("-bundle")
            .arg(bundle)
            .arg(action)
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &self.events_address)
            .env("CLOISTER_CONFIG", self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{action} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// A `containerd --version` stand-in for the 1.6 path.
    fn containerd_1_6(&self) -> String {
        let path = self.dir.path().join("containerd-1.6");
        std::fs::write(
            &path,
            "#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1'\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path.display().to_string()
    }
}

/// Kills a shim left running by a failed assertion.
struct ShimGuard(u32);

impl Drop for ShimGuard {
    fn drop(&mut self) {
        // Only a shim still running: its pid may belong to another process
        // by now.
        if exited(self.0) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

async fn connect(address: &str) -> TaskClient {
    for _ in 0..250 {
        if let Ok(client) = ttrpc::r#async::Client::connect(address).await {
            return TaskClient::new(client);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no shim at {address}");
}

/// Gone, or a zombie its new parent (init, a subreaper) has yet to reap.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| stat.contains(") Z "))
}

async fn wait_gone(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !exited(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "shim {pid} did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn containerd_2_start_create_failure_shutdown_and_delete() {
    skip_unless_root!();
    let containerd = FakeContainerd::start().await;
    let id = unique("pod");
    let bundle = containerd.bundle(&id, serde_json::json!({}));

    let reply = containerd.run_shim(&id, &bundle, "/nonexistent/containerd", "start");
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(reply["version"], 3);
    assert_eq!(reply["protocol"], "ttrpc");
    let address = reply["address"].as_str().unwrap().to_owned();
    assert!(
        address.starts_with("unix:///run/containerd/s/"),
        "{address}"
    );

    let client = connect(&address).await;
    let connected = client
        .connect(ctx(), &api::ConnectRequest::new())
        .await
        .unwrap();
    let _guard = ShimGuard(connected.shim_pid);
    assert!(connected.shim_pid > 0);

    // The sandbox's VMM exits at once: Create fails naming it, and the
    // sandbox folder is gone again.
    let create = api::CreateTaskRequest {
        id: id.clone(),
        bundle: bundle.display().to_string(),
        ..Default::default()
    };
    let err = client.create(ctx(), &create).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("exited during startup"), "{text}");
    let sandbox_dir = cloister_shim::sandbox::SandboxDir::new(
        Path::new(cloister_shim::lifecycle::STATE_DIR),
        &containerd.namespace,
        &id,
    )
    .path;
    assert!(
        !sandbox_dir.exists(),
        "{} left behind",
        sandbox_dir.display()
    );

    let err = client
        .state(
            ctx(),
            &api::StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NOT_FOUND"), "{err:?}");

    client
        .shutdown(ctx(), &api::ShutdownRequest::new())
        .await
        .ok();
    wait_gone(connected.shim_pid).await;
    let socket = address.trim_start_matches("unix://");
    assert!(!Path::new(socket).exists(), "socket {socket} left behind");

    let deleted = containerd.run_shim(&id, &bundle, "/nonexistent/containerd", "delete");
    let deleted = api::DeleteResponse::parse_from_bytes(&deleted).unwrap();
    assert_eq!(deleted.exit_status, 137);

    // The audit trail: each call once, in order, then `delete`'s record.
    let audit = std::fs::read_to_string(containerd.dir.path().join("audit.jsonl")).unwrap();
    let records: Vec<cloister_shim::audit::AuditRecord> = audit
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let summary: Vec<String> = records
        .iter()
        .filter(|r| r.operation != "inspection-finding")
        .map(|r| format!("{} {} {}", r.kind, r.operation, r.decision))
        .collect();
    assert_eq!(
        summary,
        [
            "task Connect allowed",
            "task Create failed",
            "task State failed",
            "task Shutdown allowed",
            "task ShimDelete allowed"
        ],
        "{audit}"
    );
    let create = &records.iter().find(|r| r.operation == "Create").unwrap();
    assert!(
        create.reason.contains("exited during startup"),
        "{create:?}"
    );
    // No namespace in the calls' metadata: the shim's own.
    assert_eq!(create.caller.namespace, containerd.namespace);
    assert_eq!(create.pod, id);
}

#[tokio::test]
async fn containers_of_one_pod_get_the_pods_shim() {
    skip_unless_root!();
    let containerd = FakeContainerd::start().await;
    let pod = unique("pod");
    let app = unique("app");
    let pod_bundle = containerd.bundle(
        &pod,
        serde_json::json!({"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": pod}),
    );
    let app_bundle = containerd.bundle(
        &app,
        serde_json::json!({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}),
    );
    let first: serde_json::Value =
        serde_json::from_slice(&containerd.run_shim(&pod, &pod_bundle, "", "start")).unwrap();
    let client = connect(first["address"].as_str().unwrap()).await;
    let shim_pid = client
        .connect(ctx(), &api::ConnectRequest::new())
        .await
        .unwrap()
        .shim_pid;
    let _guard = ShimGuard(shim_pid);
    let second: serde_json::Value =
        serde_json::from_slice(&containerd.run_shim(&app, &app_bundle, "", "start")).unwrap();
    assert_eq!(first["address"], second["address"]);
    // Still the same shim process.
    let again = connect(second["address"].as_str().unwrap()).await;
    let pid = again
        .connect(ctx(), &api::ConnectRequest::new())
        .await
        .unwrap()
        .shim_pid;
    assert_eq!(pid, shim_pid);
    client
        .shutdown(ctx(), &api::ShutdownRequest::new())
        .await
        .ok();
    wait_gone(shim_pid).await;
}

#[tokio::test]
async fn containerd_1_6_gets_a_bare_address_and_task_api_v2() {
    skip_unless_root!();
    let containerd = FakeContainerd::start().await;
    let id = unique("old");
    let bundle = containerd.bundle(&id, serde_json::json!({}));
    let publish = containerd.containerd_1_6();
    let reply = containerd.run_shim(&id, &bundle, &publish, "start");
    let address = String::from_utf8(reply).unwrap();
    assert!(
        address.starts_with("unix:///run/containerd/s/") && address.ends_with(".v2"),
        "{address}"
    );

    // containerd 1.6 calls the v2 service name.
    let mut client = None;
    for _ in 0..250 {
        if let Ok(c) = ttrpc::r#async::Client::connect(&address).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Some(client) = client else {
        panic!(
            "no v2 socket; shim log:\n{}",
            std::fs::read_to_string(bundle.join("log")).unwrap_or_default()
        );
    };
    let call = |method: &str, payload: Vec<u8>| ttrpc::Request {
        service: "containerd.task.v2.Task".into(),
        method: method.into(),
        payload,
        timeout_nano: 10_000_000_000,
        ..Default::default()
    };
    let response = client
        .request(call(
            "Connect",
            api::ConnectRequest::new().write_to_bytes().unwrap(),
        ))
        .await
        .unwrap();
    let connected = api::ConnectResponse::parse_from_bytes(&response.payload).unwrap();
    let _guard = ShimGuard(connected.shim_pid);
    assert!(connected.shim_pid > 0);

    client
        .request(call(
            "Shutdown",
            api::ShutdownRequest::new().write_to_bytes().unwrap(),
        ))
        .await
        .ok();
    wait_gone(connected.shim_pid).await;
    let socket = address.trim_start_matches("unix://");
    assert!(
        !Path::new(socket).exists(),
        "v2 socket {socket} left behind"
    );
}
