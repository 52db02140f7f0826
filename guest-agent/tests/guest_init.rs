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
        for _ in 0..300 {
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
