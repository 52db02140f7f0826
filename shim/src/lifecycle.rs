//! The shim process as containerd runs it: `start` (find or spawn the
//! pod's shim and print its address), the serving shim (task service,
//! events to containerd), and `delete` (clean up after a shim that died).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use tokio::sync::Mutex;

use crate::compat;
use crate::container::ExitReason;
use crate::events::{forward_to_containerd, timestamp, EventSender};
use crate::network::{network_namespace, PodNetworkNamespace};
use crate::sandbox::unplumb_network;
use crate::sandbox::{
    bundle_annotations, shim_grouping, unmount_everything_below, SandboxDir, VmLauncher,
};
use crate::service::TaskService;

/// containerd's runtime name for us (`io.containerd.cloister.v2` →
/// binary `containerd-shim-cloister-v2`).
pub const RUNTIME_ID: &str = "io.containerd.cloister.v2";
/// Where sandbox folders live on the host (short: the VM's sockets are in
/// them).
pub const STATE_DIR: &str = "/run/cloister/pods";

/// containerd-shim's options: no reaper and no subreaper — our children
/// (the VMM, QEMU) are `tokio::process` children that tokio reaps; a
/// global `waitpid(-1)` would steal their exit statuses.
pub fn shim_config() -> Config {
    Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

/// The annotations of the bundle in `dir` (start runs in the bundle).
fn annotations_in(dir: &Path) -> HashMap<String, String> {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_slice(&text).ok())
        .map(|spec| bundle_annotations(&spec))
        .unwrap_or_default()
}

pub struct CloisterShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    socket: String,
    /// The task API v2 server for containerd 1.x, while serving.
    v2_server: Mutex<Option<ttrpc::r#async::Server>>,
}

/// Whether a shim serves on the Unix socket `address` (`unix://PATH`).
fn shim_listening(address: &str) -> bool {
    let path = address.trim_start_matches("unix://");
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// The address of the pod's shim: the running one of `grouping` (further
/// containers of a pod, when containerd 1.x runs `start` per container),
/// else a newly spawned one. containerd-shim's `spawn` always starts a new
/// server, which would take the pod's socket away from the shim that runs
/// the pod's VM.
async fn find_or_spawn(
    opts: StartOpts,
    grouping: &str,
    vars: Vec<(&str, &str)>,
) -> Result<String, Error> {
    let address = opts.socket_address(grouping);
    if shim_listening(&address) {
        tracing::info!("container {} joins the shim of pod {grouping}", opts.id);
        return Ok(address);
    }
    spawn(opts, grouping, vars).await
}

impl CloisterShim {
    /// `start` for containerd 1.6/1.7: spawn (or find) the pod's shim with
    /// the v2 alias and print the alias's bare address.
    pub async fn start_legacy(flags: &Flags) -> Result<String, Error> {
        let opts = StartOpts {
            id: flags.id.clone(),
            publish_binary: flags.publish_binary.clone(),
            address: flags.address.clone(),
            ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
            namespace: flags.namespace.clone(),
            debug: flags.debug,
            ..Default::default()
        };
        let cwd = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let grouping = shim_grouping(&opts.id, &annotations_in(&cwd));
        let address = find_or_spawn(opts, &grouping, vec![(compat::TASK_API_V2_ENV, "1")]).await?;
        // containerd 1.x reconnects after its own restart through this file,
        // speaking the task API v2: it must name the v2 socket.
        let v2 = compat::v2_address(&address);
        write_str_to_file("address", &v2).await?;
        Ok(v2)
    }

    /// The `ShimDelete` record of the `delete` subcommand, in the audit
    /// file of the config containerd's environment names (the
    /// RuntimeClass's options do not reach `delete`).
    fn audit_shim_delete(&self) {
        use crate::audit::{AuditLog, Subject};
        use crate::config::{ConfigSource, RuntimeConfig, CONFIG_ENV};
        let env = std::env::var(CONFIG_ENV).ok();
        let section = match RuntimeConfig::load(&ConfigSource::resolve(None, env.as_deref())) {
            Ok(config) => config.audit,
            Err(e) => {
                tracing::warn!("runtime config for the audit trail: {e}");
                crate::audit::AuditSection::default()
            }
        };
        let audit = AuditLog::new(&self.namespace);
        audit.configure(&section);
        // containerd runs `delete` in the bundle.
        let bundle = std::env::current_dir().unwrap_or_default();
        let subject = Subject {
            pod: shim_grouping(&self.id, &annotations_in(&bundle)),
            container: self.id.clone(),
            exec_id: String::new(),
        };
        let details = serde_json::json!({ "bundle": bundle.display().to_string() });
        audit.task(None, subject, "ShimDelete", Ok(()), details);
    }

    async fn serve_task_api_v2(&self, service: &TaskService) -> Result<(), String> {
        let address = compat::v2_address(&self.socket);
        let path = address.trim_start_matches("unix://");
        // The first shim on a host runs before containerd-shim creates the
        // socket folder for its own socket.
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // A stale socket of a shim that died.
        let _ = std::fs::remove_file(path);
        let task: Arc<dyn containerd_shim_protos::shim_async::Task + Send + Sync> =
            Arc::new(service.clone());
        let services =
            compat::as_task_api_v2(containerd_shim_protos::shim_async::create_task(task));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&address)
            .map_err(|e| format!("bind {address}: {e}"))?
            .register_service(services);
        server
            .start()
            .await
            .map_err(|e| format!("serve {address}: {e}"))?;
        *self.v2_server.lock().await = Some(server);
        Ok(())
    }
}

#[async_trait]
impl Shim for CloisterShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
            v2_server: Mutex::new(None),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let cwd = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let grouping = shim_grouping(&opts.id, &annotations_in(&cwd));
        let address = find_or_spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    /// After the shim died: its VM's processes died with it
    /// (PDEATHSIG) except QEMU, which loses that signal when it drops to
    /// the pod's uid (a killed shim was seen to leave it running), so
    /// what is left is QEMU, the sandbox folder and the rootfs mounts in
    /// it.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        self.audit_shim_delete();
        let dir = SandboxDir::new(Path::new(STATE_DIR), &self.namespace, &self.id);
        let record = dir.vm_paths().vm_processes();
        tokio::task::spawn_blocking(move || crate::vm_processes::kill_recorded(&record))
            .await
            .unwrap_or_default();
        unmount_everything_below(&dir);
        if let Err(e) = dir.remove() {
            tracing::warn!("{e}");
        }
        // containerd runs `delete` in the bundle: the pod's taps and
        // redirects in its network namespace go too (idempotent).
        let spec = std::fs::read("config.json")
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        if let Some(PodNetworkNamespace::Path(netns)) =
            spec.and_then(|spec| network_namespace(&spec).ok())
        {
            unplumb_network(&netns).await;
        }
        Ok(DeleteResponse {
            exit_status: ExitReason::SandboxGone.exit_status(),
            exited_at: Some(timestamp(std::time::SystemTime::now())).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        if let Some(mut server) = self.v2_server.lock().await.take() {
            let _ = server.shutdown().await;
            let address = compat::v2_address(&self.socket);
            let _ = std::fs::remove_file(address.trim_start_matches("unix://"));
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let (sender, events) = EventSender::channel();
        tokio::spawn(forward_to_containerd(
            events,
            publisher,
            self.namespace.clone(),
        ));
        let launcher = Arc::new(VmLauncher {
            namespace: self.namespace.clone(),
            state_dir: PathBuf::from(STATE_DIR),
        });
        let audit = crate::audit::AuditLog::new(&self.namespace);
        let service = TaskService::with_audit(launcher, sender, self.exit.clone(), audit);
        if std::env::var_os(compat::TASK_API_V2_ENV).is_some() {
            if let Err(e) = self.serve_task_api_v2(&service).await {
                tracing::error!("task API v2 for containerd 1.x: {e}");
            }
        }
        service
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_come_from_the_bundle_in_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod9"}}"#,
        )
        .unwrap();
        let annotations = annotations_in(dir.path());
        assert_eq!(shim_grouping("app", &annotations), "pod9");
        assert!(annotations_in(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn shim_does_not_reap_tokios_children() {
        let config = shim_config();
        assert!(config.no_reaper && config.no_sub_reaper);
    }
}
