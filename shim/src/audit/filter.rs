//! `cloister audit`: reading an audit file and choosing records.
//!
//! A line that is not a record (cut short by a full disk, edited by hand)
//! is reported with its line number and skipped: one bad line must not
//! hide the rest of the trail.

use std::fmt::Write as _;
use std::io::BufRead;
use std::time::SystemTime;

use super::record::{AuditRecord, Decision, RecordKind};
use super::time::{parse_rfc3339, parse_time_bound, TimeError};

/// Errors of `cloister audit`'s arguments and input.
#[derive(Debug, thiserror::Error)]
pub enum AuditFilterError {
    #[error("--{flag} {value:?}: {source}")]
    Time {
        flag: &'static str,
        value: String,
        source: TimeError,
    },
    #[error("--decision {0:?}: expected allowed, denied or failed")]
    Decision(String),
    #[error("--kind {0:?}: expected task, agent or security")]
    Kind(String),
    #[error("cannot read audit file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Which records to show; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub pod: Option<String>,
    pub container: Option<String>,
    /// Case-insensitive: `create` matches `Create`.
    pub operation: Option<String>,
    pub decision: Option<Decision>,
    pub kind: Option<RecordKind>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

/// The filter flags as typed.
#[derive(Debug, Clone, Default)]
pub struct FilterArgs<'a> {
    pub pod: Option<&'a str>,
    pub container: Option<&'a str>,
    pub operation: Option<&'a str>,
    pub decision: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub since: Option<&'a str>,
    pub until: Option<&'a str>,
}

impl AuditFilter {
    /// Parses the flags; relative times count back from `now`.
    pub fn parse(args: &FilterArgs<'_>, now: SystemTime) -> Result<Self, AuditFilterError> {
        let time = |flag: &'static str, value: Option<&str>| {
            value
                .map(|v| {
                    parse_time_bound(v, now).map_err(|source| AuditFilterError::Time {
                        flag,
                        value: v.to_owned(),
                        source,
                    })
                })
                .transpose()
        };
        let decision = args
            .decision
            .map(|d| {
                Decision::ALL
                    .into_iter()
                    .find(|x| x.as_str().eq_ignore_ascii_case(d))
                    .ok_or_else(|| AuditFilterError::Decision(d.to_owned()))
            })
            .transpose()?;
        let kind = args
            .kind
            .map(|k| {
                RecordKind::ALL
                    .into_iter()
                    .find(|x| x.as_str().eq_ignore_ascii_case(k))
                    .ok_or_else(|| AuditFilterError::Kind(k.to_owned()))
            })
            .transpose()?;
        Ok(Self {
            pod: args.pod.map(str::to_owned),
            container: args.container.map(str::to_owned),
            operation: args.operation.map(str::to_owned),
            decision,
            kind,
            since: time("since", args.since)?,
            until: time("until", args.until)?,
        })
    }

    /// Whether `record` is wanted. A record whose time cannot be read
    /// fails any time bound (and matches when there is none).
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        if !same(&self.pod, &record.pod) || !same(&self.container, &record.container) {
            return false;
        }
        if let Some(op) = &self.operation {
            if !op.eq_ignore_ascii_case(&record.operation) {
                return false;
            }
        }
        if self.decision.is_some_and(|d| d != record.decision)
            || self.kind.is_some_and(|k| k != record.kind)
        {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(at) = parse_rfc3339(&record.time) else {
            return false;
        };
        self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at <= until)
    }
}

/// A line that is not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// From 1.
    pub number: usize,
    pub error: String,
}

/// What reading a file gave: the matching records, and the bad lines.
#[derive(Debug, Default)]
pub struct AuditSelection {
    pub records: Vec<AuditRecord>,
    pub bad_lines: Vec<BadLine>,
}

/// Reads `input` line by line, keeping the records `filter` wants.
pub fn select(input: impl BufRead, filter: &AuditFilter) -> std::io::Result<AuditSelection> {
    let mut selection = AuditSelection::default();
    for (index, line) in input.split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (record, bad) = parse_line(&line);
        if let Some(error) = bad {
            selection.bad_lines.push(BadLine {
                number: index + 1,
                error,
            });
        }
        if let Some(record) = record.filter(|r| filter.matches(r)) {
            selection.records.push(record);
        }
    }
    Ok(selection)
}

/// Where every record's JSON starts (`time` is its first field).
const RECORD_START: &[u8] = b"{\"time\":";

/// One line: its record, and what was wrong with it. A line cut short by a
/// full disk in one shim may have the next shim's whole record appended:
/// that record is recovered from the last record start in the line.
fn parse_line(line: &[u8]) -> (Option<AuditRecord>, Option<String>) {
    let error = match serde_json::from_slice::<AuditRecord>(line) {
        Ok(record) => return (Some(record), None),
        Err(e) => e.to_string(),
    };
    let tail = line
        .windows(RECORD_START.len())
        .rposition(|w| w == RECORD_START)
        .filter(|&at| at > 0)
        .and_then(|at| serde_json::from_slice::<AuditRecord>(&line[at..]).ok());
    match tail {
        Some(record) => (
            Some(record),
            Some(format!(
                "{error} (a cut-off record; the one after it was recovered)"
            )),
        ),
        None => (None, Some(error)),
    }
}

/// Reads the audit file at `path`.
pub fn select_file(
    path: &std::path::Path,
    filter: &AuditFilter,
) -> Result<AuditSelection, AuditFilterError> {
    let read_error = |source| AuditFilterError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    select(std::io::BufReader::new(file), filter).map_err(read_error)
}

/// The records as a table: time, kind, pod, container (`/exec`),
/// operation, decision, reason.
pub fn table(records: &[AuditRecord]) -> String {
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            let container = if r.exec_id.is_empty() {
                r.container.clone()
            } else {
                format!("{}/{}", r.container, r.exec_id)
            };
            [
                r.time.clone(),
                r.kind.to_string(),
                r.pod.clone(),
                container,
                r.operation.clone(),
                r.decision.to_string(),
                r.reason.replace('\n', " "),
            ]
        })
        .collect();
    let header = [
        "TIME",
        "KIND",
        "POD",
        "CONTAINER",
        "OPERATION",
        "DECISION",
        "REASON",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Caller, CallerVia};

    fn record(
        time: &str,
        kind: RecordKind,
        pod: &str,
        container: &str,
        operation: &str,
        decision: Decision,
    ) -> AuditRecord {
        AuditRecord {
            time: time.into(),
            seq: 1,
            kind,
            pod: pod.into(),
            container: container.into(),
            exec_id: String::new(),
            operation: operation.into(),
            caller: Caller {
                via: CallerVia::Containerd,
                namespace: "default".into(),
                shim_pid: 1,
                shim_uid: 0,
            },
            decision,
            reason: String::new(),
            details: serde_json::Value::Null,
        }
    }

    fn file() -> String {
        use Decision::*;
        use RecordKind::*;
        [
            record(
                "2026-11-24T04:00:00.000Z",
                Task,
                "p1",
                "p1",
                "Create",
                Allowed,
            ),
            record(
                "2026-11-24T04:00:01.000Z",
                Agent,
                "p1",
                "p1",
                "CreateContainer",
                Allowed,
            ),
            record(
                "2026-11-24T04:10:00.000Z",
                Task,
                "p1",
                "app",
                "Exec",
                Allowed,
            ),
            record(
                "2026-11-24T04:10:01.000Z",
                Agent,
                "p1",
                "app",
                "ExecProcess",
                Denied,
            ),
            record(
                "2026-11-24T04:10:01.500Z",
                Security,
                "p1",
                "app",
                "policy-denied",
                Denied,
            ),
            record(
                "2026-11-24T04:20:00.000Z",
                Task,
                "p2",
                "p2",
                "Create",
                Failed,
            ),
        ]
        .iter()
        .map(AuditRecord::to_line)
        .collect()
    }

    fn now() -> SystemTime {
        parse_rfc3339("2026-11-24T04:30:00Z").unwrap()
    }

    fn operations(args: FilterArgs<'_>) -> Vec<String> {
        let filter = AuditFilter::parse(&args, now()).unwrap();
        let selection = select(file().as_bytes(), &filter).unwrap();
        assert!(selection.bad_lines.is_empty());
        selection
            .records
            .into_iter()
            .map(|r| format!("{}:{}", r.pod, r.operation))
            .collect()
    }

    #[test]
    fn each_filter_keeps_what_it_names() {
        let all = || FilterArgs::default();
        let cases: Vec<(FilterArgs<'_>, &[&str])> = vec![
            (
                FilterArgs {
                    pod: Some("p2"),
                    ..all()
                },
                &["p2:Create"],
            ),
            (
                FilterArgs {
                    container: Some("app"),
                    ..all()
                },
                &["p1:Exec", "p1:ExecProcess", "p1:policy-denied"],
            ),
            (
                FilterArgs {
                    operation: Some("create"),
                    ..all()
                },
                &["p1:Create", "p2:Create"],
            ),
            (
                FilterArgs {
                    decision: Some("denied"),
                    ..all()
                },
                &["p1:ExecProcess", "p1:policy-denied"],
            ),
            (
                FilterArgs {
                    decision: Some("FAILED"),
                    ..all()
                },
                &["p2:Create"],
            ),
            (
                FilterArgs {
                    kind: Some("security"),
                    ..all()
                },
                &["p1:policy-denied"],
            ),
            (
                FilterArgs {
                    kind: Some("agent"),
                    pod: Some("p1"),
                    ..all()
                },
                &["p1:CreateContainer", "p1:ExecProcess"],
            ),
            (
                FilterArgs {
                    since: Some("20m"),
                    ..all()
                },
                &["p1:Exec", "p1:ExecProcess", "p1:policy-denied", "p2:Create"],
            ),
            (
                FilterArgs {
                    until: Some("2026-11-24T04:10:01Z"),
                    ..all()
                },
                &[
                    "p1:Create",
                    "p1:CreateContainer",
                    "p1:Exec",
                    "p1:ExecProcess",
                ],
            ),
            (
                FilterArgs {
                    since: Some("2026-11-24T05:10:00+01:00"),
                    until: Some("15m"),
                    ..all()
                },
                &["p1:Exec", "p1:ExecProcess", "p1:policy-denied"],
            ),
            (
                FilterArgs {
                    pod: Some("p3"),
                    ..all()
                },
                &[],
            ),
            (
                all(),
                &[
                    "p1:Create",
                    "p1:CreateContainer",
                    "p1:Exec",
                    "p1:ExecProcess",
                    "p1:policy-denied",
                    "p2:Create",
                ],
            ),
        ];
        for (args, expected) in cases {
            let shown = format!("{args:?}");
            assert_eq!(operations(args), expected, "{shown}");
        }
    }

    #[test]
    fn bad_flags_are_named() {
        let err = AuditFilter::parse(
            &FilterArgs {
                decision: Some("maybe"),
                ..Default::default()
            },
            now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"maybe\""), "{err}");
        let err = AuditFilter::parse(
            &FilterArgs {
                kind: Some("vm"),
                ..Default::default()
            },
            now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"vm\""), "{err}");
        let err = AuditFilter::parse(
            &FilterArgs {
                since: Some("last week"),
                ..Default::default()
            },
            now(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("--since \"last week\""),
            "{err}"
        );
    }

    #[test]
    fn malformed_lines_are_reported_by_number_and_skipped() {
        let good = file();
        let mut lines: Vec<&str> = good.lines().collect();
        lines.insert(1, "{\"time\":\"2026-11-24T04:00:00.5");
        lines.insert(3, "not json at all");
        lines.insert(4, "");
        let text = lines.join("\n") + "\n\u{ff}\u{fe}garbage";
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(&[0xff, 0xfe, b'\n']);
        let selection = select(&bytes[..], &AuditFilter::default()).unwrap();
        assert_eq!(selection.records.len(), 6);
        let numbers: Vec<usize> = selection.bad_lines.iter().map(|b| b.number).collect();
        assert_eq!(numbers, [2, 4, 10]);
    }

    #[test]
    fn a_record_appended_to_a_cut_line_is_recovered() {
        let whole = file();
        let first = whole.lines().next().unwrap();
        let text = format!("{}{}\n", &first[..30], first);
        let selection = select(text.as_bytes(), &AuditFilter::default()).unwrap();
        assert_eq!(selection.records.len(), 1);
        assert_eq!(selection.records[0].operation, "Create");
        assert_eq!(selection.bad_lines.len(), 1);
        assert!(selection.bad_lines[0].error.contains("recovered"));
    }

    #[test]
    fn table_aligns_columns_and_shows_exec_ids() {
        let mut exec = record(
            "2026-11-24T04:10:00.000Z",
            RecordKind::Security,
            "pod",
            "app",
            "exec",
            Decision::Allowed,
        );
        exec.exec_id = "e1".into();
        let mut denied = record(
            "2026-11-24T04:10:01.000Z",
            RecordKind::Agent,
            "pod",
            "app",
            "ExecProcess",
            Decision::Denied,
        );
        denied.reason = "rule exec_allowed\nsecond line".into();
        let text = table(&[exec, denied]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME"), "{text}");
        assert!(lines[1].contains("app/e1"), "{text}");
        assert!(
            lines[2].ends_with("rule exec_allowed second line"),
            "{text}"
        );
        let column = lines[0].find("OPERATION").unwrap();
        assert_eq!(&lines[1][column..column + 4], "exec");
        assert_eq!(&lines[2][column..column + 11], "ExecProcess");
    }
}
