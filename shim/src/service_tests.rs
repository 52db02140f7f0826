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
use crate::config::{InspectionMode, InspectionSection, RuntimeConfig};
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
    /// The agent's policy refuses ExecProcess with this message.
    deny_exec: StdMutex<Option<String>>,
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
        if let Some(message) = self.deny_exec.lock().unwrap().clone() {
            return Err(AgentError::Rpc {
                method: "ExecProcess",
                code: Some(ttrpc::Code::PERMISSION_DENIED),
                message,
            });
        }
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
    fn load_config(&self, config_path: Option<&str>) -> Result<RuntimeConfig, SandboxError> {
        if let Some(path) = config_path {
            self.agent.log(format!("config {path}"));
        }
        Ok(RuntimeConfig {
            inspection: self.inspection.clone(),
            audit: crate::audit::AuditSection {
                enabled: true,
                path: self.audit_path(),
            },
            ..RuntimeConfig::default()
        })
    }

    async fn launch(
        &self,
        sandbox_id: &str,
        _: &serde_json::Value,
        config: &RuntimeConfig,
        audit: &crate::audit::AuditLog,
    ) -> Result<PodSandbox, SandboxError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        let dir = SandboxDir::new(self.state_dir.path(), "test", sandbox_id);
        dir.create()?;
        let vm = FakeVm {
            exit: self.vm_kill.subscribe(),
            kill: self.vm_kill.clone(),
            stopped: self.vm_stopped.clone(),
        };
        let agent = crate::audit::agent::audited_agent(self.agent.clone(), audit, sandbox_id);
        Ok(PodSandbox::new(sandbox_id, agent, dir, Some(Box::new(vm)))
            .with_inspection(config.inspection.clone()))
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

impl FakeLauncher {
    /// The pod's audit file (the config's `[audit] path`).
    fn audit_path(&self) -> PathBuf {
        self.state_dir.path().join("audit/audit.jsonl")
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

    /// Task events published so far (security events, which carry audit
    /// records, are checked on their own).
    fn take_events(&mut self) -> Vec<TaskEvent> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if !matches!(event, TaskEvent::Security { .. }) {
                out.push(event);
            }
        }
        out
    }

    async fn next_event(&mut self) -> TaskEvent {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .expect("no event")
                .unwrap();
            if !matches!(event, TaskEvent::Security { .. }) {
                return event;
            }
        }
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

// --- the audit trail ---

use crate::audit::{AuditRecord, Decision as Audit, RecordKind};
use containerd_shim_protos::shim_async::Task as TaskApi;

/// The service as containerd's ttrpc server calls it (its inherent methods
/// of the same names skip the audit wrapper).
fn task_api(service: &TaskService) -> &(dyn TaskApi + Send + Sync) {
    service
}

/// A ttrpc context as containerd sends it, naming its namespace.
fn ctx(namespace: &str) -> Ctx {
    let mut ctx = Ctx::default();
    ctx.metadata
        .insert(NAMESPACE_METADATA.into(), vec![namespace.into()]);
    ctx
}

impl Harness {
    fn audit_records(&self) -> Vec<AuditRecord> {
        std::fs::read_to_string(self.launcher.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn records_of(&self, kind: RecordKind) -> Vec<AuditRecord> {
        self.audit_records()
            .into_iter()
            .filter(|r| r.kind == kind)
            .collect()
    }

    /// Waits up to 5 s for a record of `operation`.
    async fn await_record(&self, operation: &str) -> AuditRecord {
        for _ in 0..100 {
            if let Some(r) = self
                .audit_records()
                .into_iter()
                .find(|r| r.operation == operation)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {operation} record in {:?}", self.audit_records());
    }
}

fn exec_request(id: &str, exec_id: &str, args: &str) -> api::ExecProcessRequest {
    api::ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: Some(Any {
            value: format!(r#"{{"args":{args},"cwd":"/"}}"#).into_bytes(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_task_api_call_leaves_exactly_one_record_in_order() {
    let h = Harness::new();
    let s = task_api(&h.service);
    let c = ctx("k8s.io");
    let id = || "c1".to_string();
    s.connect(
        &c,
        api::ConnectRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let bundle = h.bundle("c1", serde_json::json!({}));
    let create = api::CreateTaskRequest {
        id: id(),
        bundle,
        ..Default::default()
    };
    s.create(&c, create).await.unwrap();
    s.state(
        &c,
        api::StateRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.start(
        &c,
        api::StartRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.exec(&c, exec_request("c1", "e1", r#"["id","-u"]"#))
        .await
        .unwrap();
    let start_exec = api::StartRequest {
        id: id(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    s.start(&c, start_exec).await.unwrap();
    let resize = api::ResizePtyRequest {
        id: id(),
        width: 80,
        height: 24,
        ..Default::default()
    };
    s.resize_pty(&c, resize).await.unwrap();
    let close = api::CloseIORequest {
        id: id(),
        stdin: true,
        ..Default::default()
    };
    s.close_io(&c, close).await.unwrap();
    s.pids(
        &c,
        api::PidsRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.stats(
        &c,
        api::StatsRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let update = api::UpdateTaskRequest {
        id: id(),
        resources: Some(Any {
            value: b"{}".to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    s.update(&c, update).await.unwrap();
    s.pause(
        &c,
        api::PauseRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.resume(
        &c,
        api::ResumeRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let checkpoint = api::CheckpointTaskRequest {
        id: id(),
        ..Default::default()
    };
    assert!(s.checkpoint(&c, checkpoint).await.is_err());
    let kill = api::KillRequest {
        id: id(),
        signal: 9,
        ..Default::default()
    };
    s.kill(&c, kill).await.unwrap();
    h.agent.send_exit("c1", "e1", 0).await;
    h.agent.send_exit("c1", "", 137).await;
    let wait = api::WaitRequest {
        id: id(),
        ..Default::default()
    };
    assert_eq!(s.wait(&c, wait).await.unwrap().exit_status, 137);
    let delete_exec = api::DeleteRequest {
        id: id(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    // The exec's exit may still be draining: wait for it first.
    h.wait("c1", "e1").await;
    s.delete(&c, delete_exec).await.unwrap();
    s.delete(
        &c,
        api::DeleteRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let missing = api::StateRequest {
        id: id(),
        ..Default::default()
    };
    assert!(s.state(&c, missing).await.is_err());
    s.shutdown(
        &c,
        api::ShutdownRequest {
            id: id(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let tasks = h.records_of(RecordKind::Task);
    let summary: Vec<(&str, &str, Audit)> = tasks
        .iter()
        .map(|r| (r.operation.as_str(), r.exec_id.as_str(), r.decision))
        .collect();
    use Audit::{Allowed as A, Failed as F};
    assert_eq!(
        summary,
        [
            ("Connect", "", A),
            ("Create", "", A),
            ("State", "", A),
            ("Start", "", A),
            ("Exec", "e1", A),
            ("Start", "e1", A),
            ("ResizePty", "", A),
            ("CloseIO", "", A),
            ("Pids", "", A),
            ("Stats", "", A),
            ("Update", "", A),
            ("Pause", "", A),
            ("Resume", "", A),
            ("Checkpoint", "", F),
            ("Kill", "", A),
            ("Wait", "", A),
            ("Delete", "e1", A),
            ("Delete", "", A),
            ("State", "", F),
            ("Shutdown", "", A),
        ]
    );
    assert!(tasks.iter().all(|r| r.caller.namespace == "k8s.io"));
    // The pod is named even in the Connect before its sandbox's Create.
    assert!(tasks.iter().all(|r| r.pod == "c1" && r.container == "c1"));
    assert!(
        tasks[13].reason.contains("not supported"),
        "{:?}",
        tasks[13]
    );
    assert_eq!(tasks[1].details["pid"], 100);
    assert_eq!(tasks[2].details["status"], "CREATED");
    assert_eq!(tasks[4].details["args"], serde_json::json!(["id", "-u"]));
    assert_eq!(tasks[14].details["signal"], 9);
    assert_eq!(tasks[15].details["exit_status"], 137);
    assert!(tasks[18].reason.contains("c1"), "{:?}", tasks[18]);
    // Records are numbered without gaps across all kinds.
    let seqs: Vec<u64> = h.audit_records().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // Agent requests were recorded too, each with its outcome.
    let agent_ops: Vec<String> = h
        .records_of(RecordKind::Agent)
        .into_iter()
        .map(|r| r.operation)
        .collect();
    for op in [
        "Events",
        "CreateContainer",
        "StartContainer",
        "ExecProcess",
        "ResizeTty",
        "ListProcesses",
        "StatsContainer",
        "UpdateContainer",
        "PauseContainer",
        "ResumeContainer",
        "SignalProcess",
        "RemoveContainer",
        "Shutdown",
    ] {
        assert_eq!(
            agent_ops.iter().filter(|o| *o == op).count(),
            1,
            "{op} in {agent_ops:?}"
        );
    }
    // The exec is a security event of its own, with its command.
    let exec = h.records_of(RecordKind::Security);
    let exec = exec.iter().find(|r| r.operation == "exec").unwrap();
    assert_eq!((exec.exec_id.as_str(), exec.decision), ("e1", A));
    assert_eq!(exec.details["args"], serde_json::json!(["id", "-u"]));
}

#[tokio::test]
async fn an_agent_denial_is_recorded_with_the_agents_message_verbatim() {
    let h = Harness::new();
    let c = ctx("default");
    h.create("c1", serde_json::json!({})).await.unwrap();
    h.start("c1", "").await.unwrap();
    // The agent policy's wording (guest-agent/src/policy): it names the rule.
    let message = "ExecProcessRequest denied by policy rule data.agent_policy.ExecProcessRequest: exec of [\"sh\"] is not allowed";
    *h.agent.deny_exec.lock().unwrap() = Some(message.into());
    task_api(&h.service)
        .exec(&c, exec_request("c1", "e1", r#"["sh"]"#))
        .await
        .unwrap();
    let start = api::StartRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    let err = task_api(&h.service).start(&c, start).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("data.agent_policy.ExecProcessRequest"),
        "{err}"
    );

    let records = h.audit_records();
    let find = |kind: RecordKind, op: &str| {
        records
            .iter()
            .find(|r| r.kind == kind && r.operation == op)
            .unwrap_or_else(|| panic!("no {kind} {op} in {records:?}"))
    };
    let agent = find(RecordKind::Agent, "ExecProcess");
    assert_eq!(
        (agent.decision, agent.reason.as_str()),
        (Audit::Denied, message)
    );
    assert_eq!(agent.exec_id, "e1");
    let denial = find(RecordKind::Security, "policy-denied");
    assert_eq!(
        (denial.decision, denial.reason.as_str()),
        (Audit::Denied, message)
    );
    assert_eq!(denial.details["request"], "ExecProcess");
    let exec = find(RecordKind::Security, "exec");
    assert_eq!(
        (exec.decision, exec.reason.as_str()),
        (Audit::Denied, message)
    );
    let task = records
        .iter()
        .rfind(|r| r.kind == RecordKind::Task)
        .unwrap();
    assert_eq!(
        (
            task.operation.as_str(),
            task.exec_id.as_str(),
            task.decision
        ),
        ("Start", "e1", Audit::Denied)
    );
    assert!(task.reason.contains(message), "{}", task.reason);
    // In order: the agent's answer, the denial, the exec, the task call.
    let position = |r: &AuditRecord| records.iter().position(|x| x == r).unwrap();
    assert!(position(agent) < position(denial));
    assert!(position(denial) < position(exec));
    assert!(position(exec) < position(task));
}

#[tokio::test]
async fn a_refused_sandbox_never_starts_a_vm_and_its_findings_are_recorded() {
    let refusing = InspectionSection {
        mode: InspectionMode::Refuse,
        ..InspectionSection::default()
    };
    let h = Harness::with_inspection(refusing);
    let err = h.create("pod", cri("sandbox", "pod")).await.unwrap_err();
    assert_eq!(err.code(), ttrpc::Code::PERMISSION_DENIED);
    assert_eq!(
        h.launcher.launches.load(Ordering::SeqCst),
        0,
        "a VM was launched"
    );
    assert!(h.agent.calls().is_empty(), "{:?}", h.agent.calls());
    let findings = h.records_of(RecordKind::Security);
    assert!(!findings.is_empty());
    assert!(findings
        .iter()
        .all(|r| r.operation == "inspection-finding" && r.pod == "pod" && r.container == "pod"));
    let refused: Vec<&str> = findings
        .iter()
        .filter(|r| r.decision == Audit::Denied)
        .map(|r| r.details["id"].as_str().unwrap())
        .collect();
    assert!(
        refused.iter().all(|id| *id == "host-namespace"),
        "{refused:?}"
    );
    assert!(!refused.is_empty());
    // The lesser findings are recorded as warnings.
    assert!(findings
        .iter()
        .any(|r| r.decision == Audit::Allowed && r.details["id"] == "runs-as-root"));
}

#[tokio::test]
async fn warn_mode_records_each_finding_of_a_workload_container() {
    let h = Harness::new();
    h.create("pod", cri("sandbox", "pod")).await.unwrap();
    let before = h.records_of(RecordKind::Security).len();
    assert!(before > 0);
    h.create("app", cri("container", "pod")).await.unwrap();
    let app: Vec<AuditRecord> = h
        .records_of(RecordKind::Security)
        .into_iter()
        .filter(|r| r.container == "app")
        .collect();
    assert_eq!(app.len(), before, "the same spec, the same findings");
    assert!(app
        .iter()
        .all(|r| r.decision == Audit::Allowed && r.pod == "pod"));
    assert!(app.iter().any(|r| r.details["id"] == "host-namespace"));
}

#[tokio::test]
async fn a_vm_that_dies_with_a_kernel_panic_leaves_crash_and_panic_records() {
    let h = Harness::new();
    h.create("pod", cri("sandbox", "pod")).await.unwrap();
    h.start("pod", "").await.unwrap();
    let console = SandboxDir::new(h.launcher.state_dir.path(), "test", "pod")
        .vm_paths()
        .console_log();
    std::fs::write(
        &console,
        "[    1.0] agent up\n[    9.1] Kernel panic - not syncing: Fatal exception\n[    9.1] Rebooting in 1 seconds..\n",
    )
    .unwrap();
    h.launcher.vm_kill.send_replace(Some(ChildExit::Code(1)));
    assert_eq!(h.wait("pod", "").await.exit_status, 137);
    let crash = h.await_record("vm-exited").await;
    assert_eq!(
        (crash.kind, crash.decision),
        (RecordKind::Security, Audit::Failed)
    );
    assert!(crash.reason.contains("exit code 1"), "{}", crash.reason);
    let panic = h.await_record("guest-panic").await;
    assert_eq!(
        panic.reason,
        "[    9.1] Kernel panic - not syncing: Fatal exception"
    );
    assert_eq!(panic.details["console"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_lost_agent_connection_is_a_security_record_and_a_deleted_pod_is_not() {
    let h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    h.start("c1", "").await.unwrap();
    h.agent.close_events();
    assert_eq!(h.wait("c1", "").await.exit_status, 255);
    let lost = h.await_record("agent-lost").await;
    assert_eq!(lost.decision, Audit::Failed);

    // An orderly delete stops the VM without a crash record.
    let h = Harness::new();
    h.create("c2", serde_json::json!({})).await.unwrap();
    h.start("c2", "").await.unwrap();
    h.agent.send_exit("c2", "", 0).await;
    h.wait("c2", "").await;
    h.delete("c2", "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ops: Vec<String> = h
        .records_of(RecordKind::Security)
        .into_iter()
        .map(|r| r.operation)
        .filter(|op| op != "inspection-finding")
        .collect();
    assert!(ops.is_empty(), "{ops:?}");
}

#[tokio::test]
async fn security_records_are_also_published_to_containerd_in_order() {
    let mut h = Harness::new();
    h.create("c1", serde_json::json!({})).await.unwrap();
    let mut published = Vec::new();
    while let Ok(event) = h.events.try_recv() {
        if let TaskEvent::Security { record_json } = event {
            published.push(serde_json::from_str::<AuditRecord>(&record_json).unwrap());
        }
    }
    let recorded = h.records_of(RecordKind::Security);
    assert!(!recorded.is_empty());
    assert_eq!(published, recorded);
}

#[tokio::test]
async fn an_unwritable_audit_file_does_not_stop_the_shim() {
    let mut h = Harness::new();
    // A file where the audit folder should be: no record can be written.
    std::fs::write(h.launcher.state_dir.path().join("audit"), "").unwrap();
    h.create("c1", serde_json::json!({})).await.unwrap();
    let c = ctx("default");
    let start = api::StartRequest {
        id: "c1".into(),
        ..Default::default()
    };
    task_api(&h.service).start(&c, start).await.unwrap();
    h.agent.send_exit("c1", "", 0).await;
    assert_eq!(h.wait("c1", "").await.exit_status, 0);
    h.delete("c1", "").await.unwrap();
    assert_eq!(
        topics(&h.take_events()),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert!(h.audit_records().is_empty());
}

#[test]
fn confidential_refusals_map_to_codes_containerd_can_tell_apart() {
    use crate::confidential::ConfidentialError;
    let refused = ServiceError::Sandbox(SandboxError::Confidential(
        ConfidentialError::ShareRefused {
            what: "the container rootfs",
            path: "/var/lib/containerd/rootfs".into(),
            kind: "rootfs",
        },
    ));
    assert_eq!(refused.code(), ttrpc::Code::PERMISSION_DENIED);
    assert!(
        refused.to_string().contains("allow_host_shares"),
        "{refused}"
    );
    let bad_input = ServiceError::Sandbox(SandboxError::Confidential(
        ConfidentialError::BadKbsUrl("not a url".into()),
    ));
    assert_eq!(bad_input.code(), ttrpc::Code::INVALID_ARGUMENT);
    let old_qemu = ServiceError::Sandbox(SandboxError::Hypervisor(
        crate::vmm_client::HypervisorError::QemuTee(
            crate::vmm_client::QemuTeeError::ObjectMissing {
                qemu: "qemu-system-x86_64".into(),
                object: "sev-snp-guest",
                version: "9.1",
                found: " (found: QEMU emulator version 7.2.22)".into(),
            },
        ),
    ));
    assert_eq!(old_qemu.code(), ttrpc::Code::FAILED_PRECONDITION);
    assert!(old_qemu.to_string().contains("9.1"), "{old_qemu}");
}
