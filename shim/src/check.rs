//! `cloister check`: can this host run a pod? One line per check, each
//! failure with the fix to apply. A failure means a pod could not start;
//! a warning means it could, with less (no networking, slower boots).

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::config::{ConfigSource, HypervisorKind, RuntimeConfig, VmmSection};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A pod starts, but something it may need is missing.
    Warn,
    /// A pod cannot start.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        };
        write!(f, "{tag} {:<12} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

/// `_IO(KVMIO, 0x00)` and `_IO(KVMIO, 0x01)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_API_VERSION: i32 = 12;

/// `/dev/kvm` opens, speaks API 12 and creates a VM.
pub fn check_kvm(device: &Path) -> Check {
    const NAME: &str = "kvm";
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::fail(
                NAME,
                format!("{} missing", device.display()),
                "enable virtualization in the firmware and load kvm_intel or kvm_amd (modprobe kvm_intel)",
            )
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot open {}: {e}", device.display()),
                "run the shim as root, or give its user access to /dev/kvm (group kvm)",
            )
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Check::fail(
            NAME,
            format!(
                "{} answers KVM API {version}, expected {KVM_API_VERSION}",
                device.display()
            ),
            "use a host kernel with standard KVM",
        );
    }
    // SAFETY: KVM_CREATE_VM with machine type 0 returns a new fd or -1.
    let vm = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return Check::fail(
            NAME,
            format!("KVM_CREATE_VM failed: {}", std::io::Error::last_os_error()),
            "free KVM resources or check dmesg for KVM errors",
        );
    }
    // SAFETY: `vm` is a fresh fd this function owns.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    let nested = if Path::new("/sys/module/kvm_pvm").exists() {
        " (nested, paravirtualized kvm_pvm: guest kernels run emulated and slow; the qemu backend with TCG may boot faster)"
    } else {
        ""
    };
    Check::ok(
        NAME,
        format!("{} usable, API {version}{nested}", device.display()),
    )
}

/// Effective capabilities of this process, from `/proc/self/status`.
fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_NET_ADMIN: u32 = 12;

/// Mounting rootfs shares needs CAP_SYS_ADMIN; taps and tc need CAP_NET_ADMIN.
pub fn check_capabilities(proc_status: &str) -> Check {
    const NAME: &str = "capabilities";
    let Some(caps) = effective_capabilities(proc_status) else {
        return Check::warn(
            NAME,
            "cannot read CapEff",
            "run on Linux with /proc mounted",
        );
    };
    let missing: Vec<&str> = [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| caps & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        return Check::ok(NAME, "CAP_SYS_ADMIN and CAP_NET_ADMIN (mounts, taps)");
    }
    Check::fail(
        NAME,
        format!("missing {}", missing.join(", ")),
        "run containerd (and so the shim) as root",
    )
}

/// A file the VM needs.
pub fn check_file(name: &'static str, path: &Path, fix: &str) -> Check {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.len() > 0 => Check::ok(
            name,
            format!("{} ({} KiB)", path.display(), meta.len() / 1024),
        ),
        Ok(_) => Check::fail(
            name,
            format!("{} is empty or not a file", path.display()),
            fix,
        ),
        Err(e) => Check::fail(name, format!("{}: {e}", path.display()), fix),
    }
}

/// An executable the hypervisor backend runs.
pub fn check_executable(name: &'static str, path: &Path, fix: &str) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
            Check::ok(name, path.display().to_string())
        }
        Ok(_) => Check::fail(name, format!("{} is not executable", path.display()), fix),
        Err(e) => Check::fail(name, format!("{}: {e}", path.display()), fix),
    }
}

/// containerd's version from `containerd --version`.
pub fn check_containerd(version_output: Option<&str>) -> Check {
    const NAME: &str = "containerd";
    let Some(output) = version_output else {
        return Check::fail(
            NAME,
            "containerd not found on PATH",
            "apt-get install containerd (1.6+), or put containerd 2.x on PATH",
        );
    };
    match crate::compat::parse_containerd_version(output) {
        Some((major, minor)) if major >= 2 => {
            Check::ok(NAME, format!("{major}.{minor} (task API v3)"))
        }
        Some((1, minor)) if minor >= 6 => Check::ok(
            NAME,
            format!("1.{minor} (task API v2 through the shim's compatibility socket)"),
        ),
        Some((major, minor)) => Check::fail(
            NAME,
            format!("{major}.{minor} is too old"),
            "upgrade containerd to 1.6 or newer",
        ),
        None => Check::warn(
            NAME,
            format!("unrecognised version {:?}", output.trim()),
            "check that containerd is 1.6 or newer",
        ),
    }
}

/// cgroup v2 (unified) or v1/hybrid: both work on the host side; the guest
/// always has its own cgroup v2.
pub fn check_cgroups(cgroup_root: &Path) -> Check {
    const NAME: &str = "cgroups";
    if cgroup_root.join("cgroup.controllers").exists() {
        return Check::ok(NAME, "v2 (unified)");
    }
    if cgroup_root.join("unified/cgroup.controllers").exists() {
        return Check::ok(NAME, "v1 with a v2 hierarchy at unified/ (hybrid); containers get cgroup v2 inside the guest");
    }
    if cgroup_root.join("memory").exists() {
        return Check::ok(NAME, "v1; containers get cgroup v2 inside the guest");
    }
    Check::warn(
        NAME,
        format!("no cgroup hierarchy under {}", cgroup_root.display()),
        "mount cgroup2 on /sys/fs/cgroup so VMs can be placed in the pod's cgroup",
    )
}

/// Hybrid vsock needs no host vsock module: its sockets are Unix sockets
/// in the sandbox folder, so the state folder must take one.
pub fn check_hybrid_vsock(state_dir: &Path) -> Check {
    const NAME: &str = "vsock";
    let fix = format!(
        "make {} writable for root on a file system that supports Unix sockets",
        state_dir.display()
    );
    if let Err(e) = std::fs::create_dir_all(state_dir) {
        return Check::fail(NAME, format!("{}: {e}", state_dir.display()), fix);
    }
    let probe: PathBuf = state_dir.join(format!(".check-{}.sock", std::process::id()));
    let result = std::os::unix::net::UnixListener::bind(&probe);
    let _ = std::fs::remove_file(&probe);
    match result {
        Ok(_) => Check::ok(
            NAME,
            format!(
                "hybrid vsock sockets can be created in {}",
                state_dir.display()
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("unix socket in {}: {e}", state_dir.display()),
            fix,
        ),
    }
}

/// Taps for pod networking.
pub fn check_tun(device: &Path) -> Check {
    const NAME: &str = "tap";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(_) => Check::ok(NAME, format!("{} usable", device.display())),
        Err(e) => Check::warn(
            NAME,
            format!(
                "{}: {e} (pods with a network namespace cannot get a tap)",
                device.display()
            ),
            "modprobe tun",
        ),
    }
}

/// The traffic-control pieces pod networking uses (through netlink; the
/// `tc` program is not needed): the ingress qdisc, the u32 classifier and
/// the mirred action.
pub const TC_MODULES: [&str; 3] = ["sch_ingress", "cls_u32", "act_mirred"];

/// `missing`: the [`TC_MODULES`] neither loaded, built in nor installed;
/// `unknown`: those this host gives no way to tell (a kernel without
/// module lists, whose built-in modules may not show in /sys/module).
pub fn check_tc(missing: &[&str], unknown: &[&str]) -> Check {
    const NAME: &str = "tc";
    let options =
        "kernel options CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_U32, CONFIG_NET_ACT_MIRRED";
    if !missing.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "{} neither loaded nor installed as a module: pods with a network cannot start",
                missing.join(", ")
            ),
            format!("modprobe {} ({options})", missing.join(" ")),
        );
    }
    if !unknown.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "cannot tell whether {} are built in (no module list for this kernel)",
                unknown.join(", ")
            ),
            format!("pods with a network fail at setup without them ({options})"),
        );
    }
    Check::ok(NAME, "sch_ingress, cls_u32 and act_mirred available")
}

/// Whether the kernel module `name` is loaded, built in or installed;
/// `None` when the kernel has no module lists to look in.
pub fn module_available(modules_root: &Path, release: &str, name: &str) -> Option<bool> {
    if Path::new("/sys/module").join(name).exists() {
        return Some(true);
    }
    let dir = modules_root.join(release);
    let list = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
    let lists: Vec<String> = ["modules.builtin", "modules.dep"]
        .into_iter()
        .filter_map(list)
        .collect();
    if lists.is_empty() {
        return None;
    }
    Some(
        lists
            .iter()
            .any(|text| text.contains(&format!("/{name}.ko"))),
    )
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Every check, in report order.
pub fn run_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(check_kvm(Path::new("/dev/kvm")));
    checks.push(check_capabilities(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
    ));
    let env = std::env::var(crate::config::CONFIG_ENV).ok();
    let source = ConfigSource::resolve(None, env.as_deref());
    let config = match RuntimeConfig::load(&source) {
        Ok(config) => {
            let detail = if source.path().exists() {
                source.path().display().to_string()
            } else {
                format!("{} absent: built-in defaults", source.path().display())
            };
            checks.push(Check::ok("config", detail));
            config
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                format!("correct {}", source.path().display()),
            ));
            RuntimeConfig::default()
        }
    };
    let install = "build it (kernel-config/build-kernel.sh, build-initramfs.sh) and install it to /usr/share/cloister/, or set [guest] in the config";
    checks.push(check_file("kernel", &config.guest.kernel, install));
    checks.push(check_file("initramfs", &config.guest.initramfs, install));
    checks.push(check_executable(
        "cloister-vmm",
        &config.vmm.path,
        "install cloister-vmm (cargo build -p cloister-vmm) or set vmm.path",
    ));
    checks.push(check_jail_ids(
        &config.vmm,
        &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
        &std::fs::read_to_string("/etc/group").unwrap_or_default(),
        crate::jail_ids::held_leases(Path::new(crate::jail_ids::JAIL_ID_LEASES)),
    ));
    if config.hypervisor == HypervisorKind::Qemu {
        checks.push(check_executable(
            "qemu",
            &config.qemu.path,
            "apt-get install qemu-system-x86, or set qemu.path",
        ));
    }
    let containerd = find_on_path("containerd").and_then(|path| {
        std::process::Command::new(path)
            .arg("--version")
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    checks.push(check_containerd(containerd.as_deref()));
    checks.push(check_cgroups(Path::new("/sys/fs/cgroup")));
    checks.push(check_hybrid_vsock(Path::new(crate::lifecycle::STATE_DIR)));
    checks.push(check_tun(Path::new("/dev/net/tun")));
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mut missing, mut unknown) = (Vec::new(), Vec::new());
    for module in TC_MODULES {
        match module_available(Path::new("/lib/modules"), &release, module) {
            Some(true) => {}
            Some(false) => missing.push(module),
            None => unknown.push(module),
        }
    }
    checks.push(check_tc(&missing, &unknown));
    checks.extend(tee_checks(&config.qemu.path));
    checks
}

/// Ranges systemd hands out ids from on its own, checking only NSS and
/// its own locks: a jailed VMM's uid there may become a service's.
const SYSTEMD_ID_RANGES: [(&str, u32, u32); 2] = [
    ("systemd's DynamicUser range", 61184, 65519),
    ("systemd's container range", 524_288, 1_879_048_191),
];

/// The jailed VMMs' uid/gid range (`[vmm] jail_uid`, `jail_gid`,
/// `jail_id_count`): how many pods hold one now, and whether anything
/// else may use those ids — an account in `passwd`/`group` text, or a
/// systemd range.
pub fn check_jail_ids(vmm: &VmmSection, passwd: &str, group: &str, held: usize) -> Check {
    const NAME: &str = "jail ids";
    if !vmm.jail {
        return Check::warn(
            NAME,
            "[vmm] jail = false: VMMs run unjailed, as root",
            "set [vmm] jail = true (the default)",
        );
    }
    let count = vmm.jail_id_count.max(1);
    let last = |first: u32| first.saturating_add(count - 1);
    let (uids, gids) = (
        (vmm.jail_uid, last(vmm.jail_uid)),
        (vmm.jail_gid, last(vmm.jail_gid)),
    );
    let overlaps = |(a, b): (u32, u32), (c, d): (u32, u32)| a <= d && c <= b;
    let mut clashes = Vec::new();
    for (what, range) in [("uids", uids), ("gids", gids)] {
        for (name, first, end) in SYSTEMD_ID_RANGES {
            if overlaps(range, (first, end)) {
                clashes.push(format!(
                    "{what} {}-{} overlap {name} {first}-{end}",
                    range.0, range.1
                ));
            }
        }
    }
    // name:password:ID:... in both files.
    let accounts = |text: &str, (first, end): (u32, u32)| -> Vec<String> {
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id: u32 = fields.nth(1)?.parse().ok()?;
                (first..=end)
                    .contains(&id)
                    .then(|| format!("{name} ({id})"))
            })
            .collect()
    };
    let users = accounts(passwd, uids);
    if !users.is_empty() {
        clashes.push(format!("passwd has {}", users.join(", ")));
    }
    let groups = accounts(group, gids);
    if !groups.is_empty() {
        clashes.push(format!("group has {}", groups.join(", ")));
    }
    let detail = format!(
        "uids {}-{}, gids {}-{}: {held} of {count} leased",
        uids.0, uids.1, gids.0, gids.1
    );
    if held >= count as usize {
        return Check::fail(
            NAME,
            format!("{detail}: no jailed pod can start"),
            "raise [vmm] jail_id_count",
        );
    }
    if clashes.is_empty() {
        Check::ok(NAME, detail)
    } else {
        Check::warn(
            NAME,
            format!("{detail}; {}", clashes.join("; ")),
            "move [vmm] jail_uid/jail_gid to a range no account or service uses",
        )
    }
}

/// Which confidential pods `cloister check` reports on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeeCheckKind {
    Snp,
    Tdx,
}

/// What the TEE checks read: a root for procfs/sysfs/dev/OVMF (`/` on the
/// host, a fixture tree in tests), `KVM_CAP_VM_TYPES`, and QEMU's
/// `-object help` and `--version` when QEMU is installed.
#[derive(Debug, Clone)]
pub struct TeeFacts {
    pub root: PathBuf,
    pub vm_types: Result<u32, String>,
    pub qemu: Option<(PathBuf, String, String)>,
}

struct TeeRequirements {
    cpu_flag: &'static str,
    cpu_fix: &'static str,
    module: &'static str,
    param: &'static str,
    vm_type_bit: u32,
    vm_type: &'static str,
    qemu_object: &'static str,
    qemu_version: &'static str,
    ovmf: &'static str,
    ovmf_fix: &'static str,
    names: [&'static str; 6],
}

const SNP: TeeRequirements = TeeRequirements {
    cpu_flag: "sev_snp",
    cpu_fix: "an AMD EPYC 7003 (Milan) or newer with SEV-SNP enabled in the firmware (SMEE, SNP memory coverage, RMP table)",
    module: "kvm_amd",
    param: "sev_snp",
    vm_type_bit: 4,
    vm_type: "KVM_X86_SNP_VM",
    qemu_object: "sev-snp-guest",
    qemu_version: "9.1",
    ovmf: "/usr/share/ovmf/OVMF.amdsev.fd",
    ovmf_fix: "install an OVMF built from AmdSevX64.dsc (OVMF.amdsev.fd) or point the qemu backend at one",
    names: ["snp-cpu", "snp-kvm", "snp-psp", "snp-vm-type", "snp-qemu", "snp-ovmf"],
};

const TDX: TeeRequirements = TeeRequirements {
    cpu_flag: "tdx_host_platform",
    cpu_fix: "a 4th/5th-gen Xeon (Sapphire/Emerald Rapids) or newer with TDX enabled in the firmware and a host kernel with TDX host support (6.16+)",
    module: "kvm_intel",
    param: "tdx",
    vm_type_bit: 5,
    vm_type: "KVM_X86_TDX_VM",
    qemu_object: "tdx-guest",
    qemu_version: "10.1",
    ovmf: "/usr/share/ovmf/OVMF.inteltdx.fd",
    ovmf_fix: "install TDVF (an OVMF built from IntelTdxX64.dsc, OVMF.inteltdx.fd)",
    names: ["tdx-cpu", "tdx-kvm", "tdx-psp", "tdx-vm-type", "tdx-qemu", "tdx-ovmf"],
};

/// One line per fact a confidential pod of `kind` needs. Missing facts
/// are warnings: ordinary pods still start.
pub fn check_tee(kind: TeeCheckKind, facts: &TeeFacts) -> Vec<Check> {
    let req = match kind {
        TeeCheckKind::Snp => &SNP,
        TeeCheckKind::Tdx => &TDX,
    };
    let path = |p: &str| facts.root.join(p.trim_start_matches('/'));
    let mut checks = Vec::new();

    let cpuinfo = std::fs::read_to_string(path("/proc/cpuinfo")).unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == req.cpu_flag));
    checks.push(if has_flag {
        Check::ok(req.names[0], format!("CPU flag {}", req.cpu_flag))
    } else {
        Check::warn(
            req.names[0],
            format!("/proc/cpuinfo has no {} flag", req.cpu_flag),
            req.cpu_fix,
        )
    });

    let param = format!("/sys/module/{}/parameters/{}", req.module, req.param);
    checks.push(match std::fs::read_to_string(path(&param)) {
        Ok(v) if matches!(v.trim(), "Y" | "y" | "1") => {
            Check::ok(req.names[1], format!("{param} = Y"))
        }
        Ok(v) => Check::warn(
            req.names[1],
            format!("{param} = {}", v.trim()),
            format!(
                "load {} with {}=1 (modprobe {} {}=1)",
                req.module, req.param, req.module, req.param
            ),
        ),
        Err(_) if !path(&format!("/sys/module/{}", req.module)).exists() => Check::warn(
            req.names[1],
            format!("{} is not loaded", req.module),
            format!("modprobe {}", req.module),
        ),
        Err(_) => Check::warn(
            req.names[1],
            format!(
                "{param} missing: this kernel's {} cannot run {} guests",
                req.module, req.vm_type
            ),
            "use a host kernel with the support (SNP: 6.11+, TDX: 6.16+)",
        ),
    });

    if kind == TeeCheckKind::Snp {
        checks.push(if path("/dev/sev").exists() {
            Check::ok(req.names[2], "/dev/sev present")
        } else {
            Check::warn(
                req.names[2],
                "/dev/sev missing",
                "load the ccp module (the AMD PSP driver)",
            )
        });
    }

    checks.push(match &facts.vm_types {
        Ok(bits) if bits & (1 << req.vm_type_bit) != 0 => Check::ok(
            req.names[3],
            format!("KVM_CAP_VM_TYPES {bits:#x} has {}", req.vm_type),
        ),
        Ok(bits) => Check::warn(
            req.names[3],
            format!("KVM_CAP_VM_TYPES {bits:#x} lacks {}", req.vm_type),
            "KVM offers the type once the CPU, firmware and module parameter above are in place",
        ),
        Err(why) => Check::warn(
            req.names[3],
            format!("KVM_CAP_VM_TYPES unknown: {why}"),
            "see the kvm line",
        ),
    });

    // The qemu backend's path: QEMU's object and OVMF.
    match &facts.qemu {
        Some((qemu, help, version)) => {
            let found = version
                .lines()
                .next()
                .unwrap_or("unknown version")
                .trim()
                .to_owned();
            checks.push(if help.lines().any(|l| l.trim() == req.qemu_object) {
                Check::ok(
                    req.names[4],
                    format!("{} has {} ({found})", qemu.display(), req.qemu_object),
                )
            } else {
                Check::warn(
                    req.names[4],
                    format!("{} lacks {} ({found})", qemu.display(), req.qemu_object),
                    format!(
                        "QEMU {} or newer for the qemu backend; cloister-vmm does not need it",
                        req.qemu_version
                    ),
                )
            });
        }
        None => checks.push(Check::warn(
            req.names[4],
            "no QEMU found",
            format!(
                "QEMU {} or newer for the qemu backend; cloister-vmm does not need it",
                req.qemu_version
            ),
        )),
    }
    checks.push(if path(req.ovmf).is_file() {
        Check::ok(req.names[5], req.ovmf)
    } else {
        Check::warn(
            req.names[5],
            format!("{} missing (qemu backend only)", req.ovmf),
            req.ovmf_fix,
        )
    });
    checks
}

/// `_IO(KVMIO, 0x03)`; `KVM_CAP_VM_TYPES` = 235.
const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
const KVM_CAP_VM_TYPES: libc::c_ulong = 235;

/// The VM types `/dev/kvm` offers, as `KVM_CAP_VM_TYPES` bits.
pub fn kvm_vm_types(device: &Path) -> Result<u32, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    // SAFETY: KVM_CHECK_EXTENSION takes an integer and returns one.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES) };
    if ret < 0 {
        return Err(format!(
            "KVM_CHECK_EXTENSION: {}",
            std::io::Error::last_os_error()
        ));
    }
    // 0: a kernel older than the capability, which has only the default type.
    Ok(if ret == 0 { 1 } else { ret as u32 })
}

/// The TEE lines of the report for this host.
pub fn tee_checks(qemu: &Path) -> Vec<Check> {
    let probe = |arg: &[&str]| {
        std::process::Command::new(qemu)
            .args(arg)
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let qemu_facts = match (probe(&["-object", "help"]), probe(&["--version"])) {
        (Some(help), Some(version)) => Some((qemu.to_path_buf(), help, version)),
        _ => None,
    };
    let facts = TeeFacts {
        root: PathBuf::from("/"),
        vm_types: kvm_vm_types(Path::new("/dev/kvm")),
        qemu: qemu_facts,
    };
    let mut checks = check_tee(TeeCheckKind::Snp, &facts);
    checks.extend(check_tee(TeeCheckKind::Tdx, &facts));
    checks
}

/// Whether a pod can start, given the checks.
pub fn pod_can_start(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.outcome != Outcome::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_ids_report_leases_and_what_else_may_use_the_range() {
        let vmm = VmmSection::default();
        let passwd = "root:x:0:0::/root:/bin/sh\nsystemd-x:x:61200:61200::/:/usr/sbin/nologin\n";

        let fine = check_jail_ids(&vmm, passwd, "root:x:0:\n", 3);
        assert_eq!(fine.outcome, Outcome::Ok, "{fine}");
        assert_eq!(
            fine.detail,
            "uids 2000000000-2000001023, gids 2000000000-2000001023: 3 of 1024 leased"
        );

        let old_default = VmmSection {
            jail_uid: 64000,
            jail_gid: 64000,
            jail_id_count: 1024,
            ..VmmSection::default()
        };
        let clash = check_jail_ids(
            &old_default,
            "svc:x:64001:64001::/:/bin/false\n",
            "grp:x:64500:\n",
            0,
        );
        assert_eq!(clash.outcome, Outcome::Warn, "{clash}");
        for part in [
            "uids 64000-65023 overlap systemd's DynamicUser range 61184-65519",
            "passwd has svc (64001)",
            "group has grp (64500)",
        ] {
            assert!(clash.detail.contains(part), "{part}: {clash}");
        }

        let full = check_jail_ids(&vmm, "", "", 1024);
        assert_eq!(full.outcome, Outcome::Fail, "{full}");
        assert!(full.detail.ends_with("no jailed pod can start"), "{full}");

        let off = check_jail_ids(
            &VmmSection {
                jail: false,
                ..VmmSection::default()
            },
            "",
            "",
            0,
        );
        assert_eq!(off.outcome, Outcome::Warn, "{off}");
    }

    #[test]
    fn missing_kvm_device_fails_with_fix() {
        let check = check_kvm(Path::new("/nonexistent/kvm"));
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(check.fix.as_deref().unwrap().contains("modprobe"));
        let line = check.to_string();
        assert!(
            line.starts_with("FAIL kvm") && line.contains("— fix:"),
            "{line}"
        );
    }

    #[test]
    fn a_non_kvm_device_is_refused() {
        let check = check_kvm(Path::new("/dev/null"));
        assert_eq!(check.outcome, Outcome::Fail, "{check}");
    }

    #[test]
    fn real_kvm_when_present() {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("SKIP: no /dev/kvm on this host");
            return;
        }
        let check = check_kvm(Path::new("/dev/kvm"));
        assert_eq!(check.outcome, Outcome::Ok, "{check}");
        assert!(check.detail.contains("API 12"));
    }

    #[test]
    fn capabilities_from_proc_status() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(check_capabilities(root).outcome, Outcome::Ok);
        let user = "CapEff:\t0000000000000000\n";
        let check = check_capabilities(user);
        assert_eq!(check.outcome, Outcome::Fail);
        assert!(
            check.detail.contains("CAP_SYS_ADMIN, CAP_NET_ADMIN"),
            "{check}"
        );
    }

    #[test]
    fn files_and_executables() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        assert_eq!(check_file("kernel", &kernel, "x").outcome, Outcome::Fail);
        std::fs::write(&kernel, "").unwrap();
        assert_eq!(check_file("kernel", &kernel, "x").outcome, Outcome::Fail);
        std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
        let ok = check_file("kernel", &kernel, "x");
        assert_eq!(ok.outcome, Outcome::Ok);
        assert!(ok.detail.contains("4 KiB"));
        assert_eq!(check_executable("vmm", &kernel, "x").outcome, Outcome::Fail);
        assert_eq!(
            check_executable("sh", Path::new("/bin/sh"), "x").outcome,
            Outcome::Ok
        );
    }

    #[test]
    fn containerd_versions() {
        assert_eq!(check_containerd(None).outcome, Outcome::Fail);
        let old = check_containerd(Some(
            "containerd github.com/containerd/containerd 1.6.20~ds1 x",
        ));
        assert_eq!(old.outcome, Outcome::Ok);
        assert!(old.detail.contains("task API v2"));
        let new = check_containerd(Some(
            "containerd github.com/containerd/containerd/v2 v2.1.4 abc",
        ));
        assert!(new.detail.contains("v3"));
        assert_eq!(
            check_containerd(Some("containerd v1.5.9 x")).outcome,
            Outcome::Fail
        );
        assert_eq!(check_containerd(Some("garbage")).outcome, Outcome::Warn);
    }

    #[test]
    fn cgroup_modes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_cgroups(dir.path()).outcome, Outcome::Warn);
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        assert!(check_cgroups(dir.path()).detail.starts_with("v1"));
        std::fs::create_dir(dir.path().join("unified")).unwrap();
        std::fs::write(dir.path().join("unified/cgroup.controllers"), "").unwrap();
        assert!(check_cgroups(dir.path()).detail.contains("hybrid"));
        std::fs::write(dir.path().join("cgroup.controllers"), "").unwrap();
        assert_eq!(check_cgroups(dir.path()).detail, "v2 (unified)");
    }

    #[test]
    fn vsock_socket_probe_and_tun_and_tc() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_hybrid_vsock(dir.path()).outcome, Outcome::Ok);
        assert_eq!(
            dir.path().read_dir().unwrap().count(),
            0,
            "probe socket left behind"
        );
        assert_eq!(
            check_hybrid_vsock(Path::new("/proc/self/cannot")).outcome,
            Outcome::Fail
        );
        assert_eq!(
            check_tun(Path::new("/nonexistent/tun")).outcome,
            Outcome::Warn
        );
        assert_eq!(check_tc(&[], &[]).outcome, Outcome::Ok);
        let missing = check_tc(&["cls_u32", "act_mirred"], &[]);
        assert_eq!(missing.outcome, Outcome::Warn);
        assert!(missing.fix.unwrap().contains("modprobe cls_u32 act_mirred"));
        let unknown = check_tc(&[], &["cls_u32"]);
        assert_eq!(unknown.outcome, Outcome::Warn);
        assert!(unknown.detail.contains("cannot tell whether cls_u32"));
    }

    #[test]
    fn modules_found_in_module_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("6.1.0")).unwrap();
        std::fs::write(
            dir.path().join("6.1.0/modules.dep"),
            "kernel/net/sched/act_mirred.ko: \n",
        )
        .unwrap();
        assert_eq!(
            module_available(dir.path(), "6.1.0", "act_mirred"),
            Some(true)
        );
        assert_eq!(
            module_available(dir.path(), "6.1.0", "cls_u32"),
            Some(false)
        );
        assert_eq!(module_available(dir.path(), "6.9.9", "cls_u32"), None);
    }

    fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        dir
    }

    fn warnings(checks: &[Check]) -> Vec<String> {
        checks
            .iter()
            .filter(|c| c.outcome != Outcome::Ok)
            .map(|c| c.to_string())
            .collect()
    }

    #[test]
    fn snp_host_passes_every_line() {
        let root = fixture(&[
            (
                "/proc/cpuinfo",
                "processor : 0\nflags : fpu sme sev sev_es sev_snp\n",
            ),
            ("/sys/module/kvm_amd/parameters/sev_snp", "Y\n"),
            ("/dev/sev", ""),
            ("/usr/share/ovmf/OVMF.amdsev.fd", "x"),
        ]);
        let facts = TeeFacts {
            root: root.path().to_path_buf(),
            vm_types: Ok(0x1F),
            qemu: Some((
                "/q".into(),
                "  sev-guest\n  sev-snp-guest\n".into(),
                "QEMU emulator version 9.2.0\n".into(),
            )),
        };
        let checks = check_tee(TeeCheckKind::Snp, &facts);
        assert_eq!(checks.len(), 6);
        assert!(warnings(&checks).is_empty(), "{:?}", warnings(&checks));
        assert!(pod_can_start(&checks));
    }

    #[test]
    fn host_like_this_one_gets_a_reason_per_line() {
        let root = fixture(&[
            ("/proc/cpuinfo", "flags : fpu vme hypervisor\n"),
            ("/sys/module/kvm/parameters/halt_poll_ns", "0\n"),
        ]);
        let facts = TeeFacts {
            root: root.path().to_path_buf(),
            vm_types: Ok(0x1),
            qemu: Some((
                "/usr/bin/qemu-system-x86_64".into(),
                "  sev-guest\n".into(),
                "QEMU emulator version 7.2.22\n".into(),
            )),
        };
        let snp = warnings(&check_tee(TeeCheckKind::Snp, &facts));
        assert_eq!(snp.len(), 6, "{snp:#?}");
        assert!(
            snp[0].contains("/proc/cpuinfo has no sev_snp flag"),
            "{}",
            snp[0]
        );
        assert!(snp[1].contains("kvm_amd is not loaded"), "{}", snp[1]);
        assert!(snp[2].contains("/dev/sev missing"), "{}", snp[2]);
        assert!(
            snp[3].contains("KVM_CAP_VM_TYPES 0x1 lacks KVM_X86_SNP_VM"),
            "{}",
            snp[3]
        );
        assert!(
            snp[4].contains("lacks sev-snp-guest (QEMU emulator version 7.2.22)")
                && snp[4].contains("QEMU 9.1"),
            "{}",
            snp[4]
        );
        assert!(snp[5].contains("OVMF.amdsev.fd missing"), "{}", snp[5]);
        let tdx = warnings(&check_tee(TeeCheckKind::Tdx, &facts));
        assert_eq!(tdx.len(), 5, "{tdx:#?}");
        assert!(tdx[0].contains("tdx_host_platform"), "{}", tdx[0]);
        assert!(tdx[3].contains("QEMU 10.1"), "{}", tdx[3]);
        // Warnings only: ordinary pods still start.
        assert!(pod_can_start(&check_tee(TeeCheckKind::Tdx, &facts)));
    }

    #[test]
    fn module_without_the_parameter_or_disabled_is_named() {
        let root = fixture(&[("/sys/module/kvm_intel/parameters/nested", "Y\n")]);
        let facts = TeeFacts {
            root: root.path().to_path_buf(),
            vm_types: Err("cannot open /dev/kvm: No such file".into()),
            qemu: None,
        };
        let tdx = warnings(&check_tee(TeeCheckKind::Tdx, &facts));
        assert!(
            tdx[1].contains("tdx missing: this kernel's kvm_intel cannot run KVM_X86_TDX_VM"),
            "{}",
            tdx[1]
        );
        assert!(
            tdx[2].contains("KVM_CAP_VM_TYPES unknown: cannot open /dev/kvm"),
            "{}",
            tdx[2]
        );
        assert!(tdx[3].contains("no QEMU found"), "{}", tdx[3]);
        let root = fixture(&[("/sys/module/kvm_amd/parameters/sev_snp", "N\n")]);
        let facts = TeeFacts {
            root: root.path().to_path_buf(),
            vm_types: Ok(1),
            qemu: None,
        };
        let snp = warnings(&check_tee(TeeCheckKind::Snp, &facts));
        assert!(
            snp[1].contains("sev_snp = N") && snp[1].contains("modprobe kvm_amd sev_snp=1"),
            "{}",
            snp[1]
        );
    }

    #[test]
    fn vm_types_of_this_hosts_kvm() {
        match kvm_vm_types(Path::new("/dev/kvm")) {
            Ok(bits) => assert!(bits & 1 != 0, "{bits:#x}"),
            Err(why) => eprintln!("SKIP: {why}"),
        }
    }

    #[test]
    fn one_failure_means_no_pod() {
        let checks = vec![Check::ok("a", "x"), Check::warn("b", "y", "z")];
        assert!(pod_can_start(&checks));
        let mut checks = checks;
        checks.push(Check::fail("c", "d", "e"));
        assert!(!pod_can_start(&checks));
    }
}
