//! Host test fixture: the real `cloister-agent --listen unix:PATH` with a
//! busybox rootfs, reached through the shim's `AgentEndpoint::Unix`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloister_protocol::agent;
use cloister_shim::agent_client::{AgentEndpoint, TtrpcAgentClient};

/// The agent binary: `CLOISTER_AGENT_BIN`, or the one cargo built next to
/// this test (`target/debug/cloister-agent`).
pub fn agent_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("CLOISTER_AGENT_BIN") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let debug_dir = exe.parent()?.parent()?;
    let candidate = debug_dir.join("cloister-agent");
    candidate.exists().then_some(candidate)
}

/// Why the host tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("host agent tests need root (namespaces, mounts, pivot_root)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (Debian package busybox-static)".into());
    }
    if agent_binary().is_none() {
        return Some(
            "cloister-agent not built: run `cargo build -p cloister-agent` or set CLOISTER_AGENT_BIN"
                .into(),
        );
    }
    None
}

macro_rules! skip_unless_host_ready {
    () => {
        if let Some(reason) = support::skip_reason() {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}
pub(crate) use skip_unless_host_ready;

pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    root
}

/// The real agent on a Unix socket.
pub struct HostAgent {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub endpoint: AgentEndpoint,
    child: Child,
    /// A private cgroup v2 parent for this agent's containers, removed
    /// (with whatever still runs in it) when the fixture drops.
    cgroup_root: Option<PathBuf>,
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// Kills everything below `dir` and removes the cgroups, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl HostAgent {
    pub async fn start() -> (HostAgent, TtrpcAgentClient) {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = busybox_rootfs(dir.path());
        let socket = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let cgroup_root = cgroup2_mount().map(|mount| {
            let name = dir.path().file_name().unwrap().to_string_lossy();
            let root = mount.join(format!(
                "cloister-shim-test{}",
                name.trim_start_matches('.')
            ));
            std::fs::create_dir(&root).unwrap();
            root
        });
        let mut command = Command::new(agent_binary().unwrap());
        if let Some(root) = &cgroup_root {
            command.arg("--cgroup-root").arg(root);
        }
        let child = command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let endpoint = AgentEndpoint::Unix { agent: socket };
        let client = endpoint
            .connect_until(Duration::from_secs(30))
            .await
            .unwrap();
        (
            HostAgent {
                dir,
                rootfs,
                endpoint,
                child,
                cgroup_root,
            },
            client,
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // On the host, containers outlive a killed agent (in a guest they
        // die with the VM): end them with their cgroups.
        if let Some(root) = &self.cgroup_root {
            remove_cgroup_tree(root);
        }
    }
}

/// A minimal spec running `args` in its own namespaces.
pub fn spec(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.1.0",
        "hostname": "box",
        "process": {
            "terminal": terminal,
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs" },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] }
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]
        }
    })
}

pub fn create_request(
    id: &str,
    rootfs: &Path,
    spec: &serde_json::Value,
    stdin: bool,
    terminal: bool,
) -> agent::CreateContainerRequest {
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = id.into();
    request.oci_spec_json = serde_json::to_vec(spec).unwrap();
    let mut root = agent::Rootfs::new();
    root.set_directory(rootfs.display().to_string());
    request.rootfs = Some(root).into();
    let mut stdio = agent::Stdio::new();
    stdio.stdin = stdin;
    stdio.stdout = true;
    stdio.stderr = !terminal;
    stdio.terminal = terminal;
    request.stdio = Some(stdio).into();
    request
}
