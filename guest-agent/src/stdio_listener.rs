//! Accepts stdio stream connections, reads their header, asks the agent
//! policy (`ReadStreamRequest` / `WriteStreamRequest`), attaches them to a
//! process's stdio and copies until EOF.

use std::sync::Arc;
use std::time::Duration;

use cloister_protocol::stdio::{AttachReply, StreamHeader, StreamKind, FIXED_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::container::manager::ContainerManager;
use crate::policy::{AgentPolicy, StreamRequest};

/// Errors on one stdio connection.
#[derive(Debug, thiserror::Error)]
pub enum StdioStreamError {
    #[error("read stdio header: {0}")]
    Read(std::io::Error),
    #[error("stdio header did not arrive within 10 s")]
    Timeout,
    #[error(transparent)]
    Header(#[from] cloister_protocol::stdio::StdioHeaderError),
}

async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<StreamHeader, StdioStreamError> {
    let read = async {
        let mut fixed = [0u8; FIXED_LEN];
        stream
            .read_exact(&mut fixed)
            .await
            .map_err(StdioStreamError::Read)?;
        let pending = StreamHeader::parse_fixed(&fixed)?;
        let mut body = vec![0u8; pending.body_len()];
        stream
            .read_exact(&mut body)
            .await
            .map_err(StdioStreamError::Read)?;
        Ok(pending.finish(&body)?)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| StdioStreamError::Timeout)?
}

/// Serves one connection: header, reply, then the copy.
pub async fn serve_connection<S>(
    manager: Arc<ContainerManager>,
    policy: Arc<AgentPolicy>,
    mut stream: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header = match read_header(&mut stream).await {
        Ok(h) => h,
        Err(e) => {
            let _ = stream
                .write_all(&AttachReply::Refused(e.to_string()).encode())
                .await;
            return;
        }
    };
    let request = StreamRequest {
        container_id: header.container_id.clone(),
        exec_id: header.exec_id.clone(),
        kind: header.kind,
    };
    if let Err(denial) = policy.check_stream(&request) {
        tracing::warn!(%denial, "policy denied a stdio stream");
        let _ = stream
            .write_all(&AttachReply::Refused(denial.to_string()).encode())
            .await;
        return;
    }
    let attached = manager
        .get(&header.container_id)
        .and_then(|c| c.process(&header.exec_id))
        .and_then(|p| Ok((p.stdio.take(header.kind)?, p)));
    let (fd, process) = match attached {
        Ok(pair) => pair,
        Err(e) => {
            let _ = stream
                .write_all(&AttachReply::Refused(e.to_string()).encode())
                .await;
            return;
        }
    };
    if stream
        .write_all(&AttachReply::Attached.encode())
        .await
        .is_err()
    {
        return;
    }
    let result = match header.kind {
        StreamKind::Stdin => process.stdio.pump_stdin(fd, stream).await,
        StreamKind::Stdout | StreamKind::Stderr => crate::io::pump_output(fd, stream).await,
    };
    match result {
        Ok(bytes) => {
            tracing::debug!(container = %header.container_id, exec = %header.exec_id, kind = %header.kind, bytes, "stdio stream done")
        }
        Err(e) => {
            tracing::warn!(container = %header.container_id, exec = %header.exec_id, kind = %header.kind, error = %e, "stdio stream failed")
        }
    }
}

/// Accept loop on a Unix socket (host tests, hybrid vsock ports).
pub async fn serve_unix(
    manager: Arc<ContainerManager>,
    policy: Arc<AgentPolicy>,
    listener: tokio::net::UnixListener,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(manager.clone(), policy.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on stdio socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accept loop on AF_VSOCK (in the guest).
pub async fn serve_vsock(
    manager: Arc<ContainerManager>,
    policy: Arc<AgentPolicy>,
    listener: tokio_vsock::VsockListener,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(manager.clone(), policy.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on stdio vsock failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
