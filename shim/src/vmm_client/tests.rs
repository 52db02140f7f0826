use super::*;
use crate::config::VmNic;

fn pod_vm() -> PodVm {
    PodVm {
        hypervisor: HypervisorKind::Cloister,
        vcpus: 2,
        memory_mib: 512,
        kernel_params: "agent.log=debug".into(),
        shared_fs: true,
        nics: Vec::new(),
        cgroups_path: None,
    }
}

fn paths() -> VmPaths {
    VmPaths {
        dir: PathBuf::from("/run/cloister/default/pod1"),
    }
}

fn strings(args: &[OsString]) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn cloister_vm_json_has_vmm_fields_and_vsock() {
    let json = serde_json::to_value(cloister_vm_json(
        &RuntimeConfig::default(),
        &pod_vm(),
        &paths(),
        None,
    ))
    .unwrap();
    assert_eq!(json["kernel"], "/usr/share/cloister/vmlinux");
    assert_eq!(json["initrd"], "/usr/share/cloister/initramfs.cpio");
    assert_eq!(json["vcpus"], 2);
    assert_eq!(json["memory_mib"], 512);
    assert_eq!(
        json["serial"],
        "file:/run/cloister/default/pod1/console.log"
    );
    assert_eq!(json["vsock"]["guest_cid"], 3);
    assert_eq!(
        json["vsock"]["uds_path"],
        "/run/cloister/default/pod1/sockets/vsock.sock"
    );
    let cmdline = json["cmdline"].as_str().unwrap();
    assert!(cmdline.starts_with("console=ttyS0"), "{cmdline}");
    assert!(cmdline.contains("reboot=k"), "{cmdline}");
    assert!(cmdline.ends_with(" agent.log=debug"), "{cmdline}");
    assert_eq!(json["fs"][0]["tag"], "cloister");
    assert_eq!(
        json["fs"][0]["shared_dir"],
        "/run/cloister/default/pod1/shared"
    );
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(json["rng"], true);
    assert_eq!(keys.len(), 10, "{keys:?}");
    assert_eq!(json["net"], serde_json::json!([]));
}

/// The contract with `cloister-vmm --config`: its own parser and
/// validation accept what we write, the pod's shared folder included.
#[test]
fn cloister_vmm_accepts_our_vm_json_with_a_jail_and_its_flags() {
    let jail = VmJailConfig {
        root: "/run/cloister/default/pod1/jail".into(),
        uid: 64000,
        gid: 64000,
        cgroups: vec!["/sys/fs/cgroup/memory/default/pod1".into()],
    };
    let mut vm_json = cloister_vm_json(&RuntimeConfig::default(), &pod_vm(), &paths(), None);
    vm_json.jail = Some(jail.clone());
    let text = serde_json::to_string(&vm_json).unwrap();
    let config = cloister_vmm::config::VmConfig::from_json(&text, Path::new("vm.json")).unwrap();
    config.validate().unwrap();
    let parsed = config.jail.unwrap();
    assert_eq!(parsed.root, jail.root);
    assert_eq!((parsed.uid, parsed.gid), (64000, 64000));
    assert_eq!(parsed.cgroups, jail.cgroups);
    assert_eq!(
        strings(&jail.args()).join(" "),
        "--jail-root /run/cloister/default/pod1/jail --jail-uid 64000 --jail-gid 64000 --jail-cgroup /sys/fs/cgroup/memory/default/pod1"
    );
}

#[test]
fn qemu_is_confined_with_the_uid_option_its_version_has() {
    let jail = VmJailConfig {
        root: "/run/cloister/default/pod1/jail".into(),
        uid: 64007,
        gid: 64007,
        cgroups: Vec::new(),
    };
    let joined = |args: Vec<OsString>| {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let sandbox = "-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny";
    assert_eq!(
        joined(qemu_confinement_args(&jail, false)),
        format!("-runas 64007:64007 {sandbox}")
    );
    assert_eq!(
        joined(qemu_confinement_args(&jail, true)),
        format!("-run-with user=64007:64007 {sandbox}")
    );

    // Told apart by the help text, as QEMU 7.2 and 10.1 print it.
    let dir = tempfile::tempdir().unwrap();
    let fake = |name: &str, help: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\nprintf '%s\\n' {help}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    };
    let old = fake("qemu-7.2", "'-runas user     change to user id user'");
    let new = fake(
        "qemu-10.1",
        "'-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]'",
    );
    assert!(!qemu_has_run_with(&old));
    // Retried: a child another test thread forks while the script is
    // still open for writing makes its exec fail (ETXTBSY) for a moment.
    let answers = || {
        (0..50).any(|_| {
            qemu_has_run_with(&new) || (std::thread::sleep(Duration::from_millis(20)), false).1
        })
    };
    assert!(answers());
    assert!(!qemu_has_run_with(&dir.path().join("no-such-qemu")));
}

#[test]
fn prepared_jail_has_an_owned_sockets_folder_and_a_shared_mount_undone_at_removal() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: preparing a jail needs root (chown, mount)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let dir = crate::sandbox::SandboxDir::new(state.path(), "default", "jail-test");
    dir.create().unwrap();
    let paths = dir.vm_paths();

    let leases = state.path().join("jail-ids");

    let prepared = prepare_jail(&VmmSection::default(), &pod_vm(), &paths, &leases).unwrap();

    use std::os::unix::fs::MetadataExt;
    let sockets = std::fs::metadata(paths.sockets_dir()).unwrap();
    let jail = prepared.jail.unwrap();
    let first = crate::config::DEFAULT_JAIL_ID;
    assert!(
        (first..first + crate::config::DEFAULT_JAIL_ID_COUNT).contains(&jail.uid),
        "{}",
        jail.uid
    );
    assert_eq!(
        jail.gid, jail.uid,
        "the default ranges start at the same id"
    );
    assert_eq!((sockets.uid(), sockets.gid()), (jail.uid, jail.gid));
    assert_eq!(sockets.mode() & 0o777, 0o700);
    let lease = std::fs::read_to_string(leases.join(jail.uid.to_string())).unwrap();
    assert_eq!(
        lease.trim_end(),
        "default/jail-test",
        "the lease names the pod"
    );
    // A second pod prepared meanwhile runs as another uid.
    let other = crate::sandbox::SandboxDir::new(state.path(), "default", "jail-test-2");
    other.create().unwrap();
    let second = prepare_jail(
        &VmmSection::default(),
        &pod_vm(),
        &other.vm_paths(),
        &leases,
    )
    .unwrap();
    assert_ne!(second.jail.unwrap().uid, jail.uid);
    other.remove().unwrap();
    assert_eq!(jail.root, paths.jail_root());
    assert!(jail.cgroups.is_empty());
    let mounts = crate::sandbox::mounts_below(&dir.path);
    assert_eq!(mounts, [paths.shared_dir()]);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let shared_line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(paths.shared_dir().to_str().unwrap()))
        .unwrap();
    assert!(shared_line.contains(" shared:"), "{shared_line}");
    // Idempotent, and the sandbox's removal undoes it.
    make_shared_mount(&paths.shared_dir()).unwrap();
    dir.remove().unwrap();
    assert!(!dir.path.exists());
    assert!(crate::sandbox::mounts_below(state.path()).is_empty());
}

#[test]
fn cloister_vmm_accepts_our_vm_json() {
    let json = serde_json::to_value(cloister_vm_json(
        &RuntimeConfig::default(),
        &pod_vm(),
        &paths(),
        None,
    ))
    .unwrap();
    let config =
        cloister_vmm::config::VmConfig::from_json(&json.to_string(), Path::new("vm.json")).unwrap();
    config.validate().unwrap();
    assert_eq!(config.vsock.unwrap().guest_cid, u64::from(GUEST_CID));
    assert_eq!(config.memory_mib, 512);
    assert!(config.rng);
    assert_eq!(config.fs.len(), 1);
    assert_eq!(config.fs[0].tag, SHARED_FS_TAG);
}

#[test]
fn pod_nics_become_vm_json_entries_and_qemu_tap_netdevs() {
    let vm = PodVm {
        nics: vec![
            VmNic {
                tap_fd: 7,
                mac: "0a:58:0a:00:00:05".into(),
            },
            VmNic {
                tap_fd: 9,
                mac: "0a:58:0a:00:01:05".into(),
            },
        ],
        ..pod_vm()
    };
    let json = serde_json::to_value(cloister_vm_json(
        &RuntimeConfig::default(),
        &vm,
        &paths(),
        None,
    ))
    .unwrap();
    assert_eq!(
        json["net"],
        serde_json::json!([
            { "fd": 7, "mac": "0a:58:0a:00:00:05" },
            { "fd": 9, "mac": "0a:58:0a:00:01:05" }
        ])
    );
    // cloister-vmm's own parser takes the entries.
    let config =
        cloister_vmm::config::VmConfig::from_json(&json.to_string(), Path::new("vm.json")).unwrap();
    assert_eq!(config.net.len(), 2);
    assert_eq!(config.net[1].fd, Some(9));
    let args = strings(&qemu_args(
        &RuntimeConfig::default(),
        &vm,
        &paths(),
        false,
        false,
    ))
    .join(" ");
    assert!(
        args.contains(
            "-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=0a:58:0a:00:00:05"
        ),
        "{args}"
    );
    assert!(args.contains("-netdev tap,id=net1,fd=9"), "{args}");
    assert_eq!(nic_fds(&vm), [7, 9]);
}

#[test]
fn vm_without_shared_folder_has_no_fs_device() {
    let vm = PodVm {
        shared_fs: false,
        ..pod_vm()
    };
    let json = cloister_vm_json(&RuntimeConfig::default(), &vm, &paths(), None);
    assert!(json.fs.is_empty());
    let args = strings(&qemu_args(
        &RuntimeConfig::default(),
        &vm,
        &paths(),
        false,
        false,
    ));
    assert!(!args.join(" ").contains("vhost-user-fs"), "{args:?}");
}

#[test]
fn cloister_vmm_is_started_with_the_config_file() {
    let vmm = CloisterVmm::new(&RuntimeConfig::default(), &pod_vm(), paths(), None);
    assert_eq!(
        strings(&vmm.args()),
        ["--config", "/run/cloister/default/pod1/vm.json"]
    );
}

#[test]
fn qemu_command_line_on_tcg() {
    let args = strings(&qemu_args(
        &RuntimeConfig::default(),
        &pod_vm(),
        &paths(),
        false,
        true,
    ));
    let joined = args.join(" ");
    assert!(
        joined.starts_with(
            "-M microvm,acpi=off,memory-backend=mem -object memory-backend-memfd,id=mem,size=512M,share=on -accel tcg -cpu qemu64 -m 512M -smp 2"
        ),
        "{joined}"
    );
    let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
    assert!(append.contains("reboot=t"), "{append}");
    // Nested-KVM parameters only when KVM is used.
    assert!(!append.contains("clearcpuid"), "{append}");
    assert!(append.ends_with("agent.log=debug"));
    assert!(joined.contains(
        "-chardev socket,id=vsock0,path=/run/cloister/default/pod1/sockets/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock0 "
    ), "{joined}");
    assert!(joined.contains(
        "-chardev socket,id=fs0,path=/run/cloister/default/pod1/sockets/vhost-fs.sock -device vhost-user-fs-device,chardev=fs0,tag=cloister"
    ), "{joined}");
    assert!(joined.contains("-serial file:/run/cloister/default/pod1/console.log"));
    assert!(joined.contains(
        "-kernel /usr/share/cloister/vmlinux -initrd /usr/share/cloister/initramfs.cpio"
    ));
}

#[test]
fn qemu_command_line_on_kvm_picks_cpu_for_host() {
    let config = RuntimeConfig::default();
    let nested = strings(&qemu_args(&config, &pod_vm(), &paths(), true, true));
    let cpu = &nested[nested.iter().position(|a| a == "-cpu").unwrap() + 1];
    assert_eq!(cpu, cmdline::NESTED_KVM_QEMU_CPU);
    let append = &nested[nested.iter().position(|a| a == "-append").unwrap() + 1];
    assert!(append.contains("clearcpuid="), "{append}");
    let bare = strings(&qemu_args(&config, &pod_vm(), &paths(), true, false));
    assert!(bare.join(" ").contains("-accel kvm -cpu host"));
}

/// Every `-device NAME,key=value` we generate names a device and
/// properties this host's QEMU knows (`-device NAME,help`).
#[test]
fn qemu_knows_every_device_property_we_pass() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        eprintln!(
            "SKIP: {} missing (Debian package qemu-system-x86)",
            qemu.display()
        );
        return;
    }
    let args = strings(&qemu_args(
        &RuntimeConfig::default(),
        &pod_vm(),
        &paths(),
        false,
        false,
    ));
    let devices = arg_after(&args, "-device");
    assert!(devices.len() >= 3, "{devices:?}");
    assert_qemu_knows_devices(qemu, "microvm", &devices);
}

/// Each `NAME,key=value,...` in `devices` is a device `qemu` has on
/// `machine`, with every one of those properties (`-device NAME,help`).
fn assert_qemu_knows_devices(qemu: &Path, machine: &str, devices: &[&str]) {
    for device in devices {
        let mut parts = device.split(',');
        let name = parts.next().unwrap();
        let help = std::process::Command::new(qemu)
            .args(["-M", machine, "-device", &format!("{name},help")])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains(&format!("{name} options:")), "{name}: {help}");
        for property in parts {
            let key = property.split('=').next().unwrap();
            assert!(
                help.contains(&format!("  {key}=")),
                "{name} has no property {key}: {help}"
            );
        }
    }
}

/// The q35 devices of a confidential pod exist in the installed QEMU
/// with every property we pass (the TEE objects themselves need a
/// newer QEMU: `old_qemu_is_refused_naming_the_version_needed`).
#[test]
fn qemu_knows_every_confidential_device_property_we_pass() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        eprintln!(
            "SKIP: {} missing (Debian package qemu-system-x86)",
            qemu.display()
        );
        return;
    }
    let mut vm = pod_vm();
    vm.nics.push(crate::config::VmNic {
        tap_fd: 3,
        mac: "02:00:00:00:00:01".into(),
    });
    let tee = QemuTee::Snp {
        policy: 0x30000,
        host_data: [0; 32],
        ovmf: "/o".into(),
        kernel: "/k/bzImage".into(),
        cpu: None,
    };
    let args =
        strings(&qemu_confidential_args(&RuntimeConfig::default(), &vm, &paths(), &tee).unwrap());
    let devices = arg_after(&args, "-device");
    assert_eq!(devices.len(), 4, "{devices:?}");
    assert_qemu_knows_devices(qemu, "q35", &devices);
}

#[test]
fn vhost_user_fs_backend_command() {
    assert_eq!(
        strings(&vhost_user_fs_args(&paths())).join(" "),
        "vhost-user --device fs --tag cloister --shared-dir /run/cloister/default/pod1/shared --socket /run/cloister/default/pod1/sockets/vhost-fs.sock"
    );
}

#[test]
fn vhost_user_backend_command() {
    assert_eq!(
        strings(&vhost_user_vsock_args(&paths())).join(" "),
        "vhost-user --device vsock --guest-cid 3 --uds /run/cloister/default/pod1/sockets/vsock.sock --socket /run/cloister/default/pod1/sockets/vhost-vsock.sock"
    );
}

fn arg_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

/// A pod's SNP/TDX launch as the runtime config and init-data make it.
fn tee_launch(config_toml: &str, init_data: Option<&str>) -> (RuntimeConfig, TeeLaunch) {
    let config = RuntimeConfig::from_toml(config_toml, Path::new("c.toml")).unwrap();
    let annotations: std::collections::HashMap<String, String> = init_data
        .map(|doc| {
            use base64::Engine;
            (
                cloister_protocol::annotations::INIT_DATA.to_owned(),
                base64::engine::general_purpose::STANDARD.encode(doc),
            )
        })
        .into_iter()
        .collect();
    let plan = crate::sandbox::PodVmPlan::for_pod(&config, &annotations).unwrap();
    (config, plan.tee.unwrap())
}

const INIT_DATA_DOC: &str =
    "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = 'url = \"http://kbs\"'\n";

/// The vm.json `tee` section as `cloister-vmm` itself parses and
/// validates it.
fn vmm_tee_spec(json: &VmJson) -> cloister_vmm::tee::config::TeeSpec {
    let text = serde_json::to_string(json).unwrap();
    let parsed = cloister_vmm::config::VmConfig::from_json(&text, Path::new("vm.json")).unwrap();
    parsed.validate().unwrap();
    parsed.tee.unwrap().validate().unwrap()
}

#[test]
fn snp_pod_vm_json_binds_host_data_to_the_init_data_digest_and_boots_the_bzimage() {
    use cloister_vmm::tee::config::TeeSpec;
    let toml = "[guest]\nkernel = \"/cache/kernel/current/vmlinux\"\n[confidential]\ntee = \"snp\"\nvcpu_type = \"EPYC-Milan\"\n";
    let (config, launch) = tee_launch(toml, Some(INIT_DATA_DOC));
    let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
    assert_eq!(json.kernel, PathBuf::from("/cache/kernel/current/bzImage"));
    assert!(json.vsock.guest_cid == GUEST_CID && json.rng && json.fs.len() == 1);
    let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA_DOC.as_bytes())
        .unwrap()
        .digest();
    assert_eq!(digest.len(), 48);
    match vmm_tee_spec(&json) {
        TeeSpec::Snp {
            policy,
            host_data,
            cpu_signature,
            vmsa_features,
        } => {
            assert_eq!(policy.bits(), 0x30000);
            assert_eq!(host_data[..], digest[..32]);
            assert_eq!(cpu_signature, Some(0x00A0_0F11));
            assert_eq!(vmsa_features, 0);
        }
        other => panic!("{other:?}"),
    }
    let value = serde_json::to_value(&json).unwrap();
    assert_eq!(
        value["tee"],
        serde_json::json!({"type": "snp", "policy": "0x30000", "host_data": hex::encode(&digest[..32]), "vcpu_type": "EPYC-Milan"})
    );
    // Without init-data: HOST_DATA is zero, as the agent then expects.
    let (config, launch) = tee_launch(toml, None);
    let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
    assert!(matches!(vmm_tee_spec(&json), TeeSpec::Snp { host_data, .. } if host_data == [0; 32]));
}

#[test]
fn tdx_pod_vm_json_binds_mr_config_id_and_the_quote_service() {
    use cloister_vmm::tee::config::TeeSpec;
    let toml = "[confidential]\ntee = \"tdx\"\nkernel = \"/k/bzImage-tdx\"\nquote_service = \"vsock:2:4050\"\ntdx_attributes = 0x10000000\ntdx_xfam = 0x2e7\n";
    let (config, launch) = tee_launch(toml, Some(INIT_DATA_DOC));
    let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
    assert_eq!(json.kernel, PathBuf::from("/k/bzImage-tdx"));
    let digest = cloister_attestation::initdata::InitData::parse(INIT_DATA_DOC.as_bytes())
        .unwrap()
        .digest();
    match vmm_tee_spec(&json) {
        TeeSpec::Tdx {
            attributes,
            xfam,
            mr_config_id,
            quote_service,
        } => {
            assert_eq!((attributes, xfam), (0x1000_0000, 0x2e7));
            assert_eq!(mr_config_id[..], digest[..]);
            assert_eq!(
                quote_service,
                Some(cloister_vmm::tee::tdx::quote::QuoteServiceAddr::Vsock { cid: 2, port: 4050 })
            );
        }
        other => panic!("{other:?}"),
    }
    let (config, launch) = tee_launch("[confidential]\ntee = \"tdx\"\n", None);
    let json = cloister_vm_json(&config, &pod_vm(), &paths(), Some(&launch));
    assert!(
        matches!(vmm_tee_spec(&json), TeeSpec::Tdx { mr_config_id, .. } if mr_config_id == [0; 48])
    );
}

/// The sample TEE keeps an ordinary VM: the vmlinux, no `tee` section,
/// its parameters on the command line.
#[test]
fn sample_pod_has_no_tee_section() {
    let config =
        RuntimeConfig::from_toml("[confidential]\ntee = \"sample\"\n", Path::new("c.toml"))
            .unwrap();
    let plan = crate::sandbox::PodVmPlan::for_pod(&config, &Default::default()).unwrap();
    assert!(plan.tee.is_none());
    let json = cloister_vm_json(&config, &plan.vm, &paths(), plan.tee.as_ref());
    assert_eq!(json.kernel, PathBuf::from("/usr/share/cloister/vmlinux"));
    assert!(
        json.cmdline.ends_with("cloister.tee=sample"),
        "{}",
        json.cmdline
    );
    assert!(serde_json::to_value(&json).unwrap().get("tee").is_none());
}

#[test]
fn qemu_tee_is_built_from_the_confidential_section() {
    let (_, launch) = tee_launch(
        "[confidential]\ntee = \"snp\"\nsnp_policy = 0x70000\nvcpu_type = \"EPYC-Genoa\"\nfirmware = \"/fw/OVMF.fd\"\n",
        None,
    );
    assert_eq!(
        QemuTee::from_launch(&launch).unwrap(),
        QemuTee::Snp {
            policy: 0x70000,
            host_data: [0; 32],
            ovmf: "/fw/OVMF.fd".into(),
            kernel: "/usr/share/cloister/bzImage".into(),
            cpu: Some("EPYC-Genoa".into()),
        }
    );
    let (_, launch) = tee_launch(
        "[confidential]\ntee = \"tdx\"\ntdx_attributes = 0x10000000\nquote_service = \"unix:/run/qgs.sock\"\n",
        None,
    );
    assert_eq!(
        QemuTee::from_launch(&launch).unwrap(),
        QemuTee::Tdx {
            mr_config_id: [0; 48],
            ovmf: "/usr/share/ovmf/OVMF.inteltdx.fd".into(),
            kernel: "/usr/share/cloister/bzImage".into(),
            attributes: Some(0x1000_0000),
            quote_service: Some(QuoteService::Unix("/run/qgs.sock".into())),
        }
    );
    let (_, launch) = tee_launch(
        "[confidential]\ntee = \"snp\"\ncpu_signature = 0xa00f11\n",
        None,
    );
    let err = QemuTee::from_launch(&launch).unwrap_err().to_string();
    assert!(
        err.starts_with("confidential.cpu_signature = 0xa00f11: QEMU takes a CPU model"),
        "{err}"
    );
    let (_, launch) = tee_launch("[confidential]\ntee = \"tdx\"\ntdx_xfam = 0xe7\n", None);
    let err = QemuTee::from_launch(&launch).unwrap_err().to_string();
    assert!(err.starts_with("confidential.tdx_xfam = 0xe7"), "{err}");
}

#[test]
fn qemu_snp_args_carry_policy_host_data_and_kernel_hashes() {
    let tee = QemuTee::Snp {
        policy: 0x30000,
        host_data: [0xAB; 32],
        ovmf: "/usr/share/ovmf/OVMF.amdsev.fd".into(),
        kernel: "/k/bzImage".into(),
        cpu: Some("EPYC-Milan".into()),
    };
    let args = strings(
        &qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee).unwrap(),
    );
    assert_eq!(
        arg_after(&args, "-machine"),
        ["q35,confidential-guest-support=sev0,memory-backend=ram0"]
    );
    let objects = arg_after(&args, "-object");
    assert_eq!(
        objects[0],
        "sev-snp-guest,id=sev0,policy=0x30000,cbitpos=51,reduced-phys-bits=1,host-data=q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=,kernel-hashes=on"
    );
    assert!(
        objects[1].starts_with("memory-backend-memfd,id=ram0,"),
        "{objects:?}"
    );
    assert_eq!(
        arg_after(&args, "-bios"),
        ["/usr/share/ovmf/OVMF.amdsev.fd"]
    );
    assert_eq!(arg_after(&args, "-accel"), ["kvm"]);
    assert_eq!(arg_after(&args, "-cpu"), ["EPYC-Milan"]);
    assert!(arg_after(&args, "-device")
        .iter()
        .all(|d| d.ends_with("iommu_platform=on")));
    assert_eq!(arg_after(&args, "-kernel"), ["/k/bzImage"]);
}

#[test]
fn qemu_snp_refuses_a_policy_without_bit_17() {
    let tee = QemuTee::Snp {
        policy: 0x10000,
        host_data: [0; 32],
        ovmf: "/o".into(),
        kernel: "/k/bzImage".into(),
        cpu: None,
    };
    let err = qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0x10000"), "{err}");
}

#[test]
fn qemu_tdx_args_carry_mrconfigid_and_the_quote_socket() {
    let mut tee = QemuTee::Tdx {
        mr_config_id: [0; 48],
        ovmf: "/usr/share/ovmf/OVMF.inteltdx.fd".into(),
        kernel: "/k/bzImage".into(),
        attributes: None,
        quote_service: Some(QuoteService::Unix("/run/tdx-qgs/qgs.socket".into())),
    };
    let args = strings(
        &qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee).unwrap(),
    );
    assert_eq!(
        arg_after(&args, "-machine"),
        ["q35,kernel-irqchip=split,confidential-guest-support=tdx0,memory-backend=ram0"]
    );
    assert_eq!(
        arg_after(&args, "-object")[0],
        format!(
            "tdx-guest,id=tdx0,mrconfigid={},quote-generation-socket.type=unix,quote-generation-socket.path=/run/tdx-qgs/qgs.socket",
            "A".repeat(64)
        )
    );
    assert_eq!(arg_after(&args, "-kernel"), ["/k/bzImage"]);
    if let QemuTee::Tdx {
        attributes,
        quote_service,
        ..
    } = &mut tee
    {
        *attributes = Some(0x1000_0000);
        *quote_service = Some(QuoteService::Vsock { cid: 2, port: 4050 });
    }
    let args = strings(
        &qemu_confidential_args(&RuntimeConfig::default(), &pod_vm(), &paths(), &tee).unwrap(),
    );
    assert!(arg_after(&args, "-object")[0].ends_with(
        ",attributes=0x10000000,quote-generation-socket.type=vsock,quote-generation-socket.cid=2,quote-generation-socket.port=4050"
    ), "{args:?}");
}

#[test]
fn old_qemu_is_refused_naming_the_version_needed() {
    let snp = QemuTee::Snp {
        policy: 0x30000,
        host_data: [0; 32],
        ovmf: "/o".into(),
        kernel: "/k/bzImage".into(),
        cpu: None,
    };
    let help_72 = "List of user creatable objects:\n  authz-list\n  sev-guest\n  tls-creds-x509\n";
    let err = qemu_supports_tee(
        Path::new("/usr/bin/qemu-system-x86_64"),
        help_72,
        "QEMU emulator version 7.2.22\n",
        &snp,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no `sev-snp-guest` object"), "{err}");
    assert!(err.contains("QEMU 9.1 or newer"), "{err}");
    assert!(err.contains("found: QEMU emulator version 7.2.22"), "{err}");
    let help_91 = format!("{help_72}  sev-snp-guest\n");
    qemu_supports_tee(Path::new("q"), &help_91, "", &snp).unwrap();
}

/// The QEMU installed here (Debian's 7.2) must be refused clearly.
#[test]
fn installed_qemu_is_probed() {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        eprintln!("SKIP: {} missing (Debian qemu-system-x86)", qemu.display());
        return;
    }
    let tdx = QemuTee::Tdx {
        mr_config_id: [0; 48],
        ovmf: "/o".into(),
        kernel: "/k/bzImage".into(),
        attributes: None,
        quote_service: None,
    };
    match probe_qemu_tee(qemu, &tdx) {
        Ok(()) => eprintln!("this QEMU has tdx-guest"),
        Err(e) => {
            assert!(e.to_string().contains("QEMU 10.1 or newer"), "{e}");
            let mut config = RuntimeConfig::default();
            config.qemu.path = qemu.to_path_buf();
            let refused = Qemu::new_confidential(&config, &pod_vm(), paths(), &tdx);
            assert_eq!(refused.err(), Some(e));
        }
    }
}

#[test]
fn accel_choice() {
    assert!(qemu_uses_kvm(QemuAccel::Kvm));
    assert!(!qemu_uses_kvm(QemuAccel::Tcg));
}

#[test]
fn log_tail_keeps_whole_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    std::fs::write(&log, "first line\nsecond line\nthird\n").unwrap();
    assert_eq!(log_tail(&log, 100), "first line\nsecond line\nthird");
    assert_eq!(log_tail(&log, 12), "third");
    assert_eq!(log_tail(&dir.path().join("none"), 10), "");
}

#[tokio::test]
async fn supervised_child_logs_and_reports_exit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("child.log");
    let child = SupervisedChild::spawn(
        "sh",
        Path::new("/bin/sh"),
        &["-c".into(), "echo out; echo err >&2; exit 7".into()],
        &log,
        &[],
    )
    .unwrap();
    assert_eq!(child.wait().await, ChildExit::Code(7));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("out\n") && text.contains("err\n"), "{text}");
}

#[tokio::test]
async fn a_child_that_cannot_join_its_cgroup_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // A "cgroup" whose cgroup.procs cannot be opened for writing.
    let cgroup = dir.path().join("pod");
    std::fs::create_dir_all(cgroup.join("cgroup.procs")).unwrap();
    let missing = dir.path().join("gone");

    let refused = SupervisedChild::spawn_in_cgroups(
        "true",
        Path::new("/bin/true"),
        &[],
        &dir.path().join("log"),
        &[],
        std::slice::from_ref(&cgroup),
    );
    let absent = SupervisedChild::spawn_in_cgroups(
        "true",
        Path::new("/bin/true"),
        &[],
        &dir.path().join("log"),
        &[],
        std::slice::from_ref(&missing),
    );

    let Err(err) = refused else {
        panic!("the join should fail")
    };
    let err = err.to_string();
    assert!(
        err.starts_with(&format!("spawn /bin/true in cgroups {}:", cgroup.display())),
        "{err}"
    );
    let Err(err) = absent else {
        panic!("there is no such cgroup")
    };
    let err = err.to_string();
    assert!(
        err.contains(&missing.join("cgroup.procs").display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn stop_kills_a_child_that_ignores_sigterm_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    let child = SupervisedChild::spawn(
        "stubborn",
        Path::new("/bin/sh"),
        &[
            "-c".into(),
            "trap '' TERM; echo ready; while :; do sleep 0.05; done".into(),
        ],
        &dir.path().join("log"),
        &[],
    )
    .unwrap();
    // SIGTERM before the trap is set would end it at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.path().join("log")).is_ok_and(|l| l.contains("ready")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the shell never set its trap"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let exit = child.stop(Duration::from_millis(300)).await;
    assert_eq!(exit, ChildExit::Signal(libc::SIGKILL));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let polite = SupervisedChild::spawn(
        "polite",
        Path::new("/bin/sleep"),
        &["100".into()],
        &dir.path().join("log2"),
        &[],
    )
    .unwrap();
    assert_eq!(
        polite.stop(Duration::from_secs(5)).await,
        ChildExit::Signal(libc::SIGTERM)
    );
}

#[tokio::test]
async fn vmm_that_exits_at_start_is_reported_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RuntimeConfig::default();
    // A "VMM" that refuses its config at once.
    let vmm_script = dir.path().join("vmm.sh");
    std::fs::write(
        &vmm_script,
        "#!/bin/sh\necho 'config: unknown field vsock' >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &vmm_script,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    config.vmm.path = vmm_script;
    config.vmm.jail = false;
    let mut vmm = CloisterVmm::new(
        &config,
        &pod_vm(),
        VmPaths {
            dir: dir.path().to_path_buf(),
        },
        None,
    );
    let err = vmm.start().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("exited during startup") && text.contains("vmm.log"),
        "{text}"
    );
    assert!(text.contains("unknown field vsock"), "{text}");
    assert!(dir.path().join("vm.json").exists());
    assert_eq!(vmm.wait_exit().await, ChildExit::Code(2));
}
