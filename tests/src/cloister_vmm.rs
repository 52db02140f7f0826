//! Boots a guest in `cloister-vmm` the way [`crate::qemu`] boots it in QEMU:
//! same kernel, initramfs and command line (but `reboot=k`, which our
//! i8042 turns into a clean exit), console on stdout, timed by
//! [`crate::console`].

use std::path::{Path, PathBuf};
use std::process::Command;

use cloister_guest_image::cmdline::{self, RebootMethod};

use crate::console::{ConsoleError, ConsoleProcess};

/// The binary's name; found by [`find_cloister_vmm`].
pub const CLOISTER_VMM_BINARY: &str = "cloister-vmm";
/// Names the binary explicitly.
pub const CLOISTER_VMM_ENV: &str = "CLOISTER_VMM";

/// A `cloister-vmm` invocation.
#[derive(Debug, Clone)]
pub struct CloisterVmmConfig {
    pub binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
}

impl CloisterVmmConfig {
    /// One vCPU and 256 MiB, as [`crate::qemu::QemuConfig::new`]; the CPU
    /// template is left to `cloister-vmm` (it picks `nested-pvm` itself on
    /// a `kvm_pvm` host).
    pub fn new(binary: &Path, kernel: &Path, initrd: Option<&Path>) -> Self {
        Self {
            binary: binary.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: cmdline::guest_cmdline(RebootMethod::Keyboard, cmdline::host_is_nested_pvm()),
            memory_mib: 256,
            vcpus: 1,
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--kernel")
            .arg(&self.kernel)
            .arg("--cmdline")
            .arg(&self.cmdline)
            .arg("--memory")
            .arg(self.memory_mib.to_string())
            .arg("--vcpus")
            .arg(self.vcpus.to_string())
            .arg("--serial")
            .arg("stdout");
        if let Some(initrd) = &self.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        cmd
    }

    /// Starts the VMM; the clock for console times starts here.
    pub fn spawn(&self) -> Result<ConsoleProcess, ConsoleError> {
        ConsoleProcess::spawn(self.command())
    }
}

/// `$CLOISTER_VMM`, else `cloister-vmm` next to the running executable
/// (or one folder up, from a test binary in `target/debug/deps`).
pub fn find_cloister_vmm() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CLOISTER_VMM_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join(CLOISTER_VMM_BINARY),
        dir.parent()?.join(CLOISTER_VMM_BINARY),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_boots_with_keyboard_reboot_and_serial_on_stdout() {
        let cfg = CloisterVmmConfig::new(
            Path::new("/b/cloister-vmm"),
            Path::new("/k/vmlinux"),
            Some(Path::new("/i.cpio")),
        );
        let cmd = cfg.command();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "/b/cloister-vmm");
        assert!(args.windows(2).any(|w| w == ["--kernel", "/k/vmlinux"]));
        assert!(args.windows(2).any(|w| w == ["--initrd", "/i.cpio"]));
        assert!(args.windows(2).any(|w| w == ["--serial", "stdout"]));
        let cmdline = &args[args.iter().position(|a| a == "--cmdline").unwrap() + 1];
        assert!(cmdline.contains("reboot=k"), "{cmdline}");
    }
}
