//! The task service running a CRI-style pod in a real guest: everything is
//! the shim's real code — `TaskService`, `PodSandbox`, the `Qemu` backend,
//! the ttrpc agent client over hybrid vsock, FIFO copying, task events —
//! except where container root file systems come from. Until the VMM has a
//! virtio-fs device the pod cannot get the shared folder, so this test's
//! launcher hands the agent the busybox rootfs built into the agent image
//! instead of sharing the bundle's.
//!
//! Covers: the pod's sandbox container and a workload container in one VM,
//! output and exit status through FIFOs and Wait, exec, pause/resume,
//! stats, events in containerd's order, and a killed VM turning the pod's
//! running processes into exits with status 137; then deletes leave no
//! process and no sandbox folder.

mod guest_support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cloister_protocol::agent;
use cloister_shim::agent_client::AgentEndpoint;
use cloister_shim::config::RuntimeConfig;
use cloister_shim::events::{EventSender, TaskEvent};
use cloister_shim::guest_spec::SharedMount;
use cloister_shim::sandbox::{
    setup_request, PodSandbox, SandboxDir, SandboxError, SandboxLauncher, CRI_CONTAINER_TYPE,
    CRI_SANDBOX_ID,
};
use cloister_shim::service::TaskService;
use cloister_shim::vmm_client::{Hypervisor, Qemu};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::types::task::Status as TaskStatus;
use guest_support::*;

/// The real VM and agent; the rootfs from the guest image (see above).
struct GuestLauncher {
    config: RuntimeConfig,
    state_dir: tempfile::TempDir,
    vm_pids: Arc<Mutex<Vec<u32>>>,
    /// Holds the audit file (beside, not in, the sandbox folders).
    audit_dir: tempfile::TempDir,
}

impl GuestLauncher {
    /// The guest's console (kernel and agent log) of the running pod.
    fn console(&self) -> String {
        let mut text = String::new();
        for entry in self.state_dir.path().read_dir().unwrap().flatten() {
            text += &std::fs::read_to_string(entry.path().join("console.log")).unwrap_or_default();
        }
        text
    }
}

#[async_trait]
impl SandboxLauncher for GuestLauncher {
    /// The test's config, its audit trail in the test's folder.
    fn load_config(&self, _: Option<&str>) -> Result<RuntimeConfig, SandboxError> {
        let mut config = self.config.clone();
        config.audit.path = self.audit_dir.path().join("audit.jsonl");
        Ok(config)
    }

    async fn launch(
        &self,
        sandbox_id: &str,
        _spec: &serde_json::Value,
        _config: &RuntimeConfig,
        _audit: &cloister_shim::audit::AuditLog,
    ) -> Result<PodSandbox, SandboxError> {
        let dir = SandboxDir::new(self.state_dir.path(), "test", sandbox_id);
        dir.create()?;
        let mut qemu = Qemu::new(&self.config, &guest_vm(), dir.vm_paths());
        qemu.start().await?;
        *self.vm_pids.lock().unwrap() = qemu.pids();
        let agent = AgentEndpoint::HybridVsock {
            uds: qemu.vsock_uds(),
        }
        .connect_until(AGENT_DEADLINE)
        .await?;
        // No shared folder to mount: hostname only.
        let mut setup = setup_request("pod");
        setup.mounts.clear();
        cloister_shim::agent_client::AgentClient::setup_sandbox(&agent, setup).await?;
        Ok(PodSandbox::new(
            sandbox_id,
            Arc::new(agent),
            dir,
            Some(Box::new(qemu)),
        ))
    }

    async fn share_rootfs(
        &self,
        _sandbox: &PodSandbox,
        _container_id: &str,
        _mounts: &[api::Mount],
        _root_dir: &Path,
    ) -> Result<agent::Rootfs, SandboxError> {
        let mut rootfs = agent::Rootfs::new();
        rootfs.set_directory(GUEST_ROOTFS.into());
        Ok(rootfs)
    }

    /// Without a shared folder there is nowhere to put a bind mount.
    fn share_mounts(
        &self,
        sandbox: &PodSandbox,
        container_id: &str,
        mounts: &[SharedMount],
    ) -> Result<(), SandboxError> {
        match mounts.first() {
            None => Ok(()),
            Some(mount) => Err(SandboxError::Rootfs {
                container_id: container_id.into(),
                target: sandbox.dir.shared_dir().join(&mount.share_path),
                reason: "the guest test launcher has no shared folder".into(),
            }),
        }
    }

    fn unshare_rootfs(&self, _: &PodSandbox, _: &str) -> Result<(), SandboxError> {
        Ok(())
    }
}

fn bundle(root: &Path, id: &str, args: &[&str], annotations: serde_json::Value) -> String {
    bundle_with(root, id, args, annotations, |_| {})
}

fn bundle_with(
    root: &Path,
    id: &str,
    args: &[&str],
    annotations: serde_json::Value,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec = spec(args);
    spec["annotations"] = annotations;
    edit(&mut spec);
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
    dir.display().to_string()
}

/// The service under test and what the test watches.
struct GuestPod {
    launcher: Arc<GuestLauncher>,
    service: TaskService,
    events: tokio::sync::mpsc::UnboundedReceiver<TaskEvent>,
    exit: Arc<ExitSignal>,
}

fn guest_service() -> Option<GuestPod> {
    let config = match guest_config() {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return None;
        }
    };
    let launcher = Arc::new(GuestLauncher {
        config,
        state_dir: tempfile::tempdir().unwrap(),
        vm_pids: Arc::new(Mutex::new(Vec::new())),
        audit_dir: tempfile::tempdir().unwrap(),
    });
    let (sender, events) = EventSender::channel();
    let exit = Arc::new(ExitSignal::default());
    let service = TaskService::new(launcher.clone(), sender, exit.clone());
    Some(GuestPod {
        launcher,
        service,
        events,
        exit,
    })
}

async fn wait(service: &TaskService, id: &str, exec_id: &str) -> u32 {
    let req = api::WaitRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(120), service.wait(&req))
        .await
        .expect("Wait did not return in 120 s")
        .unwrap()
        .exit_status
}

async fn status(service: &TaskService, id: &str) -> TaskStatus {
    let req = api::StateRequest {
        id: id.into(),
        ..Default::default()
    };
    service
        .state(&req)
        .await
        .unwrap()
        .status
        .enum_value()
        .unwrap()
}

async fn start(service: &TaskService, id: &str, exec_id: &str) {
    let req = api::StartRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    service.start(&req).await.unwrap();
}

async fn delete(service: &TaskService, id: &str, exec_id: &str) -> api::DeleteResponse {
    let req = api::DeleteRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    service.delete(&req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_in_a_guest_and_a_killed_vm_ends_it_with_137() {
    let Some(GuestPod {
        launcher,
        service,
        mut events,
        exit,
    }) = guest_service()
    else {
        return;
    };
    let bundles = tempfile::tempdir().unwrap();
    let fifos = tempfile::tempdir().unwrap();

    // The pod's sandbox container boots the VM.
    let pod_bundle = bundle(
        bundles.path(),
        "pod",
        &["sleep", "1000"],
        serde_json::json!({ CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "pod" }),
    );
    let started = std::time::Instant::now();
    service
        .create(&api::CreateTaskRequest {
            id: "pod".into(),
            bundle: pod_bundle,
            ..Default::default()
        })
        .await
        .unwrap();
    println!(
        "pod sandbox created (VM booted, agent set up) in {:.1?}",
        started.elapsed()
    );
    start(&service, "pod", "").await;

    // A workload container of the pod: output and exit status.
    let stdout = fifo(fifos.path(), "app-out");
    let reader = read_fifo(stdout.clone());
    service
        .create(&api::CreateTaskRequest {
            id: "app".into(),
            bundle: bundle(
                bundles.path(),
                "app",
                &["sh", "-c", "echo hello from $(uname -r); exit 3"],
                serde_json::json!({ CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "pod" }),
            ),
            stdout: stdout.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    start(&service, "app", "").await;
    assert_eq!(wait(&service, "app", "").await, 3);
    let out = reader.await.unwrap();
    assert!(out.starts_with("hello from "), "{out:?}");
    let host = nix::sys::utsname::uname().unwrap();
    assert!(!out.contains(&*host.release().to_string_lossy()), "{out:?}");
    assert_eq!(status(&service, "app").await, TaskStatus::STOPPED);

    // Exec in the running sandbox container.
    let exec_out = fifo(fifos.path(), "exec-out");
    let exec_reader = read_fifo(exec_out.clone());
    let process = serde_json::json!({"args": ["sh", "-c", "echo exec in $(hostname)"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    service
        .exec(&api::ExecProcessRequest {
            id: "pod".into(),
            exec_id: "e1".into(),
            stdout: exec_out,
            spec: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: serde_json::to_vec(&process).unwrap(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    start(&service, "pod", "e1").await;
    assert_eq!(wait(&service, "pod", "e1").await, 0);
    assert_eq!(exec_reader.await.unwrap(), "exec in in-guest\n");
    delete(&service, "pod", "e1").await;

    // Pause, resume, stats.
    service.pause("pod").await.unwrap();
    assert_eq!(status(&service, "pod").await, TaskStatus::PAUSED);
    service.resume("pod").await.unwrap();
    assert_eq!(status(&service, "pod").await, TaskStatus::RUNNING);
    let stats = service.stats("pod").await.unwrap();
    assert_eq!(stats.stats.type_url, "io.containerd.cgroups.v2.Metrics");

    // The VM dies: the still-running sandbox container exits with 137.
    let vm_pids = launcher.vm_pids.lock().unwrap().clone();
    let qemu_pid = vm_pids[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(qemu_pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait(&service, "pod", "").await, 137);

    delete(&service, "app", "").await;
    let deleted = delete(&service, "pod", "").await;
    assert_eq!(deleted.exit_status, 137);
    for pid in &vm_pids {
        assert!(process_gone(*pid), "VM process {pid} left running");
    }
    assert_eq!(
        launcher.state_dir.path().read_dir().unwrap().count(),
        0,
        "sandbox folder left behind"
    );

    let mut topics = Vec::new();
    let mut security = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let TaskEvent::Security { record_json } = &event {
            let record: serde_json::Value = serde_json::from_str(record_json).unwrap();
            security.push(record["operation"].as_str().unwrap_or_default().to_owned());
            continue;
        }
        if let TaskEvent::Exit {
            exit_status,
            exec_id,
            container_id,
            ..
        } = &event
        {
            println!("exit {container_id}/{exec_id}: {exit_status}");
        }
        topics.push(event.topic());
    }
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete",
            "/tasks/delete",
        ]
    );
    // Security audit records went to containerd as events too: the exec
    // and the VM's death among them.
    for operation in ["inspection-finding", "exec", "vm-exited"] {
        assert!(
            security.iter().any(|op| op == operation),
            "{operation} not in {security:?}"
        );
    }
    service.shutdown().await;
    tokio::time::timeout(Duration::from_secs(1), exit.wait())
        .await
        .expect("shim did not signal its exit after the last delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_close_io_terminal_and_oom_in_a_guest() {
    let Some(GuestPod {
        launcher,
        service,
        mut events,
        ..
    }) = guest_service()
    else {
        return;
    };
    let bundles = tempfile::tempdir().unwrap();
    let fifos = tempfile::tempdir().unwrap();

    // stdin with the writer still open: CloseIO ends it, after what was
    // written reached the process.
    let stdin = fifo(fifos.path(), "cat-in");
    let stdout = fifo(fifos.path(), "cat-out");
    let reader = read_fifo(stdout.clone());
    service
        .create(&api::CreateTaskRequest {
            id: "cat".into(),
            bundle: bundle(
                bundles.path(),
                "cat",
                &["cat"],
                serde_json::json!({ CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "cat" }),
            ),
            stdin: stdin.clone(),
            stdout,
            ..Default::default()
        })
        .await
        .unwrap();
    start(&service, "cat", "").await;
    let mut writer = open_writer(stdin).await.unwrap();
    std::io::Write::write_all(&mut writer, b"line one\nline two\n").unwrap();
    service
        .close_io(&api::CloseIORequest {
            id: "cat".into(),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();
    println!("stage: CloseIO sent");
    assert_eq!(wait(&service, "cat", "").await, 0);
    println!("stage: cat exited");
    assert_eq!(reader.await.unwrap(), "line one\nline two\n");
    drop(writer);

    // A terminal: input echoed, the window size from ResizePty.
    let tty_in = fifo(fifos.path(), "tty-in");
    let tty_out = fifo(fifos.path(), "tty-out");
    let tty_reader = read_fifo(tty_out.clone());
    service
        .create(&api::CreateTaskRequest {
            id: "tty".into(),
            bundle: bundle_with(
                bundles.path(),
                "tty",
                &["sh", "-c", "read line; echo got $line; stty size"],
                serde_json::json!({ CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "cat" }),
                |spec| {
                    spec["process"]["terminal"] = true.into();
                    spec["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                        "destination": "/dev/pts", "type": "devpts", "source": "devpts",
                        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
                    }));
                },
            ),
            stdin: tty_in.clone(),
            stdout: tty_out,
            terminal: true,
            ..Default::default()
        })
        .await
        .unwrap();
    start(&service, "tty", "").await;
    service
        .resize_pty(&api::ResizePtyRequest {
            id: "tty".into(),
            width: 100,
            height: 40,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tty_writer = open_writer(tty_in).await.unwrap();
    std::io::Write::write_all(&mut tty_writer, b"hi\n").unwrap();
    println!("stage: tty input written");
    assert_eq!(wait(&service, "tty", "").await, 0);
    println!("stage: tty exited");
    drop(tty_writer);
    let screen = tty_reader.await.unwrap();
    assert!(screen.contains("got hi\r\n"), "{screen:?}");
    assert!(screen.contains("40 100"), "{screen:?}");

    // Over its memory limit: TaskOOM, then exit 137.
    service
        .create(&api::CreateTaskRequest {
            id: "oom".into(),
            bundle: bundle_with(
                bundles.path(),
                "oom",
                // A 64 MiB buffer under a 32 MiB limit.
                &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                serde_json::json!({ CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: "cat" }),
                |spec| {
                    spec["linux"]["resources"] =
                        serde_json::json!({ "memory": { "limit": 33554432, "swap": 33554432 } })
                },
            ),
            ..Default::default()
        })
        .await
        .unwrap();
    start(&service, "oom", "").await;
    let waited = tokio::time::timeout(
        Duration::from_secs(120),
        service.wait(&api::WaitRequest {
            id: "oom".into(),
            ..Default::default()
        }),
    )
    .await;
    let Ok(Ok(waited)) = waited else {
        panic!("no exit of oom; guest console:\n{}", launcher.console());
    };
    assert_eq!(waited.exit_status, 137);
    // The agent reports the OOM kill from memory.events, around the exit.
    let mut saw_oom = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !saw_oom {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(TaskEvent::Oom { container_id })) => saw_oom = container_id == "oom",
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert!(saw_oom, "no TaskOOM for container oom");
    println!("stage: oom exited");

    for id in ["oom", "tty", "cat"] {
        delete(&service, id, "").await;
    }
    let vm_pids = launcher.vm_pids.lock().unwrap().clone();
    for pid in &vm_pids {
        assert!(process_gone(*pid), "VM process {pid} left running");
    }
}
