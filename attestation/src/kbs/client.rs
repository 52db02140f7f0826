//! The KBS client the guest agent uses: auth, attest with evidence bound to
//! the challenge and a fresh TEE key, then fetch and decrypt resources.

use super::attester::{Attester, AttesterError};
use super::jwe::{self, JweError};
use super::protocol::{
    report_data, Attestation, Challenge, CompositeEvidence, ErrorInformation, ProtocolError,
    Request, RuntimeData, TeeKeyPair, WireInitData, PROTOCOL_VERSION, SESSION_COOKIE,
};
use super::store::{check_segment, StoreError};
use super::tls::{client_config, client_config_trusting_nothing, install_ring_provider, TlsError};
use thiserror::Error;

/// Errors from the client.
#[derive(Debug, Error)]
pub enum KbsClientError {
    /// Transport failure.
    #[error("kbs request to {url} failed: {source}")]
    Http {
        /// URL.
        url: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// The KBS refused.
    #[error("kbs refused {url} with status {status}: {detail}")]
    Refused {
        /// URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The KBS's error detail.
        detail: String,
    },
    /// Unexpected response body.
    #[error("kbs response from {url} is malformed: {reason}")]
    Malformed {
        /// URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No session cookie in the challenge response.
    #[error("kbs challenge came without a kbs-session-id cookie")]
    NoCookie,
    /// Protocol helper failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Evidence could not be produced.
    #[error(transparent)]
    Attester(#[from] AttesterError),
    /// Resource could not be decrypted.
    #[error(transparent)]
    Jwe(#[from] JweError),
    /// Bad resource path.
    #[error(transparent)]
    Path(#[from] StoreError),
    /// Resource requested before attesting.
    #[error("no attested session: call attest first")]
    NotAttested,
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A client bound to one KBS.
#[derive(Debug)]
pub struct KbsClient {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
    key: Option<TeeKeyPair>,
    token: Option<String>,
}

impl KbsClient {
    /// A client for `base_url`: `http://` (loopback tests) or `https://`
    /// with a certificate from the system's trusted roots.
    pub fn new(base_url: &str) -> Self {
        install_ring_provider();
        Self::with_http(base_url, reqwest::Client::new())
    }

    /// A client for an `https://` KBS whose certificate chains to one of the
    /// CA certificates in `ca_pem` (and to nothing else).
    pub fn with_ca(base_url: &str, ca_pem: &[u8]) -> Result<Self, KbsClientError> {
        let tls = client_config(ca_pem)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .build()
            .map_err(|source| KbsClientError::Http {
                url: base_url.to_owned(),
                source,
            })?;
        Ok(Self::with_http(base_url, http))
    }

    /// A client as a guest builds it from its init-data: `https://` trusting
    /// exactly `ca_pem` (plain `http://` when none is given), and every
    /// connection made over the Unix socket `via` when set (a forwarder to
    /// the KBS, e.g. over vsock); TLS still runs end to end to the URL's
    /// host name, so the forwarder only sees ciphertext.
    pub fn for_guest(
        base_url: &str,
        ca_pem: Option<&[u8]>,
        via: Option<&std::path::Path>,
    ) -> Result<Self, KbsClientError> {
        install_ring_provider();
        let builder = match ca_pem {
            Some(ca) => reqwest::Client::builder()
                .tls_backend_preconfigured(client_config(ca)?)
                .https_only(true),
            None => reqwest::Client::builder()
                .tls_backend_preconfigured(client_config_trusting_nothing()?),
        };
        let builder = match via {
            Some(path) => builder.unix_socket(path),
            None => builder,
        };
        let http = builder.build().map_err(|source| KbsClientError::Http {
            url: base_url.to_owned(),
            source,
        })?;
        Ok(Self::with_http(base_url, http))
    }

    fn with_http(base_url: &str, http: reqwest::Client) -> Self {
        Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            cookie: None,
            key: None,
            token: None,
        }
    }

    /// The token from the last successful attestation.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn post(&self, path: &str, body: String) -> Result<reqwest::Response, KbsClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(c) = &self.cookie {
            req = req.header(reqwest::header::COOKIE, format!("{SESSION_COOKIE}={c}"));
        }
        let resp = req.send().await.map_err(|source| KbsClientError::Http {
            url: url.clone(),
            source,
        })?;
        check_status(url, resp).await
    }

    /// Runs auth + attest with a fresh EC key; `init_data` is the raw TOML
    /// the guest was launched with, if any.
    pub async fn attest(
        &mut self,
        attester: &dyn Attester,
        init_data: Option<&str>,
    ) -> Result<String, KbsClientError> {
        self.attest_with_key(attester, init_data, TeeKeyPair::generate_ec())
            .await
    }

    /// As [`attest`](Self::attest) with a given key (RSA or EC).
    pub async fn attest_with_key(
        &mut self,
        attester: &dyn Attester,
        init_data: Option<&str>,
        key: TeeKeyPair,
    ) -> Result<String, KbsClientError> {
        self.cookie = None;
        let request = Request {
            version: PROTOCOL_VERSION.into(),
            tee: attester.tee(),
            extra_params: serde_json::Value::String(String::new()),
        };
        let body = serde_json::to_string(&request).map_err(|e| KbsClientError::Malformed {
            url: "request".into(),
            reason: e.to_string(),
        })?;
        let resp = self.post("/kbs/v0/auth", body).await?;
        let cookie = resp
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                let first = v.split(';').next()?;
                let (k, val) = first.trim().split_once('=')?;
                (k == SESSION_COOKIE).then(|| val.to_owned())
            })
            .ok_or(KbsClientError::NoCookie)?;
        let url = format!("{}/kbs/v0/auth", self.base);
        let challenge: Challenge = resp.json().await.map_err(|e| KbsClientError::Malformed {
            url,
            reason: e.to_string(),
        })?;
        self.cookie = Some(cookie);

        let tee_pubkey = key.public_jwk();
        let additional_evidence = String::new();
        let rd = report_data(&challenge.nonce, &tee_pubkey, &additional_evidence)?;
        let attestation = Attestation {
            init_data: init_data.map(|body| WireInitData {
                format: "toml".into(),
                body: body.to_owned(),
            }),
            runtime_data: RuntimeData {
                nonce: challenge.nonce,
                tee_pubkey,
            },
            tee_evidence: CompositeEvidence {
                primary_evidence: attester.evidence(&rd)?,
                additional_evidence,
            },
        };
        let body = serde_json::to_string(&attestation).map_err(|e| KbsClientError::Malformed {
            url: "attestation".into(),
            reason: e.to_string(),
        })?;
        let resp = self.post("/kbs/v0/attest", body).await?;
        let url = format!("{}/kbs/v0/attest", self.base);
        let value: serde_json::Value =
            resp.json().await.map_err(|e| KbsClientError::Malformed {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let token = value
            .get("token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| KbsClientError::Malformed {
                url,
                reason: "no token".into(),
            })?
            .to_owned();
        self.key = Some(key);
        self.token = Some(token.clone());
        Ok(token)
    }

    /// Fetches and decrypts `<repo>/<type>/<tag>`.
    pub async fn get_resource(&self, path: &str) -> Result<Vec<u8>, KbsClientError> {
        let key = self.key.as_ref().ok_or(KbsClientError::NotAttested)?;
        for segment in path.split('/') {
            check_segment(segment)?;
        }
        let url = format!("{}/kbs/v0/resource/{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(c) = &self.cookie {
            req = req.header(reqwest::header::COOKIE, format!("{SESSION_COOKIE}={c}"));
        }
        let resp = req.send().await.map_err(|source| KbsClientError::Http {
            url: url.clone(),
            source,
        })?;
        let resp = check_status(url.clone(), resp).await?;
        let jwe: serde_json::Value = resp.json().await.map_err(|e| KbsClientError::Malformed {
            url,
            reason: e.to_string(),
        })?;
        Ok(jwe::decrypt(&jwe, key)?)
    }
}

async fn check_status(
    url: String,
    resp: reqwest::Response,
) -> Result<reqwest::Response, KbsClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<ErrorInformation>(&text)
        .map(|e| e.detail)
        .unwrap_or(text);
    Err(KbsClientError::Refused {
        url,
        status: status.as_u16(),
        detail,
    })
}
