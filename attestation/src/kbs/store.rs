//! Resources on disk: `<root>/<repo>/<type>/<tag>`, one file each.

use std::path::PathBuf;
use thiserror::Error;

/// Errors from the resource store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Path segment that could escape the store or is not a plain name.
    #[error("resource path segment {0:?} is not a plain name ([A-Za-z0-9._-], not . or ..)")]
    Segment(String),
    /// Not there.
    #[error("resource {0} does not exist")]
    NotFound(String),
    /// I/O.
    #[error("resource {path} cannot be read: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A directory of resources.
#[derive(Debug, Clone)]
pub struct ResourceStore {
    root: PathBuf,
}

/// Checks one segment of a resource path.
pub fn check_segment(s: &str) -> Result<(), StoreError> {
    let plain = !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain {
        Ok(())
    } else {
        Err(StoreError::Segment(s.to_owned()))
    }
}

impl ResourceStore {
    /// A store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Reads `<repo>/<type>/<tag>`.
    pub fn get(&self, path: &[&str; 3]) -> Result<Vec<u8>, StoreError> {
        for segment in path {
            check_segment(segment)?;
        }
        let joined = path.join("/");
        let file = self.root.join(path[0]).join(path[1]).join(path[2]);
        match std::fs::read(&file) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound(joined)),
            Err(source) => Err(StoreError::Io {
                path: joined,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resources_and_refuses_traversal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("default/key")).unwrap();
        std::fs::write(dir.path().join("default/key/disk"), b"k").unwrap();
        let store = ResourceStore::new(dir.path());
        assert_eq!(store.get(&["default", "key", "disk"]).unwrap(), b"k");
        assert!(matches!(
            store.get(&["default", "key", "nope"]),
            Err(StoreError::NotFound(_))
        ));
        for bad in ["..", ".", "", "a/b", "a b", "\0"] {
            assert!(matches!(
                store.get(&["default", bad, "disk"]),
                Err(StoreError::Segment(_))
            ));
        }
    }
}
