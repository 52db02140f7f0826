//! `cloister inspect` as a CI pipeline runs it: report, exit status.

use std::path::Path;
use std::process::Command;

const CLOISTER: &str = env!("CARGO_BIN_EXE_cloister");
const CTR_DEFAULT: &str = include_str!("../src/inspect/testdata/ctr-run-default.json");
const CRI_PRIVILEGED: &str = include_str!("../src/inspect/testdata/cri-privileged-pod.json");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn inspect(path: &Path, json: bool) -> Run {
    let mut command = Command::new(CLOISTER);
    command.arg("inspect").arg(path);
    if json {
        command.arg("--json");
    }
    let output = command.output().unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn spec_file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn ctr_default_spec_passes_with_lower_findings_listed() {
    let dir = tempfile::tempdir().unwrap();
    let run = inspect(&spec_file(&dir, "config.json", CTR_DEFAULT), false);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", run.stdout);
    assert!(
        lines[0].starts_with("MEDIUM runs-as-root process.user.uid: 0 — fix: "),
        "{}",
        lines[0]
    );
    assert_eq!(lines[5], "5 findings, 0 high");
}

#[test]
fn privileged_pod_fails_with_high_findings() {
    let dir = tempfile::tempdir().unwrap();
    let run = inspect(&spec_file(&dir, "config.json", CRI_PRIVILEGED), false);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .lines()
            .next()
            .unwrap()
            .starts_with("HIGH privileged "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("HIGH host-namespace linux.namespaces: pid"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("HIGH host-path-mount mounts[6].source: / -> /host (rw)"),
        "{}",
        run.stdout
    );
}

#[test]
fn json_report_parses_and_carries_the_same_findings() {
    let dir = tempfile::tempdir().unwrap();
    let run = inspect(&spec_file(&dir, "config.json", CRI_PRIVILEGED), true);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let findings = report["findings"].as_array().unwrap();
    assert!(findings
        .iter()
        .any(|f| f["id"] == "privileged" && f["severity"] == "high"));
    assert!(findings
        .iter()
        .all(|f| f["fix"].is_string() && f["field"].is_string()));
}

#[test]
fn hardened_spec_reports_no_findings() {
    let spec = serde_json::json!({
        "process": {"user": {"uid": 65534}, "noNewPrivileges": true,
                    "capabilities": {"bounding": []}},
        "root": {"path": "rootfs", "readonly": true},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                                 {"type": "mount"}, {"type": "network"}],
                  "resources": {"memory": {"limit": 67108864}, "cpu": {"quota": 10000}},
                  "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = spec_file(&dir, "clean.json", &spec.to_string());
    let run = inspect(&path, false);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(
        run.stdout,
        format!(
            "no findings: {} asks for no more than the baseline\n",
            path.display()
        )
    );
    let run = inspect(&path, true);
    assert_eq!(run.stdout.trim(), "{\n  \"findings\": []\n}");
}

#[test]
fn unreadable_or_invalid_input_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        dir.path().join("absent.json"),
        spec_file(&dir, "truncated.json", "{\"process\": {"),
        spec_file(&dir, "array.json", "[]"),
    ];
    for path in cases {
        let run = inspect(&path, false);
        assert_eq!(run.code, Some(2), "{}: {}", path.display(), run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            run.stderr.starts_with("cloister inspect: ") && run.stderr.contains(name),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn malformed_field_is_a_high_finding_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = spec_file(
        &dir,
        "odd.json",
        r#"{"process": {"user": {"uid": "root"}}}"#,
    );
    let run = inspect(&path, false);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stdout
            .contains("HIGH malformed-spec process.user.uid: a string where an integer belongs"),
        "{}",
        run.stdout
    );
}
