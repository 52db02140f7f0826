//! A container image built locally, for machines without a registry: an OCI
//! image layout archive (one uncompressed layer from a root file system
//! folder, the image config, the manifest, and an index naming the image)
//! that `ctr images import` takes.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Errors building an image archive.
#[derive(Debug, thiserror::Error)]
pub enum OciImageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("image name {0:?} has no tag (name:tag)")]
    Name(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciImageError {
    let what = what.into();
    move |source| OciImageError::Io { what, source }
}

/// What the image runs and with which environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Full reference, e.g. `docker.io/library/busybox:cloister`.
    pub name: String,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// A content-addressed blob: its bytes, digest and size.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        Self { bytes, digest }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        serde_json::json!({
            "mediaType": media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The layer: `rootfs` as a tar with paths relative to it, symlinks kept.
fn layer_tar(rootfs: &Path) -> Result<Vec<u8>, OciImageError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", rootfs)
        .map_err(io_error(format!("pack {}", rootfs.display())))?;
    builder.into_inner().map_err(io_error("finish the layer"))
}

/// Writes the OCI archive of `rootfs` as the image `spec` to `out`.
pub fn write_image_archive(
    rootfs: &Path,
    spec: &ImageSpec,
    out: &Path,
) -> Result<(), OciImageError> {
    let tag = spec
        .name
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map(|(_, tag)| tag.to_string())
        .ok_or_else(|| OciImageError::Name(spec.name.clone()))?;
    let layer = Blob::new(layer_tar(rootfs)?);
    let config = Blob::new(
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": spec.cmd, "Env": spec.env },
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        }))
        .unwrap_or_default(),
    );
    let manifest = Blob::new(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(CONFIG_MEDIA_TYPE),
            "layers": [layer.descriptor(LAYER_MEDIA_TYPE)],
        }))
        .unwrap_or_default(),
    );
    let mut manifest_descriptor = manifest.descriptor(MANIFEST_MEDIA_TYPE);
    manifest_descriptor["annotations"] = serde_json::json!({
        "io.containerd.image.name": spec.name,
        "org.opencontainers.image.ref.name": tag,
    });
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    }))
    .unwrap_or_default();

    let file = std::fs::File::create(out).map_err(io_error(format!("create {}", out.display())))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |path: &str, bytes: &[u8]| -> Result<(), OciImageError> {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive
            .append_data(&mut header, path, bytes)
            .map_err(io_error(format!("add {path} to {}", out.display())))
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for blob in [&layer, &config, &manifest] {
        let hex = blob.digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), &blob.bytes)?;
    }
    let mut writer = archive
        .into_inner()
        .map_err(io_error(format!("finish {}", out.display())))?;
    writer
        .flush()
        .map_err(io_error(format!("write {}", out.display())))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Read;

    use super::*;

    fn entries(archive: &Path) -> HashMap<String, Vec<u8>> {
        let mut found = HashMap::new();
        let mut reader = tar::Archive::new(std::fs::File::open(archive).unwrap());
        for entry in reader.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            found.insert(path, bytes);
        }
        found
    }

    #[test]
    fn archive_is_an_oci_layout_whose_digests_match_and_whose_layer_holds_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/busybox"), b"binary").unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let out = dir.path().join("image.tar");
        let spec = ImageSpec {
            name: "docker.io/library/busybox:cloister".into(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
        };
        write_image_archive(&rootfs, &spec, &out).unwrap();

        let files = entries(&out);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let manifest_ref = &index["manifests"][0];
        assert_eq!(
            manifest_ref["annotations"]["io.containerd.image.name"],
            spec.name
        );
        assert_eq!(
            manifest_ref["annotations"]["org.opencontainers.image.ref.name"],
            "cloister"
        );
        let blob = |digest: &serde_json::Value| -> Vec<u8> {
            let digest = digest.as_str().unwrap();
            let bytes = files[&format!("blobs/sha256/{}", &digest[7..])].clone();
            assert_eq!(
                format!("sha256:{}", hex(&Sha256::digest(&bytes))),
                digest,
                "blob content does not match its digest"
            );
            bytes
        };
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&manifest_ref["digest"])).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        assert_eq!(config["config"]["Cmd"][0], "sh");
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        let layer = blob(&manifest["layers"][0]["digest"]);
        let mut layer = tar::Archive::new(layer.as_slice());
        let mut saw_link = false;
        let mut saw_binary = false;
        for entry in layer.entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            if path.ends_with("bin/sh") {
                assert_eq!(
                    entry.link_name().unwrap().unwrap().display().to_string(),
                    "busybox"
                );
                saw_link = true;
            }
            saw_binary |= path.ends_with("bin/busybox");
        }
        assert!(saw_link && saw_binary);
    }

    #[test]
    fn image_name_without_tag_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            name: "localhost:5000/busybox".into(),
            cmd: vec![],
            env: vec![],
        };
        let error = write_image_archive(dir.path(), &spec, &dir.path().join("x.tar")).unwrap_err();
        assert!(
            error.to_string().contains("localhost:5000/busybox"),
            "{error}"
        );
    }
}
