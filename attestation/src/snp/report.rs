//! The SEV-SNP attestation report (`ATTESTATION_REPORT`, SEV-SNP ABI spec
//! table 22), 1184 bytes, versions 2 to 5.
//!
//! ```text
//! 0x000 version u32        0x004 guest_svn u32     0x008 policy u64
//! 0x010 family_id [16]     0x020 image_id [16]     0x030 vmpl u32
//! 0x034 signature_algo u32 0x038 current_tcb u64   0x040 platform_info u64
//! 0x048 flags u32 (author_key_en, mask_chip_key, signing_key bits 2-4)
//! 0x050 report_data [64]   0x090 measurement [48]  0x0C0 host_data [32]
//! 0x0E0 id_key_digest [48] 0x110 author_key_digest [48]
//! 0x140 report_id [32]     0x160 report_id_ma [32] 0x180 reported_tcb u64
//! 0x188 cpuid fam/mod/step (v3+)                   0x1A0 chip_id [64]
//! 0x1E0 committed_tcb u64  0x1E8 current build/minor/major
//! 0x1EC committed build/minor/major                0x1F0 launch_tcb u64
//! 0x1F8 launch_mit_vector u64 (v5)                 0x200 current_mit_vector u64 (v5)
//! 0x2A0 signature: r [72] little-endian, s [72] little-endian, reserved
//! ```
//!
//! The signature covers bytes 0x000-0x29F exactly as the firmware wrote them;
//! `ReportBytes` keeps them so verification never hashes a re-serialisation.

use super::tcb::{Generation, TcbVersion};
use serde::Serialize;
use thiserror::Error;

/// Size of an attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// End of the signed area.
pub const SIGNED_LEN: usize = 0x2A0;
const SIG_COMPONENT_LEN: usize = 72;

/// Errors from parsing a report.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    /// Wrong length.
    #[error("snp report is {0} bytes, expected 1184")]
    Length(usize),
    /// Version outside 2..=5.
    #[error("unsupported snp report version {0} (supported: 2-5)")]
    Version(u32),
    /// Signature algorithm other than ECDSA P-384 with SHA-384.
    #[error("unsupported snp signature algorithm {0} (expected 1, ecdsa p-384 sha-384)")]
    SignatureAlgorithm(u32),
    /// A non-zero byte beyond the 48-byte scalar in the 72-byte r/s fields.
    #[error("snp signature component {0} has non-zero bytes past its 48-byte scalar")]
    SignaturePadding(&'static str),
    /// Signing key field with an undefined value.
    #[error("snp report names signing key {0}, which is undefined (0 vcek, 1 vlek, 7 none)")]
    SigningKey(u32),
}

/// Which key signed the report (`flags` bits 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningKey {
    /// Versioned Chip Endorsement Key.
    Vcek,
    /// Versioned Loaded Endorsement Key (cloud provider).
    Vlek,
    /// Not signed.
    None,
}

/// Guest policy bits (SEV-SNP ABI spec, table 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestPolicy(pub u64);

impl GuestPolicy {
    /// Minimum ABI minor version.
    pub fn abi_minor(self) -> u8 {
        (self.0 & 0xFF) as u8
    }
    /// Minimum ABI major version.
    pub fn abi_major(self) -> u8 {
        ((self.0 >> 8) & 0xFF) as u8
    }
    /// SMT allowed.
    pub fn smt_allowed(self) -> bool {
        self.0 & (1 << 17) != 0
    }
    /// Migration agent allowed.
    pub fn migrate_ma_allowed(self) -> bool {
        self.0 & (1 << 18) != 0
    }
    /// Debugging allowed: the hypervisor can read and write guest memory.
    pub fn debug_allowed(self) -> bool {
        self.0 & (1 << 19) != 0
    }
    /// Guest limited to a single socket.
    pub fn single_socket(self) -> bool {
        self.0 & (1 << 20) != 0
    }
}

/// One parsed attestation report, with the raw bytes it came from.
#[derive(Debug, Clone, Serialize)]
pub struct AttestationReport {
    /// Report format version (2-5).
    pub version: u32,
    /// Guest SVN.
    pub guest_svn: u32,
    /// Guest policy.
    pub policy: GuestPolicy,
    /// Family ID supplied at launch (ID block).
    #[serde(with = "hex_bytes")]
    pub family_id: [u8; 16],
    /// Image ID supplied at launch (ID block).
    #[serde(with = "hex_bytes")]
    pub image_id: [u8; 16],
    /// VMPL the report was requested from.
    pub vmpl: u32,
    /// Signature algorithm (1 = ECDSA P-384 SHA-384).
    pub signature_algo: u32,
    /// Raw current TCB.
    pub current_tcb: u64,
    /// Platform info bits (SMT enabled, TSME enabled, ...).
    pub platform_info: u64,
    /// Whether the author key digest is present.
    pub author_key_en: bool,
    /// Whether chip_id is masked to zero.
    pub mask_chip_key: bool,
    /// Which key signed the report.
    pub signing_key: SigningKey,
    /// Guest-supplied data (nonce / key hash binding).
    #[serde(with = "hex_bytes")]
    pub report_data: [u8; 64],
    /// Launch measurement.
    #[serde(with = "hex_bytes")]
    pub measurement: [u8; 48],
    /// Host-supplied data at launch (init-data digest in cloister).
    #[serde(with = "hex_bytes")]
    pub host_data: [u8; 32],
    /// SHA-384 of the ID key.
    #[serde(with = "hex_bytes")]
    pub id_key_digest: [u8; 48],
    /// SHA-384 of the author key.
    #[serde(with = "hex_bytes")]
    pub author_key_digest: [u8; 48],
    /// Report ID of the guest.
    #[serde(with = "hex_bytes")]
    pub report_id: [u8; 32],
    /// Report ID of the migration agent.
    #[serde(with = "hex_bytes")]
    pub report_id_ma: [u8; 32],
    /// Raw reported TCB (the one the VCEK is derived from).
    pub reported_tcb: u64,
    /// CPUID family, model, stepping (version 3 and later).
    pub cpuid: Option<(u8, u8, u8)>,
    /// Chip identifier (zero when masked).
    #[serde(with = "hex_bytes")]
    pub chip_id: [u8; 64],
    /// Raw committed TCB.
    pub committed_tcb: u64,
    /// Current firmware version (major, minor, build).
    pub current_version: (u8, u8, u8),
    /// Committed firmware version (major, minor, build).
    pub committed_version: (u8, u8, u8),
    /// Raw TCB at launch.
    pub launch_tcb: u64,
    /// Mitigation vectors at launch and now (version 5 and later).
    pub mit_vectors: Option<(u64, u64)>,
    /// Signature r, big-endian.
    #[serde(skip)]
    pub signature_r: [u8; 48],
    /// Signature s, big-endian.
    #[serde(skip)]
    pub signature_s: [u8; 48],
    #[serde(skip)]
    raw: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn arr<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

/// Little-endian 72-byte field to a big-endian 48-byte P-384 scalar.
fn scalar_from_le(field: &[u8], name: &'static str) -> Result<[u8; 48], ReportError> {
    if field[48..].iter().any(|&b| b != 0) {
        return Err(ReportError::SignaturePadding(name));
    }
    let mut out = [0u8; 48];
    for (o, i) in out.iter_mut().zip(field[..48].iter().rev()) {
        *o = *i;
    }
    Ok(out)
}

impl AttestationReport {
    /// Parses a 1184-byte report. The bytes are kept for signature checks.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReportError> {
        if bytes.len() != REPORT_LEN {
            return Err(ReportError::Length(bytes.len()));
        }
        let b = bytes;
        let version = u32_at(b, 0x00);
        if !(2..=5).contains(&version) {
            return Err(ReportError::Version(version));
        }
        let signature_algo = u32_at(b, 0x34);
        if signature_algo != 1 {
            return Err(ReportError::SignatureAlgorithm(signature_algo));
        }
        let flags = u32_at(b, 0x48);
        let signing_key = match (flags >> 2) & 0x7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            other => return Err(ReportError::SigningKey(other)),
        };
        let sig = &b[SIGNED_LEN..SIGNED_LEN + 2 * SIG_COMPONENT_LEN];
        let signature_r = scalar_from_le(&sig[..SIG_COMPONENT_LEN], "r")?;
        let signature_s = scalar_from_le(&sig[SIG_COMPONENT_LEN..], "s")?;
        Ok(Self {
            version,
            guest_svn: u32_at(b, 0x04),
            policy: GuestPolicy(u64_at(b, 0x08)),
            family_id: arr(b, 0x10),
            image_id: arr(b, 0x20),
            vmpl: u32_at(b, 0x30),
            signature_algo,
            current_tcb: u64_at(b, 0x38),
            platform_info: u64_at(b, 0x40),
            author_key_en: flags & 1 != 0,
            mask_chip_key: flags & 2 != 0,
            signing_key,
            report_data: arr(b, 0x50),
            measurement: arr(b, 0x90),
            host_data: arr(b, 0xC0),
            id_key_digest: arr(b, 0xE0),
            author_key_digest: arr(b, 0x110),
            report_id: arr(b, 0x140),
            report_id_ma: arr(b, 0x160),
            reported_tcb: u64_at(b, 0x180),
            cpuid: (version >= 3).then(|| (b[0x188], b[0x189], b[0x18A])),
            chip_id: arr(b, 0x1A0),
            committed_tcb: u64_at(b, 0x1E0),
            current_version: (b[0x1EA], b[0x1E9], b[0x1E8]),
            committed_version: (b[0x1EE], b[0x1ED], b[0x1EC]),
            launch_tcb: u64_at(b, 0x1F0),
            mit_vectors: (version >= 5).then(|| (u64_at(b, 0x1F8), u64_at(b, 0x200))),
            signature_r,
            signature_s,
            raw: bytes.to_vec(),
        })
    }

    /// The bytes the signature covers (0x000-0x29F), as received.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.raw[..SIGNED_LEN]
    }

    /// The whole report as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The processor generation named by the report's CPUID fields (v3+).
    pub fn generation_from_cpuid(&self) -> Option<Generation> {
        self.cpuid
            .and_then(|(family, model, _)| Generation::from_cpuid(family, model))
    }

    /// The reported TCB in the given generation's layout.
    pub fn reported_tcb(&self, generation: Generation) -> TcbVersion {
        TcbVersion::decode(self.reported_tcb, generation)
    }
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::testdata;

    fn recorded() -> Vec<u8> {
        std::fs::read(testdata("snp/test-report.bin")).unwrap()
    }

    #[test]
    fn parse_recorded_milan_report_reads_fields() {
        let report = AttestationReport::parse(&recorded()).unwrap();
        assert_eq!(report.version, 2);
        assert_eq!(report.guest_svn, 4);
        assert_eq!(report.policy.0, 0x3_001F);
        assert!(report.policy.smt_allowed());
        assert!(!report.policy.debug_allowed());
        assert_eq!(report.vmpl, 0);
        assert_eq!(report.signing_key, SigningKey::Vcek);
        assert_eq!(report.cpuid, None);
        assert_eq!(
            hex::encode(report.measurement),
            "a1f39304132 47bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c23500644e0e692e6be917f9050d3d38c"
                .replace(' ', "")
        );
        assert_eq!(report.current_version, (1, 52, 4));
        let tcb = report.reported_tcb(Generation::Milan);
        assert_eq!((tcb.bootloader, tcb.snp, tcb.microcode), (3, 8, 0x73));
        assert_eq!(report.signature_r[47], report.as_bytes()[0x2A0]);
    }

    #[test]
    fn parse_with_truncated_report_returns_length_error() {
        let bytes = recorded();
        assert_eq!(
            AttestationReport::parse(&bytes[..1183]).unwrap_err(),
            ReportError::Length(1183)
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            AttestationReport::parse(&long).unwrap_err(),
            ReportError::Length(1185)
        );
    }

    #[test]
    fn parse_with_version_1_or_6_returns_version_error() {
        for v in [0u32, 1, 6, 0xFFFF_FFFF] {
            let mut bytes = recorded();
            bytes[..4].copy_from_slice(&v.to_le_bytes());
            assert_eq!(
                AttestationReport::parse(&bytes).unwrap_err(),
                ReportError::Version(v)
            );
        }
    }

    #[test]
    fn parse_versions_3_and_5_read_cpuid_and_mitigation_vectors() {
        let mut bytes = recorded();
        bytes[..4].copy_from_slice(&5u32.to_le_bytes());
        bytes[0x188] = 0x1A;
        bytes[0x189] = 0x02;
        bytes[0x1F8] = 0x11;
        bytes[0x200] = 0x22;
        let report = AttestationReport::parse(&bytes).unwrap();
        assert_eq!(report.generation_from_cpuid(), Some(Generation::Turin));
        assert_eq!(report.mit_vectors, Some((0x11, 0x22)));
        bytes[..4].copy_from_slice(&3u32.to_le_bytes());
        let report = AttestationReport::parse(&bytes).unwrap();
        assert_eq!(report.mit_vectors, None);
        assert_eq!(report.cpuid, Some((0x1A, 0x02, 0)));
    }

    #[test]
    fn parse_with_dirty_signature_padding_returns_error() {
        let mut bytes = recorded();
        bytes[0x2A0 + 72 + 60] = 1;
        assert_eq!(
            AttestationReport::parse(&bytes).unwrap_err(),
            ReportError::SignaturePadding("s")
        );
    }

    #[test]
    fn parse_with_undefined_signing_key_returns_error() {
        let mut bytes = recorded();
        bytes[0x48] = 3 << 2;
        assert_eq!(
            AttestationReport::parse(&bytes).unwrap_err(),
            ReportError::SigningKey(3)
        );
    }
}
