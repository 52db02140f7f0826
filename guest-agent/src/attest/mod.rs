//! The agent's side of a confidential pod: before any container starts,
//! prove the guest to the pod's KBS and fetch the secrets its init-data
//! names.
//!
//! ```text
//! kernel cmdline cloister.tee=snp|tdx|sample  ──> ConfidentialGuest (boot)
//! SetupSandbox.init_data ──> begin():  parse init-data
//!                                      check its digest against the TEE's binding
//!                                        (SNP HOST_DATA / TDX MRCONFIGID via configfs-tsm;
//!                                         sample: cloister.sample_host_data, insecure)
//!                                      install policy.rego (hook, see PolicyInstaller)
//!                                        ── done before SetupSandbox answers ──
//!                                      in the background, within 25 s:
//!                                      RCAR with the KBS (URL + CA from init-data,
//!                                        over host vsock when kbs.vsock_port is set)
//!                                      fetch every [resources] entry → tmpfs files 0400
//! CreateContainer ──> attested().await: waits; on failure FAILED_PRECONDITION
//!                     "attestation failed: <reason>"; on success the spec's
//!                     cloister-secret:// mounts and sealed secrets are resolved
//! ```
//!
//! Every container of a confidential guest waits for the outcome, and none
//! starts if attestation failed: the agent cannot tell which process would
//! need a secret later (an exec, a sealed value read at run time), so it
//! does not guess.

pub mod binding;
pub mod cmdline;
pub mod container_spec;
pub mod kbs_route;
pub mod sealed;
pub mod secrets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloister_attestation::initdata::{InitData, InitDataError};
use cloister_attestation::kbs::attester::{Attester, SampleAttester};
use cloister_attestation::kbs::client::{KbsClient, KbsClientError};
use cloister_attestation::kbs::protocol::Tee;
use cloister_attestation::kbs::tsm::{ConfigfsTsm, TsmAttester, TsmReports, CCEL_PATH};
use cloister_attestation::pod_config::{KbsSettings, PodConfig, PodConfigError};
use thiserror::Error;
use tokio::sync::{watch, Mutex};

use cmdline::GuestTee;
use kbs_route::VsockKbsRoute;
use secrets::SecretStore;

/// How long the whole flow (evidence, KBS round trips, resources) may
/// take: under the shim's 30 s per-request timeout, so a waiting
/// CreateContainer returns this reason rather than the shim's timeout.
pub const ATTESTATION_DEADLINE: Duration = Duration::from_secs(25);

/// Installs the agent API policy an init-data document carries (the text
/// of its `policy.rego`). The policy engine provides it; `Err` names why
/// the policy was refused. Without an installer, a document that carries a
/// policy fails attestation: the pod never runs without its owner's policy.
pub type PolicyInstaller = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Why a confidential guest cannot run containers.
#[derive(Debug, Error)]
pub enum AttestError {
    #[error("kernel parameter {param}={value:?}: {reason}")]
    Cmdline {
        param: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("init-data delivered by the host: {0}")]
    InitData(#[from] InitDataError),
    #[error(transparent)]
    PodConfig(#[from] PodConfigError),
    #[error("cannot read the {tee} launch binding of init-data: {reason}")]
    Binding { tee: &'static str, reason: String },
    #[error("init-data digest {delivered} does not match the {tee} launch binding {bound} (the host changed or dropped the pod's init-data)")]
    DigestMismatch {
        tee: &'static str,
        delivered: String,
        bound: String,
    },
    #[error("init-data carries policy.rego but no policy engine is connected to this agent; refusing to run the pod without its policy")]
    NoPolicyEngine,
    #[error("init-data policy.rego refused by the policy engine: {0}")]
    Policy(String),
    #[error("cannot set up a kbs client for {url}: {source}")]
    KbsClient { url: String, source: KbsClientError },
    #[error("kbs at {url} refused evidence: {source}")]
    EvidenceRefused { url: String, source: KbsClientError },
    #[error("kbs at {url} unreachable or failed: {source}")]
    KbsFailed { url: String, source: KbsClientError },
    #[error("kbs at {url} did not release resource {resource}: {source}")]
    Resource {
        url: String,
        resource: String,
        source: KbsClientError,
    },
    #[error("attestation with the kbs at {url} did not finish within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("secret name {0:?} is not a plain file name")]
    SecretName(String),
    #[error("SetupSandbox has not delivered the pod's init-data yet")]
    NotYet,
    #[error("attestation already ran; a second SetupSandbox cannot replace the pod's init-data")]
    AlreadyBegun,
    #[error("spec field {field} asks for secret {name:?}, which the pod's init-data does not name in cloister.toml [resources]")]
    UnknownSecret { field: String, name: String },
    #[error("spec field {field}: {source}")]
    Sealed {
        field: String,
        source: sealed::SealedSecretError,
    },
    #[error("spec field {field}: unsealed value is not UTF-8 text, cannot go into an environment variable")]
    SealedNotText { field: String },
    #[error("spec field {field} holds a sealed secret, but the pod's init-data names no kbs")]
    NoKbsForSealed { field: String },
}

impl AttestError {
    fn from_attest(url: &str, source: KbsClientError) -> Self {
        match source {
            KbsClientError::Refused { .. } | KbsClientError::Attester(_) => Self::EvidenceRefused {
                url: url.to_owned(),
                source,
            },
            _ => Self::KbsFailed {
                url: url.to_owned(),
                source,
            },
        }
    }
}

/// A live KBS session, kept for sealed secrets resolved after start-up.
struct KbsSession {
    url: String,
    client: Mutex<KbsClient>,
    attester: Box<dyn Attester>,
    init_text: Option<String>,
    /// Keeps the vsock route up as long as the session.
    _route: Option<VsockKbsRoute>,
}

impl KbsSession {
    async fn attest(&self) -> Result<(), AttestError> {
        let mut client = self.client.lock().await;
        let run = client.attest(self.attester.as_ref(), self.init_text.as_deref());
        match tokio::time::timeout(ATTESTATION_DEADLINE, run).await {
            Err(_) => Err(AttestError::Timeout {
                url: self.url.clone(),
                after: ATTESTATION_DEADLINE,
            }),
            Ok(Err(e)) => Err(AttestError::from_attest(&self.url, e)),
            Ok(Ok(_token)) => Ok(()),
        }
    }

    /// Fetches a resource; an expired session is renewed once.
    async fn fetch(&self, resource: &str) -> Result<Vec<u8>, AttestError> {
        let first = self.client.lock().await.get_resource(resource).await;
        let result = match first {
            Err(KbsClientError::Refused { status: 401, .. }) => {
                self.attest().await?;
                self.client.lock().await.get_resource(resource).await
            }
            other => other,
        };
        result.map_err(|source| AttestError::Resource {
            url: self.url.clone(),
            resource: resource.to_owned(),
            source,
        })
    }
}

/// A successfully attested guest: its secrets and KBS session.
pub struct Attested {
    /// Secret name → guest file.
    pub secrets: BTreeMap<String, PathBuf>,
    store: SecretStore,
    kbs: Option<KbsSession>,
}

impl std::fmt::Debug for Attested {
    // Names and paths only: never a secret's bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attested")
            .field("secrets", &self.secrets)
            .field("kbs", &self.kbs.as_ref().map(|k| k.url.as_str()))
            .finish()
    }
}

/// Init-data that matched the TEE's binding.
struct Checked {
    init: Option<InitData>,
    bound: binding::LaunchBinding,
    config: PodConfig,
}

#[derive(Clone)]
enum Outcome {
    Waiting,
    Running,
    Done(Result<Arc<Attested>, Arc<AttestError>>),
}

/// The attestation state of a confidential guest.
pub struct ConfidentialGuest {
    tee: GuestTee,
    store: SecretStore,
    mount_tmpfs: bool,
    kbs_socket: PathBuf,
    tsm: Arc<dyn TsmReports>,
    policy_installer: Option<PolicyInstaller>,
    deadline: Duration,
    outcome: watch::Sender<Outcome>,
}

/// Where things go in the guest.
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// Secrets tmpfs.
    pub secrets_dir: PathBuf,
    /// Mount a tmpfs there (PID 1 of a guest) or just create it (tests).
    pub mount_tmpfs: bool,
    /// The Unix socket of the vsock route to the KBS.
    pub kbs_socket: PathBuf,
}

impl Default for GuestPaths {
    fn default() -> Self {
        Self {
            secrets_dir: PathBuf::from(cloister_protocol::confidential::GUEST_SECRETS_DIR),
            mount_tmpfs: true,
            kbs_socket: PathBuf::from("/run/cloister/kbs.sock"),
        }
    }
}

impl ConfidentialGuest {
    /// The guest's state for `tee`.
    pub fn new(
        tee: GuestTee,
        paths: GuestPaths,
        policy_installer: Option<PolicyInstaller>,
    ) -> Self {
        Self {
            tee,
            store: SecretStore::new(paths.secrets_dir),
            mount_tmpfs: paths.mount_tmpfs,
            kbs_socket: paths.kbs_socket,
            tsm: Arc::new(ConfigfsTsm::default()),
            policy_installer,
            deadline: ATTESTATION_DEADLINE,
            outcome: watch::channel(Outcome::Waiting).0,
        }
    }

    /// Overrides [`ATTESTATION_DEADLINE`].
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// From the kernel command line: `None` for an ordinary guest.
    pub fn from_cmdline(
        cmdline: &str,
        policy_installer: Option<PolicyInstaller>,
    ) -> Result<Option<Self>, AttestError> {
        Ok(GuestTee::from_cmdline(cmdline)?
            .map(|tee| Self::new(tee, GuestPaths::default(), policy_installer)))
    }

    /// The TEE.
    pub fn tee(&self) -> &GuestTee {
        &self.tee
    }

    /// Whether [`begin`](Self::begin) already ran (a second SetupSandbox is
    /// refused before it changes anything).
    pub fn has_begun(&self) -> bool {
        !matches!(*self.outcome.borrow(), Outcome::Waiting)
    }

    /// Starts the flow for the init-data SetupSandbox delivered (empty:
    /// none). Runs once; later calls are refused. The local part — digest
    /// against the TEE binding, policy installed — is done before this
    /// returns, so the pod's policy is in force before SetupSandbox
    /// answers; the KBS part runs in the background. Failures of either
    /// become the outcome every CreateContainer reports.
    pub async fn begin(self: &Arc<Self>, init_data: Vec<u8>) -> Result<(), AttestError> {
        let mut started = false;
        self.outcome.send_if_modified(|o| {
            if matches!(o, Outcome::Waiting) {
                *o = Outcome::Running;
                started = true;
            }
            started
        });
        if !started {
            return Err(AttestError::AlreadyBegun);
        }
        let checked = match self.check_locally(init_data).await {
            Ok(checked) => checked,
            Err(e) => {
                self.finish(Err(e));
                return Ok(());
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            let url = checked
                .config
                .kbs
                .as_ref()
                .map(|k| k.url.clone())
                .unwrap_or_else(|| "(none named)".into());
            let after = this.deadline;
            let result = match tokio::time::timeout(after, this.run_kbs(checked)).await {
                Ok(result) => result,
                Err(_) => Err(AttestError::Timeout { url, after }),
            };
            this.finish(result);
        });
        Ok(())
    }

    fn finish(&self, result: Result<Attested, AttestError>) {
        match &result {
            Ok(a) => tracing::info!(
                tee = self.tee.name(),
                secrets = a.secrets.len(),
                "attestation succeeded"
            ),
            Err(e) => tracing::error!(tee = self.tee.name(), "attestation failed: {e}"),
        }
        self.outcome
            .send_replace(Outcome::Done(result.map(Arc::new).map_err(Arc::new)));
    }

    /// Waits for the outcome of [`begin`](Self::begin).
    pub async fn attested(&self) -> Result<Arc<Attested>, Arc<AttestError>> {
        let mut rx = self.outcome.subscribe();
        let outcome = rx
            .wait_for(|o| !matches!(o, Outcome::Running))
            .await
            .map(|o| o.clone());
        match outcome {
            Ok(Outcome::Done(result)) => result,
            _ => Err(Arc::new(AttestError::NotYet)),
        }
    }

    /// Parses the document, checks it against the TEE's binding and
    /// installs its policy.
    async fn check_locally(&self, raw: Vec<u8>) -> Result<Checked, AttestError> {
        let init = if raw.is_empty() {
            None
        } else {
            Some(InitData::parse(&raw)?)
        };
        let tee = self.tee.clone();
        let tsm = self.tsm.clone();
        let bound = tokio::task::spawn_blocking(move || binding::read_binding(&tee, tsm.as_ref()))
            .await
            .map_err(|e| AttestError::Binding {
                tee: self.tee.name(),
                reason: e.to_string(),
            })??;
        binding::check_binding(&self.tee, init.as_ref(), &bound)?;
        let config = match &init {
            Some(init) => PodConfig::from_init_data(init)?,
            None => PodConfig::default(),
        };
        if let Some(policy) = &config.policy {
            let install = self
                .policy_installer
                .as_ref()
                .ok_or(AttestError::NoPolicyEngine)?;
            install(policy).map_err(AttestError::Policy)?;
        }
        Ok(Checked {
            init,
            bound,
            config,
        })
    }

    /// Attests to the KBS and fetches the resources.
    async fn run_kbs(&self, checked: Checked) -> Result<Attested, AttestError> {
        let Checked {
            init,
            bound,
            config,
        } = checked;
        self.store.prepare(self.mount_tmpfs)?;
        let kbs = match &config.kbs {
            None => None,
            Some(settings) => {
                let init_text = init
                    .as_ref()
                    .map(|i| String::from_utf8_lossy(i.raw()).into_owned());
                let session = self.open_session(settings, &bound, init_text)?;
                session.attest().await?;
                Some(session)
            }
        };
        let mut secrets = BTreeMap::new();
        if let Some(session) = &kbs {
            for (name, resource) in &config.resources {
                let bytes = session.fetch(resource).await?;
                let path = self.store.write(name, &bytes)?;
                secrets.insert(name.clone(), path);
            }
        }
        Ok(Attested {
            secrets,
            store: self.store.clone(),
            kbs,
        })
    }

    fn open_session(
        &self,
        settings: &KbsSettings,
        bound: &binding::LaunchBinding,
        init_text: Option<String>,
    ) -> Result<KbsSession, AttestError> {
        let route = match settings.vsock_port {
            Some(port) => Some(VsockKbsRoute::start(&self.kbs_socket, port)?),
            None => None,
        };
        let client = KbsClient::for_guest(
            &settings.url,
            settings.cert.as_deref().map(str::as_bytes),
            route.as_ref().map(|r| r.path()),
        )
        .map_err(|source| AttestError::KbsClient {
            url: settings.url.clone(),
            source,
        })?;
        let attester: Box<dyn Attester> = match &self.tee {
            GuestTee::Sample { .. } => Box::new(SampleAttester {
                // What the "hardware" bound, not what the agent computed.
                init_data_digest: (!bound.0.is_empty()).then(|| hex::encode(&bound.0)),
            }),
            GuestTee::Snp => Box::new(TsmAttester::new(ConfigfsTsm::default(), Tee::Snp, None)),
            GuestTee::Tdx => Box::new(TsmAttester::new(
                ConfigfsTsm::default(),
                Tee::Tdx,
                Some(PathBuf::from(CCEL_PATH)),
            )),
        };
        Ok(KbsSession {
            url: settings.url.clone(),
            client: Mutex::new(client),
            attester,
            init_text,
            _route: route,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_attestation::kbs::audit::AuditLog;
    use cloister_attestation::kbs::config::KbsPolicy;
    use cloister_attestation::kbs::server::{KbsServer, KbsSettings as ServerSettings};
    use cloister_attestation::kbs::store::ResourceStore;
    use std::os::unix::fs::MetadataExt;

    struct World {
        dir: tempfile::TempDir,
        url: String,
        doc: String,
    }

    /// An in-process KBS on loopback holding `test/key/token`, accepting
    /// sample guests whose init-data digest is accepted by `accept`.
    async fn world(policy_rego: Option<&str>, accept: impl Fn(&str) -> Vec<String>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut doc = format!(
            "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cloister.toml\" = '''\n[kbs]\nurl = \"{url}\"\n[resources]\ntoken = \"test/key/token\"\n'''\n"
        );
        if let Some(policy) = policy_rego {
            doc.push_str(&format!("\"policy.rego\" = '''{policy}'''\n"));
        }
        let digest = hex::encode(InitData::parse(doc.as_bytes()).unwrap().digest());
        let digests: Vec<String> = accept(&digest).iter().map(|d| format!("{d:?}")).collect();
        let policy = KbsPolicy::parse(&format!(
            "[reference.init_data]\nrequired = true\ndigests = [{}]\n[[policy]]\nresources = \"test/*/*\"\ntees = [\"sample\"]\n",
            digests.join(",")
        ))
        .unwrap();
        let resources = dir.path().join("resources");
        std::fs::create_dir_all(resources.join("test/key")).unwrap();
        std::fs::write(resources.join("test/key/token"), b"s3cret-token").unwrap();
        let server = KbsServer::new(ServerSettings {
            policy,
            store: ResourceStore::new(&resources),
            allow_sample: true,
            session_ttl: Duration::from_secs(60),
            audit: AuditLog::to_file(&dir.path().join("audit.jsonl")).unwrap(),
        });
        tokio::spawn(server.serve(listener));
        World { dir, url, doc }
    }

    fn guest(
        world: &World,
        bound: Option<Vec<u8>>,
        installer: Option<PolicyInstaller>,
    ) -> Arc<ConfidentialGuest> {
        Arc::new(ConfidentialGuest::new(
            GuestTee::Sample {
                bound_digest: bound,
            },
            GuestPaths {
                secrets_dir: world.dir.path().join("secrets"),
                mount_tmpfs: false,
                kbs_socket: world.dir.path().join("kbs.sock"),
            },
            installer,
        ))
    }

    fn bound(doc: &str) -> Option<Vec<u8>> {
        Some(InitData::parse(doc.as_bytes()).unwrap().digest())
    }

    #[tokio::test]
    async fn attests_fetches_secrets_and_unseals() {
        let w = world(None, |d| vec![d.to_owned()]).await;
        let g = guest(&w, bound(&w.doc), None);
        assert!(matches!(
            g.attested().await.unwrap_err().as_ref(),
            AttestError::NotYet
        ));
        g.begin(w.doc.clone().into_bytes()).await.unwrap();
        assert!(matches!(
            g.begin(Vec::new()).await,
            Err(AttestError::AlreadyBegun)
        ));
        let attested = g.attested().await.unwrap();
        let file = &attested.secrets["token"];
        assert_eq!(std::fs::read(file).unwrap(), b"s3cret-token");
        assert_eq!(std::fs::metadata(file).unwrap().mode() & 0o777, 0o400);

        let spec = serde_json::json!({"process": {"env": [
            format!("T={}", sealed::seal_reference("test/key/token"))
        ]}});
        let out = attested
            .resolve_spec("c", &serde_json::to_vec(&spec).unwrap())
            .await
            .unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["process"]["env"][0], "T=s3cret-token");
        let exec = serde_json::json!({"args": ["sh"], "env": [
            format!("T={}", sealed::seal_reference("test/key/token")), "PATH=/bin"
        ]});
        let out = attested
            .resolve_process(&serde_json::to_vec(&exec).unwrap())
            .await
            .unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out["env"],
            serde_json::json!(["T=s3cret-token", "PATH=/bin"])
        );
        assert!(g.has_begun());
        let err = attested
            .resolve_spec(
                "c",
                &serde_json::to_vec(&serde_json::json!({"process": {"env": [
                    format!("T={}", sealed::seal_reference("test/key/absent"))
                ]}}))
                .unwrap(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("test/key/absent"), "{err}");
    }

    #[tokio::test]
    async fn digest_mismatch_fails_before_the_kbs_is_contacted() {
        let w = world(None, |d| vec![d.to_owned()]).await;
        let g = guest(&w, bound(&w.doc), None);
        g.begin(format!("{}# tampered\n", w.doc).into_bytes())
            .await
            .unwrap();
        let err = g.attested().await.unwrap_err();
        assert!(
            matches!(err.as_ref(), AttestError::DigestMismatch { .. }),
            "{err}"
        );
        let audit = std::fs::read_to_string(w.dir.path().join("audit.jsonl")).unwrap_or_default();
        assert!(audit.is_empty(), "{audit}");
        assert!(!w.dir.path().join("secrets/token").exists());
    }

    #[tokio::test]
    async fn kbs_refusal_names_the_kbs() {
        let w = world(None, |_| vec!["00".repeat(32)]).await;
        let g = guest(&w, bound(&w.doc), None);
        g.begin(w.doc.clone().into_bytes()).await.unwrap();
        let err = g.attested().await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("kbs at {} refused evidence", w.url)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn silent_kbs_times_out_with_its_url() {
        let w = world(None, |d| vec![d.to_owned()]).await;
        // A listener that accepts and never answers stands in for the KBS.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                held.push(conn);
            }
        });
        let doc = w.doc.replace(&w.url, &silent_url);
        let g = Arc::new(
            Arc::try_unwrap(guest(&w, bound(&doc), None))
                .ok()
                .unwrap()
                .with_deadline(Duration::from_millis(500)),
        );
        g.begin(doc.into_bytes()).await.unwrap();
        let err = g.attested().await.unwrap_err().to_string();
        assert!(err.contains(&silent_url), "{err}");
        assert!(err.contains("did not finish within 500ms"), "{err}");
    }

    #[tokio::test]
    async fn policy_goes_to_the_installer_or_fails_without_one() {
        let w = world(Some("package agent_policy"), |d| vec![d.to_owned()]).await;
        let g = guest(&w, bound(&w.doc), None);
        g.begin(w.doc.clone().into_bytes()).await.unwrap();
        let err = g.attested().await.unwrap_err();
        assert!(matches!(err.as_ref(), AttestError::NoPolicyEngine), "{err}");

        let w = world(Some("package agent_policy"), |d| vec![d.to_owned()]).await;
        let seen = Arc::new(std::sync::Mutex::new(String::new()));
        let seen_in = seen.clone();
        let installer: PolicyInstaller = Arc::new(move |text| {
            *seen_in.lock().unwrap() = text.to_owned();
            Ok(())
        });
        let g = guest(&w, bound(&w.doc), Some(installer));
        g.begin(w.doc.clone().into_bytes()).await.unwrap();
        // In force when SetupSandbox answers, before the KBS round trips.
        assert_eq!(seen.lock().unwrap().as_str(), "package agent_policy");
        g.attested().await.unwrap();
        assert_eq!(seen.lock().unwrap().as_str(), "package agent_policy");
    }
}
