//! Host test fixture: a busybox rootfs, a running `cloister-agent
//! --listen unix:…`, and a ttrpc client with stdio helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use cloister_protocol::stdio::{AttachReply, StreamHeader, StreamKind, REPLY_FIXED_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Why host tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("host agent tests need root (namespaces, mounts, pivot_root)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (Debian package busybox-static)".into());
    }
    None
}

#[allow(unused_macros)]
macro_rules! skip_unless_host_ready {
    () => {
        if let Some(reason) = support::skip_reason() {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use skip_unless_host_ready;

/// A busybox rootfs in a temporary directory.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "proc",
        "dev",
        "sys",
        "tmp",
        "etc",
        "root",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    root
}

/// A running agent on a Unix socket in a temporary directory.
pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub socket: PathBuf,
    child: Child,
    pub client: AgentServiceClient,
    /// A private cgroup v2 parent for this agent's containers, if the host
    /// has a cgroup v2 hierarchy.
    pub cgroup_root: Option<PathBuf>,
}

/// Where this host's cgroup v2 hierarchy is mounted.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// Kills everything below `dir` and removes the cgroups, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl TestAgent {
    pub async fn start() -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = busybox_rootfs(dir.path());
        let socket = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let cgroup_root = cgroup2_mount().map(|m| {
            let name = dir
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches('.')
                .to_owned();
            let root = m.join(format!("cloister-test-{name}"));
            std::fs::create_dir(&root).unwrap();
            root
        });
        let mut command = Command::new(env!("CARGO_BIN_EXE_cloister-agent"));
        if let Some(root) = &cgroup_root {
            command.arg("--cgroup-root").arg(root);
        }
        let child = command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let address = format!("unix://{}", socket.display());
        let mut client = None;
        // 30 s: an agent start is milliseconds, but not on a loaded machine.
        for _ in 0..1500 {
            if socket.exists() {
                if let Ok(c) = ttrpc::r#async::Client::connect(&address).await {
                    client = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = AgentServiceClient::new(client.expect("agent socket did not come up"));
        TestAgent {
            dir,
            rootfs,
            socket,
            child,
            client,
            cgroup_root,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// A new connection (for a second, concurrent caller).
    pub async fn connect(&self) -> AgentServiceClient {
        let address = format!("unix://{}", self.socket.display());
        AgentServiceClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap())
    }

    /// Opens a stdio stream; Err carries the refusal.
    pub async fn attach(
        &self,
        container: &str,
        exec: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, String> {
        let path = format!("{}.stdio", self.socket.display());
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(|e| e.to_string())?;
        let header = StreamHeader {
            container_id: container.into(),
            exec_id: exec.into(),
            kind,
        };
        stream
            .write_all(&header.encode().unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let mut fixed = [0u8; REPLY_FIXED_LEN];
        stream
            .read_exact(&mut fixed)
            .await
            .map_err(|e| e.to_string())?;
        let (_, len) = AttachReply::parse_fixed(&fixed).map_err(|e| e.to_string())?;
        let mut message = vec![0u8; len];
        stream
            .read_exact(&mut message)
            .await
            .map_err(|e| e.to_string())?;
        let mut all = fixed.to_vec();
        all.extend_from_slice(&message);
        match AttachReply::decode(&all).map_err(|e| e.to_string())? {
            AttachReply::Attached => Ok(stream),
            AttachReply::Refused(reason) => Err(reason),
        }
    }

    pub fn cgroup_dir(&self, id: &str) -> Option<PathBuf> {
        let dir = self.cgroup_root.as_ref()?.join("cloister").join(id);
        dir.exists().then_some(dir)
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Containers outlive a killed agent on the host (in a guest they die
        // with the VM): end them with their cgroups.
        if let Some(root) = &self.cgroup_root {
            remove_cgroup_tree(root);
        }
    }
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// A minimal runc-like spec running `args`.
pub fn spec(args: &[&str]) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    serde_json::json!({
        "ociVersion": "1.1.0",
        "hostname": "box",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 },
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs" },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"] }
        ],
        "linux": {
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "network" }],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/acpi"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub fn create_request(
    id: &str,
    rootfs: &Path,
    spec: &serde_json::Value,
    stdio: agent::Stdio,
) -> agent::CreateContainerRequest {
    let mut request = agent::CreateContainerRequest::new();
    request.container_id = id.into();
    request.oci_spec_json = serde_json::to_vec(spec).unwrap();
    let mut root = agent::Rootfs::new();
    root.set_directory(rootfs.display().to_string());
    request.rootfs = Some(root).into();
    request.stdio = Some(stdio).into();
    request
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> agent::Stdio {
    let mut s = agent::Stdio::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s.terminal = terminal;
    s
}

pub async fn read_all(mut stream: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out))
        .await
        .expect("stdio stream did not reach EOF")
        .unwrap();
    out
}

/// The ttrpc status message of an error.
pub fn error_text(err: &ttrpc::Error) -> String {
    match err {
        ttrpc::Error::RpcStatus(status) => format!("{:?}: {}", status.code(), status.message()),
        other => other.to_string(),
    }
}
