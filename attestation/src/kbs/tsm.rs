//! Hardware evidence inside a guest through Linux's configfs-tsm report
//! interface (`/sys/kernel/config/tsm/report`), which serves both SEV-SNP
//! (`sev_guest`) and TDX (`tdx_guest`):
//!
//! ```text
//! mkdir report/<name>; write inblob (64 bytes REPORT_DATA)
//! read generation, provider, outblob (SNP report / TDX quote), auxblob (SNP certs)
//! re-read generation: unchanged, else another writer raced us; rmdir
//! ```
//!
//! The SNP `auxblob` is the GHCB certificate table: `{guid [16], offset u32,
//! length u32}` entries ended by an all-zero entry, offsets from the table
//! start; the VCEK (or VLEK) is what the verifier needs.
//!
//! File access sits behind [`TsmReports`] so the evidence assembly is tested
//! with recorded reports; [`ConfigfsTsm`] is the real thing.

use super::attester::{Attester, AttesterError};
use super::protocol::Tee;
use crate::certs::Cert;
use crate::measure::guid_le;
use crate::snp::SnpEvidence;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const VCEK_GUID: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
const VLEK_GUID: &str = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";
/// Where the kernel exposes the TD's event log.
pub const CCEL_PATH: &str = "/sys/firmware/acpi/tables/data/CCEL";

/// One report from the TSM.
#[derive(Debug, Clone)]
pub struct TsmReport {
    /// `sev_guest` or `tdx_guest`.
    pub provider: String,
    /// The report (SNP) or quote (TDX).
    pub outblob: Vec<u8>,
    /// SNP certificate table (may be empty).
    pub auxblob: Vec<u8>,
}

/// Source of TSM reports.
pub trait TsmReports: Send + Sync {
    /// A report whose REPORT_DATA is `inblob`.
    fn report(&self, inblob: &[u8; 64]) -> Result<TsmReport, AttesterError>;
}

/// configfs-tsm under `root` (normally `/sys/kernel/config/tsm/report`).
#[derive(Debug, Clone)]
pub struct ConfigfsTsm {
    root: PathBuf,
}

impl Default for ConfigfsTsm {
    fn default() -> Self {
        Self::new("/sys/kernel/config/tsm/report")
    }
}

/// errno "no such device or address" (the same on every Linux
/// architecture), which configfs-tsm returns for a new report entry while
/// no TEE driver is registered.
const ENXIO: i32 = 6;

fn platform(tee: &str, reason: String) -> AttesterError {
    AttesterError::Platform {
        tee: tee.into(),
        reason,
    }
}

impl ConfigfsTsm {
    /// Reports under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn read(dir: &Path, name: &str) -> Result<Vec<u8>, AttesterError> {
        std::fs::read(dir.join(name))
            .map_err(|e| platform("tsm", format!("reading {}: {e}", dir.join(name).display())))
    }
}

impl TsmReports for ConfigfsTsm {
    fn report(&self, inblob: &[u8; 64]) -> Result<TsmReport, AttesterError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = self.root.join(format!(
            "cloister-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| {
            // The two ways a guest ends up without reports, told apart:
            // configfs-tsm refuses an entry while no TEE driver has
            // registered (ENXIO); the folder is missing when configfs is
            // not mounted or the kernel lacks TSM_REPORTS.
            let why = match e.raw_os_error() {
                Some(ENXIO) => {
                    "no TEE driver registered with configfs-tsm: the kernel is not running as an SEV-SNP or TDX guest"
                        .to_owned()
                }
                _ if e.kind() == std::io::ErrorKind::NotFound => format!(
                    "{} is missing: configfs not mounted, or a kernel without CONFIG_TSM_REPORTS",
                    self.root.display()
                ),
                _ => e.to_string(),
            };
            platform("tsm", format!("creating {}: {why}", dir.display()))
        })?;
        let result = (|| {
            std::fs::write(dir.join("inblob"), inblob)
                .map_err(|e| platform("tsm", format!("writing inblob: {e}")))?;
            let generation = Self::read(&dir, "generation")?;
            let report = TsmReport {
                provider: String::from_utf8_lossy(&Self::read(&dir, "provider")?)
                    .trim()
                    .to_owned(),
                outblob: Self::read(&dir, "outblob")?,
                auxblob: Self::read(&dir, "auxblob").unwrap_or_default(),
            };
            if Self::read(&dir, "generation")? != generation {
                return Err(platform(
                    "tsm",
                    "report entry was rewritten concurrently (generation changed)".into(),
                ));
            }
            Ok(report)
        })();
        // Best effort: a leftover entry costs a little kernel memory only.
        let _ = std::fs::remove_dir(&dir);
        result
    }
}

/// Finds the VCEK or VLEK in an SNP certificate table.
pub fn endorsement_from_cert_table(table: &[u8]) -> Result<Cert, AttesterError> {
    let wanted = [guid_le(VCEK_GUID), guid_le(VLEK_GUID)];
    for entry in table.chunks_exact(24) {
        let guid = &entry[..16];
        if guid.iter().all(|&b| b == 0) {
            break;
        }
        if !wanted.iter().any(|w| w.as_slice() == guid) {
            continue;
        }
        let offset = u32::from_le_bytes([entry[16], entry[17], entry[18], entry[19]]) as usize;
        let len = u32::from_le_bytes([entry[20], entry[21], entry[22], entry[23]]) as usize;
        let der = offset
            .checked_add(len)
            .and_then(|end| table.get(offset..end))
            .ok_or_else(|| {
                platform(
                    "snp",
                    format!("certificate table entry {offset}+{len} runs past its end"),
                )
            })?;
        return Cert::from_der(der).map_err(|e| platform("snp", e.to_string()));
    }
    Err(platform(
        "snp",
        "certificate table has no vcek or vlek (host did not provide certificates)".into(),
    ))
}

/// Evidence from configfs-tsm (or another [`TsmReports`]).
pub struct TsmAttester<R: TsmReports> {
    reports: R,
    tee: Tee,
    ccel: Option<PathBuf>,
}

impl<R: TsmReports> TsmAttester<R> {
    /// An attester for `tee` (`Snp` or `Tdx`); TDX evidence includes the
    /// event log at `ccel` when it can be read.
    pub fn new(reports: R, tee: Tee, ccel: Option<PathBuf>) -> Self {
        Self { reports, tee, ccel }
    }
}

impl<R: TsmReports> Attester for TsmAttester<R> {
    fn tee(&self) -> Tee {
        self.tee
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, AttesterError> {
        let report = self.reports.report(report_data)?;
        match (self.tee, report.provider.as_str()) {
            (Tee::Snp, "sev_guest") => SnpEvidence {
                endorsement: endorsement_from_cert_table(&report.auxblob)?,
                report: report.outblob,
            }
            .to_json()
            .map_err(|e| platform("snp", e.to_string())),
            (Tee::Tdx, "tdx_guest") => {
                let mut ev = json!({"quote": STANDARD.encode(&report.outblob)});
                if let Some(log) = self.ccel.as_ref().and_then(|p| std::fs::read(p).ok()) {
                    ev["cc_eventlog"] = STANDARD.encode(log).into();
                }
                Ok(ev)
            }
            (tee, provider) => Err(platform(
                tee.as_ref(),
                format!("tsm provider {provider:?} does not produce {tee} evidence"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The round trip through the KBS verifier needs the server half.
    #[cfg(feature = "kbs-server")]
    use crate::kbs::config::ReferenceValues;
    #[cfg(feature = "kbs-server")]
    use crate::kbs::verifier::verify_evidence;
    #[cfg(feature = "kbs-server")]
    use crate::snp::AttestationReport;
    #[cfg(feature = "kbs-server")]
    use crate::test_support::fixed_now;
    use crate::test_support::testdata;

    struct Recorded(TsmReport);

    impl TsmReports for Recorded {
        fn report(&self, _inblob: &[u8; 64]) -> Result<TsmReport, AttesterError> {
            Ok(self.0.clone())
        }
    }

    fn cert_table(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let header = 24 * (entries.len() + 1);
        let mut table = vec![0u8; header];
        let mut offset = header;
        for (i, (guid, der)) in entries.iter().enumerate() {
            let e = &mut table[24 * i..24 * i + 24];
            e[..16].copy_from_slice(&guid_le(guid));
            e[16..20].copy_from_slice(&(offset as u32).to_le_bytes());
            e[20..24].copy_from_slice(&(der.len() as u32).to_le_bytes());
            offset += der.len();
        }
        for (_, der) in entries {
            table.extend_from_slice(der);
        }
        table
    }

    #[test]
    #[cfg(feature = "kbs-server")]
    fn snp_evidence_from_tsm_verifies_at_the_kbs() {
        let report = std::fs::read(testdata("snp/test-report.bin")).unwrap();
        let vcek = std::fs::read(testdata("snp/test-vcek.der")).unwrap();
        let ask_dummy = [0x30u8, 0x00];
        let parsed = AttestationReport::parse(&report).unwrap();
        let attester = TsmAttester::new(
            Recorded(TsmReport {
                provider: "sev_guest".into(),
                outblob: report,
                auxblob: cert_table(&[
                    ("4ab7b379-bbac-4fe4-a02f-05aef327c782", &ask_dummy),
                    (VCEK_GUID, &vcek),
                ]),
            }),
            Tee::Snp,
            None,
        );
        let evidence = attester.evidence(&parsed.report_data).unwrap();
        let mut refs = ReferenceValues::default();
        refs.snp.measurements = vec![parsed.measurement];
        verify_evidence(
            Tee::Snp,
            &evidence,
            &parsed.report_data,
            None,
            &refs,
            false,
            fixed_now(),
        )
        .unwrap();
    }

    #[test]
    fn tdx_evidence_from_tsm_carries_quote_and_log() {
        let quote = std::fs::read(testdata("tdx/tdx_quote_4.dat")).unwrap();
        let attester = TsmAttester::new(
            Recorded(TsmReport {
                provider: "tdx_guest".into(),
                outblob: quote.clone(),
                auxblob: Vec::new(),
            }),
            Tee::Tdx,
            Some(testdata("tdx/CCEL_data")),
        );
        let ev = attester.evidence(&[0u8; 64]).unwrap();
        assert_eq!(
            STANDARD.decode(ev["quote"].as_str().unwrap()).unwrap(),
            quote
        );
        assert!(ev["cc_eventlog"].is_string());
    }

    #[test]
    fn wrong_provider_and_missing_certs_are_errors() {
        let attester = TsmAttester::new(
            Recorded(TsmReport {
                provider: "tdx_guest".into(),
                outblob: vec![],
                auxblob: vec![],
            }),
            Tee::Snp,
            None,
        );
        assert!(attester.evidence(&[0u8; 64]).is_err());
        assert!(endorsement_from_cert_table(&[]).is_err());
        let mut bad = cert_table(&[(VCEK_GUID, &[1, 2, 3])]);
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(endorsement_from_cert_table(&bad).is_err());
    }

    #[test]
    fn configfs_without_tsm_reports_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let tsm = ConfigfsTsm::new(dir.path().join("absent"));
        let err = tsm.report(&[0u8; 64]).unwrap_err().to_string();
        assert!(err.contains("creating"), "{err}");
        assert!(err.contains("CONFIG_TSM_REPORTS"), "{err}");
        // A plain directory is not configfs: no outblob appears.
        let tsm = ConfigfsTsm::new(dir.path());
        let err = tsm.report(&[0u8; 64]).unwrap_err().to_string();
        assert!(
            err.contains("generation") || err.contains("provider"),
            "{err}"
        );
    }
}
