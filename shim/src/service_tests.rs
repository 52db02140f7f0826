//! Unit tests of the task service against a fake agent and a fake VM.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex as StdMutex;

use async_trait::async_trait;
use cloister_protocol::stdio::StreamKind;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::agent_client::AgentClient;
use crate::config::{InspectionMode, InspectionSection};
use crate::guest_spec::SharedMount;
use crate::sandbox::{SandboxDir, CRI_CONTAINER_TYPE, CRI_SANDBOX_ID};
use crate::vmm_client::{ChildExit, Hypervisor, HypervisorError};

#[derive(Default)]
struct FakeAgent {
    calls: StdMutex<Vec<String>>,
    events: StdMutex<Option<mpsc::UnboundedSender<agent::Event>>>,
    /// The agent's ends of attached stdio streams.
    streams: StdMutex<HashMap<(String, String, StreamKind), UnixStream>>,
    next_pid: AtomicU32,
    exec_specs: StdMutex<Vec<Vec<u8>>>,
    /// The guest is gone: RemoveContainer fails as over a dead connection.
    unreachable: AtomicBool,
}

impl FakeAgent {
    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    async fn send_exit(&self, container_id: &str, exec_id: &str, status: u32) {
        let mut event = agent::Event::new();
        let mut exited = agent::ProcessExited::new();
        exited.container_id = container_id.into();
        exited.exec_id = exec_id.into();
        exited.exit_status = status;
        exited.exited_at_ns = 1_700_000_000_000_000_000;
        event.set_exited(exited);
        let tx = self.events.lock().unwrap().clone().unwrap();
        tx.send(event).unwrap();
    }
    fn close_events(&self) {
        self.events.lock().unwrap().take();
    }
    fn stream(&self, container_id: &str, exec_id: &str, kind: StreamKind) -> UnixStream {
        self.streams
            .lock()
            .unwrap()
            .remove(&(container_id.into(), exec_id.into(), kind))
            .unwrap()
    }
}

#[async_trait]
impl AgentClient for FakeAgent {
    async fn setup_sandbox(&self, _: agent::SetupSandboxRequest) -> Result<(), AgentError> {
        self.log("setup".into());
        Ok(())
    }
    async fn update_network(
        &self,
        interfaces: agent::UpdateInterfacesRequest,
        _: agent::UpdateRoutesRequest,
    ) -> Result<(), AgentError> {
        self.log(format!("network {}", interfaces.interfaces.len()));
        Ok(())
    }
    async fn create_container(
        &self,
        req: agent::CreateContainerRequest,
    ) -> Result<u32, AgentError> {
        self.log(format!("create {}", req.container_id));
        Ok(100 + self.next_pid.fetch_add(1, Ordering::SeqCst))
    }
    async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        self.log(format!("start {id}"));
        Ok(())
    }
    async fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(AgentError::Rpc {
                method: "RemoveContainer",
                code: None,
                message: "channel closed".into(),
            });
        }
        self.log(format!("remove {id} force={force}"));
        Ok(())
    }
    async fn exec_process(&self, req: agent::ExecProcessRequest) -> Result<u32, AgentError> {
        self.log(format!("exec {} {}", req.container_id, req.exec_id));
        self.exec_specs.lock().unwrap().push(req.process_json);
        Ok(200 + self.next_pid.fetch_add(1, Ordering::SeqCst))
    }
    async fn signal_process(
        &self,
        id: &str,
        exec: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.log(format!("signal {id} {exec:?} {signal} all={all}"));
        Ok(())
    }
    async fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        self.log(format!("pause {id}"));
        Ok(())
    }
    async fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        self.log(format!("resume {id}"));
        Ok(())
    }
    async fn update_container(&self, id: &str, resources: Vec<u8>) -> Result<(), AgentError> {
        self.log(format!(
            "update {id} {}",
            String::from_utf8_lossy(&resources)
        ));
        Ok(())
    }
    async fn list_processes(&self, _: &str) -> Result<Vec<agent::ProcessInfo>, AgentError> {
        let mut p = agent::ProcessInfo::new();
        p.pid = 1;
        Ok(vec![p])
    }
    async fn stats_container(&self, _: &str) -> Result<agent::StatsContainerResponse, AgentError> {
        let mut stats = agent::StatsContainerResponse::new();
        let mut pids = agent::PidsStats::new();
        pids.current = 2;
        stats.pids = Some(pids).into();
        Ok(stats)
    }
    async fn resize_tty(
        &self,
        id: &str,
        exec: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        self.log(format!("resize {id} {exec:?} {rows}x{cols}"));
        Ok(())
    }
    async fn close_stdin(&self, id: &str, exec: &str) -> Result<(), AgentError> {
        self.log(format!("close-stdin {id} {exec:?}"));
        Ok(())
    }
    async fn events(&self) -> Result<mpsc::UnboundedReceiver<agent::Event>, AgentError> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap() = Some(tx);
        Ok(rx)
    }
    async fn shutdown(&self) -> Result<(), AgentError> {
        self.log("shutdown".into());
        self.close_events();
        Ok(())
    }
    async fn open_stdio(
        &self,
        id: &str,
        exec: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, AgentError> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        self.streams
            .lock()
            .unwrap()
            .insert((id.into(), exec.into(), kind), theirs);
        Ok(ours)
    }
}

struct FakeVm {
    exit: watch::Receiver<Option<ChildExit>>,
    kill: watch::Sender<Option<ChildExit>>,
    stopped: Arc<AtomicBool>,
}

#[async_trait]
impl Hypervisor for FakeVm {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        Ok(())
    }
    fn vsock_uds(&self) -> PathBuf {
        PathBuf::from("/nonexistent")
    }
    async fn wait_exit(&self) -> ChildExit {
        let mut rx = self.exit.clone();
        let exit = rx.wait_for(Option::is_some).await.map(|e| e.unwrap());
        exit.unwrap_or(ChildExit::Lost)
    }
    async fn stop(&self, _: Duration) {
        self.stopped.store(true, Ordering::SeqCst);
        self.kill.send_replace(Some(ChildExit::Signal(15)));
    }
    fn pids(&self) -> Vec<u32> {
        vec![4242]
    }
}

struct FakeLauncher {
    agent: Arc<FakeAgent>,
    state_dir: tempfile::TempDir,
    vm_kill: watch::Sender<Option<ChildExit>>,
    vm_stopped: Arc<AtomicBool>,
    launches: AtomicU32,
    inspection: InspectionSection,
}

#[async_trait]
impl SandboxLauncher for FakeLauncher {
    async fn launch(
        &self,
        sandbox_id: &str,
        _: &serde_json::Value,
        config_path: Option<String>,
    ) -> Result<PodSandbox, SandboxError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        if let Some(path) = config_path {
            self.agent.log(format!("config {path}"));
        }
        let dir = SandboxDir::new(self.state_dir.path(), "test", sandbox_id);
        dir.create()?;
        let vm = FakeVm {
            exit: self.vm_kill.subscribe(),
            kill: self.vm_kill.clone(),
            stopped: self.vm_stopped.clone(),
        };
        Ok(
            PodSandbox::new(sandbox_id, self.agent.clone(), dir, Some(Box::new(vm)))
                .with_inspection(self.inspection.clone()),
        )
    }
    async fn share_rootfs(
        &self,
        _: &PodSandbox,
        container_id: &str,
        _: &[api::Mount],
        root_dir: &Path,
    ) -> Result<agent::Rootfs, SandboxError> {
        self.agent.log(format!("share {container_id}"));
        let mut rootfs = agent::Rootfs::new();
        rootfs.set_directory(root_dir.display().to_string());
        Ok(rootfs)
    }
    fn share_mounts(
        &self,
        _: &PodSandbox,
        container_id: &str,
        mounts: &[SharedMount],
    ) -> Result<(), SandboxError> {
        for mount in mounts {
            self.agent.log(format!(
                "share {container_id} {} -> {}",
                mount.host_source.display(),
                mount.share_path
            ));
        }
        Ok(())
    }
    fn unshare_rootfs(&self, _: &PodSandbox, container_id: &str) -> Result<(), SandboxError> {
        self.agent.log(format!("unshare {container_id}"));
        Ok(())
    }
}

struct Harness {
    service: TaskService,
    agent: Arc<FakeAgent>,
    launcher: Arc<FakeLauncher>,
    events: mpsc::UnboundedReceiver<TaskEvent>,
    exit: Arc<ExitSignal>,
    bundles: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with_inspection(InspectionSection::default())
    }

    fn with_inspection(inspection: InspectionSection) -> Self {
        let agent = Arc::new(FakeAgent::default());
        let (vm_kill, _) = watch::channel(None);
        let launcher = Arc::new(FakeLauncher {
            agent: agent.clone(),
            state_dir: tempfile::tempdir().unwrap(),
            vm_kill,
            vm_stopped: Arc::new(AtomicBool::new(false)),
            launches: AtomicU32::new(0),
            inspection,
        });
        let (sender, events) = EventSender::channel();
        let exit = Arc::new(ExitSignal::default());
        let service = TaskService::new(launcher.clone(), sender, exit.clone());
        Self {
            service,
            agent,
            launcher,
            events,
            exit,
            bundles: tempfile::tempdir().unwrap(),
        }
    }

    fn bundle(&self, id: &str, annotations: serde_json::Value) -> String {
        let dir = self.bundles.path().join(id);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "hostname": "pod",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "annotations": annotations,
        });
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        dir.display().to_string()
    }

    async fn create(&self, id: &str, annotations: serde_json::Value) -> Result<u32, ServiceError> {
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, annotations),
            ..Default::default()
        };
        self.service.create(&req).await.map(|r| r.pid)
    }

    async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ServiceError> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.service.start(&req).await.map(|r| r.pid)
    }

    async fn wait(&self, id: &str, exec_id: &str) -> api::WaitResponse {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(10), self.service.wait(&req))
            .await
            .expect("Wait did not return")
            .unwrap()
    }

    async fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse, ServiceError> {
        let req = api::DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.service.delete(&req).await
    }

    async fn status(&self, id: &str, exec_id: &str) -> TaskStatus {
        let req = api::StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.service
            .state(&req)
            .await
            .unwrap()
            .status
            .enum_value()
            .unwrap()
    }

    /// Events published so far.
    fn take_events(&mut self) -> Vec<TaskEvent> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            out.push(event);
        }
        out
    }

    async fn next_event(&mut self) -> TaskEvent {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("no event")
            .unwrap()
    }
}

fn topics(events: &[TaskEvent]) -> Vec<&'static str> {
    events.iter().map(TaskEvent::topic).collect()
}

fn cri(kind: &str, sandbox: &str) -> serde_json::Value {
    serde_json::json!({ CRI_CONTAINER_TYPE: kind, CRI_SANDBOX_ID: sandbox })
}

#[tokio::test]
async fn container_lifecycle_publishes_events_in_order_and_stops_the_vm() {
    let mut h = Harness::new();
    let pid = h.create("c1", serde_json::json!({})).await.unwrap();
    assert_eq!(pid, 100);
    assert_eq!(h.status("c1", "").await, TaskStatus::CREATED);
    assert_eq!(h.start("c1", "").await.unwrap(), 100);
    assert_eq!(h.status("c1", "").await, TaskStatus::RUNNING);
    h.agent.send_exit("c1", "", 3).await;
    let waited = h.wait("c1", "").await;
    assert_eq!(waited.exit_status, 3);
    assert_eq!(waited.exited_at.seconds, 1_700_000_000);
    assert_eq!(h.status("c1", "").await, TaskStatus::STOPPED);
    let deleted = h.delete("c1", "").await.unwrap();
    assert_eq!((deleted.pid, deleted.exit_status), (100, 3));
    assert_eq!(
        topics(&h.take_events()),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(
        h.agent.calls(),
        [
            "share c1",
            "create c1",
            "start c1",
            "remove c1 force=false",
            "unshare c1",
            "shutdown"
        ]
    );
    assert!(h.launcher.vm_stopped.load(Ordering::SeqCst));
    // The sandbox folder is gone with the VM.
    assert!(!h.launcher.state_dir.path().join("test/c1").exists());
    h.service.shutdown().await;
    tokio::time::timeout(Duration::from_secs(1), h.exit.wait())
        .await
        .unwrap();
}

#[tokio::test]
async fn inspection_in_refuse_mode_refuses_a_host_namespace_spec_before_the_agent_sees_it() {
    let refusing = InspectionSection {
        mode: InspectionMode::Refuse,
        ..InspectionSection::default()
    };
    let h = Harness::with_inspection(refusing);
    // The harness's spec has no namespaces: every one is the host's.
    let err = h.create("c1", serde_json::json!({})).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::PERMISSION_DENIED);
    assert!(err.to_string().contains("host-namespace"), "{err}");
    assert!(
        !h.agent.calls().iter().any(|c| c.starts_with("create")),
        "{:?}",
        h.agent.calls()
    );
    // Warn (the default) lets the same spec through.
    let h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
}

#[tokio::test]
async fn calls_that_do_not_fit_the_state_are_refused_with_codes() {
    let h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    let err = h.create("c1", serde_json::json!({})).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::ALREADY_EXISTS);
    h.start("c1", "").await.unwrap();
    let err = h.start("c1", "").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
    assert!(err.to_string().contains("while running"), "{err}");
    let err = h.delete("c1", "").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
    assert_eq!(
        h.service.resume("c1").await.unwrap_err().code(),
        ttrpc::Code::FAILED_PRECONDITION
    );
    let err = h.start("nope", "").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
    h.agent.send_exit("c1", "", 0).await;
    h.wait("c1", "").await;
    let kill = api::KillRequest {
        id: "c1".into(),
        signal: 9,
        ..Default::default()
    };
    let err = h.service.kill(&kill).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::NOT_FOUND);
    assert!(err.to_string().contains("already finished"), "{err}");
    // Shutdown while a container exists keeps the shim.
    h.service.shutdown().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), h.exit.wait())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn exec_is_added_then_started_with_its_spec_and_exits_by_exec_id() {
    let mut h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    h.start("c1", "").await.unwrap();
    let exec = api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        spec: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["ls"],"cwd":"/"}"#.to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    h.service.exec(&exec).await.unwrap();
    assert_eq!(
        h.service.exec(&exec).await.unwrap_err().code(),
        ttrpc::Code::ALREADY_EXISTS
    );
    assert_eq!(h.status("c1", "e1").await, TaskStatus::CREATED);
    let pid = h.start("c1", "e1").await.unwrap();
    assert!(pid >= 200);
    assert_eq!(
        h.agent.exec_specs.lock().unwrap()[0],
        br#"{"args":["ls"],"cwd":"/"}"#.to_vec()
    );
    h.agent.send_exit("c1", "e1", 0).await;
    assert_eq!(h.wait("c1", "e1").await.exit_status, 0);
    h.delete("c1", "e1").await.unwrap();
    let events = h.take_events();
    assert_eq!(
        topics(&events),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit"
        ]
    );
    assert!(matches!(&events[4], TaskEvent::Exit { exec_id, .. } if exec_id == "e1"));
    // The init process still runs.
    assert_eq!(h.status("c1", "").await, TaskStatus::RUNNING);
}

#[tokio::test]
async fn pause_resume_kill_update_resize_pids_stats_reach_the_agent() {
    let mut h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    h.start("c1", "").await.unwrap();
    h.service.pause("c1").await.unwrap();
    assert_eq!(h.status("c1", "").await, TaskStatus::PAUSED);
    h.service.resume("c1").await.unwrap();
    let kill = api::KillRequest {
        id: "c1".into(),
        signal: 15,
        all: true,
        ..Default::default()
    };
    h.service.kill(&kill).await.unwrap();
    let update = api::UpdateTaskRequest {
        id: "c1".into(),
        resources: Some(Any {
            value: br#"{"cpu":{"shares":512}}"#.to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    h.service.update(&update).await.unwrap();
    let resize = api::ResizePtyRequest {
        id: "c1".into(),
        width: 80,
        height: 24,
        ..Default::default()
    };
    h.service.resize_pty(&resize).await.unwrap();
    assert_eq!(h.service.pids("c1").await.unwrap().processes[0].pid, 1);
    let stats = h.service.stats("c1").await.unwrap();
    assert_eq!(stats.stats.type_url, "io.containerd.cgroups.v2.Metrics");
    let calls = h.agent.calls();
    for expected in [
        "pause c1",
        "resume c1",
        "signal c1 \"\" 15 all=true",
        "update c1 {\"cpu\":{\"shares\":512}}",
        "resize c1 \"\" 24x80",
    ] {
        assert!(
            calls.iter().any(|c| c == expected),
            "{expected} not in {calls:?}"
        );
    }
    assert_eq!(
        topics(&h.take_events()),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed"
        ]
    );
}

#[tokio::test]
async fn vm_death_ends_every_process_with_137() {
    let mut h = Harness::new();
    h.create("pod", cri("sandbox", "pod")).await.unwrap();
    h.start("pod", "").await.unwrap();
    h.create("app", cri("container", "pod")).await.unwrap();
    h.start("app", "").await.unwrap();
    h.create("done", cri("container", "pod")).await.unwrap();
    h.start("done", "").await.unwrap();
    h.agent.send_exit("done", "", 0).await;
    assert_eq!(h.wait("done", "").await.exit_status, 0);
    assert_eq!(h.launcher.launches.load(Ordering::SeqCst), 1);
    h.take_events();
    h.launcher.vm_kill.send_replace(Some(ChildExit::Signal(9)));
    h.agent.unreachable.store(true, Ordering::SeqCst);
    assert_eq!(h.wait("pod", "").await.exit_status, 137);
    assert_eq!(h.wait("app", "").await.exit_status, 137);
    let exits = [h.next_event().await, h.next_event().await];
    assert!(exits.iter().all(|e| matches!(
        e,
        TaskEvent::Exit {
            exit_status: 137,
            ..
        }
    )));
    // Delete works with the VM gone, also for a container that had exited
    // normally before.
    assert_eq!(h.delete("done", "").await.unwrap().exit_status, 0);
    h.delete("app", "").await.unwrap();
    h.delete("pod", "").await.unwrap();
}

#[tokio::test]
async fn agent_connection_lost_with_vm_alive_ends_processes_with_255() {
    let h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    h.start("c1", "").await.unwrap();
    h.agent.close_events();
    let waited = h.wait("c1", "").await;
    assert_eq!(waited.exit_status, 255);
}

#[tokio::test]
async fn workload_of_another_pod_or_without_sandbox_is_refused() {
    let h = Harness::new();
    let err = h.create("app", cri("container", "pod")).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::FAILED_PRECONDITION);
    h.create("pod", cri("sandbox", "pod")).await.unwrap();
    let err = h
        .create("other", cri("container", "pod2"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pod2"), "{err}");
    h.create("app", cri("container", "pod")).await.unwrap();
    assert_eq!(h.launcher.launches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn checkpoint_is_unsupported_and_config_path_option_reaches_launcher() {
    let h = Harness::new();
    let req = api::CreateTaskRequest {
        id: "c1".into(),
        bundle: h.bundle("c1", serde_json::json!({})),
        checkpoint: "/ckpt".into(),
        ..Default::default()
    };
    let err = h.service.create(&req).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::UNIMPLEMENTED);
    assert!(err.to_string().contains("not supported"), "{err}");

    let mut options = vec![0x12, 9];
    options.extend_from_slice(b"/c/x.toml");
    let req = api::CreateTaskRequest {
        id: "c2".into(),
        bundle: h.bundle("c2", serde_json::json!({})),
        options: Some(Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: options,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    h.service.create(&req).await.unwrap();
    assert!(h.agent.calls().contains(&"config /c/x.toml".to_string()));
}

#[tokio::test]
async fn output_reaches_the_fifo_before_task_exit_is_published() {
    let mut h = Harness::new();
    let fifo_dir = tempfile::tempdir().unwrap();
    let stdout = fifo_dir.path().join("stdout");
    nix::unistd::mkfifo(&stdout, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader_path = stdout.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::open(reader_path).unwrap(), &mut data)
            .unwrap();
        data
    });
    let req = api::CreateTaskRequest {
        id: "c1".into(),
        bundle: h.bundle("c1", serde_json::json!({})),
        stdout: stdout.display().to_string(),
        ..Default::default()
    };
    h.service.create(&req).await.unwrap();
    h.start("c1", "").await.unwrap();
    let mut agent_out = h.agent.stream("c1", "", StreamKind::Stdout);
    // The exit is reported while output is still being written.
    h.agent.send_exit("c1", "", 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !topics(&h.take_events()).contains(&"/tasks/exit"),
        "TaskExit published before the output ended"
    );
    agent_out.write_all(b"last words\n").await.unwrap();
    drop(agent_out);
    assert_eq!(h.wait("c1", "").await.exit_status, 0);
    assert_eq!(reader.await.unwrap(), b"last words\n");
    assert!(matches!(h.next_event().await, TaskEvent::Exit { .. }));
}

#[tokio::test]
async fn stdin_written_before_close_io_reaches_agent_then_eof() {
    let h = Harness::new();
    let fifo_dir = tempfile::tempdir().unwrap();
    let stdin = fifo_dir.path().join("stdin");
    nix::unistd::mkfifo(&stdin, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let req = api::CreateTaskRequest {
        id: "c1".into(),
        bundle: h.bundle("c1", serde_json::json!({})),
        stdin: stdin.display().to_string(),
        ..Default::default()
    };
    h.service.create(&req).await.unwrap();
    // The client writes and keeps its end open; CloseIO ends stdin.
    let writer_path = stdin.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(writer_path)
            .unwrap();
        std::io::Write::write_all(&mut w, b"input").unwrap();
        w
    })
    .await
    .unwrap();
    let close = api::CloseIORequest {
        id: "c1".into(),
        stdin: true,
        ..Default::default()
    };
    h.service.close_io(&close).await.unwrap();
    let mut agent_in = h.agent.stream("c1", "", StreamKind::Stdin);
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), agent_in.read_to_end(&mut got))
        .await
        .expect("no EOF on the stdin stream after CloseIO")
        .unwrap();
    assert_eq!(got, b"input");
    // EOF is the stream's half-close, not the RPC that could cut it short.
    assert!(!h.agent.calls().iter().any(|c| c.starts_with("close-stdin")));
    drop(writer);
}

#[tokio::test]
async fn deleting_the_sandbox_ends_the_pods_other_containers() {
    let h = Harness::new();
    h.create("pod", cri("sandbox", "pod")).await.unwrap();
    h.start("pod", "").await.unwrap();
    h.create("app", cri("container", "pod")).await.unwrap();
    h.start("app", "").await.unwrap();
    h.agent.send_exit("pod", "", 0).await;
    assert_eq!(h.wait("pod", "").await.exit_status, 0);
    h.delete("pod", "").await.unwrap();
    assert!(h.launcher.vm_stopped.load(Ordering::SeqCst));
    assert_eq!(h.wait("app", "").await.exit_status, 137);
    assert_eq!(h.status("app", "").await, TaskStatus::STOPPED);
    h.delete("app", "").await.unwrap();
}

#[tokio::test]
async fn delete_fails_when_the_agent_fails_and_the_guest_is_not_gone() {
    let h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    h.start("c1", "").await.unwrap();
    h.agent.send_exit("c1", "", 0).await;
    h.wait("c1", "").await;
    h.agent.unreachable.store(true, Ordering::SeqCst);
    let err = h.delete("c1", "").await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::UNAVAILABLE);
    assert_eq!(h.status("c1", "").await, TaskStatus::STOPPED);
}
