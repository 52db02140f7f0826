//! Our runtime as containerd starts it in the demo and the benchmarks: the
//! shim binary beside the running one, a containerd `PATH` that finds it,
//! and a runtime config for this host (`cloister-vmm` where KVM runs a
//! Linux guest; QEMU/TCG with our back ends on nested `kvm_pvm`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use cloister_guest_image::cmdline::host_is_nested_pvm;

use crate::agent_guest::{AgentGuestFixture, AGENT_DEADLINE};

/// The shim's binary name (runtime `io.containerd.cloister.v2`).
pub const SHIM_BINARY: &str = "containerd-shim-cloister-v2";

/// `program` in a folder of `PATH`.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The folder of the running binary, which must hold our shim too (cargo
/// builds all of a workspace's binaries into one folder).
pub fn shim_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.parent()
        .filter(|dir| dir.join(SHIM_BINARY).is_file())
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "{SHIM_BINARY} is not beside {}: cargo build -p cloister-shim",
                exe.display()
            )
        })
}

/// `PATH` with `dirs` first, for a containerd that must find shims there.
pub fn path_with(dirs: impl IntoIterator<Item = PathBuf>) -> Result<OsString, String> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(dirs.into_iter().chain(std::env::split_paths(&current)))
        .map_err(|e| e.to_string())
}

/// A runtime config for this host, and a line saying which hypervisor it
/// picked and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRuntimeConfig {
    pub hypervisor: String,
    pub toml: String,
}

/// The runtime config for `cloister-vmm` (the default backend) with the
/// fixture's guest image, as TOML for `CLOISTER_CONFIG`.
pub fn cloister_vmm_toml(fixture: &AgentGuestFixture, memory_mib: u32) -> String {
    format!(
        "hypervisor = \"cloister\"\n{}",
        common_toml(fixture, memory_mib)
    )
}

/// The runtime config for QEMU (`qemu`, an absolute path) on TCG with our
/// vhost-user back ends and the fixture's guest image.
pub fn qemu_tcg_toml(fixture: &AgentGuestFixture, memory_mib: u32, qemu: &Path) -> String {
    format!(
        "hypervisor = \"qemu\"\n[qemu]\npath = \"{}\"\naccel = \"tcg\"\n{}",
        qemu.display(),
        common_toml(fixture, memory_mib)
    )
}

/// An `[audit]` section putting the shims' audit trail at `path`, to
/// append to one of the configs above (tests keep the trail in their own
/// folder instead of the default `/var/log/cloister/audit.jsonl`).
pub fn audit_toml(path: &Path) -> String {
    format!("[audit]\npath = \"{}\"\n", path.display())
}

/// What every backend's config holds: our VMM, the guest image, the VM
/// size, and an agent deadline a loaded TCG host meets.
fn common_toml(fixture: &AgentGuestFixture, memory_mib: u32) -> String {
    format!(
        "[vmm]\npath = \"{}\"\n[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\n[resources]\ndefault_memory_mib = {memory_mib}\n[agent]\nconnect_timeout_secs = {}\n",
        fixture.vmm.display(),
        fixture.image.vmlinux.display(),
        fixture.initramfs.display(),
        AGENT_DEADLINE.as_secs()
    )
}

impl HostRuntimeConfig {
    pub fn for_this_host(fixture: &AgentGuestFixture, memory_mib: u32) -> Result<Self, String> {
        if !host_is_nested_pvm() {
            return Ok(Self {
                hypervisor: "cloister-vmm on KVM".into(),
                toml: cloister_vmm_toml(fixture, memory_mib),
            });
        }
        let qemu = find_on_path("qemu-system-x86_64").ok_or("qemu-system-x86_64 not on PATH")?;
        Ok(Self {
            hypervisor: "QEMU/TCG with cloister's vsock and virtio-fs back ends (this host's KVM \
                         is nested kvm_pvm, which cannot run a Linux guest at speed)"
                .into(),
            toml: qemu_tcg_toml(fixture, memory_mib, &qemu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_with_puts_the_given_folders_first() {
        let path = path_with([PathBuf::from("/opt/a"), PathBuf::from("/opt/b")]).unwrap();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(
            dirs[..2],
            [PathBuf::from("/opt/a"), PathBuf::from("/opt/b")]
        );
    }
}
