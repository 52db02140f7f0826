//! HTTPS for `cloister-kbs` and its client: rustls with the `ring` provider
//! (no C crypto libraries beyond ring's own), server certificate and key from
//! PEM files, and a client that trusts exactly the CA it is given.
//!
//! TLS handshakes run in their own tasks so one slow client cannot stall the
//! accept loop; finished connections are handed to axum through a channel.
//! The server half needs the `kbs-server` feature.

#[cfg(feature = "kbs-server")]
use axum::extract::connect_info::Connected;
#[cfg(feature = "kbs-server")]
use axum::serve::{IncomingStream, Listener};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
#[cfg(feature = "kbs-server")]
use rustls_pki_types::PrivateKeyDer;
#[cfg(feature = "kbs-server")]
use std::net::SocketAddr;
#[cfg(feature = "kbs-server")]
use std::path::Path;
use std::sync::Arc;
#[cfg(feature = "kbs-server")]
use std::time::Duration;
use thiserror::Error;
#[cfg(feature = "kbs-server")]
use tokio::net::{TcpListener, TcpStream};
#[cfg(feature = "kbs-server")]
use tokio::sync::mpsc;
#[cfg(feature = "kbs-server")]
use tokio_rustls::server::TlsStream;
#[cfg(feature = "kbs-server")]
use tokio_rustls::TlsAcceptor;

#[cfg(feature = "kbs-server")]
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from TLS setup.
#[derive(Debug, Error)]
pub enum TlsError {
    /// PEM unreadable.
    #[error("{what} pem {path} cannot be read: {reason}")]
    Pem {
        /// Certificate or key.
        what: &'static str,
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    /// No certificate in the file.
    #[error("no certificate in {0}")]
    NoCertificate(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide rustls provider unless one is installed, so
/// that `reqwest::Client::new()` (system roots) works without aws-lc.
pub fn install_ring_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(feature = "kbs-server")]
/// Server configuration from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |what, path: &Path, reason: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err("certificate", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err("certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("key", key, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Client configuration trusting only the CA certificates in `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| TlsError::Pem {
            what: "ca certificate",
            path: "<memory>".into(),
            reason: e.to_string(),
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate("ca bundle".into()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client config that trusts nothing: for a plain-http client, which
/// must not go looking for a system trust store (a guest has none).
pub fn client_config_trusting_nothing() -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// A listener yielding TLS streams, for `axum::serve`.
#[cfg(feature = "kbs-server")]
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

#[cfg(feature = "kbs-server")]
impl TlsListener {
    /// Accepts TCP on `tcp` and completes handshakes with `config`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("tcp accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!("tls handshake with {peer} failed: {e}"),
                        Err(_) => tracing::info!("tls handshake with {peer} timed out"),
                    }
                });
            }
        });
        Ok(Self {
            incoming: rx,
            local,
        })
    }
}

#[cfg(feature = "kbs-server")]
impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(feature = "kbs-server")]
/// The client's address, over plain TCP or TLS.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

#[cfg(feature = "kbs-server")]
impl Connected<IncomingStream<'_, TcpListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

#[cfg(feature = "kbs-server")]
impl Connected<IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}
