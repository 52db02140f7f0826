//! Forwards the guest's KBS connections to the KBS: the agent dials host
//! vsock port P (init-data `cloister.toml` `kbs.vsock_port`), which hybrid
//! vsock delivers to the Unix socket `<vsock uds>_<P>`; each connection
//! there is copied to and from a TCP connection to the KBS.
//!
//! Why vsock and not the pod network: a guest reaches it under every
//! hypervisor backend without a route, tap or DNS, and the KBS need not be
//! reachable from the pod network. The host learns nothing by it: the
//! bytes are TLS to the KBS's name (https), or for plain http a protocol
//! whose resources are JWE-encrypted to the guest's ephemeral TEE key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::task::JoinHandle;

#[derive(Debug, Error)]
pub enum KbsForwardError {
    #[error("cannot listen for kbs connections on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every byte the forwarder carried, both directions in arrival order
/// (tests search it for secrets).
pub type Transcript = Arc<Mutex<Vec<u8>>>;

/// A running forwarder; stops (and removes its socket) on drop.
#[derive(Debug)]
pub struct KbsForwarder {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl KbsForwarder {
    /// Listens on `path` and forwards to `kbs` (`host:port`); copies what
    /// it carries into `transcript` when given. `owner` (uid, gid) is the
    /// jailed VMM's, which must be able to connect to the socket.
    pub fn spawn(
        path: &Path,
        kbs: String,
        transcript: Option<Transcript>,
        owner: Option<(u32, u32)>,
    ) -> Result<Self, KbsForwardError> {
        let _ = std::fs::remove_file(path);
        let listen_error = |source| KbsForwardError::Listen {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(listen_error)?;
        }
        let task = tokio::spawn(async move {
            loop {
                let (guest, _) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!("kbs forwarder: accept: {e}");
                        return;
                    }
                };
                let kbs = kbs.clone();
                let transcript = transcript.clone();
                tokio::spawn(async move {
                    match TcpStream::connect(&kbs).await {
                        Ok(upstream) => forward(guest, upstream, transcript).await,
                        Err(e) => tracing::warn!("kbs forwarder: connect to {kbs}: {e}"),
                    }
                });
            }
        });
        Ok(Self {
            task,
            path: path.to_owned(),
        })
    }

    /// The Unix socket the guest's connections arrive on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KbsForwarder {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn copy_one_way<R, W>(mut from: R, mut to: W, transcript: Option<Transcript>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(t) = &transcript {
            if let Ok(mut t) = t.lock() {
                t.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn forward(guest: tokio::net::UnixStream, kbs: TcpStream, transcript: Option<Transcript>) {
    let (guest_read, guest_write) = guest.into_split();
    let (kbs_read, kbs_write) = kbs.into_split();
    tokio::join!(
        copy_one_way(guest_read, kbs_write, transcript.clone()),
        copy_one_way(kbs_read, guest_write, transcript),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, UnixStream};

    #[tokio::test]
    async fn bytes_flow_both_ways_and_are_recorded() {
        let kbs = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let kbs_addr = kbs.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut conn, _) = kbs.accept().await.unwrap();
            let mut request = [0u8; 5];
            conn.read_exact(&mut request).await.unwrap();
            assert_eq!(&request, b"hello");
            conn.write_all(b"world").await.unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock_1026");
        let transcript = Transcript::default();
        let forwarder =
            KbsForwarder::spawn(&path, kbs_addr, Some(transcript.clone()), None).unwrap();
        let mut guest = UnixStream::connect(forwarder.path()).await.unwrap();
        guest.write_all(b"hello").await.unwrap();
        let mut reply = Vec::new();
        guest.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"world");
        assert_eq!(transcript.lock().unwrap().as_slice(), b"helloworld");
        drop(forwarder);
        assert!(!path.exists(), "socket left behind");
    }

    #[tokio::test]
    async fn unreachable_kbs_closes_the_guest_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fwd");
        // Port 1 on loopback: nothing listens.
        let forwarder = KbsForwarder::spawn(&path, "127.0.0.1:1".into(), None, None).unwrap();
        let mut guest = UnixStream::connect(forwarder.path()).await.unwrap();
        let mut reply = Vec::new();
        guest.read_to_end(&mut reply).await.unwrap();
        assert!(reply.is_empty());
    }
}
