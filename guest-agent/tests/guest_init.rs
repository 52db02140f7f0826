//! The agent as PID 1, on the host: `unshare` gives it its own pid, mount,
//! network, uts and ipc namespaces (a guest without the VM), so the
//! PID-1-only RPCs (SetupSandbox, UpdateInterfaces, UpdateRoutes,
//! Shutdown) run for real without touching the host. Needs root,
//! util-linux (unshare, nsenter) and iproute2 (ip).

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use support::*;

fn tools_missing() -> Option<String> {
    if let Some(reason) = skip_reason() {
        return Some(reason);
    }
    for tool in [
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
        "/usr/sbin/ip",
        "/bin/sh",
    ] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} missing (Debian packages util-linux, iproute2)"
            ));
        }
    }
    None
}

struct Pid1Agent {
    unshare: Child,
    pid: u32,
    client: AgentServiceClient,
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Pid1Agent {
    async fn start() -> Pid1Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        // A private /etc so SetupSandbox's resolv.conf stays in the test.
        let script = format!(
            "mount -t tmpfs tmpfs /etc && exec {} --listen unix:{} --log-level debug 2>{}",
            env!("CARGO_BIN_EXE_cloister-agent"),
            socket.display(),
            log.display()
        );
        let unshare = Command::new("/usr/bin/unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--net",
                "--uts",
                "--ipc",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let address = format!("unix://{}", socket.display());
        let mut client = None;
        for _ in 0..1500 {
            if socket.exists() {
                if let Ok(c) = ttrpc::r#async::Client::connect(&address).await {
                    client = Some(c);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = AgentServiceClient::new(client.expect("PID 1 agent did not come up"));
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
        let pid = children.split_whitespace().next().unwrap().parse().unwrap();
        Pid1Agent {
            unshare,
            pid,
            client,
            _dir: dir,
            log,
        }
    }

    /// Runs a host command inside the agent's namespaces.
    fn nsenter(&self, namespaces: &[&str], command: &[&str]) -> String {
        let output = Command::new("/usr/bin/nsenter")
            .arg("-t")
            .arg(self.pid.to_string())
            .args(namespaces)
            .args(command)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Pid1Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

#[tokio::test]
async fn pid1_agent_sets_up_the_sandbox_network_and_powers_off() {
    if let Some(reason) = tools_missing() {
        eprintln!("SKIP: {reason}");
        return;
    }
    let mut agent = Pid1Agent::start().await;

    let details = agent
        .client
        .guest_details(ctx(), &agent::GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(details.is_guest_init, "agent did not see itself as PID 1");
    assert!(!details.kernel_release.is_empty());
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid)).unwrap();
    for target in [
        " /proc ",
        " /sys ",
        " /dev ",
        " /sys/fs/cgroup ",
        " /run ",
        " /dev/shm ",
        " /dev/pts ",
    ] {
        assert!(mounts.contains(target), "early mount {target} missing");
    }

    let mut setup = agent::SetupSandboxRequest::new();
    setup.hostname = "pod-host".into();
    let mut dns = agent::Dns::new();
    dns.nameservers = vec!["10.0.0.10".into()];
    dns.searches = vec!["svc.cluster.local".into()];
    setup.dns = Some(dns).into();
    setup
        .sysctls
        .insert("net.ipv4.ip_forward".into(), "1".into());
    let mut share = agent::GuestMount::new();
    share.fstype = "tmpfs".into();
    share.source = "shared".into();
    share.target = "/run/cloister/shared".into();
    share.options = vec!["size=1m".into()];
    setup.mounts.push(share);
    agent.client.setup_sandbox(ctx(), &setup).await.unwrap();
    assert_eq!(agent.nsenter(&["-u"], &["hostname"]).trim(), "pod-host");
    assert_eq!(
        agent
            .nsenter(&["-n"], &["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );
    let resolv = agent.nsenter(&["-m"], &["cat", "/etc/resolv.conf"]);
    assert_eq!(resolv, "nameserver 10.0.0.10\nsearch svc.cluster.local\n");
    assert!(
        std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid))
            .unwrap()
            .contains(" /run/cloister/shared ")
    );

    // A tap stands in for the guest's virtio-net device (this host's kernel
    // has no dummy or veth).
    agent.nsenter(
        &["-n"],
        &["ip", "tuntap", "add", "mode", "tap", "name", "nic0"],
    );
    agent.nsenter(
        &["-n"],
        &["ip", "link", "set", "nic0", "address", "02:00:00:00:00:09"],
    );
    let mut iface = agent::Interface::new();
    iface.mac_address = "02:00:00:00:00:09".into();
    iface.name = "eth0".into();
    iface.mtu = 1400;
    iface.addresses = vec!["10.9.0.5/24".into()];
    let mut request = agent::UpdateInterfacesRequest::new();
    request.interfaces.push(iface);
    agent
        .client
        .update_interfaces(ctx(), &request)
        .await
        .unwrap();
    let link = agent.nsenter(&["-n"], &["ip", "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    let addr = agent.nsenter(&["-n"], &["ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(addr.contains("10.9.0.5/24"), "{addr}");

    let mut routes = agent::UpdateRoutesRequest::new();
    let mut default = agent::Route::new();
    default.gateway = "10.9.0.1".into();
    routes.routes.push(default);
    let mut link_route = agent::Route::new();
    link_route.destination = "10.10.0.0/16".into();
    link_route.device = "eth0".into();
    link_route.metric = 5;
    routes.routes.push(link_route);
    agent.client.update_routes(ctx(), &routes).await.unwrap();
    let table = agent.nsenter(&["-n"], &["ip", "-4", "route"]);
    assert!(table.contains("default via 10.9.0.1 dev eth0"), "{table}");
    assert!(table.contains("10.10.0.0/16 dev eth0"), "{table}");

    // Bad inputs name the field; the agent keeps serving.
    let mut bad = agent::UpdateInterfacesRequest::new();
    let mut unknown = agent::Interface::new();
    unknown.mac_address = "02:00:00:00:00:77".into();
    bad.interfaces.push(unknown);
    let err = agent
        .client
        .update_interfaces(ctx(), &bad)
        .await
        .unwrap_err();
    assert!(
        error_text(&err).contains("interfaces[0].mac_address"),
        "{}",
        error_text(&err)
    );
    let mut bad = agent::UpdateRoutesRequest::new();
    let mut bad_route = agent::Route::new();
    bad_route.destination = "10.0.0.0/99".into();
    bad_route.device = "eth0".into();
    bad.routes.push(bad_route);
    let err = agent.client.update_routes(ctx(), &bad).await.unwrap_err();
    assert!(
        error_text(&err).contains("routes[0].destination"),
        "{}",
        error_text(&err)
    );

    // A container without its own network namespace sees the pod's eth0.
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(dir.path());
    let mut s = spec(&["cat", "/proc/net/dev"]);
    s["linux"]["namespaces"] = serde_json::json!([{ "type": "pid" }, { "type": "mount" }, { "type": "ipc" }, { "type": "uts" }]);
    let request = create_request("c1", &rootfs, &s, stdio(false, false, false, false));
    agent
        .client
        .create_container(ctx(), &request)
        .await
        .unwrap();
    let mut start = agent::StartContainerRequest::new();
    start.container_id = "c1".into();
    agent.client.start_container(ctx(), &start).await.unwrap();
    let mut wait = agent::WaitProcessRequest::new();
    wait.container_id = "c1".into();
    assert_eq!(
        agent
            .client
            .wait_process(ctx(), &wait)
            .await
            .unwrap()
            .exit_status,
        0
    );

    // Shutdown removes the containers and powers the "guest" off: the
    // agent (PID 1 of its pid namespace) is gone.
    agent
        .client
        .shutdown(ctx(), &agent::ShutdownRequest::new())
        .await
        .unwrap();
    let mut exited = None;
    for _ in 0..500 {
        if let Some(status) = agent.unshare.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let status = exited.unwrap_or_else(|| panic!("agent did not power off; log:\n{log}"));
    assert!(log.contains("shutdown requested"), "{log}");
    // reboot(RESTART) from PID 1 of a child pid namespace ends that
    // namespace as if its init had been killed by SIGHUP (unshare passes
    // the signal on): proof the guest-ending path ran.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGHUP),
        "{status:?}; log:\n{log}"
    );
}

/// Copies `binary` and the shared libraries `ldd` lists into `root`.
fn install_with_libraries(binary: &Path, root: &Path, name: &str) -> Result<(), String> {
    std::fs::copy(binary, root.join(name)).map_err(|e| e.to_string())?;
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(Path::new);
        let Some(path) = path else { continue };
        let target = root.join(path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::copy(path, &target).map_err(|e| format!("copy {}: {e}", path.display()))?;
    }
    Ok(())
}

#[tokio::test]
async fn pid1_agent_on_a_tmpfs_root_leaves_it_and_containers_use_pivot_root() {
    if let Some(reason) = tools_missing() {
        eprintln!("SKIP: {reason}");
        return;
    }
    // Like an initramfs: the agent's root is a tmpfs holding only /init.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("newroot");
    let staging = dir.path().join("staging");
    let sock = dir.path().join("sock");
    for d in [&root, &staging, &sock] {
        std::fs::create_dir_all(d).unwrap();
    }
    if let Err(e) = install_with_libraries(
        Path::new(env!("CARGO_BIN_EXE_cloister-agent")),
        &staging,
        "init",
    ) {
        eprintln!("SKIP: cannot stage the agent with its libraries: {e}");
        return;
    }
    let rootfs = busybox_rootfs(dir.path());
    let script = format!(
        "set -e; mount -t tmpfs tmpfs {root}; cp -a {staging}/. {root}/; \
         mkdir -p {root}/sock {root}/ctr; mount --bind {sock} {root}/sock; mount --rbind {rootfs} {root}/ctr; \
         cd {root}; exec /usr/sbin/chroot . /init --listen unix:/sock/agent.sock --log-level debug 2>{sock}/agent.log",
        root = root.display(),
        staging = staging.display(),
        sock = sock.display(),
        rootfs = rootfs.display(),
    );
    let mut unshare = Command::new("/usr/bin/unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--net",
            "--uts",
            "--ipc",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let socket = sock.join("agent.sock");
    let address = format!("unix://{}", socket.display());
    let mut client = None;
    for _ in 0..1500 {
        if socket.exists() {
            if let Ok(c) = ttrpc::r#async::Client::connect(&address).await {
                client = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = || std::fs::read_to_string(sock.join("agent.log")).unwrap_or_default();
    let Some(client) = client else {
        let _ = unshare.kill();
        panic!("agent on a tmpfs root did not come up; log:\n{}", log());
    };
    let client = AgentServiceClient::new(client);

    let request = create_request(
        "pivot",
        Path::new("/ctr"),
        &spec(&["true"]),
        stdio(false, false, false, false),
    );
    let created = client.create_container(ctx(), &request).await;
    let outcome = async {
        created.map_err(|e| error_text(&e))?;
        let mut start = agent::StartContainerRequest::new();
        start.container_id = "pivot".into();
        client
            .start_container(ctx(), &start)
            .await
            .map_err(|e| error_text(&e))?;
        let mut wait = agent::WaitProcessRequest::new();
        wait.container_id = "pivot".into();
        let status = client
            .wait_process(ctx(), &wait)
            .await
            .map_err(|e| error_text(&e))?
            .exit_status;
        client
            .shutdown(ctx(), &agent::ShutdownRequest::new())
            .await
            .map_err(|e| error_text(&e))?;
        Ok::<u32, String>(status)
    }
    .await;
    for _ in 0..500 {
        if unshare.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = unshare.kill();
    let _ = unshare.wait();
    let log = log();
    assert_eq!(
        outcome.unwrap_or_else(|e| panic!("{e}; log:\n{log}")),
        0,
        "{log}"
    );
    assert!(
        log.contains("root=PivotRoot"),
        "container did not use pivot_root; log:\n{log}"
    );
    assert!(!log.contains("staying on the initramfs root"), "{log}");
}
