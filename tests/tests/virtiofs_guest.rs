//! virtio-fs in a real guest: our kernel under QEMU/TCG mounts shares served
//! by `cloister-vmm vhost-user --device fs` (the same device code
//! `cloister-vmm` runs in process), and the agent runs a container whose
//! root file system *is* a host directory seen through the share — what the
//! shim does with the rootfs containerd's snapshotter mounted.
//!
//! One boot checks: the container reads what the host put there; what it
//! writes, renames, fsyncs and removes is exactly what the host then sees;
//! a file the host changes while the guest runs is seen; symlinks and `..`
//! aimed outside the share never reach the host file there; a share served
//! read-only refuses writes even when the guest mounts it read-write.
//!
//! Skips, with the reason printed, when QEMU, the built kernel, the agent
//! initramfs, busybox-static or the `cloister-vmm` binary is missing.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use cloister_e2e::agent_guest::{
    busybox_spec, connect_agent, create_request, ctx, run_to_exit, shutdown, AgentGuest,
    AgentGuestFixture,
};
use cloister_e2e::containerd::busybox_rootfs;
use cloister_e2e::qemu::VhostUserKind;
use cloister_protocol::agent;

/// Debian's busybox-static.
const BUSYBOX: &str = "/bin/busybox";
const POD_TAG: &str = "pod";
const READ_ONLY_TAG: &str = "ro";
/// Where the agent mounts the shares in the guest.
const POD_MOUNT: &str = "/run/cloister/shares/pod";
const READ_ONLY_MOUNT: &str = "/run/cloister/shares/ro";
/// Never to appear in anything the guest prints.
const SECRET: &str = "host secret outside the share";

fn fs_backend(vmm: &Path, share: &Path, tag: &str, socket: &Path, read_only: bool) -> Command {
    let mut command = Command::new(vmm);
    command
        .args(["vhost-user", "--device", "fs", "--shared-dir"])
        .arg(share)
        .args(["--tag", tag, "--socket"])
        .arg(socket);
    if read_only {
        command.arg("--read-only");
    }
    command
}

fn virtiofs_mount(tag: &str, target: &str) -> agent::GuestMount {
    let mut mount = agent::GuestMount::new();
    mount.fstype = "virtiofs".into();
    mount.source = tag.into();
    mount.target = target.into();
    mount
}

/// A create request whose root is `rootfs` inside the `pod` share.
fn share_rooted_request(id: &str, spec: &serde_json::Value) -> agent::CreateContainerRequest {
    let mut request = create_request(id, spec, true);
    let mut virtio_fs = agent::VirtioFsRootfs::new();
    virtio_fs.tag = POD_TAG.into();
    virtio_fs.path = "rootfs".into();
    let mut root = agent::Rootfs::new();
    root.set_virtio_fs(virtio_fs);
    request.rootfs = Some(root).into();
    request
}

struct Layout {
    share: PathBuf,
    rootfs: PathBuf,
    read_only_share: PathBuf,
}

async fn drive(uds: &Path, layout: &Layout) {
    let client = connect_agent(uds).await.expect("connect to the agent");
    let mut setup = agent::SetupSandboxRequest::new();
    setup.hostname = "virtiofs".into();
    setup.mounts = vec![
        virtiofs_mount(POD_TAG, POD_MOUNT),
        virtiofs_mount(READ_ONLY_TAG, READ_ONLY_MOUNT),
    ];
    client
        .setup_sandbox(ctx(), &setup)
        .await
        .expect("SetupSandbox mounts both shares");

    // Reads, writes, renames, fsyncs, directory changes — on the share
    // that is the container's root.
    let script = "cat /data/hello.txt; ls /data; \
        echo written in the guest > /data/new.txt && mv /data/new.txt /data/renamed.txt && echo rename-ok; \
        dd if=/dev/zero of=/data/synced bs=4096 count=4 conv=fsync 2>/dev/null && echo fsync-ok; \
        mkdir /data/made && rmdir /data/made && mkdir /data/kept && echo dirs-ok; \
        rm /data/doomed.txt && echo rm-ok";
    let (out, status) = run_to_exit(
        &client,
        uds,
        share_rooted_request("rw", &busybox_spec(&["sh", "-c", script])),
    )
    .await;
    assert_eq!(status, 0, "container output: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"from the host"), "{out}");
    for name in ["doomed.txt", "escape", "escape_rel", "hello.txt"] {
        assert!(lines.contains(&name), "ls misses {name}: {out}");
    }
    for marker in ["rename-ok", "fsync-ok", "dirs-ok", "rm-ok"] {
        assert!(lines.contains(&marker), "no {marker}: {out}");
    }
    let data = layout.rootfs.join("data");
    assert_eq!(
        std::fs::read_to_string(data.join("renamed.txt")).unwrap(),
        "written in the guest\n"
    );
    assert!(!data.join("new.txt").exists(), "rename left the old name");
    assert_eq!(
        std::fs::read(data.join("synced")).unwrap(),
        vec![0u8; 16384]
    );
    assert!(data.join("kept").is_dir() && !data.join("made").exists());
    assert!(!data.join("doomed.txt").exists());

    // The host changes a file while the guest runs; the guest sees it once
    // the attributes it cached expire (cache=auto, the default: 1 s, as
    // virtiofsd's auto mode).
    std::fs::write(data.join("hello.txt"), "changed on the host\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (out, _) = run_to_exit(
        &client,
        uds,
        share_rooted_request("reread", &busybox_spec(&["cat", "/data/hello.txt"])),
    )
    .await;
    assert_eq!(out, "changed on the host\n");

    // Escape attempts: an absolute and a relative symlink the host placed
    // in the share, aimed at a host file beside it, and `..` past the
    // share's root through the guest's own mount of the share.
    let script = format!(
        "cat /data/escape 2>&1; cat /data/escape_rel 2>&1; \
         cat {POD_MOUNT}/../secret.txt 2>&1; cat {POD_MOUNT}/rootfs/../../secret.txt 2>&1; \
         ls {POD_MOUNT}/..; echo escape-done"
    );
    let mut spec = busybox_spec(&["sh", "-c", &script]);
    // The guest's view of the share, to try `..` on it from inside.
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": POD_MOUNT, "type": "bind", "source": POD_MOUNT, "options": ["rbind", "ro"]
        }));
    let (out, _) = run_to_exit(&client, uds, share_rooted_request("escape", &spec)).await;
    println!("escape attempts from the guest:\n{out}");
    assert!(out.contains("escape-done"), "{out}");
    assert!(
        !out.contains(SECRET),
        "the guest read a host file outside the share: {out}"
    );
    assert!(
        !out.lines().any(|l| l == "secret.txt" || l == "share"),
        "the guest listed the share's host parent: {out}"
    );

    // A read-only share refuses writes even though the guest mounted it
    // read-write; reads work.
    let script = format!(
        "cat {READ_ONLY_MOUNT}/readme.txt; echo x > {READ_ONLY_MOUNT}/new.txt 2>&1; \
         rm {READ_ONLY_MOUNT}/readme.txt 2>&1; echo done"
    );
    let mut spec = busybox_spec(&["sh", "-c", &script]);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": READ_ONLY_MOUNT, "type": "bind", "source": READ_ONLY_MOUNT, "options": ["rbind", "rw"]
        }));
    let (out, _) = run_to_exit(&client, uds, share_rooted_request("ro", &spec)).await;
    println!("writes to a read-only share:\n{out}");
    assert!(out.starts_with("read only\n"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(!layout.read_only_share.join("new.txt").exists());
    assert!(layout.read_only_share.join("readme.txt").exists());
    assert!(layout.share.join("rootfs").is_dir());

    shutdown(&client).await;
}

#[test]
fn container_rooted_on_a_virtio_fs_share_reads_writes_and_cannot_escape() {
    share_test(false);
}

/// The same with each fs server jailed (`--jail-*`: own namespaces and
/// root, the jail uid with only the six capabilities virtio-fs needs,
/// seccomp), as the shim runs them.
#[test]
fn jailed_fs_server_serves_the_same_share_and_cannot_escape() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: a jailed cloister-vmm vhost-user server needs root");
        return;
    }
    share_test(true);
}

/// The uid/gid of the jailed servers (as the shim's default).
const JAIL_ID: &str = "64000";

fn share_test(jailed: bool) {
    if !Path::new(BUSYBOX).exists() {
        eprintln!("SKIP: {BUSYBOX} missing (Debian package busybox-static)");
        return;
    }
    let mut guest = match AgentGuestFixture::locate().and_then(AgentGuest::new) {
        Ok(guest) => guest,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let base = guest.dir().join("host");
    let share = base.join("share");
    let rootfs = share.join("rootfs");
    busybox_rootfs(Path::new(BUSYBOX), &rootfs).unwrap();
    let data = rootfs.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "from the host\n").unwrap();
    std::fs::write(data.join("doomed.txt"), "to be removed\n").unwrap();
    let secret = base.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    symlink(&secret, data.join("escape")).unwrap();
    symlink("../../../secret.txt", data.join("escape_rel")).unwrap();
    let read_only_share = base.join("read-only");
    std::fs::create_dir_all(&read_only_share).unwrap();
    std::fs::write(read_only_share.join("readme.txt"), "read only\n").unwrap();

    let vmm = guest.fixture().vmm.clone();
    for (tag, dir, read_only) in [
        (POD_TAG, &share, false),
        (READ_ONLY_TAG, &read_only_share, true),
    ] {
        let socket = guest.socket_path(tag);
        let mut command = fs_backend(&vmm, dir, tag, &socket, read_only);
        if jailed {
            command
                .arg("--jail-root")
                .arg(guest.dir().join(format!("jail-{tag}")))
                .args(["--jail-uid", JAIL_ID, "--jail-gid", JAIL_ID]);
        }
        guest
            .add_vhost_user(VhostUserKind::Fs { tag: tag.into() }, tag, command)
            .unwrap_or_else(|e| panic!("fs back end {tag}: {e}"));
    }
    let layout = Layout {
        share,
        rootfs,
        read_only_share,
    };
    guest.run(|uds| async move { drive(&uds, &layout).await });
}
