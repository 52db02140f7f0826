//! The `qemu` backend: QEMU `microvm` (or `q35` with OVMF for a
//! confidential pod) with our devices served over vhost-user, confined
//! under `[vmm] jail`.

use super::*;

/// The `cloister-vmm vhost-user` command serving our vsock device to QEMU.
pub fn vhost_user_vsock_args(paths: &VmPaths) -> Vec<OsString> {
    vec![
        "vhost-user".into(),
        "--device".into(),
        "vsock".into(),
        "--guest-cid".into(),
        GUEST_CID.to_string().into(),
        "--uds".into(),
        paths.vsock_uds().into(),
        "--socket".into(),
        paths.vhost_user_vsock().into(),
    ]
}

/// The `cloister-vmm vhost-user` command serving the pod's shared folder.
pub fn vhost_user_fs_args(paths: &VmPaths) -> Vec<OsString> {
    vec![
        "vhost-user".into(),
        "--device".into(),
        "fs".into(),
        "--tag".into(),
        SHARED_FS_TAG.into(),
        "--shared-dir".into(),
        paths.shared_dir().into(),
        "--socket".into(),
        paths.vhost_user_fs().into(),
    ]
}

/// Whether QEMU should use KVM: asked for, or `auto` and `/dev/kvm` opens.
pub fn qemu_uses_kvm(accel: QemuAccel) -> bool {
    match accel {
        QemuAccel::Kvm => true,
        QemuAccel::Tcg => false,
        // On nested, paravirtualized KVM (kvm_pvm) a guest kernel runs
        // emulated instruction by instruction and stalls; TCG boots.
        QemuAccel::Auto => {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
                && !cmdline::host_is_nested_pvm()
        }
    }
}

/// QEMU's arguments for the pod's microVM.
pub fn qemu_args(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    kvm: bool,
    nested_pvm: bool,
) -> Vec<OsString> {
    let (accel, cpu) = match (kvm, nested_pvm) {
        (false, _) => ("tcg", "qemu64"),
        // `-cpu host` fails on nested KVM.
        (true, true) => ("kvm", cmdline::NESTED_KVM_QEMU_CPU),
        (true, false) => ("kvm", "host"),
    };
    let base = cmdline::guest_cmdline(RebootMethod::TripleFault, kvm && nested_pvm);
    let memory = format!(
        "memory-backend-memfd,id=mem,size={}M,share=on",
        vm.memory_mib
    );
    let mut args: Vec<String> = vec![
        "-M".into(),
        // Shared memfd memory: the vhost-user backend maps guest memory.
        "microvm,acpi=off,memory-backend=mem".into(),
        "-object".into(),
        memory,
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
    ];
    args.extend(boot_args(config, vm, paths, &config.guest.kernel, base));
    args.extend(device_args(vm, paths, VirtioBus::Mmio));
    args.into_iter().map(OsString::from).collect()
}

/// A confidential pod on the `qemu` backend: SEV-SNP or TDX with OVMF,
/// as Kata users know it. The firmware measures the kernel, initramfs
/// and command line through its kernel-hashes table (SNP) or its own
/// event log (TDX), so the guest is launched from OVMF on `q35` rather
/// than directly on `microvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuTee {
    Snp {
        /// Guest policy (bit 17 must be set).
        policy: u64,
        /// HOST_DATA: the init-data digest fitted to 32 bytes.
        host_data: [u8; 32],
        /// OVMF built with `AmdSevX64.dsc` (has the SNP kernel-hashes
        /// section), e.g. `/usr/share/ovmf/OVMF.amdsev.fd`.
        ovmf: PathBuf,
        /// The bzImage OVMF boots (and hashes).
        kernel: PathBuf,
        /// QEMU `-cpu` model (it is measured in the VMSAs); `None`: host.
        cpu: Option<String>,
    },
    Tdx {
        /// MRCONFIGID: the init-data digest fitted to 48 bytes.
        mr_config_id: [u8; 48],
        /// TDVF, e.g. `/usr/share/ovmf/OVMF.inteltdx.fd`.
        ovmf: PathBuf,
        kernel: PathBuf,
        /// TD ATTRIBUTES; `None`: QEMU's default.
        attributes: Option<u64>,
        /// Intel QGS for the guest's quote requests.
        quote_service: Option<QuoteService>,
    },
}

/// The QEMU that first has the object: `sev-snp-guest` in 9.1,
/// `tdx-guest` in 10.1.
pub const QEMU_SNP_OBJECT: (&str, &str) = ("sev-snp-guest", "9.1");
pub const QEMU_TDX_OBJECT: (&str, &str) = ("tdx-guest", "10.1");
/// The C-bit position and the physical address bits it costs on every
/// SNP part so far (Milan, Genoa, Turin).
const SNP_CBITPOS: u32 = 51;
const SNP_REDUCED_PHYS_BITS: u32 = 1;

/// Why QEMU cannot launch the confidential pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuTeeError {
    #[error("{qemu} has no `{object}` object (its `-object help` does not list it): QEMU {version} or newer is needed{found}")]
    ObjectMissing {
        qemu: String,
        object: &'static str,
        version: &'static str,
        found: String,
    },
    #[error("cannot run {qemu} -object help: {reason}")]
    Probe { qemu: String, reason: String },
    #[error("tee policy {0:#x}: reserved bit 17 must be set")]
    Policy(u64),
    #[error("confidential.{key} = {value}: {reason}")]
    Unsupported {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl QemuTee {
    /// The QEMU view of a pod's SNP/TDX launch.
    pub fn from_launch(launch: &TeeLaunch) -> Result<Self, QemuTeeError> {
        Ok(match &launch.kind {
            TeeLaunchKind::Snp {
                policy,
                vcpu,
                host_data,
            } => QemuTee::Snp {
                policy: *policy,
                host_data: *host_data,
                ovmf: launch.firmware.clone(),
                kernel: launch.kernel.clone(),
                cpu: match vcpu {
                    None => None,
                    Some(SnpVcpu::Type(name)) => Some(name.clone()),
                    Some(SnpVcpu::Signature(signature)) => {
                        return Err(QemuTeeError::Unsupported {
                            key: "cpu_signature",
                            value: format!("{signature:#x}"),
                            reason: "QEMU takes a CPU model: set confidential.vcpu_type instead",
                        })
                    }
                },
            },
            TeeLaunchKind::Tdx {
                attributes,
                xfam,
                quote_service,
                mr_config_id,
            } => {
                if let Some(xfam) = xfam {
                    return Err(QemuTeeError::Unsupported {
                        key: "tdx_xfam",
                        value: format!("{xfam:#x}"),
                        reason: "QEMU derives XFAM from its -cpu features: unset it for the qemu backend",
                    });
                }
                QemuTee::Tdx {
                    mr_config_id: *mr_config_id,
                    ovmf: launch.firmware.clone(),
                    kernel: launch.kernel.clone(),
                    attributes: *attributes,
                    quote_service: quote_service.clone(),
                }
            }
        })
    }

    fn object(&self) -> (&'static str, &'static str) {
        match self {
            QemuTee::Snp { .. } => QEMU_SNP_OBJECT,
            QemuTee::Tdx { .. } => QEMU_TDX_OBJECT,
        }
    }
}

/// Checks QEMU's `-object help` output (and `--version` for the message)
/// for the object `tee` needs.
pub fn qemu_supports_tee(
    qemu: &Path,
    object_help: &str,
    version: &str,
    tee: &QemuTee,
) -> Result<(), QemuTeeError> {
    let (object, needed) = tee.object();
    if object_help.lines().any(|l| l.trim() == object) {
        return Ok(());
    }
    let found = version
        .lines()
        .next()
        .map(|l| format!(" (found: {})", l.trim()))
        .unwrap_or_default();
    Err(QemuTeeError::ObjectMissing {
        qemu: qemu.display().to_string(),
        object,
        version: needed,
        found,
    })
}

/// Runs `qemu -object help` and `qemu --version` and checks them.
pub fn probe_qemu_tee(qemu: &Path, tee: &QemuTee) -> Result<(), QemuTeeError> {
    let run = |arg: &[&str]| -> Result<String, QemuTeeError> {
        let out = std::process::Command::new(qemu)
            .args(arg)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| QemuTeeError::Probe {
                qemu: qemu.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let help = run(&["-object", "help"])?;
    let version = run(&["--version"])?;
    qemu_supports_tee(qemu, &help, &version, tee)
}

/// What QEMU's `-m` … `-append` say in every pod: size, no defaults, the
/// console to a file, the guest kernel, initramfs and command line.
fn boot_args(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    kernel: &Path,
    base: String,
) -> Vec<String> {
    vec![
        "-m".into(),
        format!("{}M", vm.memory_mib),
        "-smp".into(),
        vm.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", paths.console_log().display()),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        config.guest.initramfs.display().to_string(),
        "-append".into(),
        join_cmdline(base, &vm.kernel_params),
    ]
}

/// How the pod's virtio devices sit in QEMU: on virtio-mmio (`microvm`),
/// or on PCI with `iommu_platform=on`, which a confidential guest needs
/// so its drivers bounce I/O through shared memory.
#[derive(Debug, Clone, Copy)]
enum VirtioBus {
    Mmio,
    PciBehindIommu,
}

impl VirtioBus {
    /// The QEMU device name for `kind` on this bus, with its options.
    fn device(self, kind: &str, options: &str) -> String {
        match self {
            VirtioBus::Mmio => format!("{kind}-device{options}"),
            VirtioBus::PciBehindIommu => format!("{kind}-pci{options},iommu_platform=on"),
        }
    }
}

/// The pod's devices: our vhost-user vsock (the CID comes from the back
/// end, vhost-user GET_CONFIG), rng, the vhost-user fs share when there is
/// one, and a virtio-net per tap.
fn device_args(vm: &PodVm, paths: &VmPaths, bus: VirtioBus) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-chardev".into(),
        format!(
            "socket,id=vsock0,path={}",
            paths.vhost_user_vsock().display()
        ),
        "-device".into(),
        bus.device("vhost-user-vsock", ",chardev=vsock0"),
        "-device".into(),
        bus.device("virtio-rng", ""),
    ];
    if vm.shared_fs {
        args.extend([
            "-chardev".into(),
            format!("socket,id=fs0,path={}", paths.vhost_user_fs().display()),
            "-device".into(),
            bus.device(
                "vhost-user-fs",
                &format!(",chardev=fs0,tag={SHARED_FS_TAG}"),
            ),
        ]);
    }
    for (index, nic) in vm.nics.iter().enumerate() {
        args.extend([
            "-netdev".into(),
            format!("tap,id=net{index},fd={}", nic.tap_fd),
            "-device".into(),
            bus.device("virtio-net", &format!(",netdev=net{index},mac={}", nic.mac)),
        ]);
    }
    args
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// QEMU's arguments for a confidential pod: KVM only, `q35` with the
/// confidential-guest object, guest RAM in a shared memfd (private pages
/// come from guest_memfd, which QEMU adds itself), OVMF as firmware, and
/// the devices as virtio-pci with `iommu_platform=on` so the guest
/// driver bounces I/O through shared memory.
pub fn qemu_confidential_args(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    tee: &QemuTee,
) -> Result<Vec<OsString>, QemuTeeError> {
    let base = cmdline::guest_cmdline(RebootMethod::TripleFault, false);
    let (machine, object, ovmf, kernel, cpu) = match tee {
        QemuTee::Snp {
            policy,
            host_data,
            ovmf,
            kernel,
            cpu,
        } => {
            if policy & (1 << 17) == 0 {
                return Err(QemuTeeError::Policy(*policy));
            }
            (
                "q35,confidential-guest-support=sev0,memory-backend=ram0",
                format!(
                    "sev-snp-guest,id=sev0,policy={policy:#x},cbitpos={SNP_CBITPOS},reduced-phys-bits={SNP_REDUCED_PHYS_BITS},host-data={},kernel-hashes=on",
                    base64(host_data)
                ),
                ovmf,
                kernel,
                cpu.as_deref().unwrap_or("host"),
            )
        }
        QemuTee::Tdx {
            mr_config_id,
            ovmf,
            kernel,
            attributes,
            quote_service,
        } => {
            let mut object = format!("tdx-guest,id=tdx0,mrconfigid={}", base64(mr_config_id));
            if let Some(attributes) = attributes {
                object.push_str(&format!(",attributes={attributes:#x}"));
            }
            match quote_service {
                Some(QuoteService::Unix(socket)) => object.push_str(&format!(
                    ",quote-generation-socket.type=unix,quote-generation-socket.path={}",
                    socket.display()
                )),
                Some(QuoteService::Vsock { cid, port }) => object.push_str(&format!(
                    ",quote-generation-socket.type=vsock,quote-generation-socket.cid={cid},quote-generation-socket.port={port}"
                )),
                None => {}
            }
            (
                "q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0",
                object,
                ovmf,
                kernel,
                "host",
            )
        }
    };
    let mut args: Vec<String> = vec![
        "-machine".into(),
        machine.into(),
        "-object".into(),
        object,
        "-object".into(),
        format!(
            "memory-backend-memfd,id=ram0,size={}M,share=on",
            vm.memory_mib
        ),
        "-bios".into(),
        ovmf.display().to_string(),
        "-accel".into(),
        "kvm".into(),
        "-cpu".into(),
        cpu.into(),
    ];
    args.extend(boot_args(config, vm, paths, kernel, base));
    args.extend(device_args(vm, paths, VirtioBus::PciBehindIommu));
    Ok(args.into_iter().map(OsString::from).collect())
}

/// What confines QEMU where `[vmm] jail` confines cloister-vmm (QEMU
/// cannot take our jail: it opens its devices, files and sockets as root
/// and then drops): the pod's own uid/gid once it is set up (no
/// capabilities left, and none to be had again), and QEMU's own seccomp
/// sandbox refusing obsolete calls, fork/exec and scheduler/resource
/// changes. Its cgroups are joined before exec. The uid switch is
/// `-run-with user=` where QEMU has it (9.1 on, which deprecated
/// `-runas`; TDX needs 10.1), `-runas` before.
pub fn qemu_confinement_args(jail: &VmJailConfig, has_run_with: bool) -> Vec<OsString> {
    let ids = format!("{}:{}", jail.uid, jail.gid);
    let (option, value) = if has_run_with {
        ("-run-with", format!("user={ids}"))
    } else {
        ("-runas", ids)
    };
    vec![
        option.into(),
        value.into(),
        "-sandbox".into(),
        "on,obsolete=deny,spawn=deny,resourcecontrol=deny".into(),
    ]
}

/// Whether `qemu` takes `-run-with` (its `-help` lists it). A QEMU that
/// cannot even print its help is taken for an old one: starting it fails
/// with its own message.
pub fn qemu_has_run_with(qemu: &Path) -> bool {
    std::process::Command::new(qemu)
        .arg("-help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line.starts_with("-run-with "))
        })
}

/// QEMU with our vhost-user vsock and fs backends.
pub struct Qemu {
    qemu: PathBuf,
    vmm: PathBuf,
    args: Vec<OsString>,
    paths: VmPaths,
    shared_fs: bool,
    inherited_fds: Vec<i32>,
    vmm_section: VmmSection,
    vm: PodVm,
    jail: PreparedJail,
    backends: Vec<SupervisedChild>,
    qemu_child: Option<SupervisedChild>,
}

impl Qemu {
    pub fn new(config: &RuntimeConfig, vm: &PodVm, paths: VmPaths) -> Self {
        let kvm = qemu_uses_kvm(config.qemu.accel);
        let args = qemu_args(config, vm, &paths, kvm, cmdline::host_is_nested_pvm());
        Self {
            qemu: config.qemu.path.clone(),
            vmm: config.vmm.path.clone(),
            args,
            paths,
            shared_fs: vm.shared_fs,
            inherited_fds: nic_fds(vm),
            vmm_section: config.vmm.clone(),
            vm: vm.clone(),
            jail: PreparedJail::default(),
            backends: Vec::new(),
            qemu_child: None,
        }
    }

    /// QEMU for a confidential pod: refused at once when this QEMU lacks
    /// the `sev-snp-guest` / `tdx-guest` object, before anything starts.
    pub fn new_confidential(
        config: &RuntimeConfig,
        vm: &PodVm,
        paths: VmPaths,
        tee: &QemuTee,
    ) -> Result<Self, QemuTeeError> {
        probe_qemu_tee(&config.qemu.path, tee)?;
        let args = qemu_confidential_args(config, vm, &paths, tee)?;
        Ok(Self {
            args,
            ..Self::new(config, vm, paths)
        })
    }

    pub fn args(&self) -> &[OsString] {
        &self.args
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        self.jail = prepare_jail(
            &self.vmm_section,
            &self.vm,
            &self.paths,
            Path::new(JAIL_ID_LEASES),
        )?;
        let jail_args = self
            .jail
            .jail
            .as_ref()
            .map(VmJailConfig::args)
            .unwrap_or_default();
        let mut backends = vec![(
            "cloister-vmm vhost-user vsock",
            vhost_user_vsock_args(&self.paths),
            self.paths.vhost_user_vsock_log(),
            self.paths.vhost_user_vsock(),
            "vhost-user vsock socket",
        )];
        if self.shared_fs {
            backends.push((
                "cloister-vmm vhost-user fs",
                vhost_user_fs_args(&self.paths),
                self.paths.vhost_user_fs_log(),
                self.paths.vhost_user_fs(),
                "vhost-user fs socket",
            ));
        }
        for (name, mut args, log, socket, what) in backends {
            args.extend(jail_args.iter().cloned());
            let backend = SupervisedChild::spawn(name, &self.vmm, &args, &log, &[])?;
            // QEMU connects to the backends' sockets at start: they must exist.
            let ready = wait_for_socket(&backend, &socket, what).await;
            record_vm_process(&self.paths, &backend);
            self.backends.push(backend);
            ready?;
        }
        let mut args = self.args.clone();
        let mut cgroups: &[PathBuf] = &[];
        if let Some(jail) = &self.jail.jail {
            args.extend(qemu_confinement_args(jail, qemu_has_run_with(&self.qemu)));
            cgroups = &jail.cgroups;
        }
        let qemu = SupervisedChild::spawn_in_cgroups(
            "qemu",
            &self.qemu,
            &args,
            &self.paths.qemu_log(),
            &self.inherited_fds,
            cgroups,
        )?;
        record_vm_process(&self.paths, &qemu);
        self.qemu_child = Some(qemu);
        Ok(())
    }

    fn vsock_uds(&self) -> PathBuf {
        self.paths.vsock_uds()
    }

    /// Any process of the VM ending ends the VM.
    async fn wait_exit(&self) -> ChildExit {
        let children: Vec<&SupervisedChild> =
            self.qemu_child.iter().chain(self.backends.iter()).collect();
        if children.is_empty() {
            return ChildExit::Lost;
        }
        let waits = children.into_iter().map(|c| Box::pin(c.wait()));
        futures_select_all(waits).await
    }

    async fn stop(&self, grace: Duration) {
        // QEMU first: the backends serve its memory until then.
        for child in self.qemu_child.iter().chain(self.backends.iter()) {
            let exit = child.stop(grace).await;
            tracing::info!(name = %child.name, pid = child.pid, "stopped: {exit}");
        }
        remove_cgroups(&self.jail.created_cgroups);
    }

    fn pids(&self) -> Vec<u32> {
        self.qemu_child
            .iter()
            .chain(self.backends.iter())
            .map(|c| c.pid)
            .collect()
    }

    fn jail_ids(&self) -> Option<(u32, u32)> {
        self.jail.jail.as_ref().map(|jail| (jail.uid, jail.gid))
    }
}
