//! The shim's `cloister` backend launches `cloister-vmm` jailed (the
//! default `[vmm] jail = true`): vm.json carries the jail, the VMM comes
//! up in the pod's cgroup as the pod's own jail uid under seccomp and serves its
//! vsock socket in the sandbox's sockets folder, and once it is stopped
//! nothing of the jail outlives the sandbox (cgroups the shim created,
//! the shared folder's mount, the jail folder). The guest only has to get
//! as far as the VMM building its devices. Needs root, `/dev/kvm` and the
//! built guest image; skips with the reason otherwise.

mod guest_support;

use std::path::Path;
use std::time::Duration;

use cloister_shim::config::HypervisorKind;
use cloister_shim::sandbox::SandboxDir;
use cloister_shim::vmm_client::hypervisor_for;
use cloister_shim::vmm_jail::{cgroup_dirs, CGROUP_ROOT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_cloister_vmm_runs_in_the_pod_cgroup_and_leaves_nothing_behind() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: a jailed cloister-vmm needs root");
        return;
    }
    if let Err(e) = cloister_vmm::vstate::kvm::KvmContext::open() {
        eprintln!("SKIP: needs a usable /dev/kvm: {e}");
        return;
    }
    let mut config = match guest_support::guest_config() {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    config.hypervisor = HypervisorKind::Cloister;
    let state = tempfile::tempdir().unwrap();
    let dir = SandboxDir::new(state.path(), "default", "jailed-vmm");
    dir.create().unwrap();
    let mut vm = guest_support::guest_vm();
    vm.hypervisor = HypervisorKind::Cloister;
    vm.shared_fs = true;
    let cgroups_path = format!("/cloister-jail-test-{}/sandbox", std::process::id());
    vm.cgroups_path = Some(cgroups_path.clone());
    let cgroups = cgroup_dirs(Path::new(CGROUP_ROOT), &cgroups_path).unwrap();
    let mut hypervisor = hypervisor_for(&config, &vm, dir.vm_paths(), None).unwrap();

    let started = hypervisor.start().await;

    let paths = dir.vm_paths();
    let log = std::fs::read_to_string(paths.vmm_log()).unwrap_or_default();
    let pid = hypervisor.pids()[0];
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
    let child = children.ok().and_then(|c| c.trim().parse::<u32>().ok());
    // Every thread has its seccomp filter once the main thread, the last,
    // installed its own.
    let task_statuses = |child: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{child}/task"))
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut vmm_status = String::new();
    if let Some(child) = child {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let statuses = task_statuses(child);
            let all_filtered =
                !statuses.is_empty() && statuses.iter().all(|s| s.contains("Seccomp:\t2"));
            if all_filtered || std::time::Instant::now() > deadline {
                vmm_status = statuses.join("\n");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let own_cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (uid, gid) = hypervisor.jail_ids().expect("a jailed VM has its ids");
    hypervisor.stop(Duration::from_secs(5)).await;
    started.unwrap_or_else(|e| panic!("jailed cloister-vmm did not start: {e}\n{log}"));

    let vm_json = std::fs::read_to_string(paths.vm_config()).unwrap();
    assert!(vm_json.contains("\"jail\""), "{vm_json}");
    assert!(log.contains("jailed in"), "{log}");
    // The pod's own ids, leased from the default range.
    let first = cloister_shim::config::DEFAULT_JAIL_ID;
    let count = cloister_shim::config::DEFAULT_JAIL_ID_COUNT;
    assert!((first..first + count).contains(&uid), "{uid}");
    assert_eq!(gid, uid);
    assert!(
        // Real and saved uid the jail's; effective 0 because the VM
        // serves virtio-fs (see cloister-vmm's `jail::privileges`).
        vmm_status.contains(&format!("Uid:\t{uid}\t0\t{uid}\t0")),
        "{vmm_status}"
    );
    assert!(
        vmm_status.contains("CapEff:\t00000000000000db"),
        "{vmm_status}"
    );
    assert!(
        !vmm_status.contains("Seccomp:\t0"),
        "a thread without seccomp: {vmm_status}"
    );
    assert!(
        own_cgroups.contains(&cgroups_path),
        "not in {cgroups_path}: {own_cgroups}"
    );
    for cgroup in &cgroups {
        assert!(!cgroup.exists(), "{} outlived the VM", cgroup.display());
        assert!(
            !cgroup.parent().unwrap().exists(),
            "{} outlived the VM",
            cgroup.display()
        );
    }
    assert!(
        std::fs::read_dir(paths.jail_root())
            .unwrap()
            .next()
            .is_none(),
        "jail folder not empty"
    );
    dir.remove().unwrap();
    assert!(!dir.path.exists());
    assert!(cloister_shim::sandbox::mounts_below(state.path()).is_empty());
}

/// The `qemu` backend under `[vmm] jail`: QEMU itself runs as the pod's
/// own uid/gid with no capabilities under its seccomp sandbox, in the
/// pod's cgroup from its first instruction; its vhost-user servers are
/// jailed as that same uid. The guest need not boot far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_qemu_runs_as_the_pods_uid_in_its_cgroup_under_seccomp() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: confining QEMU needs root");
        return;
    }
    let config = match guest_support::guest_config() {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let state = tempfile::tempdir().unwrap();
    let dir = SandboxDir::new(state.path(), "default", "jailed-qemu");
    dir.create().unwrap();
    let mut vm = guest_support::guest_vm();
    let cgroups_path = format!("/cloister-qemu-jail-test-{}/sandbox", std::process::id());
    vm.cgroups_path = Some(cgroups_path.clone());
    let cgroups = cgroup_dirs(Path::new(CGROUP_ROOT), &cgroups_path).unwrap();
    let mut hypervisor = hypervisor_for(&config, &vm, dir.vm_paths(), None).unwrap();

    let started = hypervisor.start().await;
    if let Err(e) = &started {
        let log = std::fs::read_to_string(dir.vm_paths().qemu_log()).unwrap_or_default();
        hypervisor.stop(Duration::from_secs(5)).await;
        panic!("jailed QEMU did not start: {e}\n{log}");
    }
    let (uid, gid) = hypervisor.jail_ids().expect("a jailed VM has its ids");
    let pids = hypervisor.pids();
    // QEMU drops to the uid once its devices are set up.
    let qemu = pids[0];
    let expected_uid = format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut status = String::new();
    while std::time::Instant::now() < deadline {
        status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
        if status.contains(&expected_uid) || status.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let qemu_cgroups = std::fs::read_to_string(format!("/proc/{qemu}/cgroup")).unwrap_or_default();
    // The vsock server: a supervisor that forks the jailed server.
    let backend = pids[1];
    let backend_status =
        std::fs::read_to_string(format!("/proc/{backend}/task/{backend}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().map(str::to_owned))
            .and_then(|child| std::fs::read_to_string(format!("/proc/{child}/status")).ok())
            .unwrap_or_default();
    let log = std::fs::read_to_string(dir.vm_paths().qemu_log()).unwrap_or_default();
    // Having changed its uid, QEMU no longer dies with its parent: what
    // `shim delete` does after a shim died ends it and the servers.
    let record = dir.vm_paths().vm_processes();
    let killed =
        tokio::task::spawn_blocking(move || cloister_shim::vm_processes::kill_recorded(&record))
            .await
            .unwrap();
    let exits = tokio::time::timeout(Duration::from_secs(10), hypervisor.wait_exit()).await;
    hypervisor.stop(Duration::from_secs(5)).await;
    assert_eq!(killed, pids.len(), "QEMU and its servers are recorded");
    assert!(exits.is_ok(), "the recorded processes did not end");

    assert!(status.contains(&expected_uid), "{status}\nlog:\n{log}");
    assert!(
        status.contains(&format!("Gid:\t{gid}\t{gid}\t{gid}\t{gid}")),
        "{status}"
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(
        qemu_cgroups.contains(&cgroups_path),
        "QEMU not in {cgroups_path}: {qemu_cgroups}"
    );
    assert!(
        backend_status.contains(&format!("Uid:\t{uid}\t")),
        "the vsock server does not run as the pod's uid: {backend_status}"
    );
    for cgroup in &cgroups {
        assert!(!cgroup.exists(), "{} outlived the VM", cgroup.display());
    }
    dir.remove().unwrap();
}
