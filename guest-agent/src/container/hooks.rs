//! OCI lifecycle hooks that run in the agent's (the guest's) namespaces:
//! createRuntime and prestart once the container's namespaces and rootfs
//! exist (before Start), poststart after Start, poststop at removal. Hooks
//! meant to run inside the container (createContainer, startContainer) are
//! refused when the spec is checked, never skipped.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::unistd::Pid;
use oci_spec::runtime::{Hook, Hooks};
use serde::{Deserialize, Serialize};

use super::spec::SpecError;
use crate::process::Reaper;

/// Errors running a hook.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hooks.{kind}[{index}] {path}: {reason}")]
    Failed {
        kind: &'static str,
        index: usize,
        path: String,
        reason: String,
    },
}

/// One hook, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookPlan {
    pub path: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<Duration>,
}

/// The hooks the agent runs, by stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookSet {
    /// prestart followed by createRuntime (same moment for us).
    pub create_runtime: Vec<HookPlan>,
    pub poststart: Vec<HookPlan>,
    pub poststop: Vec<HookPlan>,
}

fn plan_list(kind: &str, hooks: &Option<Vec<Hook>>) -> Result<Vec<HookPlan>, SpecError> {
    let mut out = Vec::new();
    for (i, hook) in hooks.iter().flatten().enumerate() {
        let field = format!("hooks.{kind}[{i}]");
        if !hook.path().is_absolute() {
            return Err(SpecError::Invalid {
                field: format!("{field}.path"),
                reason: format!("{:?} is not absolute", hook.path()),
            });
        }
        let timeout = match hook.timeout() {
            None => None,
            Some(t) if t > 0 => Some(Duration::from_secs(t.unsigned_abs())),
            Some(t) => {
                return Err(SpecError::Invalid {
                    field: format!("{field}.timeout"),
                    reason: format!("{t} is not positive"),
                })
            }
        };
        out.push(HookPlan {
            path: hook.path().clone(),
            args: hook.args().clone().unwrap_or_default(),
            env: hook.env().clone().unwrap_or_default(),
            timeout,
        });
    }
    Ok(out)
}

/// Checks a spec's hooks.
pub fn plan_hooks(hooks: Option<&Hooks>) -> Result<HookSet, SpecError> {
    let Some(hooks) = hooks else {
        return Ok(HookSet::default());
    };
    for (kind, list) in [
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
    ] {
        if list.as_ref().is_some_and(|l| !l.is_empty()) {
            return Err(SpecError::Invalid {
                field: format!("hooks.{kind}"),
                reason: "hooks inside the container's namespaces are not supported".into(),
            });
        }
    }
    #[allow(deprecated)]
    let mut create_runtime = plan_list("prestart", hooks.prestart())?;
    create_runtime.extend(plan_list("createRuntime", hooks.create_runtime())?);
    Ok(HookSet {
        create_runtime,
        poststart: plan_list("poststart", hooks.poststart())?,
        poststop: plan_list("poststop", hooks.poststop())?,
    })
}

/// The container state a hook reads on stdin (OCI runtime spec "state").
pub fn state_json(id: &str, status: &str, pid: Option<Pid>, bundle: &str) -> String {
    let mut state = serde_json::json!({
        "ociVersion": "1.1.0",
        "id": id,
        "status": status,
        "bundle": bundle,
    });
    if let Some(pid) = pid {
        state["pid"] = pid.as_raw().into();
    }
    state.to_string()
}

/// Runs `hooks` in order; the first failure stops and is returned.
pub async fn run_hooks(
    kind: &'static str,
    hooks: &[HookPlan],
    state: &str,
    reaper: &Reaper,
) -> Result<(), HookError> {
    for (index, hook) in hooks.iter().enumerate() {
        let fail = |reason: String| HookError::Failed {
            kind,
            index,
            path: hook.path.display().to_string(),
            reason,
        };
        let mut command = Command::new(&hook.path);
        if let Some((arg0, rest)) = hook.args.split_first() {
            use std::os::unix::process::CommandExt;
            command.arg0(arg0).args(rest);
        }
        command.env_clear();
        for entry in &hook.env {
            if let Some((k, v)) = entry.split_once('=') {
                command.env(k, v);
            }
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("spawn: {e}")))?;
        let pid =
            Pid::from_raw(i32::try_from(child.id()).map_err(|_| fail("pid out of range".into()))?);
        // The agent's reaper owns waitpid; ask it, not `child.wait()`.
        let exit = reaper.register(pid);
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that does not read its stdin is not an error.
            let _ = stdin.write_all(state.as_bytes());
        }
        let info = match hook.timeout {
            Some(limit) => match tokio::time::timeout(limit, exit).await {
                Ok(r) => r,
                Err(_) => {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    return Err(fail(format!("timed out after {} s", limit.as_secs())));
                }
            },
            None => exit.await,
        }
        .map_err(|_| fail("exit status lost".into()))?;
        if info.status != 0 {
            return Err(fail(format!("exited with status {}", info.status)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(json: serde_json::Value) -> Hooks {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn runtime_hooks_are_planned_in_order() {
        let set = plan_hooks(Some(&hooks(serde_json::json!({
            "prestart": [{ "path": "/bin/a" }],
            "createRuntime": [{ "path": "/bin/b", "args": ["b", "-x"], "timeout": 5 }],
            "poststop": [{ "path": "/bin/c" }]
        }))))
        .unwrap();
        let paths: Vec<_> = set
            .create_runtime
            .iter()
            .map(|h| h.path.display().to_string())
            .collect();
        assert_eq!(paths, ["/bin/a", "/bin/b"]);
        assert_eq!(set.create_runtime[1].timeout, Some(Duration::from_secs(5)));
        assert_eq!(set.poststop.len(), 1);
    }

    #[test]
    fn in_container_hooks_return_error_naming_field() {
        let err = plan_hooks(Some(&hooks(serde_json::json!({
            "startContainer": [{ "path": "/bin/a" }]
        }))))
        .unwrap_err();
        assert!(err.to_string().contains("hooks.startContainer"), "{err}");
    }

    #[test]
    fn relative_hook_path_or_bad_timeout_returns_error() {
        assert!(plan_hooks(Some(&hooks(
            serde_json::json!({ "poststart": [{ "path": "bin/a" }] })
        )))
        .is_err());
        let err = plan_hooks(Some(&hooks(
            serde_json::json!({ "poststop": [{ "path": "/a", "timeout": 0 }] }),
        )))
        .unwrap_err();
        assert!(
            err.to_string().contains("hooks.poststop[0].timeout"),
            "{err}"
        );
    }

    #[test]
    fn state_json_carries_id_status_and_pid() {
        let state: serde_json::Value =
            serde_json::from_str(&state_json("c1", "created", Some(Pid::from_raw(42)), "/b"))
                .unwrap();
        assert_eq!(state["id"], "c1");
        assert_eq!(state["status"], "created");
        assert_eq!(state["pid"], 42);
    }
}
