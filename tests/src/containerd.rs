//! A private containerd for end-to-end tests and the demo: its own root,
//! state, sockets and opt folder under one temporary folder, so it never
//! clashes with a containerd the machine runs (see
//! `shared/notes/containerd-e2e.md`). Works with Debian's 1.6 (config
//! version 2) and with 2.x from sid (config version 3,
//! `scripts/install-containerd2.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cloister_guest_image::paths;
use cloister_shim::compat::containerd_version;

/// Names a folder holding containerd 2.x's `containerd` and `ctr`.
pub const CONTAINERD2_DIR_ENV: &str = "CLOISTER_CONTAINERD2_DIR";
/// Where `scripts/install-containerd2.sh` unpacks sid's containerd.
const CONTAINERD2_CACHE: &str = "tools/containerd2/usr/bin";
/// How long a containerd gets to open its socket.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// Errors starting a private containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("containerd did not open {socket} within {waited:?}:\n{log}")]
    NotStarted {
        socket: PathBuf,
        waited: Duration,
        log: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerdError {
    let what = what.into();
    move |source| ContainerdError::Io { what, source }
}

/// A containerd and its `ctr`, with the version the binary reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdBinaries {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub version: (u32, u32),
}

impl ContainerdBinaries {
    /// The pair in `dir`, if both are there and containerd says its version.
    pub fn in_dir(dir: &Path) -> Option<Self> {
        let containerd = dir.join("containerd");
        let ctr = dir.join("ctr");
        if !containerd.is_file() || !ctr.is_file() {
            return None;
        }
        let version = containerd_version(&containerd)?;
        Some(Self {
            containerd,
            ctr,
            version,
        })
    }

    /// The machine's own containerd (Debian's 1.6 here), found on `PATH`.
    pub fn system() -> Option<Self> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).find_map(|dir| Self::in_dir(&dir))
    }

    /// containerd 2.x: `$CLOISTER_CONTAINERD2_DIR`, else what
    /// `scripts/install-containerd2.sh` fetched into the cache.
    pub fn containerd2() -> Option<Self> {
        let dir = std::env::var_os(CONTAINERD2_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| paths::cache_dir().join(CONTAINERD2_CACHE));
        Self::in_dir(&dir).filter(|b| b.version.0 >= 2)
    }

    pub fn describe(&self) -> String {
        format!(
            "containerd {}.{} ({})",
            self.version.0,
            self.version.1,
            self.containerd.display()
        )
    }
}

/// Debian's containerd (1.x) and 2.x from sid, each when present; a
/// missing one is printed as a skip, so a test runs under what it can.
pub fn available_containerds() -> Vec<ContainerdBinaries> {
    let mut found = Vec::new();
    match ContainerdBinaries::system() {
        Some(binaries) => found.push(binaries),
        None => eprintln!(
            "SKIP (containerd 1.x): containerd and ctr not on PATH (Debian package containerd)"
        ),
    }
    match ContainerdBinaries::containerd2() {
        Some(binaries) => found.push(binaries),
        None => eprintln!("SKIP (containerd 2.x): not fetched (scripts/install-containerd2.sh)"),
    }
    found
}

/// containerd's CRI plugin, set up for pods of the `handler` runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriSettings {
    /// The RuntimeClass handler name (`cloister`).
    pub handler: String,
    /// Its `runtime_type`, e.g. `io.containerd.cloister.v2`.
    pub runtime_type: String,
    /// The runtime option `ConfigPath` (our runtime config), if any.
    pub runtime_config: Option<PathBuf>,
    /// The pod sandbox ("pause") image, which must be imported in `k8s.io`.
    pub sandbox_image: String,
    /// CNI network configs and plugin binaries.
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
}

impl CriSettings {
    /// The CRI part of the config, for config version 2 (1.x) or 3 (2.x).
    fn toml(&self, major: u32) -> String {
        let options = self
            .runtime_config
            .as_ref()
            .map(|path| format!("ConfigPath = \"{}\"\n", path.display()))
            .unwrap_or_default();
        let (handler, runtime_type) = (&self.handler, &self.runtime_type);
        let (conf, bin, image) = (
            self.cni_conf_dir.display(),
            self.cni_bin_dir.display(),
            &self.sandbox_image,
        );
        // These hosts lack CAP_SYS_RESOURCE: containerd must not lower
        // oom_score_adj below its own.
        if major >= 2 {
            format!(
                "[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = '{image}'\n\
                 [plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = true\n  disable_apparmor = true\n\
                 [plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = '{handler}'\n\
                 [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{handler}]\n  runtime_type = '{runtime_type}'\n  pod_annotations = ['io.cloister.*']\n\
                 [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{handler}.options]\n{options}\
                 [plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = ['{bin}']\n  conf_dir = '{conf}'\n"
            )
        } else {
            let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
            format!(
                "[{cri}]\n  sandbox_image = \"{image}\"\n  restrict_oom_score_adj = true\n  disable_apparmor = true\n\
                 [{cri}.containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"{handler}\"\n\
                 [{cri}.containerd.runtimes.{handler}]\n  runtime_type = \"{runtime_type}\"\n  pod_annotations = [\"io.cloister.*\"]\n\
                 [{cri}.containerd.runtimes.{handler}.options]\n{options}\
                 [{cri}.cni]\n  bin_dir = \"{bin}\"\n  conf_dir = \"{conf}\"\n"
            )
        }
    }
}

/// A running private containerd, killed on drop.
#[derive(Debug)]
pub struct PrivateContainerd {
    dir: tempfile::TempDir,
    child: Child,
    binaries: ContainerdBinaries,
    env: Vec<(String, PathBuf)>,
}

impl PrivateContainerd {
    /// Starts `binaries.containerd` with a config of its own; `env` reaches
    /// containerd and so every shim it starts (e.g. `CLOISTER_CONFIG`).
    pub fn start(
        binaries: &ContainerdBinaries,
        env: &[(&str, &Path)],
    ) -> Result<Self, ContainerdError> {
        Self::start_with_cri(binaries, env, None)
    }

    /// [`Self::start`] with the CRI plugin set up as `cri` says.
    pub fn start_with_cri(
        binaries: &ContainerdBinaries,
        env: &[(&str, &Path)],
        cri: Option<&CriSettings>,
    ) -> Result<Self, ContainerdError> {
        let dir = tempfile::tempdir().map_err(io_error("create a temporary folder"))?;
        let mut config = containerd_config(dir.path(), binaries.version.0);
        if let Some(cri) = cri {
            config.push_str(&cri.toml(binaries.version.0));
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).map_err(io_error("write containerd's config"))?;
        let env: Vec<(String, PathBuf)> = env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_path_buf()))
            .collect();
        let child = spawn_containerd(binaries, dir.path(), &env)?;
        let containerd = Self {
            dir,
            child,
            binaries: binaries.clone(),
            env,
        };
        containerd.wait_for_socket()?;
        Ok(containerd)
    }

    /// Kills containerd (SIGKILL, as a crash) and starts it again on the
    /// same folders: running tasks' shims must survive and be found again.
    pub fn crash_and_restart(&mut self) -> Result<(), ContainerdError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.socket());
        self.child = spawn_containerd(&self.binaries, self.dir.path(), &self.env)?;
        self.wait_for_socket()
    }

    fn wait_for_socket(&self) -> Result<(), ContainerdError> {
        let socket = self.socket();
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > START_DEADLINE {
                return Err(ContainerdError::NotStarted {
                    socket,
                    waited: START_DEADLINE,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The folder holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn binaries(&self) -> &ContainerdBinaries {
        &self.binaries
    }

    /// Runs `ctr --address <ours> args…` to completion.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.binaries.ctr.display()))
    }

    /// The `ctr` command for `args`, to run with other stdio.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binaries.ctr);
        command.arg("--address").arg(self.socket()).args(args);
        command
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Starts `ctr events` and returns once it is subscribed: a probe
    /// namespace is created (containerd publishes `/namespaces/create`)
    /// until the watcher prints it. Without this wait an event published
    /// right after the spawn (a Create's security findings) can precede the
    /// subscription on a loaded machine and be missed.
    pub fn watch_events(&self) -> Result<EventWatch, ContainerdError> {
        let out = tempfile::NamedTempFile::new().map_err(io_error("create the events file"))?;
        let reopen = || out.reopen().map_err(io_error("reopen the events file"));
        let child = self
            .ctr_command(&["events"])
            .stdin(Stdio::null())
            .stdout(reopen()?)
            .stderr(reopen()?)
            .spawn()
            .map_err(io_error(format!(
                "run {} events",
                self.binaries.ctr.display()
            )))?;
        let mut watch = EventWatch { child, out };
        let started = Instant::now();
        for attempt in 0u32.. {
            let probe = format!("cloister-events-probe-{}-{attempt}", std::process::id());
            self.ctr(&["namespaces", "create", &probe]);
            let seen_by = Instant::now() + Duration::from_millis(500);
            while Instant::now() < seen_by {
                if watch.text().contains(&probe) {
                    for n in 0..=attempt {
                        let probe = format!("cloister-events-probe-{}-{n}", std::process::id());
                        self.ctr(&["namespaces", "remove", &probe]);
                    }
                    return Ok(watch);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if started.elapsed() > START_DEADLINE {
                break;
            }
        }
        let seen = watch.stop();
        Err(ContainerdError::Io {
            what: format!(
                "ctr events printed no probe event within {START_DEADLINE:?}; it printed: {seen}"
            ),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        })
    }
}

/// A subscribed `ctr events`, writing to a temporary file; killed on drop.
#[derive(Debug)]
pub struct EventWatch {
    child: Child,
    out: tempfile::NamedTempFile,
}

impl EventWatch {
    /// What the watcher printed so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(self.out.path()).unwrap_or_default()
    }

    /// Stops the watcher and returns everything it printed.
    pub fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.text()
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateContainerd {
    /// Kills containerd and any shim it started that is still running (a
    /// test that failed half-way did not delete its tasks): shims outlive
    /// containerd by design, and each one's VM dies with it (PDEATHSIG).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let socket = self.socket().display().to_string();
        for pid in pids_mentioning(&format!("-address {socket}")) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) with integer arguments; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Pids of running processes whose command line (arguments joined by
/// spaces) contains `word`.
pub fn pids_mentioning(word: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(word)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// containerd on the config in `dir`, its log appended to `containerd.log`.
fn spawn_containerd(
    binaries: &ContainerdBinaries,
    dir: &Path,
    env: &[(String, PathBuf)],
) -> Result<Child, ContainerdError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .map_err(io_error("open containerd.log"))?;
    let mut command = Command::new(&binaries.containerd);
    command
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .spawn()
        .map_err(io_error(format!("start {}", binaries.containerd.display())))
}

/// containerd's config with every path under `dir`: 1.x reads config
/// version 2, 2.x version 3; NRI's socket is global, so NRI is off.
fn containerd_config(dir: &Path, major: u32) -> String {
    let d = dir.display();
    let common = format!(
        "root = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n[debug]\n  address = \"{d}/debug.sock\"\n"
    );
    if major >= 2 {
        format!("version = 3\n{common}[plugins.'io.containerd.internal.v1.opt']\n  path = \"{d}/opt\"\n[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n")
    } else {
        format!("version = 2\n{common}[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n")
    }
}

/// The command lines of running processes that contain `word`.
pub fn processes_mentioning(word: &str) -> Vec<String> {
    pids_mentioning(word)
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .collect()
}

/// A busybox root file system in `root`: Debian's static busybox with the
/// usual applets as symlinks, and the folders a container expects.
pub fn busybox_rootfs(busybox: &Path, root: &Path) -> Result<(), ContainerdError> {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(io_error(format!("create {}", bin.display())))?;
    std::fs::copy(busybox, bin.join("busybox"))
        .map_err(io_error(format!("copy {}", busybox.display())))?;
    for applet in [
        "sh", "cat", "ls", "echo", "mv", "dd", "mkdir", "rmdir", "rm", "stat", "sync", "test",
        "sleep", "wc", "uname", "true", "false", "id", "hostname", "ps", "ip", "ping", "nc",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .map_err(io_error(format!("link {applet}")))?;
    }
    for dir in ["proc", "dev", "sys", "tmp", "etc", "run"] {
        std::fs::create_dir_all(root.join(dir)).map_err(io_error(format!("create {dir}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_version_follows_containerd_major_and_keeps_every_path_inside() {
        let dir = Path::new("/t");
        let v2 = containerd_config(dir, 1);
        let v3 = containerd_config(dir, 2);
        assert!(v2.starts_with("version = 2\n") && !v2.contains("nri"));
        assert!(v3.starts_with("version = 3\n") && v3.contains("disable = true"));
        for config in [v2, v3] {
            for line in config.lines().filter(|l| l.contains('/')) {
                assert!(line.contains("\"/t/"), "{line}");
            }
        }
    }

    #[test]
    fn cri_settings_name_the_handler_and_paths_in_both_config_versions() {
        let cri = CriSettings {
            handler: "cloister".into(),
            runtime_type: "io.containerd.cloister.v2".into(),
            runtime_config: Some("/t/cloister.toml".into()),
            sandbox_image: "docker.io/library/pause:x".into(),
            cni_conf_dir: "/t/cni".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
        };
        for major in [1, 2] {
            let text = cri.toml(major);
            for needle in [
                "runtimes.cloister]",
                "io.containerd.cloister.v2",
                "ConfigPath = \"/t/cloister.toml\"",
                "docker.io/library/pause:x",
                "/t/cni",
                "/usr/lib/cni",
                "restrict_oom_score_adj = true",
            ] {
                assert!(
                    text.contains(needle),
                    "{major}: {needle} missing in\n{text}"
                );
            }
        }
        assert!(cri.toml(2).contains("'io.containerd.cri.v1.runtime'"));
        assert!(cri.toml(1).contains("\"io.containerd.grpc.v1.cri\""));
    }

    #[test]
    fn busybox_rootfs_links_applets_to_the_copied_binary() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("busybox");
        std::fs::write(&fake, b"binary").unwrap();
        let root = dir.path().join("root");
        busybox_rootfs(&fake, &root).unwrap();
        assert_eq!(std::fs::read(root.join("bin/sh")).unwrap(), b"binary");
        assert_eq!(
            std::fs::read_link(root.join("bin/cat")).unwrap(),
            Path::new("busybox")
        );
        assert!(root.join("proc").is_dir() && root.join("tmp").is_dir());
    }
}
