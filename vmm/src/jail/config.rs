//! What the jail is made of, as `--jail-*` flags or the `"jail"` object of
//! vm.json name it; validated by name like the rest of the config.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Where cgroup hierarchies are mounted; a cgroup outside it is refused so
/// the jail never writes its pid into an arbitrary file.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// One jail: the folder that becomes the VMM's root, the ids it runs as,
/// the cgroups it joins and the network namespace it opens its taps in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// An empty folder (created if missing) over which the jail mounts its
    /// own tmpfs root; on the host it stays empty.
    pub root: PathBuf,
    /// Not 0: the VMM must not run as root.
    pub uid: u32,
    pub gid: u32,
    /// cgroup folders (`/sys/fs/cgroup/...`, one per v1 controller or the
    /// v2 one) the VMM's pid is written into.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<PathBuf>,
    /// A network namespace (`/var/run/netns/NAME`, `/proc/PID/ns/net`)
    /// joined only to open taps by name; the VMM then runs in a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

fn invalid(field: &'static str, value: impl std::fmt::Display, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| !matches!(c, std::path::Component::ParentDir))
}

impl JailConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_plain_absolute(&self.root) || self.root == Path::new("/") {
            return Err(invalid(
                "jail.root",
                self.root.display(),
                "must be an absolute folder other than / without ..",
            ));
        }
        if self.uid == 0 {
            return Err(invalid(
                "jail.uid",
                self.uid,
                "the jail must not run as root",
            ));
        }
        if self.gid == 0 {
            return Err(invalid(
                "jail.gid",
                self.gid,
                "the jail must not run as group root",
            ));
        }
        for cgroup in &self.cgroups {
            if !is_plain_absolute(cgroup) || !cgroup.starts_with(CGROUP_MOUNT) {
                return Err(invalid(
                    "jail.cgroups",
                    cgroup.display(),
                    "must be a folder under /sys/fs/cgroup without ..",
                ));
            }
        }
        if let Some(netns) = &self.netns {
            if !is_plain_absolute(netns) {
                return Err(invalid(
                    "jail.netns",
                    netns.display(),
                    "must be an absolute path without ..",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail() -> JailConfig {
        JailConfig {
            root: "/run/cloister/p/jail".into(),
            uid: 64000,
            gid: 64000,
            cgroups: vec!["/sys/fs/cgroup/memory/kubepods/pod1".into()],
            netns: Some("/var/run/netns/pod1".into()),
        }
    }

    #[test]
    fn jail_with_unprivileged_ids_validates() {
        jail().validate().unwrap();
    }

    #[test]
    fn jail_as_root_is_refused_naming_the_id() {
        let err = JailConfig { uid: 0, ..jail() }.validate().unwrap_err();
        assert!(err.to_string().starts_with("jail.uid = 0"), "{err}");
        let err = JailConfig { gid: 0, ..jail() }.validate().unwrap_err();
        assert!(err.to_string().starts_with("jail.gid = 0"), "{err}");
    }

    #[test]
    fn jail_with_bad_paths_names_them() {
        for (bad, field) in [
            (
                JailConfig {
                    root: "/".into(),
                    ..jail()
                },
                "jail.root = /",
            ),
            (
                JailConfig {
                    root: "rel".into(),
                    ..jail()
                },
                "jail.root = rel",
            ),
            (
                JailConfig {
                    root: "/a/../b".into(),
                    ..jail()
                },
                "jail.root = /a/../b",
            ),
            (
                JailConfig {
                    cgroups: vec!["/etc/passwd".into()],
                    ..jail()
                },
                "jail.cgroups = /etc/passwd",
            ),
            (
                JailConfig {
                    cgroups: vec!["/sys/fs/cgroup/../../etc".into()],
                    ..jail()
                },
                "jail.cgroups = /sys/fs/cgroup/../../etc",
            ),
            (
                JailConfig {
                    netns: Some("ns".into()),
                    ..jail()
                },
                "jail.netns = ns",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }

    #[test]
    fn jail_object_with_unknown_field_is_refused() {
        let err =
            serde_json::from_str::<JailConfig>(r#"{"root": "/j", "uid": 1, "gid": 1, "user": 1}"#)
                .unwrap_err();
        assert!(err.to_string().contains("unknown field `user`"), "{err}");
    }
}

/// The jail flags of `cloister-vmm` and `cloister-vmm vhost-user`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct JailArgs {
    /// Run jailed, with this empty folder as the root (see the `jail`
    /// module); needs --jail-uid and --jail-gid.
    #[arg(long, value_name = "DIR")]
    pub jail_root: Option<PathBuf>,
    /// The unprivileged uid the jailed VMM runs as (need not exist in
    /// /etc/passwd).
    #[arg(long, value_name = "N")]
    pub jail_uid: Option<u32>,
    /// The unprivileged gid the jailed VMM runs as.
    #[arg(long, value_name = "N")]
    pub jail_gid: Option<u32>,
    /// A cgroup folder to join (repeat for each v1 controller).
    #[arg(long, value_name = "PATH")]
    pub jail_cgroup: Vec<PathBuf>,
    /// The network namespace to open taps in (the jail then gets a fresh
    /// one).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Run without jail and seccomp even if the config file has a jail:
    /// for development only; prints a warning.
    #[arg(long)]
    pub no_jail: bool,
}

impl JailArgs {
    /// The jail the flags ask for: `Some` with --jail-root, `None` without
    /// jail flags, an error for an incomplete or contradictory set.
    pub fn jail(&self) -> Result<Option<JailConfig>, ConfigError> {
        let any = self.jail_root.is_some()
            || self.jail_uid.is_some()
            || self.jail_gid.is_some()
            || !self.jail_cgroup.is_empty()
            || self.netns.is_some();
        if self.no_jail && any {
            return Err(invalid(
                "--no-jail",
                "true",
                "cannot be combined with --jail-* or --netns",
            ));
        }
        if !any {
            return Ok(None);
        }
        let missing = |flag: &'static str| {
            invalid(
                flag,
                "(missing)",
                "every jail needs --jail-root, --jail-uid and --jail-gid",
            )
        };
        let jail = JailConfig {
            root: self
                .jail_root
                .clone()
                .ok_or_else(|| missing("--jail-root"))?,
            uid: self.jail_uid.ok_or_else(|| missing("--jail-uid"))?,
            gid: self.jail_gid.ok_or_else(|| missing("--jail-gid"))?,
            cgroups: self.jail_cgroup.clone(),
            netns: self.netns.clone(),
        };
        jail.validate()?;
        Ok(Some(jail))
    }
}

#[cfg(test)]
mod args_tests {
    use super::*;

    #[test]
    fn jail_flags_without_uid_name_the_missing_flag() {
        let args = JailArgs {
            jail_root: Some("/j".into()),
            jail_gid: Some(1000),
            ..Default::default()
        };
        let err = args.jail().unwrap_err().to_string();
        assert!(err.starts_with("--jail-uid = (missing)"), "{err}");
    }

    #[test]
    fn no_jail_with_jail_flags_is_refused() {
        let args = JailArgs {
            jail_root: Some("/j".into()),
            no_jail: true,
            ..Default::default()
        };
        assert!(args
            .jail()
            .unwrap_err()
            .to_string()
            .starts_with("--no-jail"));
    }

    #[test]
    fn complete_jail_flags_make_a_jail_and_none_make_none() {
        assert_eq!(JailArgs::default().jail().unwrap(), None);
        let args = JailArgs {
            jail_root: Some("/j".into()),
            jail_uid: Some(1000),
            jail_gid: Some(1000),
            jail_cgroup: vec!["/sys/fs/cgroup/pod".into()],
            ..Default::default()
        };
        let jail = args.jail().unwrap().unwrap();
        assert_eq!((jail.uid, jail.cgroups.len()), (1000, 1));
    }
}
