//! The default backend: `cloister-vmm --config vm.json`, and the vm.json
//! it reads (also what `cloister measure` measures).

use super::*;

/// `vsock` section of `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmVsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// One `fs` entry of `vm.json`: a host folder shared under a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmFsConfig {
    pub tag: String,
    pub shared_dir: PathBuf,
}

/// One `net` entry of `vm.json`: a tap inherited as an fd, and the guest's
/// MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmNetConfig {
    pub fd: i32,
    pub mac: String,
}

/// What `cloister-vmm --config` reads: the fields of the VMM's `VmConfig`
/// plus the vsock device, the virtio-fs shares and the NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmJson {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub serial: String,
    /// virtio-rng: the agent's and containers' entropy.
    pub rng: bool,
    pub vsock: VmVsockConfig,
    pub fs: Vec<VmFsConfig>,
    pub net: Vec<VmNetConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jail: Option<VmJailConfig>,
    /// SEV-SNP / TDX launch (the VMM's `tee::config::TeeConfig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee: Option<VmTeeConfig>,
}

/// `tee` section of `vm.json`. HOST_DATA and MRCONFIGID are written as
/// the bytes themselves (`host_data`, `mr_config_id`: the VMM binds them
/// unchanged), not as `init_data_digest`, so what the launch binds is
/// exactly [`crate::confidential::PodConfidential::snp_host_data`] /
/// `tdx_mr_config_id`, all zero for a pod without init-data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum VmTeeConfig {
    Snp {
        policy: String,
        host_data: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        vcpu_type: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cpu_signature: Option<String>,
    },
    Tdx {
        #[serde(skip_serializing_if = "Option::is_none")]
        attributes: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        xfam: Option<String>,
        mr_config_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        quote_service: Option<String>,
    },
}

impl VmTeeConfig {
    pub fn from_launch(launch: &TeeLaunch) -> Self {
        match &launch.kind {
            TeeLaunchKind::Snp {
                policy,
                vcpu,
                host_data,
            } => VmTeeConfig::Snp {
                policy: format!("{policy:#x}"),
                host_data: hex::encode(host_data),
                vcpu_type: match vcpu {
                    Some(SnpVcpu::Type(name)) => Some(name.clone()),
                    _ => None,
                },
                cpu_signature: match vcpu {
                    Some(SnpVcpu::Signature(signature)) => Some(format!("{signature:#x}")),
                    _ => None,
                },
            },
            TeeLaunchKind::Tdx {
                attributes,
                xfam,
                quote_service,
                mr_config_id,
            } => VmTeeConfig::Tdx {
                attributes: attributes.map(|a| format!("{a:#x}")),
                xfam: xfam.map(|x| format!("{x:#x}")),
                mr_config_id: hex::encode(mr_config_id),
                quote_service: quote_service.as_ref().map(QuoteService::to_string),
            },
        }
    }
}

/// `jail` section of `vm.json` (the VMM's `JailConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmJailConfig {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<PathBuf>,
}

impl VmJailConfig {
    /// The same as `cloister-vmm` flags (the vhost-user servers').
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--jail-root".into(),
            self.root.clone().into(),
            "--jail-uid".into(),
            self.uid.to_string().into(),
            "--jail-gid".into(),
            self.gid.to_string().into(),
        ];
        for cgroup in &self.cgroups {
            args.push("--jail-cgroup".into());
            args.push(cgroup.clone().into());
        }
        args
    }
}

/// The VM config for `cloister-vmm`; an SNP/TDX pod (`tee`) boots the
/// bzImage and gets the `tee` section, with the same devices (the VMM
/// offers them to a confidential guest behind VIRTIO_F_ACCESS_PLATFORM).
/// `cloister measure` measures exactly this.
pub fn cloister_vm_json(
    config: &RuntimeConfig,
    vm: &PodVm,
    paths: &VmPaths,
    tee: Option<&TeeLaunch>,
) -> VmJson {
    // cloister-vmm adds the nested-KVM parameters itself when it picks the
    // nested-pvm CPU template, and resets through the i8042.
    let base = cmdline::guest_cmdline(RebootMethod::Keyboard, false);
    VmJson {
        kernel: tee.map_or_else(|| config.guest.kernel.clone(), |t| t.kernel.clone()),
        initrd: Some(config.guest.initramfs.clone()),
        cmdline: join_cmdline(base, &vm.kernel_params),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        serial: format!("file:{}", paths.console_log().display()),
        rng: true,
        vsock: VmVsockConfig {
            guest_cid: GUEST_CID,
            uds_path: paths.vsock_uds(),
        },
        fs: if vm.shared_fs {
            vec![VmFsConfig {
                tag: SHARED_FS_TAG.into(),
                shared_dir: paths.shared_dir(),
            }]
        } else {
            Vec::new()
        },
        net: vm
            .nics
            .iter()
            .map(|nic| VmNetConfig {
                fd: nic.tap_fd,
                mac: nic.mac.clone(),
            })
            .collect(),
        jail: None,
        tee: tee.map(VmTeeConfig::from_launch),
    }
}

/// Writes `vm.json` (the launcher's and `cloister measure`'s one writer).
pub fn write_vm_json(json: &VmJson, path: &Path) -> Result<(), HypervisorError> {
    let text = serde_json::to_vec_pretty(json).map_err(|e| HypervisorError::File {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text).map_err(|source| HypervisorError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The default backend.
pub struct CloisterVmm {
    binary: PathBuf,
    vm_json: VmJson,
    inherited_fds: Vec<i32>,
    paths: VmPaths,
    vmm: VmmSection,
    vm: PodVm,
    jail: PreparedJail,
    child: Option<SupervisedChild>,
}

impl CloisterVmm {
    pub fn new(
        config: &RuntimeConfig,
        vm: &PodVm,
        paths: VmPaths,
        tee: Option<&TeeLaunch>,
    ) -> Self {
        Self {
            binary: config.vmm.path.clone(),
            vm_json: cloister_vm_json(config, vm, &paths, tee),
            inherited_fds: nic_fds(vm),
            paths,
            vmm: config.vmm.clone(),
            vm: vm.clone(),
            jail: PreparedJail::default(),
            child: None,
        }
    }

    pub fn args(&self) -> Vec<OsString> {
        vec!["--config".into(), self.paths.vm_config().into()]
    }
}

#[async_trait]
impl Hypervisor for CloisterVmm {
    async fn start(&mut self) -> Result<(), HypervisorError> {
        self.jail = prepare_jail(&self.vmm, &self.vm, &self.paths, Path::new(JAIL_ID_LEASES))?;
        self.vm_json.jail = self.jail.jail.clone();
        write_vm_json(&self.vm_json, &self.paths.vm_config())?;
        let child = SupervisedChild::spawn(
            "cloister-vmm",
            &self.binary,
            &self.args(),
            &self.paths.vmm_log(),
            &self.inherited_fds,
        )?;
        // The vsock socket appears once the VMM built its devices; a VMM
        // that refuses its config exits first.
        let ready = wait_for_socket(&child, &self.paths.vsock_uds(), "vsock socket").await;
        record_vm_process(&self.paths, &child);
        self.child = Some(child);
        ready
    }

    fn vsock_uds(&self) -> PathBuf {
        self.paths.vsock_uds()
    }

    async fn wait_exit(&self) -> ChildExit {
        match &self.child {
            Some(child) => child.wait().await,
            None => ChildExit::Lost,
        }
    }

    async fn stop(&self, grace: Duration) {
        if let Some(child) = &self.child {
            let exit = child.stop(grace).await;
            tracing::info!(pid = child.pid, "cloister-vmm stopped: {exit}");
        }
        remove_cgroups(&self.jail.created_cgroups);
    }

    fn pids(&self) -> Vec<u32> {
        self.child.iter().map(|c| c.pid).collect()
    }

    fn jail_ids(&self) -> Option<(u32, u32)> {
        self.jail.jail.as_ref().map(|jail| (jail.uid, jail.gid))
    }
}
