//! The host side of confidential pods: the runtime config's
//! `[confidential]` section, the pod's init-data (annotation or RuntimeClass
//! default, decoded and checked here), what the guest is told about it, the
//! host directories such a pod may still share, and the vsock forwarder
//! that lets a guest without a network route reach its KBS.
//!
//! Trust: the shim is not trusted by the guest. Init-data travels in the
//! SetupSandbox request; the agent checks its digest against the value the
//! TEE bound at launch (SNP `HOST_DATA`, TDX `MRCONFIGID`, set by the VMM
//! from [`init_data::ValidInitData::digest_hex`]) before using it, so a
//! host that changes the document in transit only gets a pod that fails to
//! attest. Checking here is for the pod owner: a bad document fails early
//! with its reason.

pub mod init_data;
pub mod kbs_forward;
pub mod launch;
pub mod measure;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cloister_protocol::agent;
use cloister_protocol::annotations;
use serde::Deserialize;
use thiserror::Error;

use init_data::{InitDataDecodeError, ValidInitData};

pub use cloister_protocol::confidential::{SAMPLE_HOST_DATA_PARAM, TEE_PARAM};

/// Which TEE a confidential pod runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeeKind {
    Snp,
    Tdx,
    /// No hardware: evidence is a software stand-in, accepted only by a KBS
    /// started with `--insecure-allow-sample-tee`. Tests only.
    Sample,
}

impl TeeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snp => "snp",
            Self::Tdx => "tdx",
            Self::Sample => "sample",
        }
    }
}

/// Host directories a confidential pod may still share into its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostShare {
    /// The container image's rootfs (the snapshotter's mount) over
    /// virtio-fs. Needed while images are not pulled inside the guest or
    /// brought in measured.
    Rootfs,
    /// The spec's bind mounts (volumes, `/etc/hosts`, ...).
    Bind,
}

/// `[confidential]` of the runtime config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ConfidentialSection {
    /// The TEE of every pod of this runtime class; none: not confidential.
    pub tee: Option<TeeKind>,
    /// Default init-data (TOML, optionally gzip'd) for pods without the
    /// annotation.
    pub init_data: Option<PathBuf>,
    /// Where the shim forwards the guest's KBS vsock port (the
    /// `vsock_port` of init-data's `cloister.toml`): `host:port` or
    /// `http(s)://host:port`. The forwarder sees only what the guest sends:
    /// TLS (https KBS) or JWE-wrapped resources (plain http).
    pub kbs_url: Option<String>,
    /// What may still be shared from the host; empty (the default) shares
    /// nothing, so the pod's images must come from inside the guest.
    pub allow_host_shares: Vec<HostShare>,
    /// SNP guest policy (default 0x30000); bit 17 must be set, debug
    /// (bit 19) needs `allow_debug`. See [`launch`].
    pub snp_policy: Option<u64>,
    /// SNP: the QEMU EPYC model the vCPUs report (EPYC, EPYC-Rome,
    /// EPYC-Milan, EPYC-Genoa), or `cpu_signature` (CPUID 1 EAX). It is
    /// measured; without it the digest is the host CPU's and `cloister
    /// measure` cannot compute it.
    pub vcpu_type: Option<String>,
    pub cpu_signature: Option<u32>,
    /// TDX ATTRIBUTES and XFAM (default: the VMM's, SEPT_VE_DISABLE and
    /// 0xe7); ATTRIBUTES.DEBUG needs `allow_debug`.
    pub tdx_attributes: Option<u64>,
    pub tdx_xfam: Option<u64>,
    /// TDX quote service: `unix:PATH` or `vsock:CID:PORT`.
    pub quote_service: Option<String>,
    /// Allow a debuggable guest (SNP policy bit 19, TDX ATTRIBUTES.DEBUG):
    /// its memory is then readable by the host.
    pub allow_debug: bool,
    /// The bzImage an SNP/TDX guest boots (default: `bzImage` beside
    /// `[guest] kernel`).
    pub kernel: Option<PathBuf>,
    /// OVMF for the `qemu` backend (default: /usr/share/ovmf/OVMF.amdsev.fd
    /// for SNP, OVMF.inteltdx.fd for TDX, as Ubuntu's ovmf installs them).
    pub firmware: Option<PathBuf>,
}

/// Why a confidential pod cannot start.
#[derive(Debug, Error)]
pub enum ConfidentialError {
    #[error("annotation {key}: {source}")]
    Annotation {
        key: &'static str,
        source: InitDataDecodeError,
    },
    #[error("init-data file {path}: {source}")]
    File {
        path: PathBuf,
        source: InitDataDecodeError,
    },
    #[error("cannot read init-data file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("annotations {0} and {1} carry different init-data")]
    ConflictingAnnotations(&'static str, &'static str),
    #[error("annotation {0} given, but this runtime class is not confidential ([confidential] tee is unset)")]
    NotConfidential(&'static str),
    #[error("init-data asks for the kbs on vsock port {port}, but [confidential] kbs_url is unset (nothing to forward it to)")]
    NoForwardTarget { port: u32 },
    #[error("[confidential] kbs_url = {0:?} is not host:port or http(s)://host:port")]
    BadKbsUrl(String),
    #[error("confidential pod: sharing {what} {path} from the host is not allowed ([confidential] allow_host_shares lacks {kind:?})")]
    ShareRefused {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
}

/// A confidential pod's settings, resolved from config and annotations.
#[derive(Debug, Clone)]
pub struct PodConfidential {
    pub tee: TeeKind,
    pub init_data: Option<ValidInitData>,
    pub allow_host_shares: Vec<HostShare>,
    /// `(vsock port, host address)` to forward for the guest's KBS.
    pub kbs_forward: Option<(u32, String)>,
}

fn from_annotations(
    pod_annotations: &HashMap<String, String>,
) -> Result<Option<(&'static str, Vec<u8>)>, ConfidentialError> {
    let mut found: Option<(&'static str, Vec<u8>)> = None;
    for key in [
        annotations::INIT_DATA,
        annotations::INIT_DATA_UNHYPHENATED,
        annotations::KATA_INIT_DATA,
    ] {
        let Some(value) = pod_annotations.get(key) else {
            continue;
        };
        let raw = init_data::decode_annotation(value)
            .map_err(|source| ConfidentialError::Annotation { key, source })?;
        match &found {
            Some((first, bytes)) if *bytes != raw => {
                return Err(ConfidentialError::ConflictingAnnotations(first, key))
            }
            Some(_) => {}
            None => found = Some((key, raw)),
        }
    }
    Ok(found)
}

/// `host:port` out of `host:port` or `http(s)://host:port[/...]`.
fn forward_address(kbs_url: &str) -> Result<String, ConfidentialError> {
    let rest = kbs_url
        .strip_prefix("http://")
        .or_else(|| kbs_url.strip_prefix("https://"))
        .unwrap_or(kbs_url);
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(authority.to_owned())
        }
        _ => Err(ConfidentialError::BadKbsUrl(kbs_url.to_owned())),
    }
}

impl PodConfidential {
    /// The pod's confidential settings, or `None` for an ordinary pod.
    pub fn resolve(
        section: &ConfidentialSection,
        pod_annotations: &HashMap<String, String>,
    ) -> Result<Option<Self>, ConfidentialError> {
        let annotated = from_annotations(pod_annotations)?;
        let Some(tee) = section.tee else {
            return match annotated {
                Some((key, _)) => Err(ConfidentialError::NotConfidential(key)),
                None => Ok(None),
            };
        };
        let init_data = match (annotated, &section.init_data) {
            (Some((key, raw)), _) => Some(
                init_data::validate(&raw)
                    .map_err(|source| ConfidentialError::Annotation { key, source })?,
            ),
            (None, Some(path)) => Some(Self::read_file(path)?),
            (None, None) => None,
        };
        let vsock_port = init_data
            .as_ref()
            .and_then(|i| i.config.kbs.as_ref())
            .and_then(|k| k.vsock_port);
        let kbs_forward = match vsock_port {
            None => None,
            Some(port) => {
                let url = section
                    .kbs_url
                    .as_deref()
                    .ok_or(ConfidentialError::NoForwardTarget { port })?;
                Some((port, forward_address(url)?))
            }
        };
        Ok(Some(Self {
            tee,
            init_data,
            allow_host_shares: section.allow_host_shares.clone(),
            kbs_forward,
        }))
    }

    fn read_file(path: &Path) -> Result<ValidInitData, ConfidentialError> {
        let bytes = std::fs::read(path).map_err(|source| ConfidentialError::Read {
            path: path.to_owned(),
            source,
        })?;
        init_data::document_bytes(bytes)
            .and_then(|raw| init_data::validate(&raw))
            .map_err(|source| ConfidentialError::File {
                path: path.to_owned(),
                source,
            })
    }

    /// Kernel parameters telling the agent it is in a confidential pod,
    /// plus, for the `sample` TEE only, the init-data binding a real TEE
    /// would report from hardware.
    pub fn kernel_params(&self) -> String {
        let mut params = format!("{TEE_PARAM}={}", self.tee.as_str());
        if self.tee == TeeKind::Sample {
            if let Some(init) = &self.init_data {
                // The whole digest: the sample evidence reports it as the
                // bound value, as SNP/TDX hardware reports HOST_DATA.
                params.push_str(&format!(" {SAMPLE_HOST_DATA_PARAM}={}", init.digest_hex()));
            }
        }
        params
    }

    /// SNP `HOST_DATA` for the launch: the init-data digest fitted to 32
    /// bytes, zero without init-data (the agent then expects zero).
    pub fn snp_host_data(&self) -> [u8; 32] {
        self.init_data
            .as_ref()
            .map(|i| i.document.snp_host_data())
            .unwrap_or([0; 32])
    }

    /// TDX `MRCONFIGID` for the launch: the digest fitted to 48 bytes, zero
    /// without init-data.
    pub fn tdx_mr_config_id(&self) -> [u8; 48] {
        self.init_data
            .as_ref()
            .map(|i| i.document.tdx_mr_config_id())
            .unwrap_or([0; 48])
    }

    /// Puts the init-data document into the SetupSandbox request.
    pub fn add_to_setup(&self, request: &mut agent::SetupSandboxRequest) {
        if let Some(init) = &self.init_data {
            request.init_data = init.document.raw().to_vec();
        }
    }

    /// Whether any host directory may be shared (the pod's virtio-fs
    /// folder is attached only then).
    pub fn shares_anything(&self) -> bool {
        !self.allow_host_shares.is_empty()
    }

    /// Refuses a host share the config does not allow.
    pub fn check_share(&self, kind: HostShare, path: &Path) -> Result<(), ConfidentialError> {
        if self.allow_host_shares.contains(&kind) {
            return Ok(());
        }
        let (what, kind) = match kind {
            HostShare::Rootfs => ("the container rootfs", "rootfs"),
            HostShare::Bind => ("the bind mount", "bind"),
        };
        Err(ConfidentialError::ShareRefused {
            what,
            path: path.to_owned(),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    const DOC: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cloister.toml\" = '''\n[kbs]\nurl = \"http://kbs.test:8080\"\nvsock_port = 1026\n[resources]\ntoken = \"test/key/token\"\n'''\n";

    fn section(tee: Option<TeeKind>) -> ConfidentialSection {
        ConfidentialSection {
            tee,
            kbs_url: Some("http://127.0.0.1:8080".into()),
            ..Default::default()
        }
    }

    fn annotated(key: &str, doc: &str) -> HashMap<String, String> {
        HashMap::from([(key.to_owned(), STANDARD.encode(doc))])
    }

    #[test]
    fn ordinary_pod_is_not_confidential_and_refuses_init_data() {
        let none = PodConfidential::resolve(&section(None), &HashMap::new()).unwrap();
        assert!(none.is_none());
        let err = PodConfidential::resolve(&section(None), &annotated(annotations::INIT_DATA, DOC))
            .unwrap_err();
        assert!(err.to_string().contains("not confidential"), "{err}");
    }

    #[test]
    fn sample_pod_gets_tee_and_host_data_params_and_init_data_in_setup() {
        let pod = PodConfidential::resolve(
            &section(Some(TeeKind::Sample)),
            &annotated(annotations::KATA_INIT_DATA, DOC),
        )
        .unwrap()
        .unwrap();
        let init = pod.init_data.as_ref().unwrap();
        assert_eq!(
            pod.kernel_params(),
            format!(
                "cloister.tee=sample cloister.sample_host_data={}",
                init.digest_hex()
            )
        );
        assert_eq!(pod.kbs_forward, Some((1026, "127.0.0.1:8080".into())));
        let mut setup = agent::SetupSandboxRequest::new();
        pod.add_to_setup(&mut setup);
        assert_eq!(setup.init_data, DOC.as_bytes());
    }

    #[test]
    fn snp_pod_never_puts_host_data_on_the_command_line() {
        let pod = PodConfidential::resolve(
            &section(Some(TeeKind::Snp)),
            &annotated(annotations::INIT_DATA, DOC),
        )
        .unwrap()
        .unwrap();
        assert_eq!(pod.kernel_params(), "cloister.tee=snp");
        let digest = pod.init_data.as_ref().unwrap().document.digest();
        assert_eq!(pod.snp_host_data()[..], digest[..32]);
        assert_eq!(pod.tdx_mr_config_id()[..32], digest[..]);
        assert_eq!(pod.tdx_mr_config_id()[32..], [0; 16]);
        let bare = PodConfidential::resolve(&section(Some(TeeKind::Snp)), &HashMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(bare.snp_host_data(), [0; 32]);
        assert_eq!(bare.tdx_mr_config_id(), [0; 48]);
    }

    #[test]
    fn runtime_class_default_file_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("init.toml");
        std::fs::write(&file, DOC).unwrap();
        let mut config = section(Some(TeeKind::Tdx));
        config.init_data = Some(file.clone());
        let pod = PodConfidential::resolve(&config, &HashMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(pod.init_data.unwrap().document.raw(), DOC.as_bytes());

        std::fs::write(&file, DOC.replace("sha256", "crc32")).unwrap();
        let err = PodConfidential::resolve(&config, &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("init.toml"), "{err}");
        assert!(err.to_string().contains("crc32"), "{err}");
        config.init_data = Some(dir.path().join("absent"));
        let err = PodConfidential::resolve(&config, &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn unhyphenated_annotation_is_the_same_init_data() {
        let pod = PodConfidential::resolve(
            &section(Some(TeeKind::Snp)),
            &annotated(annotations::INIT_DATA_UNHYPHENATED, DOC),
        )
        .unwrap()
        .unwrap();
        let hyphenated = PodConfidential::resolve(
            &section(Some(TeeKind::Snp)),
            &annotated(annotations::INIT_DATA, DOC),
        )
        .unwrap()
        .unwrap();
        assert_ne!(pod.snp_host_data(), [0; 32]);
        assert_eq!(pod.snp_host_data(), hyphenated.snp_host_data());
        let mut both = annotated(annotations::INIT_DATA_UNHYPHENATED, DOC);
        both.insert(
            annotations::INIT_DATA.into(),
            STANDARD.encode(DOC.replace("8080", "9090")),
        );
        let err = PodConfidential::resolve(&section(Some(TeeKind::Snp)), &both).unwrap_err();
        assert!(err.to_string().contains("io.cloister.initdata"), "{err}");
    }

    #[test]
    fn conflicting_annotations_and_missing_forward_target_are_refused() {
        let mut both = annotated(annotations::INIT_DATA, DOC);
        both.insert(
            annotations::KATA_INIT_DATA.into(),
            STANDARD.encode(DOC.replace("8080", "9090")),
        );
        let err = PodConfidential::resolve(&section(Some(TeeKind::Sample)), &both).unwrap_err();
        assert!(
            matches!(err, ConfidentialError::ConflictingAnnotations(..)),
            "{err}"
        );

        let mut no_target = section(Some(TeeKind::Sample));
        no_target.kbs_url = None;
        let err = PodConfidential::resolve(&no_target, &annotated(annotations::INIT_DATA, DOC))
            .unwrap_err();
        assert!(err.to_string().contains("vsock port 1026"), "{err}");

        let mut bad = section(Some(TeeKind::Sample));
        bad.kbs_url = Some("kbs.example".into());
        let err =
            PodConfidential::resolve(&bad, &annotated(annotations::INIT_DATA, DOC)).unwrap_err();
        assert!(err.to_string().contains("kbs.example"), "{err}");
    }

    #[test]
    fn bad_annotation_names_its_key() {
        let bad = HashMap::from([(annotations::INIT_DATA.to_owned(), "%%%".to_owned())]);
        let err = PodConfidential::resolve(&section(Some(TeeKind::Sample)), &bad).unwrap_err();
        assert!(err.to_string().contains(annotations::INIT_DATA), "{err}");
    }

    #[test]
    fn host_shares_are_refused_unless_allowed() {
        let mut config = section(Some(TeeKind::Sample));
        let pod = PodConfidential::resolve(&config, &HashMap::new())
            .unwrap()
            .unwrap();
        assert!(!pod.shares_anything());
        let err = pod
            .check_share(HostShare::Rootfs, Path::new("/var/lib/snap/1"))
            .unwrap_err();
        assert!(err.to_string().contains("/var/lib/snap/1"), "{err}");
        assert!(err.to_string().contains("rootfs"), "{err}");

        config.allow_host_shares = vec![HostShare::Rootfs];
        let pod = PodConfidential::resolve(&config, &HashMap::new())
            .unwrap()
            .unwrap();
        assert!(pod.shares_anything());
        pod.check_share(HostShare::Rootfs, Path::new("/r")).unwrap();
        let err = pod
            .check_share(HostShare::Bind, Path::new("/etc/hosts"))
            .unwrap_err();
        assert!(err.to_string().contains("bind"), "{err}");
    }

    #[test]
    fn config_section_parses_from_toml() {
        let parsed: ConfidentialSection = toml::from_str(
            "tee = \"sample\"\ninit_data = \"/etc/cloister/init.toml\"\nkbs_url = \"http://127.0.0.1:8080\"\nallow_host_shares = [\"rootfs\"]\n",
        )
        .unwrap();
        assert_eq!(parsed.tee, Some(TeeKind::Sample));
        assert_eq!(parsed.allow_host_shares, vec![HostShare::Rootfs]);
        assert!(toml::from_str::<ConfidentialSection>("tee = \"sev\"").is_err());
        assert!(toml::from_str::<ConfidentialSection>("allow_host_shares = [\"all\"]").is_err());
    }
}
