//! Footprint benchmark: prints the agent binary's size and the idle RSS of
//! a running agent. Measures the binary cargo built for this test, or the
//! one named by `CLOISTER_AGENT_BIN` (e.g. the static build):
//! `CLOISTER_AGENT_BIN=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/debug/cloister-agent \
//!  cargo test -p cloister-agent --test footprint -- --nocapture`
//! Prints figures only; it never fails on a size or a time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn agent_binary_size_and_idle_rss() {
    let binary = std::env::var_os("CLOISTER_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cloister-agent")));
    let dir = tempfile::tempdir().unwrap();
    let size = std::fs::metadata(&binary).unwrap().len();
    let stripped_copy = dir.path().join("agent-stripped");
    std::fs::copy(&binary, &stripped_copy).unwrap();
    let stripped = match Command::new("strip").arg(&stripped_copy).status() {
        Ok(s) if s.success() => Some(std::fs::metadata(&stripped_copy).unwrap().len()),
        _ => None,
    };

    let socket = dir.path().join("agent.sock");
    let mut child = Command::new(&binary)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Up to 30 s: the measurement starts once it serves, however slow
    // the machine.
    for _ in 0..3000 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let rss = status_field(pid, "VmRSS");
    let anon = status_field(pid, "RssAnon");
    let file = status_field(pid, "RssFile");
    let _ = child.kill();
    let _ = child.wait();
    assert!(socket.exists(), "agent did not come up");

    println!("agent binary: {}", binary.display());
    println!(
        "binary size: {:.2} MiB ({size} bytes)",
        size as f64 / 1048576.0
    );
    match stripped {
        Some(s) => println!("stripped size: {:.2} MiB ({s} bytes)", s as f64 / 1048576.0),
        None => println!("stripped size: unknown (no strip binary)"),
    }
    println!(
        "idle RSS: {} KiB (anonymous {} KiB, file-backed {} KiB)",
        rss.unwrap_or(0),
        anon.unwrap_or(0),
        file.unwrap_or(0)
    );
}
