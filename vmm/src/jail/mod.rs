//! The VMM's jail: what a `cloister-vmm` (VM or vhost-user server) may
//! still reach once a guest runs.
//!
//! [`enter`] runs before any guest code or device serving, while the
//! process has one thread, as root:
//! 1. joins the given cgroups (`cgroup.procs`, or `tasks` on v1);
//! 2. unshares the PID namespace and forks: the child becomes the VMM, the
//!    parent a supervisor that forwards signals and ends as the VMM ends
//!    ([`process`]);
//! 3. joins the given network namespace, opens taps named in the config
//!    there (they become inherited fds), closes every descriptor inherited
//!    from the caller that the config does not name (one pointing at a host
//!    folder would lead out of the root), then unshares mount, IPC, UTS and
//!    network namespaces;
//! 4. builds the root (a tmpfs with the binds of [`plan`], device nodes, a
//!    fresh read-only procfs), makes it read-only and pivots into it
//!    ([`root`]);
//! 5. sets resource limits and drops to the jail's uid/gid with no
//!    capabilities (or the few a virtio-fs server needs), no_new_privs
//!    ([`privileges`]);
//! 6. compiles the seccomp filters that each thread installs once its
//!    setup is done ([`seccomp`]).
//!
//! Every failure is an error naming the step and the value; nothing is
//! skipped with a warning.

pub mod config;
pub mod plan;
pub mod privileges;
pub mod process;
pub mod root;
pub mod seccomp;
#[cfg(feature = "jail-selftest")]
pub mod selftest;
pub mod taps;

use std::path::PathBuf;
use std::process::ExitCode;

pub use config::JailConfig;
pub use plan::JailPlan;
pub use process::Forked;

/// Why a jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {step} ({value}): {source}")]
    Step {
        step: &'static str,
        value: String,
        source: std::io::Error,
    },
    #[error("jail: {field} = {}: {reason}", path.display())]
    Path {
        field: &'static str,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("jail: seccomp filter {kind}: {reason}")]
    Seccomp { kind: &'static str, reason: String },
    #[error("jail: {0}")]
    Taps(String),
    #[error(
        "jail: this host has no {node} to give the jail a node of (it comes from {provided_by})"
    )]
    NoHostDevice {
        node: &'static str,
        provided_by: &'static str,
    },
}

/// Where [`enter`] left this process.
pub enum Entered {
    /// Inside the jail: build and run the VM.
    Jailed,
    /// The supervisor, once the jailed VMM ended: exit with this.
    Supervisor(ExitCode),
}

/// Enters the jail `jail` laid out by `plan`. `open_taps` runs in the
/// joined network namespace, as root, before the VMM gets a fresh one.
/// `inherited_fds` are the descriptors the caller passed on purpose (taps
/// given as `fd=N`); every other inherited one is closed.
/// The caller must have no other thread.
pub fn enter(
    jail: &JailConfig,
    plan: &JailPlan,
    inherited_fds: &[std::os::fd::RawFd],
    open_taps: impl FnOnce() -> Result<(), JailError>,
) -> Result<Entered, JailError> {
    privileges::join_cgroups(&jail.cgroups)?;
    let link = match process::fork_into_pid_namespace()? {
        Forked::Supervisor(code) => return Ok(Entered::Supervisor(code)),
        Forked::Vmm(link) => link,
    };
    if let Some(netns) = &jail.netns {
        process::join_netns(netns)?;
    }
    open_taps()?;
    process::close_inherited_fds(inherited_fds)?;
    process::unshare_namespaces()?;
    root::enter_root(&jail.root, plan, jail.uid, jail.gid)?;
    privileges::set_limits(plan.writes_guest_files)?;
    privileges::drop_privileges(jail.uid, jail.gid, plan.serves_fs)?;
    process::die_with_supervisor(link)?;
    Ok(Entered::Jailed)
}

/// The warning `--no-jail` prints.
pub const NO_JAIL_WARNING: &str = "cloister-vmm: WARNING: --no-jail: this VMM runs WITHOUT a jail and WITHOUT seccomp, with all the privileges of its caller; a guest that escapes the device code owns them. For development only.";
