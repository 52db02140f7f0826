//! The jailed `cloister-vmm`: tiny payloads packed as ELF kernels boot in
//! the jail and serve their devices; the jailed process cannot open a
//! host file outside its root, cannot exec, and dies with SIGSYS (seen
//! here, on the pid this test started) when it makes a call outside its
//! seccomp allowlist or maps executable memory; the jail folder is empty
//! on the host afterwards.
//!
//! Needs root (namespaces, mounts, uid change) and `/dev/kvm`; the
//! selftest cases need the `jail-selftest` feature
//! (`cargo test -p cloister-vmm --features jail-selftest --test jail`).
//! Each skips with the reason otherwise.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cloister_vmm::vstate::kvm::KvmContext;

const JAIL_UID: u32 = 64000;
const JAIL_GID: u32 = 64000;

#[path = "support/payload_elf.rs"]
mod payload_elf;
use payload_elf::{elf_kernel, HALT_FOREVER, HELLO_THEN_RESET};

fn can_jail() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: the jail tests need root (namespaces, mounts, uid change)");
        return false;
    }
    if let Err(e) = KvmContext::open() {
        eprintln!("SKIP: the jail tests need a usable /dev/kvm: {e}");
        return false;
    }
    true
}

/// A folder with a payload kernel, a sockets folder the jail uid owns and
/// an empty jail root.
struct JailFixture {
    dir: tempfile::TempDir,
}

impl JailFixture {
    fn new(code: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kernel.elf"), elf_kernel(code)).unwrap();
        let sockets = dir.path().join("sockets");
        std::fs::create_dir(&sockets).unwrap();
        nix::unistd::chown(
            &sockets,
            Some(nix::unistd::Uid::from_raw(JAIL_UID)),
            Some(nix::unistd::Gid::from_raw(JAIL_GID)),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cloister-vmm"));
        command
            .arg("--kernel")
            .arg(self.path("kernel.elf"))
            .args(["--memory", "32"])
            .arg("--jail-root")
            .arg(self.path("jail"))
            .args(["--jail-uid", &JAIL_UID.to_string()])
            .args(["--jail-gid", &JAIL_GID.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// The jail folder holds nothing on the host (its tmpfs lived only in
    /// the VMM's mount namespace).
    fn assert_jail_left_empty(&self) {
        let entries: Vec<_> = std::fs::read_dir(self.path("jail"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(entries.is_empty(), "jail folder not empty: {entries:?}");
    }
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn jailed_vmm_boots_a_payload_and_leaves_an_empty_jail_folder() {
    if !can_jail() {
        return;
    }
    let fixture = JailFixture::new(HELLO_THEN_RESET);

    let output = fixture.command().args(["--rng"]).output().unwrap();

    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{:?}\n{stderr}", output.status);
    assert_eq!(stdout, "hello from long mode\n", "{stderr}");
    assert!(stderr.contains("jailed in"), "{stderr}");
    assert!(stderr.contains("guest reset"), "{stderr}");
    fixture.assert_jail_left_empty();
}

#[test]
fn jailed_vmm_serves_vsock_on_the_host_and_stops_on_sigterm() {
    if !can_jail() {
        return;
    }
    let fixture = JailFixture::new(HALT_FOREVER);
    let uds = fixture.path("sockets/vsock.sock");
    let mut child = fixture
        .command()
        .arg("--vsock")
        .arg(format!("guest_cid=3,uds_path={}", uds.display()))
        .args(["--rng", "--print-metrics"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !uds.exists() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("vsock socket never appeared on the host");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The host reaches the socket the jailed device made.
    std::os::unix::net::UnixStream::connect(&uds).expect("host connects to the jailed vsock");
    let pid = child.id();
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
    let vmm_pid: u32 = status(pid)
        .unwrap()
        .trim()
        .parse()
        .expect("one jailed child");
    // Every thread of the jailed VMM runs under a seccomp filter once the
    // main thread has installed its own, the last.
    let task_statuses = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{vmm_pid}/task"))
            .unwrap()
            .map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).unwrap())
            .collect()
    };
    let mut statuses = task_statuses();
    while !statuses.iter().all(|s| s.contains("Seccomp:\t2")) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "threads without seccomp: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
        statuses = task_statuses();
    }
    assert!(statuses.len() >= 4, "{statuses:?}");
    let proc_status = statuses.join("\n");
    let mountinfo = std::fs::read_to_string(format!("/proc/{vmm_pid}/mountinfo")).unwrap();
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            Some((*fields.get(4)?, *fields.get(5)?))
        })
        .collect();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();

    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(stderr.contains("\"vsock\""), "no exit metrics: {stderr}");
    assert!(!uds.exists(), "vsock socket left behind");
    // The jail's whole file system: its read-only root, the kernel, the
    // sockets folder, a read-only procfs.
    let mount_points: Vec<&str> = mounts.iter().map(|(point, _)| *point).collect();
    assert_eq!(
        mount_points,
        ["/", "/boot/kernel", "/sock/vsock", "/proc"],
        "{mountinfo}"
    );
    for (point, options) in &mounts {
        let read_only = options.split(',').next() == Some("ro");
        assert_eq!(read_only, *point != "/sock/vsock", "{point} {options}");
    }
    for line in [
        format!("Uid:\t{JAIL_UID}\t{JAIL_UID}\t{JAIL_UID}\t{JAIL_UID}"),
        "CapEff:\t0000000000000000".into(),
        "CapBnd:\t0000000000000000".into(),
        "NoNewPrivs:\t1".into(),
        "Seccomp:\t2".into(),
    ] {
        assert!(proc_status.contains(&line), "{line} not in\n{proc_status}");
    }
    fixture.assert_jail_left_empty();
}

#[test]
fn jail_that_cannot_be_built_is_an_error_naming_the_step() {
    if !can_jail() {
        return;
    }
    let fixture = JailFixture::new(HELLO_THEN_RESET);

    let output = fixture
        .command()
        .args([
            "--jail-cgroup",
            "/sys/fs/cgroup/no-such-cgroup-for-cloister",
        ])
        .output()
        .unwrap();

    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("jail: join cgroup (/sys/fs/cgroup/no-such-cgroup-for-cloister/tasks)"),
        "{stderr}"
    );
}

#[test]
fn jailed_vmm_opens_its_tap_in_the_given_netns_and_runs_in_a_fresh_one() {
    if !can_jail() {
        return;
    }
    let tap = format!("cljail{}", std::process::id() % 100_000);
    let fixture = JailFixture::new(HALT_FOREVER);
    let child = fixture
        .command()
        .args(["--netns", "/proc/self/ns/net"])
        .arg("--net")
        .arg(format!("tap={tap}"))
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    let tap_dir = PathBuf::from("/sys/class/net").join(&tap);
    let vmm_pid = loop {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
        if let Some(vmm) = children.ok().and_then(|c| c.trim().parse::<u32>().ok()) {
            // The tap is opened before the VMM leaves the given namespace:
            // wait for its seccomp filter, the last step of the jail.
            let status = std::fs::read_to_string(format!("/proc/{vmm}/status"));
            let jailed = status.is_ok_and(|s| s.contains("Seccomp:\t2"));
            if tap_dir.exists() && jailed {
                break Some(vmm);
            }
        }
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let namespaces = vmm_pid.map(|vmm| {
        let link = |pid: String| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        (link("self".into()), link(vmm.to_string()))
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();

    let (_, stderr) = text(&output);
    let (host_ns, vmm_ns) = namespaces.unwrap_or_else(|| {
        panic!("tap {tap} never appeared or the VMM never installed its seccomp filter: {stderr}")
    });
    assert_ne!(
        host_ns, vmm_ns,
        "the VMM runs in the host's network namespace"
    );
    assert!(stderr.contains(&format!("net0: tap {tap}")), "{stderr}");
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(!tap_dir.exists(), "tap {tap} outlived the VMM");
}

#[test]
fn jailed_vmm_closes_a_host_folder_fd_its_caller_leaked() {
    if !can_jail() {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fixture = JailFixture::new(HALT_FOREVER);
    // A folder of the host, inherited without close-on-exec as fd 7: the
    // way out of a chroot if it survived the pivot.
    let leaked = std::fs::File::open(fixture.dir.path()).unwrap();
    let leaked_fd = leaked.as_raw_fd();
    let mut command = fixture.command();
    // SAFETY: dup2 between fork and exec touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(leaked_fd, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    let pid = child.id();
    let jailed_fds = wait_for_jailed_vmm(pid).map(|vmm| {
        std::fs::read_dir(format!("/proc/{vmm}/fd"))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .collect::<Vec<PathBuf>>()
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();

    let (_, stderr) = text(&output);
    let fds = jailed_fds.unwrap_or_else(|| panic!("the jailed VMM never ran: {stderr}"));
    assert!(
        !fds.iter().any(|target| target == fixture.dir.path()),
        "the jailed VMM still holds the host folder: {fds:?}"
    );
    assert_eq!(output.status.code(), Some(143), "{stderr}");
}

/// The jailed VMM's pid (the supervisor's child) once all of its threads
/// run under seccomp, or `None` after 20 s.
fn wait_for_jailed_vmm(supervisor: u32) -> Option<u32> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"));
        if let Some(vmm) = children.ok().and_then(|c| c.trim().parse::<u32>().ok()) {
            let status = std::fs::read_to_string(format!("/proc/{vmm}/status"));
            if status.is_ok_and(|s| s.contains("Seccomp:\t2")) {
                return Some(vmm);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn read_only_share_is_read_only_and_nodev_below_its_submounts_too() {
    if !can_jail() {
        return;
    }
    let fixture = JailFixture::new(HALT_FOREVER);
    let share = fixture.path("share");
    let submount = share.join("sub");
    std::fs::create_dir_all(&submount).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &submount,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let child = fixture
        .command()
        .arg("--fs")
        .arg(format!(
            "tag=t,shared_dir={},read_only=true",
            share.display()
        ))
        .spawn()
        .unwrap();
    let pid = child.id();
    let mountinfo = wait_for_jailed_vmm(pid)
        .and_then(|vmm| std::fs::read_to_string(format!("/proc/{vmm}/mountinfo")).ok());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    nix::mount::umount2(&submount, nix::mount::MntFlags::MNT_DETACH).unwrap();

    let (_, stderr) = text(&output);
    let mountinfo = mountinfo.unwrap_or_else(|| panic!("the jailed VMM never ran: {stderr}"));
    let options = |point: &str| -> Vec<String> {
        mountinfo
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&point))
            .map(|f| f[5].split(',').map(str::to_owned).collect())
            .unwrap_or_else(|| panic!("{point} not mounted in\n{mountinfo}"))
    };
    for point in ["/share/0", "/share/0/sub"] {
        let options = options(point);
        for flag in ["ro", "nodev", "nosuid"] {
            assert!(options.iter().any(|o| o == flag), "{point}: {options:?}");
        }
    }
    assert_eq!(output.status.code(), Some(143), "{stderr}");
}

/// cgroup folders for a test: the v2 one, or the v1 `memory` and `pids`
/// hierarchies (and the hybrid `unified` one) that exist here.
fn test_cgroups(name: &str) -> Vec<PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(name)];
    }
    ["memory", "pids", "unified"]
        .iter()
        .map(|h| root.join(h))
        .filter(|h| h.join("cgroup.procs").exists())
        .map(|h| h.join(name))
        .collect()
}

#[test]
fn jailed_vmm_joins_every_given_cgroup() {
    if !can_jail() {
        return;
    }
    let cgroups = test_cgroups(&format!("cloister-jail-test-{}", std::process::id()));
    if cgroups.is_empty() {
        eprintln!("SKIP: no cgroup hierarchy under /sys/fs/cgroup");
        return;
    }
    for cgroup in &cgroups {
        std::fs::create_dir_all(cgroup).unwrap();
    }
    let fixture = JailFixture::new(HALT_FOREVER);
    let mut command = fixture.command();
    for cgroup in &cgroups {
        command.arg("--jail-cgroup").arg(cgroup);
    }
    let child = command.spawn().unwrap();
    let pid = child.id();
    // The supervisor and the jailed VMM are both in each cgroup.
    let started = Instant::now();
    let in_all = || {
        cgroups.iter().all(|c| {
            std::fs::read_to_string(c.join("cgroup.procs"))
                .map(|procs| {
                    procs.lines().count() == 2 && procs.lines().any(|l| l == pid.to_string())
                })
                .unwrap_or(false)
        })
    };
    while !in_all() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let joined = in_all();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    for cgroup in &cgroups {
        std::fs::remove_dir(cgroup).unwrap();
    }
    let (_, stderr) = text(&output);
    assert!(joined, "not in every cgroup of {cgroups:?}: {stderr}");
    assert_eq!(output.status.code(), Some(143), "{stderr}");
}

#[cfg(feature = "jail-selftest")]
mod selftest {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn run_selftest(action: &str) -> (Output, String) {
        let fixture = JailFixture::new(HELLO_THEN_RESET);
        let output = fixture
            .command()
            .env("CLOISTER_VMM_JAIL_SELFTEST", action)
            .output()
            .unwrap();
        let (_, stderr) = text(&output);
        fixture.assert_jail_left_empty();
        (output, stderr)
    }

    #[test]
    fn jailed_vmm_cannot_open_a_host_file_outside_its_root() {
        if !can_jail() {
            return;
        }
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "host secret").unwrap();
        let path = secret.path().display().to_string();

        let (output, stderr) = run_selftest(&format!("open:{path}"));

        assert!(
            stderr.contains(&format!("selftest: open {path}: No such file or directory")),
            "{stderr}"
        );
        // And the VM still ran.
        assert!(output.status.success(), "{stderr}");
        let (_, stderr) = run_selftest("open:/etc/passwd");
        assert!(
            stderr.contains("selftest: open /etc/passwd: No such file or directory"),
            "{stderr}"
        );
    }

    #[test]
    fn jailed_vmm_cannot_execve() {
        if !can_jail() {
            return;
        }

        let (output, stderr) = run_selftest("exec:/bin/true");

        assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{stderr}");
        assert!(!stderr.contains("returned"), "{stderr}");
        assert!(stderr.contains("killed by signal 31"), "{stderr}");
    }

    #[test]
    fn jailed_vmm_dies_with_sigsys_on_a_syscall_outside_its_allowlist() {
        if !can_jail() {
            return;
        }

        let (output, stderr) = run_selftest("forbidden");

        assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{stderr}");
        assert!(!stderr.contains("ptrace returned"), "{stderr}");
    }

    #[test]
    fn jailed_vmm_maps_data_but_dies_with_sigsys_mapping_code() {
        if !can_jail() {
            return;
        }

        let (output, stderr) = run_selftest("map-exec");

        assert!(
            stderr.contains("selftest: mmap read-write page: mapped=true"),
            "{stderr}"
        );
        assert_eq!(output.status.signal(), Some(libc::SIGSYS), "{stderr}");
        assert!(!stderr.contains("executable page"), "{stderr}");
    }
}

#[cfg(not(feature = "jail-selftest"))]
#[test]
fn selftests_need_the_jail_selftest_feature() {
    eprintln!(
        "SKIP: open/exec/forbidden-syscall/map-exec jail tests need `--features jail-selftest`"
    );
}
