//! `cloister audit` as an operator runs it on a trail the shim wrote:
//! filters, table and JSON output, malformed lines reported and skipped.

use std::process::Command;
use std::time::{Duration, SystemTime};

use cloister_shim::audit::time::format_rfc3339_millis;
use cloister_shim::audit::{AuditEvent, AuditLog, AuditSection, Decision, Subject};

const CLOISTER: &str = env!("CARGO_BIN_EXE_cloister");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn audit(args: &[&str]) -> Run {
    let output = Command::new(CLOISTER)
        .arg("audit")
        .args(args)
        // No runtime config on the test's behalf.
        .env("CLOISTER_CONFIG", "/nonexistent/cloister.toml")
        .output()
        .unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn subject(pod: &str, container: &str) -> Subject {
    Subject {
        pod: pod.into(),
        container: container.into(),
        exec_id: String::new(),
    }
}

/// A trail written by the shim's own code: two pods, a denial, an exec,
/// then a line cut short by a full disk and one more record.
fn trail(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::new("k8s.io");
    log.configure(&AuditSection {
        enabled: true,
        path: path.clone(),
    });
    let none = serde_json::Value::Null;
    log.task(None, subject("web", "web"), "Create", Ok(()), none.clone());
    log.task(None, subject("web", "web"), "Start", Ok(()), none.clone());
    log.security(
        "web",
        AuditEvent::ExecIntoContainer {
            container: "web".into(),
            exec_id: "shell".into(),
            args: vec!["sh".into()],
            terminal: true,
            decision: Decision::Denied,
            reason: "policy: rule exec_commands".into(),
        },
    );
    log.agent_request(
        subject("web", "web"),
        "ExecProcess",
        Err((Decision::Denied, "policy: rule exec_commands".into())),
        none.clone(),
    );
    let text = std::fs::read_to_string(&path).unwrap() + "{\"time\":\"2026-11-";
    std::fs::write(&path, text).unwrap();
    let log = AuditLog::new("default");
    log.configure(&AuditSection {
        enabled: true,
        path: path.clone(),
    });
    log.task(
        None,
        subject("db", "db"),
        "Create",
        Err((Decision::Failed, "bundle missing".into())),
        none,
    );
    path.display().to_string()
}

#[test]
fn filters_pick_records_and_a_torn_line_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let file = trail(&dir);

    let all = audit(&["--file", &file]);
    assert_eq!(all.code, Some(0), "{}", all.stderr);
    let rows: Vec<&str> = all.stdout.lines().collect();
    assert_eq!(rows.len(), 6, "{}", all.stdout);
    assert!(rows[0].starts_with("TIME"));
    assert!(rows[3].contains("web/shell"), "{}", all.stdout);
    // The torn line, the fifth of the file, is named; the next shim's
    // record, appended right behind the cut, is recovered from it.
    assert!(
        all.stderr.contains("line 5: not an audit record"),
        "{}",
        all.stderr
    );
    assert!(all.stderr.contains("recovered"), "{}", all.stderr);
    assert_eq!(all.stderr.lines().count(), 1, "{}", all.stderr);
    assert!(rows[5].contains("bundle missing"), "{}", all.stdout);

    let denied = audit(&["--file", &file, "--decision", "denied", "--json"]);
    let lines: Vec<serde_json::Value> = denied
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", denied.stdout);
    assert_eq!(lines[0]["operation"], "exec");
    assert_eq!(lines[1]["reason"], "policy: rule exec_commands");

    let cases: [(&[&str], usize); 7] = [
        (&["--pod", "db"], 1),
        (&["--container", "web", "--kind", "task"], 2),
        (&["--operation", "create"], 2),
        (&["--kind", "agent"], 1),
        (&["--decision", "failed", "--pod", "web"], 0),
        (&["--since", "10m"], 5),
        (&["--until", "10m"], 0),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["--file", file.as_str(), "--json"];
        args.extend_from_slice(flags);
        let run = audit(&args);
        assert_eq!(run.code, Some(0), "{flags:?}: {}", run.stderr);
        assert_eq!(
            run.stdout.lines().count(),
            expected,
            "{flags:?}: {}",
            run.stdout
        );
    }
    let later = format_rfc3339_millis(SystemTime::now() + Duration::from_secs(60));
    let run = audit(&["--file", &file, "--json", "--since", &later]);
    assert_eq!(run.stdout.lines().count(), 0);
}

#[test]
fn bad_flags_and_missing_files_exit_2_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = trail(&dir);
    let run = audit(&["--file", &file, "--since", "yesterday"]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("--since \"yesterday\""),
        "{}",
        run.stderr
    );
    let run = audit(&["--file", &file, "--kind", "vm"]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("\"vm\""), "{}", run.stderr);
    let missing = dir.path().join("nope.jsonl");
    let run = audit(&["--file", &missing.display().to_string()]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("nope.jsonl"), "{}", run.stderr);
    // Without --file, the config's path; a config that cannot be read says so.
    let run = audit(&[]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("--file"), "{}", run.stderr);
}

#[test]
fn without_file_the_runtime_configs_audit_path_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = trail(&dir);
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("[audit]\npath = \"{file}\"\n")).unwrap();
    let output = Command::new(CLOISTER)
        .args(["audit", "--pod", "db", "--json"])
        .env("CLOISTER_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("bundle missing"), "{stdout}");
}
