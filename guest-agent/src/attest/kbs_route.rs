//! The guest's route to a KBS on host vsock port P (init-data
//! `cloister.toml` `kbs.vsock_port`): a Unix socket in the guest whose
//! every connection is joined to a new vsock connection to the host
//! (CID 2), where the shim forwards it to the KBS. The KBS client makes
//! its HTTP(S) connections over that socket (reqwest `unix_socket`), so TLS
//! still runs to the KBS's own name and the host carries ciphertext only.

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_vsock::{VsockAddr, VsockStream};

use super::AttestError;

/// The host's vsock CID.
const HOST_CID: u32 = 2;

/// A running route; stops on drop.
#[derive(Debug)]
pub struct VsockKbsRoute {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl VsockKbsRoute {
    /// Listens on `path` and joins each connection to host vsock `port`.
    pub fn start(path: &Path, port: u32) -> Result<Self, AttestError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| AttestError::Io {
            what: format!("listen on {}", path.display()),
            source,
        })?;
        let task = tokio::spawn(async move {
            while let Ok((mut local, _)) = listener.accept().await {
                tokio::spawn(async move {
                    match VsockStream::connect(VsockAddr::new(HOST_CID, port)).await {
                        Ok(mut host) => {
                            let _ = tokio::io::copy_bidirectional(&mut local, &mut host).await;
                        }
                        Err(e) => {
                            tracing::warn!("kbs route: vsock connect to host port {port}: {e}")
                        }
                    }
                });
            }
        });
        Ok(Self {
            path: path.to_owned(),
            task,
        })
    }

    /// The socket the KBS client connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VsockKbsRoute {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
