//! Boots a guest in QEMU's `microvm` machine and records its serial console
//! with the time of each line since QEMU started.
//!
//! QEMU is Debian's `qemu-system-x86_64` (package `qemu-system-x86`). The
//! kernel is the uncompressed `vmlinux`, entered through PVH; the initramfs
//! is raw `newc` (decompressing is slow when emulated). Without ACPI the
//! guest cannot power off, so it reboots (`reboot=t`) and `-no-reboot`
//! turns that into QEMU exiting with status 0.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cloister_guest_image::cmdline::{self, RebootMethod};

use crate::console::{ConsoleError, ConsoleLine, ConsoleProcess, WaitPolicy};
use crate::guest_image::{TEST_INIT_MARKER, TEST_INIT_POWER_OFF};

/// The QEMU binary (Debian package `qemu-system-x86`).
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How QEMU runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works everywhere, ~1-3 s to `/init` here.
    Tcg,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
}

/// A QEMU `microvm` invocation.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub accel: Accel,
    /// `-cpu` model.
    pub cpu: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Guest RAM in a shared memfd (`memory-backend-memfd,share=on`), which
    /// vhost-user back ends need to map it; forced on by
    /// [`Self::vhost_user`] devices.
    pub shared_memory: bool,
    /// Devices served by vhost-user back ends (on virtio-mmio).
    pub vhost_user: Vec<VhostUserDevice>,
    /// virtio-net devices on tap fds QEMU inherits.
    pub taps: Vec<QemuTap>,
    /// Appended as given (devices, `-global`s, ...).
    pub extra_args: Vec<String>,
}

/// The kinds of vhost-user device QEMU 7.2 offers on `microvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostUserKind {
    Vsock,
    Rng,
    Block,
    /// virtio-fs; QEMU keeps the config space (the mount tag) itself.
    Fs {
        tag: String,
    },
}

impl VhostUserKind {
    /// QEMU's device model (the virtio-bus one, not the PCI proxy) and its
    /// properties.
    pub fn qemu_device(&self) -> String {
        match self {
            VhostUserKind::Vsock => "vhost-user-vsock-device".into(),
            // QEMU 7.2's vhost-user-rng offers the guest QEMU's own ring
            // features (indirect descriptors, event index) without asking
            // the back end, and passes what the guest acked on; ours offers
            // neither, so QEMU must not either.
            VhostUserKind::Rng => "vhost-user-rng,indirect_desc=off,event_idx=off".into(),
            VhostUserKind::Block => "vhost-user-blk".into(),
            VhostUserKind::Fs { tag } => format!("vhost-user-fs-device,tag={tag}"),
        }
    }
}

/// A virtio-net device (QEMU's own, on virtio-mmio) on an open tap: QEMU
/// inherits `fd` (`-netdev tap,fd=N`); [`QemuMicrovm::spawn`] clears its
/// close-on-exec flag in the child only (the shim's `inherit_in_child`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuTap {
    pub fd: RawFd,
    /// The guest's MAC address (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
}

/// A device whose back end listens on a vhost-user socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserDevice {
    pub kind: VhostUserKind,
    /// The back end's socket (it must listen before QEMU starts).
    pub socket: PathBuf,
}

impl QemuConfig {
    /// One vCPU, 256 MiB, and the CPU model and command line the guest
    /// kernel needs with `accel` on this host: on nested, paravirtualized
    /// KVM (`kvm_pvm`) a CPU model without the features that host cannot
    /// emulate and the matching kernel parameters.
    pub fn new(accel: Accel, kernel: &Path, initrd: Option<&Path>) -> Self {
        let nested = accel == Accel::Kvm && cmdline::host_is_nested_pvm();
        let cpu = match accel {
            Accel::Tcg => "qemu64",
            // `-cpu host` fails on nested KVM ("failed to set MSR 0x10a").
            Accel::Kvm if nested => cmdline::NESTED_KVM_QEMU_CPU,
            Accel::Kvm => "host",
        };
        Self {
            binary: PathBuf::from(QEMU_BINARY),
            accel,
            cpu: cpu.to_string(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            cmdline: cmdline::guest_cmdline(RebootMethod::TripleFault, nested),
            memory_mib: 256,
            vcpus: 1,
            shared_memory: false,
            vhost_user: Vec::new(),
            taps: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// QEMU's arguments (without the binary).
    pub fn args(&self) -> Vec<OsString> {
        let accel = match self.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        let shared_memory = self.shared_memory || !self.vhost_user.is_empty();
        let machine = if shared_memory {
            "microvm,acpi=off,memory-backend=mem"
        } else {
            "microvm,acpi=off"
        };
        let mut args: Vec<OsString> = [
            "-M",
            machine,
            "-accel",
            accel,
            "-cpu",
            &self.cpu,
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.vcpus.to_string(),
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-append",
            &self.cmdline,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("-kernel".into());
        args.push(self.kernel.clone().into());
        if let Some(initrd) = &self.initrd {
            args.push("-initrd".into());
            args.push(initrd.clone().into());
        }
        if shared_memory {
            args.push("-object".into());
            args.push(
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                )
                .into(),
            );
        }
        for (i, device) in self.vhost_user.iter().enumerate() {
            let mut chardev = OsString::from(format!("socket,id=vhu{i},path="));
            chardev.push(&device.socket);
            args.push("-chardev".into());
            args.push(chardev);
            args.push("-device".into());
            args.push(format!("{},chardev=vhu{i}", device.kind.qemu_device()).into());
        }
        for (i, tap) in self.taps.iter().enumerate() {
            args.push("-netdev".into());
            args.push(format!("tap,id=net{i},fd={}", tap.fd).into());
            args.push("-device".into());
            args.push(format!("virtio-net-device,netdev=net{i},mac={}", tap.mac).into());
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }
}

/// A guest that prints this goes no further: it reboots at once
/// (`panic=-1`). QEMU on nested `kvm_pvm` was seen to hang there instead of
/// exiting, so waits end a grace period ([`PANIC_GRACE`]) after it.
pub const KERNEL_PANIC: &str = "Kernel panic - not syncing";
/// How long a VMM gets to exit after [`KERNEL_PANIC`].
pub const PANIC_GRACE: Duration = Duration::from_secs(30);
/// A booting guest prints something at least this often, even with its
/// kernel mode emulated; silence this long means it stopped (QEMU on
/// `kvm_pvm` was seen to pause on "KVM internal error" mid-boot).
pub const BOOT_IDLE_LIMIT: Duration = Duration::from_secs(120);

/// How to wait for a guest boot: up to `timeout`, ending
/// [`PANIC_GRACE`] after a kernel panic or after [`BOOT_IDLE_LIMIT`] of
/// console silence.
pub fn boot_wait_policy(timeout: Duration) -> WaitPolicy<'static> {
    WaitPolicy {
        timeout,
        end_marker: Some((KERNEL_PANIC, PANIC_GRACE)),
        idle_limit: Some(BOOT_IDLE_LIMIT),
    }
}

/// A console message that marks a stage of the boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Milestone {
    pub name: &'static str,
    /// Text that the stage's console line contains.
    pub needle: &'static str,
}

/// The boot stages tests time, in boot order.
pub const MILESTONES: &[Milestone] = &[
    Milestone {
        name: "kernel started",
        needle: "Linux version",
    },
    Milestone {
        name: "fpu set up",
        needle: "x86/fpu",
    },
    // 6.12 prints "Freeing unused kernel image (initmem) memory", older
    // kernels "Freeing unused kernel memory".
    Milestone {
        name: "init memory freed",
        needle: "Freeing unused kernel",
    },
    Milestone {
        name: "run /init",
        needle: "Run /init",
    },
    Milestone {
        name: "init reached",
        needle: TEST_INIT_MARKER,
    },
    Milestone {
        name: "powering off",
        needle: TEST_INIT_POWER_OFF,
    },
];

/// When each of [`MILESTONES`] first appeared on `console` (`None`: never).
pub fn milestones(console: &[ConsoleLine]) -> Vec<(Milestone, Option<Duration>)> {
    MILESTONES
        .iter()
        .map(|m| {
            let at = console
                .iter()
                .find(|line| line.text.contains(m.needle))
                .map(|line| line.at);
            (*m, at)
        })
        .collect()
}

/// Starts QEMU: [`crate::console::ConsoleProcess`] with `config`'s
/// arguments (its `wait` returns the timed console).
pub struct QemuMicrovm;

impl QemuMicrovm {
    /// Starts QEMU with `config`; the clock for console times starts here.
    pub fn spawn(config: &QemuConfig) -> Result<ConsoleProcess, ConsoleError> {
        let mut command = Command::new(&config.binary);
        command.args(config.args());
        let tap_fds: Vec<RawFd> = config.taps.iter().map(|t| t.fd).collect();
        cloister_shim::network::inherit_in_child(&mut command, &tap_fds);
        ConsoleProcess::spawn(command)
    }
}

/// Whether `binary` can be run (found on `PATH` or as a path).
pub fn qemu_available(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ms: u64, text: &str) -> ConsoleLine {
        ConsoleLine {
            at: Duration::from_millis(ms),
            text: text.to_string(),
        }
    }

    #[test]
    fn milestones_take_first_occurrence_and_leave_missing_ones_none() {
        let console = [
            line(
                300,
                "[    0.000000] Linux version 6.12.117 (cloister@cloister)",
            ),
            line(590, "[    0.103728] x86/fpu: x87 FPU will use FXSAVE"),
            line(600, "[    0.110000] x86/fpu: again"),
            line(
                1030,
                "[    0.827337] Freeing unused kernel image (initmem) memory: 744K",
            ),
            line(1050, "[    0.835811] Run /init as init process"),
        ];
        let found = milestones(&console);
        let times: Vec<Option<u64>> = found
            .iter()
            .map(|(_, at)| at.map(|d| d.as_millis() as u64))
            .collect();
        assert_eq!(
            times,
            [Some(300), Some(590), Some(1030), Some(1050), None, None]
        );
        assert_eq!(found[4].0.needle, TEST_INIT_MARKER);
    }

    #[test]
    fn args_for_tcg_boot_pvh_vmlinux_with_raw_initrd_and_serial_on_stdio() {
        let config = QemuConfig::new(
            Accel::Tcg,
            Path::new("/k/vmlinux"),
            Some(Path::new("/i.cpio")),
        );
        let args: Vec<String> = config
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-M microvm,acpi=off -accel tcg -cpu qemu64 -m 256 -smp 1"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-serial stdio"));
        assert!(joined.ends_with("-kernel /k/vmlinux -initrd /i.cpio"));
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert!(args[append + 1].contains("reboot=t"));
        assert!(args[append + 1].contains("console=ttyS0"));
        // TCG needs none of the nested-KVM workarounds.
        assert!(!args[append + 1].contains("clearcpuid"));
    }

    #[test]
    fn fs_device_carries_its_mount_tag() {
        let kind = VhostUserKind::Fs {
            tag: "cloister".into(),
        };
        assert_eq!(kind.qemu_device(), "vhost-user-fs-device,tag=cloister");
    }

    #[test]
    fn args_with_vhost_user_device_share_guest_memory_and_attach_the_socket() {
        let mut config = QemuConfig::new(Accel::Tcg, Path::new("/k/vmlinux"), None);
        config.vhost_user.push(VhostUserDevice {
            kind: VhostUserKind::Vsock,
            socket: PathBuf::from("/run/v.sock"),
        });
        let joined = config
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.starts_with("-M microvm,acpi=off,memory-backend=mem "));
        assert!(joined.contains(" -object memory-backend-memfd,id=mem,size=256M,share=on "));
        assert!(joined.ends_with(
            " -chardev socket,id=vhu0,path=/run/v.sock -device vhost-user-vsock-device,chardev=vhu0"
        ));
    }

    #[test]
    fn args_with_tap_attach_virtio_net_on_the_inherited_fd_with_the_mac() {
        let mut config = QemuConfig::new(Accel::Tcg, Path::new("/k/vmlinux"), None);
        config.taps.push(QemuTap {
            fd: 9,
            mac: "02:00:00:00:00:01".into(),
        });
        let joined = config
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.ends_with(
            " -netdev tap,id=net0,fd=9 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"
        ));
        // QEMU's own device: no shared memory needed.
        assert!(joined.starts_with("-M microvm,acpi=off "));
    }

    #[test]
    fn spawn_of_missing_binary_names_it() {
        let mut config = QemuConfig::new(Accel::Tcg, Path::new("/k"), None);
        config.binary = PathBuf::from("/nonexistent/qemu");
        let err = QemuMicrovm::spawn(&config).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
