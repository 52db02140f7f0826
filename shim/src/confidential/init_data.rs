//! Init-data as a pod brings it: the annotation value (base64 of gzip'd
//! TOML as Kata/CoCo write it, or base64 of plain TOML) or a file named by
//! the runtime config, decoded with size limits and checked before the pod
//! starts, so a bad document fails `RunPodSandbox` with its reason instead
//! of a guest that cannot attest.

use std::io::Read;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use cloister_attestation::initdata::{InitData, InitDataError};
use cloister_attestation::pod_config::{PodConfig, PodConfigError};
use flate2::read::GzDecoder;
use thiserror::Error;

/// Longest annotation value accepted (base64 text).
pub const MAX_ENCODED_BYTES: usize = 128 << 10;
/// Longest init-data document after decompression. Kata's guest reads it
/// from a small disk; ours goes in the SetupSandbox request.
pub const MAX_DOCUMENT_BYTES: usize = 256 << 10;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Why init-data was refused.
#[derive(Debug, Error)]
pub enum InitDataDecodeError {
    #[error("init-data is {len} bytes of base64, more than the {max} allowed")]
    EncodedTooLarge { len: usize, max: usize },
    #[error("init-data is not base64: {0}")]
    Base64(base64::DecodeError),
    #[error("init-data is not valid gzip: {0}")]
    Gzip(std::io::Error),
    #[error("init-data inflates to more than {max} bytes (compression bomb guard)")]
    DocumentTooLarge { max: usize },
    #[error(transparent)]
    Document(#[from] InitDataError),
    #[error(transparent)]
    Contents(#[from] PodConfigError),
}

/// A checked init-data document.
#[derive(Debug, Clone)]
pub struct ValidInitData {
    /// The parsed document (its raw bytes are what the digest covers).
    pub document: InitData,
    /// What it asks of the runtime.
    pub config: PodConfig,
}

impl ValidInitData {
    /// Hex of the document's digest (the value the KBS's
    /// `reference.init_data.digests` lists).
    pub fn digest_hex(&self) -> String {
        hex::encode(self.document.digest())
    }

    /// Hex of the SNP `HOST_DATA` value (digest fitted to 32 bytes).
    pub fn snp_host_data_hex(&self) -> String {
        hex::encode(self.document.snp_host_data())
    }

    /// Hex of the TDX `MRCONFIGID` value (digest fitted to 48 bytes).
    pub fn tdx_mr_config_id_hex(&self) -> String {
        hex::encode(self.document.tdx_mr_config_id())
    }
}

/// Inflates gzip'd bytes, refusing to produce more than `max` bytes.
fn gunzip_bounded(bytes: &[u8], max: usize) -> Result<Vec<u8>, InitDataDecodeError> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    GzDecoder::new(bytes)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(InitDataDecodeError::Gzip)?;
    if out.len() > max {
        return Err(InitDataDecodeError::DocumentTooLarge { max });
    }
    Ok(out)
}

/// Raw document bytes from an annotation value: base64 (padded or not,
/// whitespace ignored) of gzip'd or plain TOML.
pub fn decode_annotation(value: &str) -> Result<Vec<u8>, InitDataDecodeError> {
    if value.len() > MAX_ENCODED_BYTES {
        return Err(InitDataDecodeError::EncodedTooLarge {
            len: value.len(),
            max: MAX_ENCODED_BYTES,
        });
    }
    let compact: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = STANDARD
        .decode(&compact)
        .or_else(|_| STANDARD_NO_PAD.decode(&compact))
        .map_err(InitDataDecodeError::Base64)?;
    document_bytes(bytes)
}

/// Raw document bytes from a file's contents: gzip'd or plain TOML.
pub fn document_bytes(bytes: Vec<u8>) -> Result<Vec<u8>, InitDataDecodeError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        return gunzip_bounded(&bytes, MAX_DOCUMENT_BYTES);
    }
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(InitDataDecodeError::DocumentTooLarge {
            max: MAX_DOCUMENT_BYTES,
        });
    }
    Ok(bytes)
}

/// Parses and checks a document (version, algorithm, `[data]` entries).
pub fn validate(raw: &[u8]) -> Result<ValidInitData, InitDataDecodeError> {
    let document = InitData::parse(raw)?;
    let config = PodConfig::from_init_data(&document)?;
    Ok(ValidInitData { document, config })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    pub(crate) const DOC: &str = r#"version = "0.1.0"
algorithm = "sha384"
[data]
"cloister.toml" = '''
[kbs]
url = "http://127.0.0.1:8080"
vsock_port = 1026
[resources]
"token" = "test/key/token"
'''
"#;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_and_plain_base64_decode_to_the_same_document() {
        let gz = STANDARD.encode(gzip(DOC.as_bytes()));
        let plain = STANDARD.encode(DOC.as_bytes());
        assert_eq!(decode_annotation(&gz).unwrap(), DOC.as_bytes());
        assert_eq!(decode_annotation(&plain).unwrap(), DOC.as_bytes());
        let wrapped: String = plain
            .as_bytes()
            .chunks(60)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(decode_annotation(&wrapped).unwrap(), DOC.as_bytes());
        let unpadded = STANDARD_NO_PAD.encode(DOC.as_bytes());
        assert_eq!(decode_annotation(&unpadded).unwrap(), DOC.as_bytes());
    }

    #[test]
    fn valid_document_gives_digest_and_config() {
        let valid = validate(DOC.as_bytes()).unwrap();
        assert_eq!(valid.digest_hex().len(), 96);
        assert_eq!(valid.snp_host_data_hex(), valid.digest_hex()[..64]);
        assert_eq!(valid.tdx_mr_config_id_hex(), valid.digest_hex());
        assert_eq!(valid.config.resources["token"], "test/key/token");
    }

    #[test]
    fn oversized_base64_is_refused_before_decoding() {
        let err = decode_annotation(&"A".repeat(MAX_ENCODED_BYTES + 4)).unwrap_err();
        assert!(
            matches!(err, InitDataDecodeError::EncodedTooLarge { .. }),
            "{err}"
        );
    }

    #[test]
    fn gzip_bomb_is_refused() {
        // 64 MiB of zeros compress to ~64 KiB of base64: under the encoded
        // limit, far over the document limit.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        let encoded = STANDARD.encode(&bomb);
        assert!(encoded.len() < MAX_ENCODED_BYTES, "{}", encoded.len());
        let err = decode_annotation(&encoded).unwrap_err();
        assert!(err.to_string().contains("compression bomb"), "{err}");
    }

    #[test]
    fn bad_encodings_are_named() {
        let err = decode_annotation("not base64 !").unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        let mut truncated = gzip(DOC.as_bytes());
        truncated.truncate(truncated.len() / 2);
        let err = decode_annotation(&STANDARD.encode(truncated)).unwrap_err();
        assert!(err.to_string().contains("gzip"), "{err}");
        let err = document_bytes(vec![b'#'; MAX_DOCUMENT_BYTES + 1]).unwrap_err();
        assert!(matches!(err, InitDataDecodeError::DocumentTooLarge { .. }));
    }

    #[test]
    fn every_bad_document_field_is_named() {
        let cases = [
            (DOC.replace("0.1.0", "0.2.0"), "version"),
            (DOC.replace("sha384", "md5"), "algorithm"),
            (
                DOC.replace("\"cloister.toml\"", "\"cloister.tml\""),
                "cloister.tml",
            ),
            (DOC.replace("http://", "gopher://"), "kbs url"),
            (DOC.replace("test/key/token", "token"), "resources.token"),
            (
                DOC.replace("vsock_port = 1026", "vsock_port = 3"),
                "vsock_port",
            ),
            ("version = \"0.1.0\"\n".to_owned(), "algorithm"),
            ("\u{0}".to_owned(), "toml"),
        ];
        for (doc, named) in cases {
            let err = validate(doc.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(named), "{named}: {err}");
        }
    }
}
