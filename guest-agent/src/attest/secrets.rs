//! Fetched secrets as files on a guest tmpfs (`/run/cloister/secrets`):
//! one file per init-data resource, mode 0400, owned by root. The folder is
//! its own tmpfs (mode 0700, nosuid, nodev, noexec) so that nothing on it
//! ever reaches a disk or a virtio-fs share the host can read; containers
//! get single files bind-mounted read-only.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cloister_attestation::pod_config::check_secret_name;
use nix::mount::{mount, MsFlags};

use super::AttestError;

/// The secrets folder.
#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> AttestError {
    move |source| AttestError::Io { what, source }
}

impl SecretStore {
    /// A store in `dir` (not created yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the folder and, in the guest, mounts a private tmpfs on it.
    pub fn prepare(&self, mount_tmpfs: bool) -> Result<(), AttestError> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!("create {}", self.dir.display())))?;
        if mount_tmpfs {
            mount(
                Some("tmpfs"),
                &self.dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0700,size=16m"),
            )
            .map_err(|e| AttestError::Io {
                what: format!("mount tmpfs on {}", self.dir.display()),
                source: e.into(),
            })?;
        }
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", self.dir.display())))
    }

    /// Where secret `name` lives (the name is checked).
    pub fn path(&self, name: &str) -> Result<PathBuf, AttestError> {
        if !check_secret_name(name) {
            return Err(AttestError::SecretName(name.to_owned()));
        }
        Ok(self.dir.join(name))
    }

    /// Writes secret `name` once: a second write of the same name (or a
    /// file someone placed there) is an error, never an overwrite.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, AttestError> {
        let path = self.path(name)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io(format!("create secret file {}", path.display())))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io(format!("write secret file {}", path.display())))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn secrets_are_0400_files_in_a_0700_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SecretStore::new(tmp.path().join("secrets"));
        store.prepare(false).unwrap();
        let path = store.write("db-password", b"hunter2").unwrap();
        assert_eq!(path, tmp.path().join("secrets/db-password"));
        assert_eq!(std::fs::read(&path).unwrap(), b"hunter2");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o400);
        assert_eq!(
            std::fs::metadata(store.dir()).unwrap().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn names_are_checked_and_files_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SecretStore::new(tmp.path());
        store.prepare(false).unwrap();
        for bad in ["../escape", ".hidden", "a/b", ""] {
            let err = store.write(bad, b"x").unwrap_err();
            assert!(matches!(err, AttestError::SecretName(_)), "{bad:?}: {err}");
        }
        store.write("once", b"1").unwrap();
        let err = store.write("once", b"2").unwrap_err();
        assert!(err.to_string().contains("once"), "{err}");
        assert_eq!(std::fs::read(tmp.path().join("once")).unwrap(), b"1");
        // A symlink planted under a secret's name is not followed.
        std::os::unix::fs::symlink(tmp.path().join("target"), tmp.path().join("link")).unwrap();
        assert!(store.write("link", b"x").is_err());
        assert!(!tmp.path().join("target").exists());
    }
}
