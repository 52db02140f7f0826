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
