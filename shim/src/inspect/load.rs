//! Reading a spec file for `cloister inspect`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a spec file could not be inspected at all.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not an OCI runtime spec: the top level is not a JSON object")]
    NotAnObject { path: PathBuf },
}

/// Reads and parses an OCI runtime spec (`config.json`).
pub fn load_spec(path: &Path) -> Result<Value, InspectError> {
    let text = std::fs::read_to_string(path).map_err(|source| InspectError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let spec: Value = serde_json::from_str(&text).map_err(|source| InspectError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    if !spec.is_object() {
        return Err(InspectError::NotAnObject {
            path: path.to_path_buf(),
        });
    }
    Ok(spec)
}

/// The spec's own `annotations` (where containerd puts the CRI ones);
/// values that are not strings are left out (the spec rules see the field).
pub fn spec_annotations(spec: &Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = load_spec(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"process\":").unwrap();
        let err = load_spec(&bad).unwrap_err();
        assert!(
            matches!(err, InspectError::Json { .. }) && err.to_string().contains("bad.json"),
            "{err}"
        );
        let list = dir.path().join("list.json");
        std::fs::write(&list, "[1]").unwrap();
        let err = load_spec(&list).unwrap_err();
        assert!(matches!(err, InspectError::NotAnObject { .. }), "{err}");
    }

    #[test]
    fn annotations_keep_string_values() {
        let spec = serde_json::json!({"annotations": {"a": "1", "b": 2}});
        assert_eq!(
            spec_annotations(&spec),
            HashMap::from([("a".to_string(), "1".to_string())])
        );
        assert!(spec_annotations(&serde_json::json!({})).is_empty());
    }
}
