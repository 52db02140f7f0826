//! Puts a confidential pod's secrets into a container's spec before the
//! container is created:
//!
//! - a mount whose source is `cloister-secret://<name>` becomes a
//!   read-only bind mount (nosuid, nodev, noexec) of the secret's tmpfs
//!   file; `<name>` must be a resource of the pod's init-data;
//! - an environment value `sealed.…` is unsealed through the KBS and the
//!   plaintext takes its place;
//! - a bind mount of a regular file whose content is `sealed.…` (a
//!   Kubernetes Secret volume holding a sealed secret) is redirected to a
//!   tmpfs file with the plaintext.
//!
//! The plaintext exists only in guest memory (tmpfs and the spec the agent
//! hands to the container's init); nothing goes back to the host.

use cloister_protocol::confidential::SECRET_MOUNT_SCHEME;
use serde_json::Value;
use std::io::Read;

use super::{sealed, AttestError, Attested};

/// Largest file inspected for a sealed secret (they are a few hundred
/// bytes; a volume file is not read whole for nothing).
const MAX_SEALED_FILE: u64 = 64 << 10;

fn ensure_options(mount: &mut Value, wanted: &[&str]) {
    if !mount.get("options").is_some_and(Value::is_array) {
        mount["options"] = Value::Array(Vec::new());
    }
    if let Some(options) = mount.get_mut("options").and_then(Value::as_array_mut) {
        options.retain(|o| o.as_str() != Some("rw"));
        for w in wanted {
            if !options.iter().any(|o| o.as_str() == Some(w)) {
                options.push(Value::String((*w).to_owned()));
            }
        }
    }
}

/// Reads a sealed secret from a small regular file, if that is what it holds.
fn sealed_file(path: &str) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_SEALED_FILE {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_SEALED_FILE)
        .read_to_string(&mut text)
        .ok()?;
    sealed::is_sealed(&text).then_some(text)
}

impl Attested {
    async fn unseal(&self, field: &str, value: &str) -> Result<Vec<u8>, AttestError> {
        let secret = sealed::parse(value).map_err(|source| AttestError::Sealed {
            field: field.to_owned(),
            source,
        })?;
        let session = self
            .kbs
            .as_ref()
            .ok_or_else(|| AttestError::NoKbsForSealed {
                field: field.to_owned(),
            })?;
        session.fetch(&secret.resource).await
    }

    /// The spec with secrets resolved; a spec that is not JSON is returned
    /// unchanged for the container code to refuse with its own error.
    pub async fn resolve_spec(
        &self,
        container_id: &str,
        spec_json: &[u8],
    ) -> Result<Vec<u8>, AttestError> {
        let Ok(mut spec) = serde_json::from_slice::<Value>(spec_json) else {
            return Ok(spec_json.to_vec());
        };
        let mut changed = false;
        if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            for (index, mount) in mounts.iter_mut().enumerate() {
                let field = format!("mounts[{index}].source");
                let Some(source) = mount.get("source").and_then(Value::as_str) else {
                    continue;
                };
                if let Some(name) = source.strip_prefix(SECRET_MOUNT_SCHEME) {
                    let path =
                        self.secrets
                            .get(name)
                            .ok_or_else(|| AttestError::UnknownSecret {
                                field: field.clone(),
                                name: name.to_owned(),
                            })?;
                    mount["source"] = Value::String(path.display().to_string());
                    mount["type"] = Value::String("bind".into());
                    ensure_options(mount, &["bind", "ro", "nosuid", "nodev", "noexec"]);
                    changed = true;
                } else if let Some(text) = sealed_file(source) {
                    let plaintext = self.unseal(&field, &text).await?;
                    let name = format!("sealed-{container_id}-{index}");
                    let path = self.store.write(&name, &plaintext)?;
                    mount["source"] = Value::String(path.display().to_string());
                    ensure_options(mount, &["ro"]);
                    changed = true;
                }
            }
        }
        if let Some(process) = spec.get_mut("process") {
            changed |= self.unseal_env(process).await?;
        }
        if !changed {
            return Ok(spec_json.to_vec());
        }
        serde_json::to_vec(&spec).map_err(|e| AttestError::Io {
            what: "re-encode the container spec".into(),
            source: e.into(),
        })
    }

    /// An exec's OCI `process` with its sealed env values unsealed.
    pub async fn resolve_process(&self, process_json: &[u8]) -> Result<Vec<u8>, AttestError> {
        let Ok(mut process) = serde_json::from_slice::<Value>(process_json) else {
            return Ok(process_json.to_vec());
        };
        if !self.unseal_env(&mut process).await? {
            return Ok(process_json.to_vec());
        }
        serde_json::to_vec(&process).map_err(|e| AttestError::Io {
            what: "re-encode the exec process".into(),
            source: e.into(),
        })
    }

    /// Replaces sealed values in `process.env`; whether any was.
    async fn unseal_env(&self, process: &mut Value) -> Result<bool, AttestError> {
        let mut changed = false;
        let Some(env) = process.get_mut("env").and_then(Value::as_array_mut) else {
            return Ok(false);
        };
        for entry in env.iter_mut() {
            let Some((key, value)) = entry.as_str().and_then(|e| e.split_once('=')) else {
                continue;
            };
            if !sealed::is_sealed(value) {
                continue;
            }
            let field = format!("process.env {key}");
            let plaintext = self.unseal(&field, value).await?;
            let text =
                String::from_utf8(plaintext).map_err(|_| AttestError::SealedNotText { field })?;
            *entry = Value::String(format!("{key}={text}"));
            changed = true;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::secrets::SecretStore;
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn attested(dir: &std::path::Path) -> Attested {
        let store = SecretStore::new(dir);
        store.prepare(false).unwrap();
        let path = store.write("token", b"s3cret").unwrap();
        Attested {
            secrets: BTreeMap::from([("token".to_owned(), path)]),
            store,
            kbs: None,
        }
    }

    async fn resolve(a: &Attested, spec: &Value) -> Result<Value, AttestError> {
        let bytes = a
            .resolve_spec("c1", &serde_json::to_vec(spec).unwrap())
            .await?;
        Ok(serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn secret_mount_becomes_a_read_only_bind_of_the_tmpfs_file() {
        let tmp = tempfile::tempdir().unwrap();
        let a = attested(tmp.path());
        let spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/secrets/token", "source": "cloister-secret://token", "options": ["rw"]}
        ]});
        let out = resolve(&a, &spec).await.unwrap();
        let mount = &out["mounts"][1];
        assert_eq!(
            mount["source"],
            tmp.path().join("token").display().to_string()
        );
        assert_eq!(mount["type"], "bind");
        let options: Vec<&str> = mount["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(options, ["bind", "ro", "nosuid", "nodev", "noexec"]);
        assert_eq!(out["mounts"][0], spec["mounts"][0]);
    }

    #[tokio::test]
    async fn unknown_secret_names_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let a = attested(tmp.path());
        let spec = json!({"mounts": [{"destination": "/s", "source": "cloister-secret://other"}]});
        let err = resolve(&a, &spec).await.unwrap_err().to_string();
        assert!(err.contains("mounts[0].source"), "{err}");
        assert!(err.contains("\"other\""), "{err}");
    }

    #[tokio::test]
    async fn sealed_values_need_a_kbs_and_must_parse() {
        let tmp = tempfile::tempdir().unwrap();
        let a = attested(tmp.path());
        let spec = json!({"process": {"env": [
            "PATH=/bin",
            format!("DB={}", sealed::seal_reference("default/key/db"))
        ]}});
        let err = resolve(&a, &spec).await.unwrap_err().to_string();
        assert!(err.contains("process.env DB"), "{err}");
        assert!(err.contains("names no kbs"), "{err}");

        let spec = json!({"process": {"env": ["DB=sealed.only.three"]}});
        let err = resolve(&a, &spec).await.unwrap_err().to_string();
        assert!(err.contains("process.env DB"), "{err}");
        assert!(err.contains("3 dot-separated parts"), "{err}");

        // A sealed secret in a volume file is found and needs the kbs too.
        let volume = tmp.path().join("volume-file");
        std::fs::write(&volume, sealed::seal_reference("a/b/c")).unwrap();
        let spec = json!({"mounts": [{"destination": "/v", "source": volume, "type": "bind"}]});
        let err = resolve(&a, &spec).await.unwrap_err().to_string();
        assert!(err.contains("mounts[0].source"), "{err}");
    }

    #[tokio::test]
    async fn spec_without_secrets_is_passed_through_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let a = attested(tmp.path());
        let raw = br#"{"process": {"env": ["A=b"]}, "mounts": [{"source": "/etc/hosts"}]}"#;
        assert_eq!(a.resolve_spec("c1", raw).await.unwrap(), raw);
        assert_eq!(
            a.resolve_spec("c1", b"not json").await.unwrap(),
            b"not json"
        );
    }
}
