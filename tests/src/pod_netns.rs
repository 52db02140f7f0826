//! Network namespaces for pod-network tests: a "pod" namespace whose veth
//! (`eth0`, what CNI would make) is paired with `peer0` in a "peer"
//! namespace standing in for the rest of the cluster. Made with `ip`
//! (iproute2) and removed on drop, so a failing test leaves nothing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where `ip netns add` puts namespace files.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Errors building the namespaces.
#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
}

/// Runs `program args…`; the error carries the command line and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, PodNetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| PodNetnsError::Command {
            command: command.clone(),
            output: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(PodNetnsError::Command {
            command,
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Why pod-network tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("pod network tests need root (network namespaces, taps, tc)".into());
    }
    for tool in ["ip", "tc"] {
        if run(tool, &["-V"]).is_err() {
            return Some(format!("`{tool}` not found (Debian package iproute2)"));
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing (tun module)".into());
    }
    None
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// A new namespace named `clst-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Result<Self, PodNetnsError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "clst-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Its path (`/var/run/netns/<name>`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, PodNetnsError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `tc -n <name> args…`.
    pub fn tc(&self, args: &[&str]) -> Result<String, PodNetnsError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("tc", &all)
    }

    /// A command to run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes every interface in it (a veth's
        // peer in another namespace with it).
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// The addresses of a [`PodNetnsPair`].
pub const POD_IP: &str = "10.99.0.2";
pub const PEER_IP: &str = "10.99.0.1";
pub const PREFIX_LEN: u8 = 24;
/// The veth MTU (not the default, so tests see it carried over).
pub const POD_MTU: u32 = 1400;

/// A pod namespace with `eth0` (`POD_IP/24`, default route via the peer)
/// and a peer namespace with `peer0` (`PEER_IP/24`).
#[derive(Debug)]
pub struct PodNetnsPair {
    // Declared first: dropped first (the pod's veth goes with it).
    pub pod: TestNetns,
    pub peer: TestNetns,
}

impl PodNetnsPair {
    /// Makes both namespaces and the veth pair, as a CNI ptp plugin would.
    pub fn new(tag: &str) -> Result<Self, PodNetnsError> {
        let pair = Self {
            pod: TestNetns::new(&format!("{tag}-pod"))?,
            peer: TestNetns::new(&format!("{tag}-peer"))?,
        };
        let mtu = POD_MTU.to_string();
        run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &pair.pod.name,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                "peer0",
                "netns",
                &pair.peer.name,
                "mtu",
                &mtu,
            ],
        )?;
        let pod_cidr = format!("{POD_IP}/{PREFIX_LEN}");
        let peer_cidr = format!("{PEER_IP}/{PREFIX_LEN}");
        pair.pod.ip(&["addr", "add", &pod_cidr, "dev", "eth0"])?;
        pair.pod.ip(&["link", "set", "eth0", "up"])?;
        pair.pod
            .ip(&["route", "add", "default", "via", PEER_IP, "dev", "eth0"])?;
        pair.peer.ip(&["addr", "add", &peer_cidr, "dev", "peer0"])?;
        pair.peer.ip(&["link", "set", "peer0", "up"])?;
        Ok(pair)
    }

    /// `eth0`'s MAC address as `ip` prints it.
    pub fn pod_mac(&self) -> Result<String, PodNetnsError> {
        let text = self.pod.ip(&["-br", "link", "show", "eth0"])?;
        // "eth0@if5  UP  aa:bb:cc:dd:ee:ff <BROADCAST,...>"
        Ok(text
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string())
    }
}

/// Where Debian's containernetworking-plugins puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The subnet [`CniBridgePod`] gets addresses from, and its gateway (the
/// bridge's address in the node namespace).
pub const CNI_SUBNET: &str = "10.77.0.0/24";
pub const CNI_GATEWAY: &str = "10.77.0.1";

/// A pod namespace set up by the real CNI `bridge` plugin (host-local
/// IPAM), as containerd's CRI plugin would: the plugin runs inside a
/// "node" namespace, so its bridge and the veth's host end live there and
/// the host's own network is untouched. Drop runs CNI DEL, then removes
/// the namespaces and the IPAM state.
#[derive(Debug)]
pub struct CniBridgePod {
    pub pod: TestNetns,
    pub node: TestNetns,
    ipam_dir: tempfile::TempDir,
    container_id: String,
}

impl CniBridgePod {
    /// Why the CNI plugins cannot be used here, if they cannot.
    pub fn unavailable() -> Option<String> {
        let bridge = std::path::Path::new(CNI_BIN_DIR).join("bridge");
        (!bridge.exists()).then(|| {
            format!(
                "{} missing (Debian package containernetworking-plugins)",
                bridge.display()
            )
        })
    }

    /// Runs CNI ADD for a new pod namespace.
    pub fn new(tag: &str) -> Result<Self, PodNetnsError> {
        let ipam_dir = tempfile::tempdir().map_err(|e| PodNetnsError::Command {
            command: "tempdir for host-local IPAM".into(),
            output: e.to_string(),
        })?;
        let pod = TestNetns::new(&format!("{tag}-pod"))?;
        let node = TestNetns::new(&format!("{tag}-node"))?;
        let container_id = pod.name.clone();
        let cni = Self {
            pod,
            node,
            ipam_dir,
            container_id,
        };
        cni.plugin("ADD")?;
        Ok(cni)
    }

    fn config(&self) -> String {
        format!(
            r#"{{"cniVersion":"0.4.0","name":"clst-podnet","type":"bridge","bridge":"clst-br0",
               "isGateway":true,"ipMasq":false,
               "ipam":{{"type":"host-local","subnet":"{CNI_SUBNET}","gateway":"{CNI_GATEWAY}",
                        "routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}"#,
            self.ipam_dir.path().display()
        )
    }

    /// Runs the bridge plugin with `command` (ADD or DEL) in the node
    /// namespace; returns its stdout (the CNI result for ADD).
    fn plugin(&self, command: &str) -> Result<String, PodNetnsError> {
        let line = format!("CNI {command} for {}", self.pod.name);
        let failed = |output: String| PodNetnsError::Command {
            command: line.clone(),
            output,
        };
        let mut child = self
            .node
            .command(&format!("{CNI_BIN_DIR}/bridge"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", self.pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN_DIR)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin
                .write_all(self.config().as_bytes())
                .map_err(|e| failed(e.to_string()))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| failed(e.to_string()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(failed(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(stdout)
    }
}

impl Drop for CniBridgePod {
    fn drop(&mut self) {
        // As containerd does at StopPodSandbox: CNI DEL, then the
        // namespace goes (TestNetns's own drop).
        let _ = self.plugin("DEL");
    }
}
