//! Resolving spec paths inside a container's rootfs without leaving it.
//!
//! Paths from a spec are checked before anything is mounted: a `..`
//! component, an absolute symlink or a relative symlink that climbs above
//! the rootfs is an error naming the spec field, never silently clamped.

use std::path::{Component, Path, PathBuf};

/// Errors resolving a path inside the rootfs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootfsPathError {
    #[error("{field} {path:?} is not absolute")]
    NotAbsolute { field: String, path: String },
    #[error("{field} {path:?} contains a '..' component")]
    DotDot { field: String, path: String },
    #[error("{field} {path:?} goes through absolute symlink {link:?} -> {target:?}, which would leave the rootfs")]
    AbsoluteSymlink {
        field: String,
        path: String,
        link: String,
        target: String,
    },
    #[error("{field} {path:?} goes through symlink {link:?} -> {target:?}, which climbs above the rootfs")]
    SymlinkEscape {
        field: String,
        path: String,
        link: String,
        target: String,
    },
    #[error("{field} {path:?} has more than 40 symlinks")]
    SymlinkLoop { field: String, path: String },
}

/// Checks that `path` is absolute and has no `..` component.
pub fn check_spec_path(field: &str, path: &str) -> Result<(), RootfsPathError> {
    if !path.starts_with('/') {
        return Err(RootfsPathError::NotAbsolute {
            field: field.to_owned(),
            path: path.to_owned(),
        });
    }
    if Path::new(path)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(RootfsPathError::DotDot {
            field: field.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Resolves the container path `path` to a path below `root`, following
/// relative symlinks that stay inside `root`. Components that do not exist
/// yet are kept as they are (the caller creates them).
pub fn resolve_in_rootfs(root: &Path, path: &str, field: &str) -> Result<PathBuf, RootfsPathError> {
    check_spec_path(field, path)?;
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    // Remaining components, last first, so symlink targets can be pushed.
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            // Only reachable through a symlink target.
            resolved.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&name);
        let Ok(metadata) = std::fs::symlink_metadata(&candidate) else {
            resolved.push(name);
            continue;
        };
        if !metadata.file_type().is_symlink() {
            resolved.push(name);
            continue;
        }
        hops += 1;
        if hops > 40 {
            return Err(RootfsPathError::SymlinkLoop {
                field: field.to_owned(),
                path: path.to_owned(),
            });
        }
        let target = std::fs::read_link(&candidate).unwrap_or_default();
        let link = {
            let mut p = PathBuf::from("/");
            p.extend(&resolved);
            p.push(&name);
            p.display().to_string()
        };
        if target.is_absolute() {
            return Err(RootfsPathError::AbsoluteSymlink {
                field: field.to_owned(),
                path: path.to_owned(),
                link,
                target: target.display().to_string(),
            });
        }
        // Check the climb before following: `..` past the root is an escape.
        let mut depth = resolved.len();
        for c in target.components() {
            match c {
                Component::ParentDir if depth == 0 => {
                    return Err(RootfsPathError::SymlinkEscape {
                        field: field.to_owned(),
                        path: path.to_owned(),
                        link,
                        target: target.display().to_string(),
                    })
                }
                Component::ParentDir => depth -= 1,
                Component::Normal(_) => depth += 1,
                _ => {}
            }
        }
        for c in target.components().rev() {
            match c {
                Component::ParentDir => pending.push("..".into()),
                Component::Normal(n) => pending.push(n.to_owned()),
                _ => {}
            }
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn plain_path_resolves_below_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        let p = resolve_in_rootfs(root.path(), "/etc/hosts", "f").unwrap();
        assert_eq!(p, root.path().join("etc/hosts"));
    }

    #[test]
    fn dot_dot_component_returns_error_naming_field() {
        let root = tempfile::tempdir().unwrap();
        let err =
            resolve_in_rootfs(root.path(), "/a/../../etc", "mounts[2].destination").unwrap_err();
        assert!(matches!(err, RootfsPathError::DotDot { .. }));
        assert!(err.to_string().contains("mounts[2].destination"));
    }

    #[test]
    fn relative_path_returns_error() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve_in_rootfs(root.path(), "etc", "process.cwd"),
            Err(RootfsPathError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn absolute_symlink_returns_error() {
        let root = tempfile::tempdir().unwrap();
        symlink("/etc", root.path().join("evil")).unwrap();
        let err =
            resolve_in_rootfs(root.path(), "/evil/passwd", "mounts[0].destination").unwrap_err();
        assert!(
            matches!(err, RootfsPathError::AbsoluteSymlink { .. }),
            "{err}"
        );
    }

    #[test]
    fn relative_symlink_climbing_out_returns_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        symlink("../../../etc", root.path().join("a/up")).unwrap();
        let err = resolve_in_rootfs(root.path(), "/a/up/passwd", "f").unwrap_err();
        assert!(
            matches!(err, RootfsPathError::SymlinkEscape { .. }),
            "{err}"
        );
    }

    #[test]
    fn relative_symlink_inside_is_followed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::fs::create_dir(root.path().join("x")).unwrap();
        symlink("../usr/lib", root.path().join("x/lib")).unwrap();
        let p = resolve_in_rootfs(root.path(), "/x/lib/mod", "f").unwrap();
        assert_eq!(p, root.path().join("usr/lib/mod"));
    }

    #[test]
    fn symlink_loop_returns_error() {
        let root = tempfile::tempdir().unwrap();
        symlink("b", root.path().join("a")).unwrap();
        symlink("a", root.path().join("b")).unwrap();
        assert!(matches!(
            resolve_in_rootfs(root.path(), "/a", "f"),
            Err(RootfsPathError::SymlinkLoop { .. })
        ));
    }
}
