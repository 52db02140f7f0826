//! A CRI client, as kubelet talks to containerd: the `runtime.v1` runtime and
//! image services over containerd's Unix socket (crate `k8s-cri`, tonic),
//! plus the pieces a pod test needs — a CNI bridge network confined to a
//! test folder and CRI's log file format.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Errors reaching CRI.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to CRI on {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("write the CNI config {path}: {source}")]
    CniConfig {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The runtime and image services on one channel.
#[derive(Debug, Clone)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    pub async fn connect(socket: &Path) -> Result<Self, CriError> {
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector dials the
        // Unix socket.
        let endpoint = Endpoint::from_static("http://[::]:50051");
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// A CNI bridge network whose state stays under one folder: bridge
/// `bridge` with host-local addresses from `subnet`, no gateway address and
/// no masquerading (nothing outside the test is touched but the bridge
/// itself, which the test deletes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniBridge {
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    pub conf_dir: PathBuf,
    pub ipam_dir: PathBuf,
}

impl CniBridge {
    /// Writes `<conf_dir>/10-<name>.conflist`.
    pub fn write(&self) -> Result<PathBuf, CriError> {
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": self.subnet,
                    "dataDir": self.ipam_dir,
                }
            }]
        });
        let path = self.conf_dir.join(format!("10-{}.conflist", self.name));
        std::fs::create_dir_all(&self.conf_dir)
            .and_then(|()| std::fs::write(&path, conflist.to_string()))
            .map_err(|source| CriError::CniConfig {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }
}

/// The messages of a CRI container log ("<time> <stream> <P|F> <text>"
/// lines, P = partial), joined back into the output as written.
pub fn cri_log_text(log: &str) -> String {
    let mut text = String::new();
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag) = (parts.next(), parts.next(), parts.next());
        let message = parts.next().unwrap_or("");
        text.push_str(message);
        if tag != Some("P") {
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_joined_with_partial_lines_continued() {
        let log = "2026-11-24T01:00:00.1Z stdout F hello\n\
                   2026-11-24T01:00:00.2Z stdout P par\n\
                   2026-11-24T01:00:00.3Z stdout F tial line\n\
                   2026-11-24T01:00:00.4Z stderr F \n";
        assert_eq!(cri_log_text(log), "hello\npartial line\n\n");
    }

    #[test]
    fn cni_bridge_config_keeps_ipam_state_in_the_given_folder() {
        let dir = tempfile::tempdir().unwrap();
        let bridge = CniBridge {
            name: "test-net".into(),
            bridge: "clst-test0".into(),
            subnet: "10.199.0.0/24".into(),
            conf_dir: dir.path().join("cni"),
            ipam_dir: dir.path().join("ipam"),
        };
        let path = bridge.write().unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let plugin = &config["plugins"][0];
        assert_eq!(plugin["bridge"], "clst-test0");
        assert_eq!(plugin["isGateway"], false);
        assert_eq!(
            plugin["ipam"]["dataDir"],
            dir.path().join("ipam").display().to_string()
        );
    }
}
