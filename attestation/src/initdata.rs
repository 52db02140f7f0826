//! Init-data: the TOML document a pod's owner hands to its confidential
//! guest through the untrusted host (Confidential Containers' format):
//!
//! ```toml
//! version = "0.1.0"
//! algorithm = "sha384"          # sha256 | sha384 | sha512
//! [data]
//! "aa.toml" = '''...'''         # attestation agent config (KBS URL, certs)
//! "cdh.toml" = '''...'''        # confidential data hub config
//! "policy.rego" = '''...'''     # agent API policy
//! ```
//!
//! Its digest is taken over the raw bytes as delivered (never a
//! re-serialisation) and bound into the launch: SNP `HOST_DATA` (32 bytes:
//! digest truncated, or zero-padded for sha256) and TDX `MRCONFIGID` (48
//! bytes: zero-padded or truncated). The verifier recomputes the digest from
//! the init-data the guest presents and compares.

use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384, Sha512};
use std::collections::BTreeMap;
use thiserror::Error;

/// Errors from init-data handling.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InitDataError {
    /// Not UTF-8 TOML of the expected shape.
    #[error("init-data is not valid toml: {0}")]
    Toml(String),
    /// Unknown algorithm.
    #[error("init-data algorithm {0:?} is not one of sha256, sha384, sha512")]
    Algorithm(String),
    /// Unknown version.
    #[error("init-data version {0:?} is not supported (0.1.0)")]
    Version(String),
}

/// Digest algorithm of an init-data document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitDataAlgorithm {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl InitDataAlgorithm {
    fn parse(name: &str) -> Result<Self, InitDataError> {
        match name {
            "sha256" => Ok(Self::Sha256),
            "sha384" => Ok(Self::Sha384),
            "sha512" => Ok(Self::Sha512),
            other => Err(InitDataError::Algorithm(other.to_owned())),
        }
    }

    /// Digest of `bytes`.
    pub fn digest(self, bytes: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(bytes).to_vec(),
            Self::Sha384 => Sha384::digest(bytes).to_vec(),
            Self::Sha512 => Sha512::digest(bytes).to_vec(),
        }
    }
}

#[derive(Deserialize)]
struct RawInitData {
    version: String,
    algorithm: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// A parsed init-data document with its raw bytes.
#[derive(Debug, Clone)]
pub struct InitData {
    /// Format version.
    pub version: String,
    /// Digest algorithm.
    pub algorithm: InitDataAlgorithm,
    /// Files by name (`aa.toml`, `cdh.toml`, `policy.rego`, ...).
    pub data: BTreeMap<String, String>,
    raw: Vec<u8>,
}

/// Fits a digest into a field of `len` bytes: truncate or zero-pad.
fn fit(digest: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let n = digest.len().min(len);
    out[..n].copy_from_slice(&digest[..n]);
    out
}

impl InitData {
    /// Parses a document, keeping its bytes for the digest.
    pub fn parse(raw: &[u8]) -> Result<Self, InitDataError> {
        let text = std::str::from_utf8(raw).map_err(|e| InitDataError::Toml(e.to_string()))?;
        let parsed: RawInitData =
            toml::from_str(text).map_err(|e| InitDataError::Toml(e.message().to_owned()))?;
        if parsed.version != "0.1.0" {
            return Err(InitDataError::Version(parsed.version));
        }
        Ok(Self {
            version: parsed.version,
            algorithm: InitDataAlgorithm::parse(&parsed.algorithm)?,
            data: parsed.data,
            raw: raw.to_vec(),
        })
    }

    /// The raw bytes as delivered.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Digest over the raw bytes with the document's algorithm.
    pub fn digest(&self) -> Vec<u8> {
        self.algorithm.digest(&self.raw)
    }

    /// The value for SNP `HOST_DATA`.
    pub fn snp_host_data(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&fit(&self.digest(), 32));
        out
    }

    /// The value for TDX `MRCONFIGID`.
    pub fn tdx_mr_config_id(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out.copy_from_slice(&fit(&self.digest(), 48));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"version = "0.1.0"
algorithm = "sha384"
[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://127.0.0.1:8080"
'''
"policy.rego" = '''
package agent_policy
default AllowRequestsFailingPolicy := false
'''
"#;

    #[test]
    fn parse_reads_files_and_digest_covers_raw_bytes() {
        let init = InitData::parse(DOC.as_bytes()).unwrap();
        assert_eq!(init.algorithm, InitDataAlgorithm::Sha384);
        assert!(init.data["aa.toml"].contains("127.0.0.1"));
        assert_eq!(init.digest(), Sha384::digest(DOC.as_bytes()).to_vec());
        // Whitespace changes the digest: it is over bytes, not meaning.
        let spaced = format!("{DOC}\n");
        assert_ne!(
            InitData::parse(spaced.as_bytes()).unwrap().digest(),
            init.digest()
        );
    }

    #[test]
    fn bindings_truncate_and_pad() {
        let init = InitData::parse(DOC.as_bytes()).unwrap();
        let d = init.digest();
        assert_eq!(&init.snp_host_data()[..], &d[..32]);
        assert_eq!(&init.tdx_mr_config_id()[..], &d[..]);

        let sha256 = DOC.replace("sha384", "sha256");
        let init = InitData::parse(sha256.as_bytes()).unwrap();
        let d = Sha256::digest(sha256.as_bytes());
        assert_eq!(&init.snp_host_data()[..], &d[..]);
        assert_eq!(&init.tdx_mr_config_id()[..32], &d[..]);
        assert_eq!(&init.tdx_mr_config_id()[32..], &[0u8; 16]);

        let sha512 = DOC.replace("sha384", "sha512");
        let init = InitData::parse(sha512.as_bytes()).unwrap();
        let d = Sha512::digest(sha512.as_bytes());
        assert_eq!(&init.tdx_mr_config_id()[..], &d[..48]);
    }

    #[test]
    fn bad_documents_are_rejected_with_reason() {
        assert!(matches!(
            InitData::parse(b"version = "),
            Err(InitDataError::Toml(_))
        ));
        assert_eq!(
            InitData::parse(DOC.replace("sha384", "md5").as_bytes()).unwrap_err(),
            InitDataError::Algorithm("md5".into())
        );
        assert_eq!(
            InitData::parse(DOC.replace("0.1.0", "9.9").as_bytes()).unwrap_err(),
            InitDataError::Version("9.9".into())
        );
        assert!(InitData::parse(&[0xFF, 0xFE]).is_err());
    }
}
