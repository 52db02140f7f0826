//! The HTTP side of `cloister-kbs`: the three RCAR endpoints over axum.
//!
//! Session life: `auth` creates a session in state *challenged* (nonce,
//! TEE type, short deadline). `attest` consumes the challenge whatever the
//! outcome, so an attestation can be presented once only (a replay finds no
//! outstanding challenge); on success the session becomes *attested* with the
//! TEE key and claims until its deadline. `resource` needs an attested session
//! (cookie) or a valid token (bearer), then the resource policy, then the
//! store; the answer is a JWE to the TEE key. Every decision is audited.

use super::audit::{AuditLog, AuditRecord};
use super::config::{Decision, KbsPolicy};
use super::jwe;
use super::protocol::{
    report_data, Attestation, Challenge, ErrorInformation, Request, Tee, TeePubKey, TeePublicKey,
    SESSION_COOKIE,
};
use super::store::{check_segment, ResourceStore, StoreError};
use super::tls::{PeerAddr, TlsListener};
use super::token::{ClaimsWire, TokenClaims, TokenSigner};
use super::verifier::{verify_evidence, Claims};
use crate::initdata::InitData;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand_core::RngCore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Upper bound on live sessions; beyond it expired ones are purged and new
/// requests are refused.
const MAX_SESSIONS: usize = 10_000;
/// How long a challenge may stay unanswered.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);
const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// Server settings.
#[derive(Debug)]
pub struct KbsSettings {
    /// Reference values and resource policy.
    pub policy: KbsPolicy,
    /// Resource store.
    pub store: ResourceStore,
    /// Accept the `sample` TEE (tests only: it proves nothing).
    pub allow_sample: bool,
    /// Lifetime of an attested session and its token.
    pub session_ttl: Duration,
    /// Audit trail.
    pub audit: AuditLog,
}

enum SessionState {
    Challenged { nonce: String },
    Attested { key: TeePublicKey, claims: Claims },
}

struct Session {
    tee: Tee,
    state: SessionState,
    deadline: Instant,
}

/// Shared server state.
pub struct KbsServer {
    settings: KbsSettings,
    sessions: Mutex<HashMap<String, Session>>,
    signer: TokenSigner,
}

impl std::fmt::Debug for KbsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KbsServer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand_core::OsRng.fill_bytes(&mut b);
    STANDARD.encode(b)
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand_core::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = ErrorInformation {
        error_type: format!("{ERROR_TYPE_PREFIX}{kind}"),
        detail: detail.to_owned(),
    };
    (status, axum::Json(body)).into_response()
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == SESSION_COOKIE).then(|| v.to_owned())
        })
}

fn set_cookie(resp: &mut Response, id: &str) {
    if let Ok(value) = HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly")) {
        resp.headers_mut().insert(header::SET_COOKIE, value);
    }
}

fn tee_name(tee: Tee) -> String {
    tee.to_string()
}

impl KbsServer {
    /// A server with fresh sessions and a fresh token key.
    pub fn new(settings: KbsSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            sessions: Mutex::new(HashMap::new()),
            signer: TokenSigner::default(),
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        peer: SocketAddr,
        session: &str,
        action: &str,
        tee: &str,
        target: &str,
        allowed: bool,
        reason: &str,
    ) {
        self.settings.audit.record(AuditRecord {
            ts: 0,
            peer: peer.to_string(),
            session,
            action,
            tee,
            target,
            decision: if allowed { "allow" } else { "deny" },
            reason,
        });
    }

    /// The axum router for this server.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/kbs/v0/auth", post(auth))
            .route("/kbs/v0/attest", post(attest))
            .route("/kbs/v0/resource/{repo}/{kind}/{tag}", get(resource))
            .with_state(self.clone())
    }

    /// Serves plain HTTP on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = self
            .router()
            .into_make_service_with_connect_info::<PeerAddr>();
        axum::serve(listener, app).await
    }

    /// Serves HTTPS on `listener` until the task is dropped.
    pub async fn serve_tls(self: Arc<Self>, listener: TlsListener) -> std::io::Result<()> {
        let app = self
            .router()
            .into_make_service_with_connect_info::<PeerAddr>();
        axum::serve(listener, app).await
    }
}

fn version_supported(version: &str) -> bool {
    // Same major.minor as ours: 0.4.x.
    let mut parts = version.split('.');
    parts.next() == Some("0") && parts.next() == Some("4")
}

async fn auth(
    State(kbs): State<Arc<KbsServer>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    body: Bytes,
) -> Response {
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("request is not valid json: {e}");
            kbs.audit(peer, "", "auth", "", "", false, &reason);
            return error(StatusCode::BAD_REQUEST, "InvalidRequest", &reason);
        }
    };
    let tee = tee_name(request.tee);
    if !version_supported(&request.version) {
        let reason = format!(
            "protocol version {} is not supported (0.4.x)",
            request.version
        );
        kbs.audit(peer, "", "auth", &tee, "", false, &reason);
        return error(StatusCode::BAD_REQUEST, "ProtocolVersion", &reason);
    }
    if request.tee == Tee::Sample && !kbs.settings.allow_sample {
        let reason = "sample tee refused: start the kbs with --insecure-allow-sample-tee";
        kbs.audit(peer, "", "auth", &tee, "", false, reason);
        return error(StatusCode::UNAUTHORIZED, "SampleTeeRefused", reason);
    }
    let id = random_hex(32);
    let nonce = random_b64(32);
    {
        let mut sessions = kbs.sessions();
        if sessions.len() >= MAX_SESSIONS {
            let now = Instant::now();
            sessions.retain(|_, s| s.deadline > now);
        }
        if sessions.len() >= MAX_SESSIONS {
            drop(sessions);
            let reason = "too many live sessions";
            kbs.audit(peer, "", "auth", &tee, "", false, reason);
            return error(StatusCode::SERVICE_UNAVAILABLE, "Busy", reason);
        }
        sessions.insert(
            id.clone(),
            Session {
                tee: request.tee,
                state: SessionState::Challenged {
                    nonce: nonce.clone(),
                },
                deadline: Instant::now() + CHALLENGE_TTL,
            },
        );
    }
    kbs.audit(peer, &id, "auth", &tee, "", true, "challenge issued");
    let challenge = Challenge {
        nonce,
        extra_params: serde_json::Value::String(String::new()),
    };
    let mut resp = axum::Json(challenge).into_response();
    set_cookie(&mut resp, &id);
    resp
}

/// Verifies one attestation against the consumed challenge.
fn check_attestation(
    kbs: &KbsServer,
    tee: Tee,
    nonce: &str,
    body: &[u8],
) -> Result<(TeePublicKey, TeePubKey, Claims), (StatusCode, &'static str, String)> {
    let attestation: Attestation = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            format!("attestation is not valid json: {e}"),
        )
    })?;
    if attestation.runtime_data.nonce != nonce {
        return Err((
            StatusCode::UNAUTHORIZED,
            "NonceMismatch",
            "runtime-data nonce is not this session's challenge".into(),
        ));
    }
    let jwk = attestation.runtime_data.tee_pubkey;
    let key = TeePublicKey::from_jwk(&jwk)
        .map_err(|e| (StatusCode::BAD_REQUEST, "InvalidTeePubKey", e.to_string()))?;
    let init_data = match &attestation.init_data {
        None => None,
        Some(wire) if wire.format == "toml" => Some(
            InitData::parse(wire.body.as_bytes())
                .map_err(|e| (StatusCode::BAD_REQUEST, "InvalidInitData", e.to_string()))?,
        ),
        Some(wire) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "InvalidInitData",
                format!("init-data format {:?} is not toml", wire.format),
            ))
        }
    };
    let expected = report_data(nonce, &jwk, &attestation.tee_evidence.additional_evidence)
        .map_err(|e| (StatusCode::BAD_REQUEST, "InvalidRequest", e.to_string()))?;
    let claims = verify_evidence(
        tee,
        &attestation.tee_evidence.primary_evidence,
        &expected,
        init_data.as_ref(),
        &kbs.settings.policy.reference,
        kbs.settings.allow_sample,
        SystemTime::now(),
    )
    .map_err(|e| (StatusCode::UNAUTHORIZED, "AttestationFailed", e.to_string()))?;
    Ok((key, jwk, claims))
}

async fn attest(
    State(kbs): State<Arc<KbsServer>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(id) = session_cookie(&headers) else {
        let reason = "no kbs-session-id cookie: call /kbs/v0/auth first";
        kbs.audit(peer, "", "attest", "", "", false, reason);
        return error(StatusCode::UNAUTHORIZED, "MissingCookie", reason);
    };
    // Take the challenge out: it is answered once, whatever the outcome.
    let taken = kbs.sessions().remove(&id);
    let (tee, nonce) = match taken {
        Some(Session {
            tee,
            state: SessionState::Challenged { nonce },
            deadline,
        }) if deadline > Instant::now() => (tee, nonce),
        Some(Session {
            state: SessionState::Challenged { .. },
            ..
        }) => {
            let reason = "challenge expired";
            kbs.audit(peer, &id, "attest", "", "", false, reason);
            return error(StatusCode::UNAUTHORIZED, "ExpiredCookie", reason);
        }
        _ => {
            let reason =
                "no outstanding challenge for this session (unknown, replayed or already attested)";
            kbs.audit(peer, &id, "attest", "", "", false, reason);
            return error(StatusCode::UNAUTHORIZED, "InvalidCookie", reason);
        }
    };
    let tee_str = tee_name(tee);
    match check_attestation(&kbs, tee, &nonce, &body) {
        Err((status, kind, reason)) => {
            kbs.audit(peer, &id, "attest", &tee_str, "", false, &reason);
            error(status, kind, &reason)
        }
        Ok((key, jwk, claims)) => {
            let ttl = kbs.settings.session_ttl;
            let now = unix_now();
            let token = kbs.signer.issue(&TokenClaims {
                iss: "cloister-kbs".into(),
                iat: now,
                exp: now + ttl.as_secs(),
                claims: (&claims).into(),
                tee_pubkey: jwk,
            });
            let reason = format!(
                "evidence verified: measurement {} init-data {} tcb {}",
                if claims.measurement.is_empty() {
                    "-"
                } else {
                    &claims.measurement
                },
                claims.init_data_digest.as_deref().unwrap_or("-"),
                claims.tcb
            );
            kbs.audit(peer, &id, "attest", &tee_str, "", true, &reason);
            kbs.sessions().insert(
                id.clone(),
                Session {
                    tee,
                    state: SessionState::Attested { key, claims },
                    deadline: Instant::now() + ttl,
                },
            );
            let mut resp = axum::Json(serde_json::json!({ "token": token })).into_response();
            set_cookie(&mut resp, &id);
            resp
        }
    }
}

/// Who is asking: from an attested cookie session or a bearer token.
fn requester(
    kbs: &KbsServer,
    headers: &HeaderMap,
) -> Result<(String, ClaimsWire, TeePublicKey), String> {
    if let Some(id) = session_cookie(headers) {
        let sessions = kbs.sessions();
        return match sessions.get(&id) {
            Some(Session {
                state: SessionState::Attested { key, claims },
                deadline,
                ..
            }) if *deadline > Instant::now() => Ok((id.clone(), claims.into(), key.clone())),
            Some(Session {
                state: SessionState::Attested { .. },
                ..
            }) => Err("session expired: attest again".into()),
            _ => Err("session has not attested".into()),
        };
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("no session cookie and no bearer token")?;
    let body = kbs
        .signer
        .check(bearer, unix_now())
        .map_err(|e| e.to_string())?;
    let key = TeePublicKey::from_jwk(&body.tee_pubkey).map_err(|e| e.to_string())?;
    Ok(("token".into(), body.claims, key))
}

async fn resource(
    State(kbs): State<Arc<KbsServer>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let target = format!("{repo}/{kind}/{tag}");
    let (session, claims, key) = match requester(&kbs, &headers) {
        Ok(r) => r,
        Err(reason) => {
            kbs.audit(peer, "", "resource", "", &target, false, &reason);
            return error(StatusCode::UNAUTHORIZED, "Unauthenticated", &reason);
        }
    };
    let tee = claims.tee.clone();
    let path = [repo.as_str(), kind.as_str(), tag.as_str()];
    if let Some(bad) = path.iter().find(|s| check_segment(s).is_err()) {
        let reason = format!("resource path segment {bad:?} is not a plain name");
        kbs.audit(peer, &session, "resource", &tee, &target, false, &reason);
        return error(StatusCode::BAD_REQUEST, "InvalidResourcePath", &reason);
    }
    match kbs.settings.policy.decide(&claims, &path) {
        Decision::Deny(reason) => {
            kbs.audit(peer, &session, "resource", &tee, &target, false, &reason);
            error(StatusCode::FORBIDDEN, "PolicyDeny", &reason)
        }
        Decision::Allow(rule) => {
            let data = match kbs.settings.store.get(&path) {
                Ok(d) => d,
                Err(e @ StoreError::NotFound(_)) => {
                    let reason = e.to_string();
                    kbs.audit(peer, &session, "resource", &tee, &target, false, &reason);
                    return error(StatusCode::NOT_FOUND, "ResourceNotFound", &reason);
                }
                Err(e) => {
                    let reason = e.to_string();
                    kbs.audit(peer, &session, "resource", &tee, &target, false, &reason);
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "ResourceStore", &reason);
                }
            };
            match jwe::encrypt(&data, &key) {
                Ok(jwe) => {
                    let reason = format!("allowed by rule {rule}");
                    kbs.audit(peer, &session, "resource", &tee, &target, true, &reason);
                    axum::Json(jwe).into_response()
                }
                Err(e) => {
                    let reason = e.to_string();
                    kbs.audit(peer, &session, "resource", &tee, &target, false, &reason);
                    error(StatusCode::INTERNAL_SERVER_ERROR, "Encryption", &reason)
                }
            }
        }
    }
}
