//! The confidential-computing event log (ACPI CCEL) of a TD and its replay
//! into RTMR values.
//!
//! The log is in TCG crypto-agile format: a first `TCG_PCR_EVENT` (SHA-1
//! layout) carrying the `Spec ID Event03` that lists the digest algorithms and
//! their sizes, then `TCG_PCR_EVENT2` records:
//!
//! ```text
//! mr_index u32 | event_type u32 | digest count u32 | { alg_id u16, digest }* | event_size u32 | event
//! ```
//!
//! CC measurement register index 0 is MRTD, 1-4 are RTMR0-3. Each event
//! extends `RTMR = SHA-384(RTMR || digest)`; `EV_NO_ACTION` events are not
//! extended. The log ends at the buffer's end or at an all-ones / all-zero
//! header (unused ACPI area).

use sha2::{Digest, Sha384};
use thiserror::Error;

const EV_NO_ACTION: u32 = 0x3;
const TPM_ALG_SHA384: u16 = 0x000C;

/// Errors from parsing an event log.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CcelError {
    /// Record runs past the end.
    #[error("ccel record at offset {0} is truncated")]
    Truncated(usize),
    /// First event is not a Spec ID event.
    #[error("ccel does not start with a tcg spec id event")]
    NoSpecId,
    /// Digest algorithm not listed in the Spec ID event.
    #[error("ccel record at offset {offset} uses digest algorithm {alg:#x} not declared in the spec id event")]
    UnknownAlgorithm {
        /// Offset.
        offset: usize,
        /// Algorithm ID.
        alg: u16,
    },
    /// MR index out of range.
    #[error("ccel record at offset {offset} names measurement register {index} (valid 0-4)")]
    MrIndex {
        /// Offset.
        offset: usize,
        /// Index.
        index: u32,
    },
    /// Event lacks a SHA-384 digest.
    #[error("ccel record at offset {0} has no sha-384 digest")]
    NoSha384(usize),
    /// Replay disagrees with the quote.
    #[error("rtmr{index} replayed from the ccel is {replayed}, quote says {quoted}")]
    RtmrMismatch {
        /// RTMR number.
        index: usize,
        /// hex replayed.
        replayed: String,
        /// hex quoted.
        quoted: String,
    },
}

/// One measured event.
#[derive(Debug, Clone)]
pub struct CcelEvent {
    /// CC MR index (0 MRTD, 1-4 RTMR0-3).
    pub mr_index: u32,
    /// TCG event type.
    pub event_type: u32,
    /// SHA-384 digest extended.
    pub sha384: [u8; 48],
    /// Event data.
    pub data: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, CcelError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(CcelError::Truncated(off))
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, CcelError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(CcelError::Truncated(off))
}

/// Parses the log into its events (Spec ID header excluded).
pub fn parse(log: &[u8]) -> Result<Vec<CcelEvent>, CcelError> {
    // TCG_PCR_EVENT: pcr u32, type u32, sha1 [20], size u32, event.
    let first_type = u32_at(log, 4)?;
    let first_size = u32_at(log, 28)? as usize;
    let spec = log
        .get(32..32 + first_size)
        .ok_or(CcelError::Truncated(32))?;
    if first_type != EV_NO_ACTION || !spec.starts_with(b"Spec ID Event03\0") {
        return Err(CcelError::NoSpecId);
    }
    // Spec ID event: signature [16], platform_class u32, version 3 bytes,
    // uintn_size u8, number_of_algorithms u32, {alg u16, size u16}*.
    let count = u32_at(spec, 24)? as usize;
    let mut sizes = Vec::new();
    for i in 0..count.min(16) {
        let alg = u16_at(spec, 28 + 4 * i)?;
        let size = u16_at(spec, 30 + 4 * i)? as usize;
        sizes.push((alg, size));
    }
    let mut events = Vec::new();
    let mut pos = 32 + first_size;
    while pos + 8 <= log.len() {
        let mr_index = u32_at(log, pos)?;
        let event_type = u32_at(log, pos + 4)?;
        if mr_index == u32::MAX || event_type == u32::MAX || (mr_index == 0 && event_type == 0) {
            break;
        }
        let start = pos;
        let digests = u32_at(log, pos + 8)? as usize;
        pos += 12;
        let mut sha384 = None;
        for _ in 0..digests {
            let alg = u16_at(log, pos)?;
            let size = sizes
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, s)| *s)
                .ok_or(CcelError::UnknownAlgorithm { offset: start, alg })?;
            let digest = log
                .get(pos + 2..pos + 2 + size)
                .ok_or(CcelError::Truncated(pos))?;
            if alg == TPM_ALG_SHA384 && size == 48 {
                let mut d = [0u8; 48];
                d.copy_from_slice(digest);
                sha384 = Some(d);
            }
            pos += 2 + size;
        }
        let size = u32_at(log, pos)? as usize;
        let data = log
            .get(pos + 4..pos + 4 + size)
            .ok_or(CcelError::Truncated(pos))?
            .to_vec();
        pos += 4 + size;
        if mr_index > 4 {
            return Err(CcelError::MrIndex {
                offset: start,
                index: mr_index,
            });
        }
        events.push(CcelEvent {
            mr_index,
            event_type,
            sha384: sha384.ok_or(CcelError::NoSha384(start))?,
            data,
        });
    }
    Ok(events)
}

/// Replays the events into RTMR0-3.
pub fn replay(events: &[CcelEvent]) -> [[u8; 48]; 4] {
    let mut rtmr = [[0u8; 48]; 4];
    for event in events {
        if event.event_type == EV_NO_ACTION || event.mr_index == 0 {
            continue;
        }
        let slot = &mut rtmr[(event.mr_index - 1) as usize];
        let mut h = Sha384::new();
        h.update(*slot);
        h.update(event.sha384);
        slot.copy_from_slice(&h.finalize());
    }
    rtmr
}

/// Replays the log and compares with the quoted RTMRs.
pub fn check_against(log: &[u8], quoted: &[[u8; 48]; 4]) -> Result<Vec<CcelEvent>, CcelError> {
    let events = parse(log)?;
    let replayed = replay(&events);
    for (index, (r, q)) in replayed.iter().zip(quoted.iter()).enumerate() {
        if r != q {
            return Err(CcelError::RtmrMismatch {
                index,
                replayed: hex::encode(r),
                quoted: hex::encode(q),
            });
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::testdata;

    fn ccel() -> Vec<u8> {
        std::fs::read(testdata("tdx/CCEL_data")).unwrap()
    }

    #[test]
    fn recorded_ccel_parses_and_replays_to_pinned_rtmrs() {
        // The recorded log holds five firmware events (RTMR0: 2, RTMR1: 3);
        // the rest of the 1 MiB ACPI area is zero. The expected values were
        // computed separately with Python's hashlib over the same file.
        let events = parse(&ccel()).unwrap();
        let indexes: Vec<u32> = events.iter().map(|e| e.mr_index).collect();
        assert_eq!(indexes, [1, 1, 2, 2, 2]);
        let rtmr = replay(&events);
        assert_eq!(
            hex::encode(rtmr[0]),
            "2dc712306a963eadb894ad47dbaa17df44814151555aee11cbb843becca88950ffd079664902e6f22c66f7c8213543f4"
        );
        assert_eq!(
            hex::encode(rtmr[1]),
            "0fa3be56af61208bbd179dc7b124988eb929319154663c539d6f46445ecac2fec287075047ff7bd1922829fec28cd3cf"
        );
        assert_eq!(rtmr[2], [0u8; 48]);
    }

    #[test]
    fn recorded_ccel_against_another_tds_quote_returns_rtmr_mismatch() {
        // The log and the quote come from different TDs: replay must notice.
        let quote =
            crate::tdx::TdxQuote::parse(&std::fs::read(testdata("tdx/tdx_quote_4.dat")).unwrap())
                .unwrap();
        assert!(matches!(
            check_against(&ccel(), &quote.td_report.rtmr),
            Err(CcelError::RtmrMismatch { index: 0, .. })
        ));
    }

    #[test]
    fn changed_event_digest_changes_replay_and_is_caught() {
        let log = ccel();
        let rtmr = replay(&parse(&log).unwrap());
        check_against(&log, &rtmr).unwrap();
        let mut events = parse(&log).unwrap();
        let target = events
            .iter_mut()
            .find(|e| e.mr_index == 1 && e.event_type != EV_NO_ACTION)
            .unwrap();
        target.sha384[0] ^= 1;
        let tampered = replay(&events);
        assert_ne!(tampered[0], rtmr[0]);
        assert!(matches!(
            check_against(&log, &tampered),
            Err(CcelError::RtmrMismatch { index: 0, .. })
        ));
    }

    #[test]
    fn truncated_or_foreign_log_is_rejected() {
        let log = ccel();
        assert!(parse(&log[..20]).is_err());
        assert_eq!(parse(&[0u8; 64]).unwrap_err(), CcelError::NoSpecId);
        for len in [100usize, 300, 1000, 2000] {
            // Cutting inside a record must be an error or a shorter log, never a panic.
            let _ = parse(&log[..len]);
        }
    }
}
