//! Intel TDX quotes, versions 4 and 5 (Intel TDX DCAP Quoting Library API,
//! appendix A).
//!
//! ```text
//! header (48)       version u16, att_key_type u16 (2 = ECDSA P-256), tee_type u32 (0x81),
//!                   reserved u32, qe_vendor_id [16], user_data [20]
//! v4: TD report (584) at 48
//! v5: body type u16 (2 = TDX 1.0, 3 = TDX 1.5), body size u32, TD report (584 or 648)
//! signature data length u32, then:
//!   quote signature [64] (r||s big-endian), attestation key [64] (x||y)
//!   certification data: type u16 (6 = QE report), size u32, then
//!     QE report [384] (SGX report body), QE report signature [64],
//!     QE auth data: size u16, bytes
//!     certification data: type u16 (5 = PCK chain, PEM), size u32, bytes
//! ```
//!
//! TD report: tee_tcb_svn [16], mr_seam [48], mr_signer_seam [48],
//! seam_attributes [8], td_attributes [8], xfam [8], mr_td [48],
//! mr_config_id [48], mr_owner [48], mr_owner_config [48], rtmr0-3 [4x48],
//! report_data [64]; TDX 1.5 adds tee_tcb_svn2 [16], mr_servicetd [48].

use thiserror::Error;

const HEADER_LEN: usize = 48;
const TD_REPORT_10_LEN: usize = 584;
const TD_REPORT_15_LEN: usize = 648;
const QE_REPORT_LEN: usize = 384;
/// TEE type of TDX in the quote header.
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Attestation key type ECDSA-256-with-P-256.
pub const ATT_KEY_ECDSA_P256: u16 = 2;
const CERT_DATA_QE_REPORT: u16 = 6;
const CERT_DATA_PCK_CHAIN: u16 = 5;

/// Errors from parsing a quote.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuoteError {
    /// Ran out of bytes.
    #[error("tdx quote truncated: {field} needs bytes {start}..{end}, quote has {len}")]
    Truncated {
        /// What was being read.
        field: &'static str,
        /// Start offset.
        start: usize,
        /// End offset.
        end: usize,
        /// Quote length.
        len: usize,
    },
    /// Version other than 4 or 5.
    #[error("unsupported tdx quote version {0} (supported: 4, 5)")]
    Version(u16),
    /// Not a TDX quote.
    #[error("quote tee type {0:#x} is not tdx (0x81)")]
    TeeType(u32),
    /// Not ECDSA P-256.
    #[error("quote attestation key type {0} is not ecdsa p-256 (2)")]
    KeyType(u16),
    /// Unknown v5 body type.
    #[error("tdx quote v5 body type {ty} with size {size} is not a td report (2/584 or 3/648)")]
    BodyType {
        /// Type.
        ty: u16,
        /// Size.
        size: u32,
    },
    /// Certification data of an unexpected type.
    #[error("tdx quote certification data type {found}, expected {expected}")]
    CertDataType {
        /// Found.
        found: u16,
        /// Expected.
        expected: u16,
    },
    /// Trailing bytes after the signature data.
    #[error("tdx quote has {0} bytes after its signature data")]
    Trailing(usize),
}

/// The TD report inside a quote.
#[derive(Debug, Clone)]
pub struct TdReport {
    /// TEE TCB SVN.
    pub tee_tcb_svn: [u8; 16],
    /// Measurement of the TDX module.
    pub mr_seam: Vec<u8>,
    /// Signer of the TDX module.
    pub mr_signer_seam: Vec<u8>,
    /// SEAM attributes.
    pub seam_attributes: u64,
    /// TD attributes (bit 0: debug).
    pub td_attributes: u64,
    /// XFAM.
    pub xfam: u64,
    /// Build-time measurement of the TD.
    pub mr_td: [u8; 48],
    /// Host-set config ID (init-data digest in cloister).
    pub mr_config_id: [u8; 48],
    /// Host-set owner.
    pub mr_owner: [u8; 48],
    /// Host-set owner config.
    pub mr_owner_config: [u8; 48],
    /// Runtime measurement registers.
    pub rtmr: [[u8; 48]; 4],
    /// Guest-supplied data.
    pub report_data: [u8; 64],
    /// TDX 1.5: second TEE TCB SVN.
    pub tee_tcb_svn2: Option<[u8; 16]>,
    /// TDX 1.5: service TD measurement.
    pub mr_servicetd: Option<Vec<u8>>,
}

/// A parsed quote with the byte ranges its signatures cover.
#[derive(Debug, Clone)]
pub struct TdxQuote {
    /// 4 or 5.
    pub version: u16,
    /// QE vendor ID.
    pub qe_vendor_id: [u8; 16],
    /// The TD report.
    pub td_report: TdReport,
    /// Quote signature r||s.
    pub signature: [u8; 64],
    /// Attestation public key x||y.
    pub attestation_key: [u8; 64],
    /// QE report (SGX report body, 384 bytes).
    pub qe_report: Vec<u8>,
    /// QE report signature r||s, by the PCK key.
    pub qe_report_signature: [u8; 64],
    /// QE authentication data.
    pub qe_auth_data: Vec<u8>,
    /// PCK certificate chain, PEM (PCK, intermediate, root).
    pub pck_chain_pem: Vec<u8>,
    /// Header and body as received: what the quote signature covers.
    pub signed: Vec<u8>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], QuoteError> {
        let end = self.pos.saturating_add(n);
        if end > self.b.len() {
            return Err(QuoteError::Truncated {
                field,
                start: self.pos,
                end,
                len: self.b.len(),
            });
        }
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, QuoteError> {
        let s = self.take(2, field)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, QuoteError> {
        let s = self.take(4, field)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn arr<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], QuoteError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, QuoteError> {
        Ok(u64::from_le_bytes(self.arr::<8>(field)?))
    }
}

fn parse_td_report(r: &mut Reader<'_>, tdx15: bool) -> Result<TdReport, QuoteError> {
    Ok(TdReport {
        tee_tcb_svn: r.arr("tee_tcb_svn")?,
        mr_seam: r.take(48, "mr_seam")?.to_vec(),
        mr_signer_seam: r.take(48, "mr_signer_seam")?.to_vec(),
        seam_attributes: r.u64("seam_attributes")?,
        td_attributes: r.u64("td_attributes")?,
        xfam: r.u64("xfam")?,
        mr_td: r.arr("mr_td")?,
        mr_config_id: r.arr("mr_config_id")?,
        mr_owner: r.arr("mr_owner")?,
        mr_owner_config: r.arr("mr_owner_config")?,
        rtmr: [
            r.arr("rtmr0")?,
            r.arr("rtmr1")?,
            r.arr("rtmr2")?,
            r.arr("rtmr3")?,
        ],
        report_data: r.arr("report_data")?,
        tee_tcb_svn2: if tdx15 {
            Some(r.arr("tee_tcb_svn2")?)
        } else {
            None
        },
        mr_servicetd: if tdx15 {
            Some(r.take(48, "mr_servicetd")?.to_vec())
        } else {
            None
        },
    })
}

impl TdReport {
    /// TD attribute bit 0: the TD is debuggable.
    pub fn debug(&self) -> bool {
        self.td_attributes & 1 != 0
    }
}

impl TdxQuote {
    /// Parses a v4 or v5 TDX quote with ECDSA P-256 and QE report
    /// certification data.
    pub fn parse(bytes: &[u8]) -> Result<Self, QuoteError> {
        let mut r = Reader { b: bytes, pos: 0 };
        let version = r.u16("version")?;
        if version != 4 && version != 5 {
            return Err(QuoteError::Version(version));
        }
        let key_type = r.u16("att_key_type")?;
        if key_type != ATT_KEY_ECDSA_P256 {
            return Err(QuoteError::KeyType(key_type));
        }
        let tee_type = r.u32("tee_type")?;
        if tee_type != TEE_TYPE_TDX {
            return Err(QuoteError::TeeType(tee_type));
        }
        r.take(4, "reserved")?;
        let qe_vendor_id = r.arr("qe_vendor_id")?;
        r.take(20, "user_data")?;
        debug_assert_eq!(r.pos, HEADER_LEN);
        let tdx15 = if version == 5 {
            let ty = r.u16("body_type")?;
            let size = r.u32("body_size")?;
            match (ty, size as usize) {
                (2, TD_REPORT_10_LEN) => false,
                (3, TD_REPORT_15_LEN) => true,
                _ => return Err(QuoteError::BodyType { ty, size }),
            }
        } else {
            false
        };
        let td_report = parse_td_report(&mut r, tdx15)?;
        let signed = bytes[..r.pos].to_vec();
        let sig_len = r.u32("signature_data_len")? as usize;
        let sig_start = r.pos;
        let signature = r.arr("quote_signature")?;
        let attestation_key = r.arr("attestation_key")?;
        let cert_type = r.u16("certification_data_type")?;
        if cert_type != CERT_DATA_QE_REPORT {
            return Err(QuoteError::CertDataType {
                found: cert_type,
                expected: CERT_DATA_QE_REPORT,
            });
        }
        let _outer_size = r.u32("certification_data_size")?;
        let qe_report = r.take(QE_REPORT_LEN, "qe_report")?.to_vec();
        let qe_report_signature = r.arr("qe_report_signature")?;
        let auth_len = r.u16("qe_auth_data_size")? as usize;
        let qe_auth_data = r.take(auth_len, "qe_auth_data")?.to_vec();
        let inner_type = r.u16("pck_certification_data_type")?;
        if inner_type != CERT_DATA_PCK_CHAIN {
            return Err(QuoteError::CertDataType {
                found: inner_type,
                expected: CERT_DATA_PCK_CHAIN,
            });
        }
        let chain_len = r.u32("pck_chain_size")? as usize;
        let pck_chain_pem = r.take(chain_len, "pck_chain")?.to_vec();
        // PEM chains are often NUL-terminated; anything else past the
        // declared signature data is an error.
        let end = sig_start.saturating_add(sig_len);
        if r.pos > end {
            return Err(QuoteError::Truncated {
                field: "signature_data",
                start: sig_start,
                end: r.pos,
                len: end,
            });
        }
        if bytes.len() > end {
            return Err(QuoteError::Trailing(bytes.len() - end));
        }
        Ok(Self {
            version,
            qe_vendor_id,
            td_report,
            signature,
            attestation_key,
            qe_report,
            qe_report_signature,
            qe_auth_data,
            pck_chain_pem,
            signed,
        })
    }

    /// The report_data field of the QE report (offset 320 of the SGX
    /// report body).
    pub fn qe_report_data(&self) -> &[u8] {
        &self.qe_report[320..384]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::testdata;

    fn quote(v: u8) -> Vec<u8> {
        std::fs::read(testdata(&format!("tdx/tdx_quote_{v}.dat"))).unwrap()
    }

    #[test]
    fn parse_v4_and_v5_recorded_quotes() {
        let q4 = TdxQuote::parse(&quote(4)).unwrap();
        assert_eq!(q4.version, 4);
        assert!(q4.td_report.tee_tcb_svn2.is_none());
        assert_eq!(q4.signed.len(), 48 + 584);
        assert_eq!(q4.qe_auth_data.len(), 32);
        assert!(q4.td_report.debug());
        assert!(q4.pck_chain_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
        let q5 = TdxQuote::parse(&quote(5)).unwrap();
        assert_eq!(q5.version, 5);
        assert!(q5.td_report.mr_servicetd.is_some());
        assert_eq!(q5.signed.len(), 48 + 6 + 648);
    }

    #[test]
    fn parse_every_truncation_returns_error() {
        let bytes = quote(4);
        for len in (0..bytes.len()).step_by(7) {
            assert!(TdxQuote::parse(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn parse_with_wrong_version_or_tee_returns_error() {
        let mut bytes = quote(4);
        bytes[0] = 3;
        assert_eq!(TdxQuote::parse(&bytes).unwrap_err(), QuoteError::Version(3));
        let mut bytes = quote(4);
        bytes[4] = 0;
        assert_eq!(TdxQuote::parse(&bytes).unwrap_err(), QuoteError::TeeType(0));
        let mut bytes = quote(5);
        bytes[48] = 9;
        assert!(matches!(
            TdxQuote::parse(&bytes),
            Err(QuoteError::BodyType { ty: 9, .. })
        ));
        let mut bytes = quote(4);
        bytes.push(0);
        assert_eq!(
            TdxQuote::parse(&bytes).unwrap_err(),
            QuoteError::Trailing(1)
        );
    }
}
