//! The shim's side of the agent: the `AgentClient` trait the task service
//! calls, and its real implementation — ttrpc over hybrid vsock.
//!
//! Hybrid vsock (Firecracker's scheme, served by our VMM and by our
//! vhost-user vsock backend alike): the VM's vsock device is a Unix socket
//! on the host. To reach guest port P the host connects, writes
//! `CONNECT P\n`, reads `OK <host_port>\n`, and from then on the Unix stream
//! is the guest connection. Until the guest agent listens, the VMM refuses
//! or closes such connections, so [`AgentEndpoint::connect_until`] retries
//! until a deadline.
//!
//! For host tests the agent listens on plain Unix sockets
//! (`cloister-agent --listen unix:PATH`, stdio on `PATH.stdio`):
//! [`AgentEndpoint::Unix`] reaches it without the handshake.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use cloister_protocol::ports::{AGENT_VSOCK_PORT, STDIO_VSOCK_PORT};
use cloister_protocol::stdio::{AttachReply, StreamHeader, StreamKind, REPLY_FIXED_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The longest `OK <port>\n` line we accept.
const MAX_HANDSHAKE_LINE: usize = 64;
/// Each RPC's deadline; Wait-like calls are not RPCs here (exits come as events).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake on {path} for port {port}: {reason}")]
    Handshake {
        path: PathBuf,
        port: u32,
        reason: String,
    },
    #[error("agent not reachable at {endpoint} within {waited:?}: {last}")]
    Deadline {
        endpoint: String,
        waited: Duration,
        last: String,
    },
    #[error("agent {method}: {message}")]
    Rpc {
        method: &'static str,
        code: Option<ttrpc::Code>,
        message: String,
    },
    #[error("stdio stream {kind} of {container_id}/{exec_id}: {reason}")]
    Stdio {
        container_id: String,
        exec_id: String,
        kind: StreamKind,
        reason: String,
    },
}

impl AgentError {
    fn rpc(method: &'static str, err: ttrpc::Error) -> Self {
        match err {
            ttrpc::Error::RpcStatus(status) => AgentError::Rpc {
                method,
                code: Some(status.code()),
                message: status.message().to_owned(),
            },
            other => AgentError::Rpc {
                method,
                code: None,
                message: other.to_string(),
            },
        }
    }

    /// The ttrpc code the agent answered with, if it answered.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Rpc { code, .. } => *code,
            _ => None,
        }
    }
}

/// What the task service needs from the guest agent. One implementation
/// talks ttrpc to the real agent; unit tests use a fake.
#[async_trait]
pub trait AgentClient: Send + Sync {
    async fn setup_sandbox(&self, req: agent::SetupSandboxRequest) -> Result<(), AgentError>;
    /// Gives the guest the pod's interfaces (matched by MAC), then its
    /// routes.
    async fn update_network(
        &self,
        interfaces: agent::UpdateInterfacesRequest,
        routes: agent::UpdateRoutesRequest,
    ) -> Result<(), AgentError>;
    /// Returns the init process's pid in the guest.
    async fn create_container(&self, req: agent::CreateContainerRequest)
        -> Result<u32, AgentError>;
    async fn start_container(&self, container_id: &str) -> Result<(), AgentError>;
    async fn remove_container(&self, container_id: &str, force: bool) -> Result<(), AgentError>;
    /// Returns the exec'd process's pid in the guest.
    async fn exec_process(&self, req: agent::ExecProcessRequest) -> Result<u32, AgentError>;
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError>;
    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError>;
    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError>;
    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError>;
    async fn list_processes(
        &self,
        container_id: &str,
    ) -> Result<Vec<agent::ProcessInfo>, AgentError>;
    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsContainerResponse, AgentError>;
    async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError>;
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// Exits and OOM kills from now on, in order; the channel closes when
    /// the agent connection ends. Unbounded: a relay that waited for a slow
    /// consumer would stall the ttrpc connection the RPCs share.
    async fn events(&self) -> Result<mpsc::UnboundedReceiver<agent::Event>, AgentError>;
    async fn shutdown(&self) -> Result<(), AgentError>;
    /// Opens one stdio stream of a process (see `cloister_protocol::stdio`).
    async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, AgentError>;
}

/// How the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// The VMM's hybrid vsock socket.
    HybridVsock { uds: PathBuf },
    /// The agent's own Unix sockets (host test mode).
    Unix { agent: PathBuf },
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::HybridVsock { uds } => write!(f, "hybrid vsock {}", uds.display()),
            AgentEndpoint::Unix { agent } => write!(f, "unix {}", agent.display()),
        }
    }
}

impl AgentEndpoint {
    /// One connection to a guest port.
    pub async fn open(&self, port: u32) -> Result<UnixStream, AgentError> {
        match self {
            AgentEndpoint::HybridVsock { uds } => hybrid_vsock_connect(uds, port).await,
            AgentEndpoint::Unix { agent } => {
                let path = if port == STDIO_VSOCK_PORT {
                    PathBuf::from(format!("{}.stdio", agent.display()))
                } else {
                    agent.clone()
                };
                UnixStream::connect(&path)
                    .await
                    .map_err(|source| AgentError::Connect { path, source })
            }
        }
    }

    /// Connects the ttrpc client and checks the agent answers, retrying
    /// until `timeout` has passed.
    pub async fn connect_until(&self, timeout: Duration) -> Result<TtrpcAgentClient, AgentError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let last = match self.try_connect().await {
                Ok(client) => return Ok(client),
                Err(e) => e.to_string(),
            };
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(AgentError::Deadline {
                    endpoint: self.to_string(),
                    waited,
                    last,
                });
            }
            tokio::time::sleep(pause.min(timeout.saturating_sub(waited))).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    async fn try_connect(&self) -> Result<TtrpcAgentClient, AgentError> {
        let stream = self.open(AGENT_VSOCK_PORT).await?;
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        let client = TtrpcAgentClient {
            client: AgentServiceClient::new(ttrpc::r#async::Client::new(socket)),
            endpoint: self.clone(),
        };
        let health = client
            .client
            .health_check(
                ctx_with(Duration::from_secs(5)),
                &agent::HealthCheckRequest::new(),
            )
            .await
            .map_err(|e| AgentError::rpc("HealthCheck", e))?;
        if !health.serving {
            return Err(AgentError::Rpc {
                method: "HealthCheck",
                code: None,
                message: "agent not serving yet".into(),
            });
        }
        Ok(client)
    }
}

/// `CONNECT <port>\n` → `OK <host_port>\n` on the VMM's Unix socket.
pub async fn hybrid_vsock_connect(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| AgentError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
    let handshake_error = |reason: String| AgentError::Handshake {
        path: uds.to_path_buf(),
        port,
        reason,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| handshake_error(format!("write: {e}")))?;
    // Byte by byte: whatever follows the newline already belongs to the
    // guest's stream.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| handshake_error(format!("read: {e}")))?;
        if n == 0 {
            return Err(handshake_error(format!(
                "closed after {:?} (guest not listening yet?)",
                String::from_utf8_lossy(&line)
            )));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(handshake_error(format!(
                "reply longer than {MAX_HANDSHAKE_LINE} bytes"
            )));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|p| p.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(handshake_error(format!("unexpected reply {text:?}")));
    }
    Ok(stream)
}

/// Opens a stdio stream on an already connected stream: header, reply.
pub async fn attach_stdio(
    mut stream: UnixStream,
    container_id: &str,
    exec_id: &str,
    kind: StreamKind,
) -> Result<UnixStream, AgentError> {
    let fail = |reason: String| AgentError::Stdio {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        kind,
        reason,
    };
    let header = StreamHeader {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        kind,
    }
    .encode()
    .map_err(|e| fail(e.to_string()))?;
    stream
        .write_all(&header)
        .await
        .map_err(|e| fail(format!("write header: {e}")))?;
    let mut fixed = [0u8; REPLY_FIXED_LEN];
    stream
        .read_exact(&mut fixed)
        .await
        .map_err(|e| fail(format!("read reply: {e}")))?;
    let (attached, len) = AttachReply::parse_fixed(&fixed).map_err(|e| fail(e.to_string()))?;
    let mut message = vec![0u8; len];
    stream
        .read_exact(&mut message)
        .await
        .map_err(|e| fail(format!("read reply: {e}")))?;
    if !attached {
        return Err(fail(format!(
            "refused: {}",
            String::from_utf8_lossy(&message)
        )));
    }
    Ok(stream)
}

fn ctx_with(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

fn ctx() -> ttrpc::context::Context {
    ctx_with(RPC_TIMEOUT)
}

/// The real agent over ttrpc.
#[derive(Clone)]
pub struct TtrpcAgentClient {
    client: AgentServiceClient,
    endpoint: AgentEndpoint,
}

impl TtrpcAgentClient {
    /// Installs the pod's agent policy (see `crate::pod_policy`). Not in
    /// [`AgentClient`]: only the launcher calls it, once, before
    /// SetupSandbox.
    pub async fn set_policy(&self, rego: String) -> Result<(), AgentError> {
        let mut req = agent::SetPolicyRequest::new();
        req.policy = rego;
        self.client
            .set_policy(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("SetPolicy", e))
    }
}

#[async_trait]
impl AgentClient for TtrpcAgentClient {
    async fn setup_sandbox(&self, req: agent::SetupSandboxRequest) -> Result<(), AgentError> {
        self.client
            .setup_sandbox(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("SetupSandbox", e))
    }

    async fn update_network(
        &self,
        interfaces: agent::UpdateInterfacesRequest,
        routes: agent::UpdateRoutesRequest,
    ) -> Result<(), AgentError> {
        self.client
            .update_interfaces(ctx(), &interfaces)
            .await
            .map_err(|e| AgentError::rpc("UpdateInterfaces", e))?;
        self.client
            .update_routes(ctx(), &routes)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("UpdateRoutes", e))
    }

    async fn create_container(
        &self,
        req: agent::CreateContainerRequest,
    ) -> Result<u32, AgentError> {
        self.client
            .create_container(ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(|e| AgentError::rpc("CreateContainer", e))
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = container_id.into();
        self.client
            .start_container(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("StartContainer", e))
    }

    async fn remove_container(&self, container_id: &str, force: bool) -> Result<(), AgentError> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = container_id.into();
        req.force = force;
        self.client
            .remove_container(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("RemoveContainer", e))
    }

    async fn exec_process(&self, req: agent::ExecProcessRequest) -> Result<u32, AgentError> {
        self.client
            .exec_process(ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(|e| AgentError::rpc("ExecProcess", e))
    }

    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        self.client
            .signal_process(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("SignalProcess", e))
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let mut req = agent::PauseContainerRequest::new();
        req.container_id = container_id.into();
        self.client
            .pause_container(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("PauseContainer", e))
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let mut req = agent::ResumeContainerRequest::new();
        req.container_id = container_id.into();
        self.client
            .resume_container(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("ResumeContainer", e))
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let mut req = agent::UpdateContainerRequest::new();
        req.container_id = container_id.into();
        req.resources_json = resources_json;
        self.client
            .update_container(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("UpdateContainer", e))
    }

    async fn list_processes(
        &self,
        container_id: &str,
    ) -> Result<Vec<agent::ProcessInfo>, AgentError> {
        let mut req = agent::ListProcessesRequest::new();
        req.container_id = container_id.into();
        self.client
            .list_processes(ctx(), &req)
            .await
            .map(|r| r.processes)
            .map_err(|e| AgentError::rpc("ListProcesses", e))
    }

    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsContainerResponse, AgentError> {
        let mut req = agent::StatsContainerRequest::new();
        req.container_id = container_id.into();
        self.client
            .stats_container(ctx(), &req)
            .await
            .map_err(|e| AgentError::rpc("StatsContainer", e))
    }

    async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let mut req = agent::ResizeTtyRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        req.rows = rows;
        req.columns = columns;
        self.client
            .resize_tty(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("ResizeTty", e))
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = container_id.into();
        req.exec_id = exec_id.into();
        self.client
            .close_stdin(ctx(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("CloseStdin", e))
    }

    async fn events(&self) -> Result<mpsc::UnboundedReceiver<agent::Event>, AgentError> {
        // No deadline: the stream lives as long as the sandbox.
        let mut stream = self
            .client
            .events(
                ttrpc::context::Context::default(),
                &agent::EventsRequest::new(),
            )
            .await
            .map_err(|e| AgentError::rpc("Events", e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match stream.recv().await {
                    Ok(Some(event)) => {
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!("agent event stream ended: {e}");
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn shutdown(&self) -> Result<(), AgentError> {
        self.client
            .shutdown(
                ctx_with(Duration::from_secs(10)),
                &agent::ShutdownRequest::new(),
            )
            .await
            .map(drop)
            .map_err(|e| AgentError::rpc("Shutdown", e))
    }

    async fn open_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, AgentError> {
        let stream = self.endpoint.open(STDIO_VSOCK_PORT).await?;
        attach_stdio(stream, container_id, exec_id, kind).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A stand-in for the VMM's hybrid vsock socket: answers `reply` to the
    /// first line, then echoes.
    fn fake_vmm(path: &Path, reply: &'static str) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let mut stream = reader.into_inner();
            stream.write_all(reply.as_bytes()).await.unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            vec![line, String::from_utf8_lossy(&rest).into_owned()]
        })
    }

    #[tokio::test]
    async fn handshake_sends_connect_and_keeps_bytes_after_ok() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let server = fake_vmm(&uds, "OK 1073741824\nguest bytes");
        let mut stream = hybrid_vsock_connect(&uds, 1024).await.unwrap();
        let mut first = [0u8; 11];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"guest bytes");
        stream.write_all(b"to guest").await.unwrap();
        drop(stream);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            vec!["CONNECT 1024\n".to_string(), "to guest".to_string()]
        );
    }

    #[tokio::test]
    async fn handshake_with_bad_reply_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let _server = fake_vmm(&uds, "NO\n");
        let err = hybrid_vsock_connect(&uds, 1025).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("port 1025") && text.contains("\"NO\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn handshake_closed_by_vmm_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        // Closed before a reply: EOF or a reset, depending on timing.
        let err = hybrid_vsock_connect(&uds, 1024).await.unwrap_err();
        assert!(matches!(err, AgentError::Handshake { .. }), "{err}");
    }

    #[tokio::test]
    async fn connect_until_gives_up_at_deadline_with_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = AgentEndpoint::HybridVsock {
            uds: dir.path().join("missing.sock"),
        };
        let started = Instant::now();
        let err = endpoint
            .connect_until(Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(3));
        let text = err.to_string();
        assert!(
            text.contains("missing.sock") && text.contains("within"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn attach_stdio_reads_refusal_reason() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let agent = tokio::spawn(async move {
            let mut header = vec![0u8; 8 + 2 + 1];
            theirs.read_exact(&mut header).await.unwrap();
            let decoded = StreamHeader::decode(&header).unwrap();
            theirs
                .write_all(&AttachReply::Refused("no such process".into()).encode())
                .await
                .unwrap();
            decoded
        });
        let err = attach_stdio(ours, "c1", "e", StreamKind::Stdout)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("refused: no such process"),
            "{err}"
        );
        let header = agent.await.unwrap();
        assert_eq!(
            (header.container_id.as_str(), header.exec_id.as_str()),
            ("c1", "e")
        );
        assert_eq!(header.kind, StreamKind::Stdout);
    }

    #[tokio::test]
    async fn unix_endpoint_maps_stdio_port_to_dot_stdio_socket() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent.sock");
        let _stdio = UnixListener::bind(dir.path().join("agent.sock.stdio")).unwrap();
        let endpoint = AgentEndpoint::Unix {
            agent: agent.clone(),
        };
        endpoint.open(STDIO_VSOCK_PORT).await.unwrap();
        let err = endpoint.open(AGENT_VSOCK_PORT).await.unwrap_err();
        assert!(err.to_string().contains("agent.sock"), "{err}");
    }
}
