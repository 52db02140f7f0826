//! One compiled Rego policy and its evaluation.
//!
//! A policy is `package agent_policy` with one boolean rule per request
//! kind, named after the request (`CreateContainerRequest`, …, plus
//! `ReadStreamRequest`/`WriteStreamRequest` for stdio streams). A rule that
//! is undefined for the input, not boolean, or fails to evaluate denies:
//! policies give every rule a `default`. When a rule says false, the
//! optional set `deny_reasons` (evaluated on the same input) explains why;
//! its strings end up in the PERMISSION_DENIED message.
//!
//! The policy is parsed and analysed once ([`PolicyEngine::from_rego`]);
//! each request evaluates on a clone of the prepared engine (its modules are
//! shared behind `Arc`s, so a clone copies little), which lets requests
//! evaluate concurrently without a lock around the interpreter.

use std::num::NonZeroU32;
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use serde_json::Value;

/// The package every agent policy declares.
pub const PACKAGE: &str = "data.agent_policy";

/// The name the policy text is loaded under (in regorus' error messages).
const SOURCE_NAME: &str = "agent_policy.rego";

/// The optional set of explanations consulted on a denial.
pub const DENY_REASONS_RULE: &str = "deny_reasons";

/// A runaway policy (deep recursion, huge comprehensions) is stopped and
/// the request denied instead of stalling the agent.
const EVALUATION_LIMIT: Duration = Duration::from_secs(2);

/// Errors compiling a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCompileError {
    #[error("policy does not parse: {0}")]
    Parse(String),
    #[error("policy declares {found}, expected `package agent_policy`")]
    Package { found: String },
    #[error("policy does not evaluate: {0}")]
    Prepare(String),
}

/// Why a request was not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyDenial {
    #[error("{request} denied by policy rule {PACKAGE}.{request}{}", reasons_suffix(.reasons))]
    Denied {
        request: &'static str,
        reasons: Vec<String>,
    },
    #[error("{request} denied: policy rule {PACKAGE}.{request} is undefined for this input (the policy lacks the rule or its default)")]
    Undefined { request: &'static str },
    #[error("{request} denied: policy rule {PACKAGE}.{request} gave {value}, not a boolean")]
    NotBoolean {
        request: &'static str,
        value: String,
    },
    #[error("{request} denied: policy rule {PACKAGE}.{request} failed to evaluate: {error}")]
    Evaluation {
        request: &'static str,
        error: String,
    },
    #[error("{request} denied: its policy input cannot be built: {error}")]
    Input {
        request: &'static str,
        error: String,
    },
    #[error("{request} denied: the policy was installed from {origin} and is locked")]
    Locked {
        request: &'static str,
        origin: &'static str,
    },
}

fn reasons_suffix(reasons: &[String]) -> String {
    if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", reasons.join("; "))
    }
}

/// A compiled policy, ready to evaluate.
#[derive(Clone)]
pub struct PolicyEngine {
    engine: regorus::Engine,
    rego: String,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("rego_bytes", &self.rego.len())
            .finish()
    }
}

impl PolicyEngine {
    /// Parses and prepares a policy. The confidential-pod path calls this
    /// with the policy text from init-data.
    pub fn from_rego(rego: &str) -> Result<PolicyEngine, PolicyCompileError> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: EVALUATION_LIMIT,
            check_interval: NonZeroU32::MIN,
        });
        let package = engine
            .add_policy(SOURCE_NAME.to_owned(), rego.to_owned())
            .map_err(|e| PolicyCompileError::Parse(e.to_string()))?;
        if package != PACKAGE {
            return Err(PolicyCompileError::Package { found: package });
        }
        // The first evaluation analyses the modules (rule dependencies,
        // schedules); doing it here makes every clone start prepared and
        // reports errors at install time. A constant query evaluates no
        // rule, so a rule that fails on some input is not an error here.
        engine.set_input(regorus::Value::new_object());
        engine
            .eval_query("true".to_owned(), false)
            .map_err(|e| PolicyCompileError::Prepare(e.to_string()))?;
        Ok(PolicyEngine {
            engine,
            rego: rego.to_owned(),
        })
    }

    /// The policy's source text.
    pub fn rego(&self) -> &str {
        &self.rego
    }

    /// Whether the policy has a rule (or a default) at `rule`.
    fn declares(&self, rule: &str) -> bool {
        self.engine
            .has_declared_rule_rooted_at(SOURCE_NAME, rule)
            .unwrap_or(false)
    }

    /// Decides one request: Ok when its rule is true.
    pub fn decide(&self, request: &'static str, input: &Value) -> Result<(), PolicyDenial> {
        let evaluation_error = |e: &dyn std::fmt::Display| PolicyDenial::Evaluation {
            request,
            error: e.to_string(),
        };
        let mut engine = self.engine.clone();
        let input =
            regorus::Value::from_json_str(&input.to_string()).map_err(|e| evaluation_error(&e))?;
        engine.set_input(input);
        let rule = format!("{PACKAGE}.{request}");
        let value = match engine.eval_rule(rule.clone()) {
            Ok(value) => value,
            // A rule the policy does not have is an error to regorus: say so
            // plainly instead of its "not a valid rule path".
            Err(_) if !self.declares(&rule) => return Err(PolicyDenial::Undefined { request }),
            Err(e) => return Err(evaluation_error(&e)),
        };
        match value {
            regorus::Value::Bool(true) => Ok(()),
            regorus::Value::Bool(false) => Err(PolicyDenial::Denied {
                request,
                reasons: deny_reasons(&mut engine),
            }),
            regorus::Value::Undefined => Err(PolicyDenial::Undefined { request }),
            other => Err(PolicyDenial::NotBoolean {
                request,
                value: other.to_json_str().unwrap_or_else(|_| format!("{other:?}")),
            }),
        }
    }
}

/// The policy's `deny_reasons` for the input already set, sorted; empty
/// when the policy has none.
fn deny_reasons(engine: &mut regorus::Engine) -> Vec<String> {
    let Ok(results) = engine.eval_query(format!("{PACKAGE}.{DENY_REASONS_RULE}"), false) else {
        return Vec::new();
    };
    let mut reasons: Vec<String> = results
        .result
        .iter()
        .flat_map(|r| r.expressions.iter())
        .filter_map(|e| match &e.value {
            regorus::Value::Set(set) => Some(set.iter().cloned().collect::<Vec<_>>()),
            regorus::Value::Array(items) => Some(items.iter().cloned().collect()),
            _ => None,
        })
        .flatten()
        .map(|v| match v {
            regorus::Value::String(s) => s.to_string(),
            other => other.to_json_str().unwrap_or_default(),
        })
        .collect();
    reasons.sort();
    reasons.dedup();
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SMALL: &str = r#"
package agent_policy

default StartContainerRequest := false
StartContainerRequest if input.container_id == "ok"

deny_reasons contains sprintf("container %q is not allowed to start", [input.container_id]) if {
    not StartContainerRequest
}

default Broken := false
Broken := 1 / input.divisor if true

NotBool := "yes"
"#;

    #[test]
    fn true_rule_allows_and_false_rule_denies_with_its_reason() {
        let engine = PolicyEngine::from_rego(SMALL).unwrap();

        assert_eq!(
            engine.decide("StartContainerRequest", &json!({"container_id": "ok"})),
            Ok(())
        );
        let denial = engine
            .decide("StartContainerRequest", &json!({"container_id": "bad"}))
            .unwrap_err();
        assert_eq!(
            denial.to_string(),
            "StartContainerRequest denied by policy rule data.agent_policy.StartContainerRequest: \
             container \"bad\" is not allowed to start"
        );
    }

    #[test]
    fn missing_rule_denies_naming_it() {
        let engine = PolicyEngine::from_rego(SMALL).unwrap();

        let denial = engine.decide("ExecProcessRequest", &json!({})).unwrap_err();

        assert_eq!(
            denial,
            PolicyDenial::Undefined {
                request: "ExecProcessRequest"
            }
        );
        assert_eq!(
            denial.to_string(),
            "ExecProcessRequest denied: policy rule data.agent_policy.ExecProcessRequest is \
             undefined for this input (the policy lacks the rule or its default)"
        );
    }

    #[test]
    fn non_boolean_rule_denies() {
        let engine = PolicyEngine::from_rego(SMALL).unwrap();

        let denial = engine.decide("NotBool", &json!({})).unwrap_err();

        assert_eq!(
            denial,
            PolicyDenial::NotBoolean {
                request: "NotBool",
                value: "\"yes\"".into()
            }
        );
    }

    #[test]
    fn failing_rule_denies_fail_closed() {
        let engine = PolicyEngine::from_rego(SMALL).unwrap();

        let result = engine.decide("Broken", &json!({"divisor": 0}));

        // Division by zero is an error (or undefined) in Rego: never allow.
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn wrong_package_and_syntax_errors_are_refused() {
        let wrong = PolicyEngine::from_rego("package other\nx := true\n").unwrap_err();
        assert!(
            matches!(&wrong, PolicyCompileError::Package { found } if found == "data.other"),
            "{wrong}"
        );
        let broken = PolicyEngine::from_rego("package agent_policy\nx := \n").unwrap_err();
        assert!(matches!(broken, PolicyCompileError::Parse(_)), "{broken}");
    }

    #[test]
    fn policy_engine_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PolicyEngine>();
    }

    /// Not a benchmark gate: prints what one decision costs (clone of the
    /// prepared engine + input conversion + evaluation) for the biggest
    /// input, a CreateContainerRequest with a runc-like spec.
    #[test]
    fn decision_cost_is_printed() {
        let spec = json!({
            "ociVersion": "1.1.0",
            "annotations": {"io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"},
            "process": {
                "args": ["sh", "-c", "echo allowed"],
                "env": ["PATH=/bin", "TERM=xterm"],
                "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_CHOWN"]}
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
            ],
            "linux": {"maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]}
        });
        let input =
            json!({"container_id": "c", "image": "docker.io/library/busybox:1.36", "oci": spec});
        let strict = r#"
package agent_policy
default CreateContainerRequest := false
CreateContainerRequest if {
    input.image == "docker.io/library/busybox:1.36"
    input.oci.process.args in [["sh", "-c", "echo allowed"], ["sleep", "30"]]
    every m in input.oci.mounts { m.type != "bind" }
    every c in input.oci.process.capabilities.bounding { c in {"CAP_CHOWN", "CAP_KILL"} }
    count(input.oci.linux.maskedPaths) > 0
}
"#;
        let rounds = 500u32;
        for (label, rego) in [
            ("default", super::super::DEFAULT_POLICY),
            ("strict", strict),
        ] {
            let engine = PolicyEngine::from_rego(rego).unwrap();
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                assert_eq!(engine.decide("CreateContainerRequest", &input), Ok(()));
            }
            let per = start.elapsed() / rounds;
            eprintln!(
                "policy decision, {label} policy, CreateContainerRequest: {per:?} per request"
            );
        }
    }
}
