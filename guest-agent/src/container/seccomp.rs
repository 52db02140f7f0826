//! OCI seccomp profile → BPF programs, compiled with seccompiler.
//!
//! seccompiler builds one filter per (match action, mismatch action) pair,
//! while an OCI profile gives each rule its own action. The kernel runs every
//! installed filter and keeps the most severe result (kill > trap > errno >
//! trace > log > allow), so a profile becomes a stack of filters:
//!
//! - a base filter: every syscall the profile names → allow, anything
//!   else → the default action;
//! - one filter per other action A: the rules with action A → A, anything
//!   else → allow.
//!
//! A call no rule matches gets the default action from the base filter and
//! allow from the rest; a call matching a rule with action A gets allow from
//! the base and A from its group. Nothing in the profile is ever dropped: an
//! action, flag or architecture we cannot express is an error. The only
//! names skipped are syscalls the native architecture does not have, which
//! native code cannot call (foreign-architecture calls are killed by the
//! architecture check of every filter).

use std::collections::{BTreeMap, BTreeSet};

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Errors translating a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("linux.seccomp.architectures {0:?} does not include the native architecture")]
    ForeignArchitectures(Vec<String>),
    #[error("linux.seccomp.flags: flag {0:?} is not supported")]
    UnsupportedFlag(String),
    #[error("linux.seccomp.listenerPath: seccomp user notification is not supported")]
    NotifyListener,
    #[error("{field}: action SCMP_ACT_NOTIFY is not supported")]
    NotifyAction { field: String },
    #[error("{field}: argument index {index} is out of range (0..=5)")]
    ArgIndex { field: String, index: usize },
    #[error("{field}: SCMP_CMP_MASKED_EQ needs valueTwo")]
    MaskedEqWithoutValueTwo { field: String },
    #[error("{field}: syscall name is empty")]
    EmptyName { field: String },
    #[error("seccomp filter compilation failed: {0}")]
    Compile(String),
}

/// One BPF instruction, in a form that crosses to the container init helper.
pub type BpfInstruction = (u16, u8, u8, u32);

/// The compiled profile: filters to install in order, and the flags for the
/// seccomp(2) call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompPlan {
    pub filters: Vec<Vec<BpfInstruction>>,
    pub flags: u32,
}

#[cfg(target_arch = "x86_64")]
const NATIVE: (seccompiler::TargetArch, Arch) =
    (seccompiler::TargetArch::x86_64, Arch::ScmpArchX86_64);
#[cfg(target_arch = "aarch64")]
const NATIVE: (seccompiler::TargetArch, Arch) =
    (seccompiler::TargetArch::aarch64, Arch::ScmpArchAarch64);

/// Compiles `profile` for the native architecture.
pub fn compile(profile: &LinuxSeccomp) -> Result<SeccompPlan, SeccompError> {
    check_architectures(profile)?;
    let flags = translate_flags(profile)?;
    if profile.listener_path().is_some() {
        return Err(SeccompError::NotifyListener);
    }
    let default = action_json(
        profile.default_action(),
        profile.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;

    // action (as JSON text, to group equal actions) → rules
    let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    let mut all_rules = Vec::new();
    let mut known_names: BTreeMap<String, bool> = BTreeMap::new();
    for (i, syscall) in profile.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let action = action_json(syscall.action(), syscall.errno_ret(), &field)?;
        let conditions = translate_args(syscall.args().as_deref().unwrap_or(&[]), &field)?;
        for name in syscall.names() {
            if name.is_empty() {
                return Err(SeccompError::EmptyName {
                    field: format!("{field}.names"),
                });
            }
            let known = *known_names
                .entry(name.clone())
                .or_insert_with(|| is_native_syscall(name));
            if !known {
                continue;
            }
            for rule_conditions in &conditions {
                let rule = if rule_conditions.is_empty() {
                    json!({ "syscall": name })
                } else {
                    json!({ "syscall": name, "args": rule_conditions })
                };
                all_rules.push(rule.clone());
                groups
                    .entry(action.to_string())
                    .or_insert_with(|| (action.clone(), Vec::new()))
                    .1
                    .push(rule);
            }
        }
    }

    let allow = json!("allow");
    let mut ordered: Vec<(String, Value)> = Vec::new();
    if default != allow {
        ordered.push((
            "0-base".to_owned(),
            json!({ "mismatch_action": default, "match_action": allow, "filter": all_rules }),
        ));
    }
    for (n, (action, rules)) in groups.into_values().enumerate() {
        if action == allow {
            continue;
        }
        ordered.push((
            format!("{}-group", n + 1),
            json!({ "mismatch_action": allow, "match_action": action, "filter": rules }),
        ));
    }
    let document: serde_json::Map<String, Value> = ordered.iter().cloned().collect();
    let mut compiled = seccompiler::compile_from_json(
        serde_json::to_vec(&document)
            .map_err(|e| SeccompError::Compile(e.to_string()))?
            .as_slice(),
        NATIVE.0,
    )
    .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let mut filters = Vec::with_capacity(ordered.len());
    for (name, _) in &ordered {
        let program = compiled
            .remove(name)
            .ok_or_else(|| SeccompError::Compile(format!("filter {name} missing from output")))?;
        filters.push(
            program
                .into_iter()
                .map(|insn| (insn.code, insn.jt, insn.jf, insn.k))
                .collect(),
        );
    }
    Ok(SeccompPlan { filters, flags })
}

fn check_architectures(profile: &LinuxSeccomp) -> Result<(), SeccompError> {
    let Some(arches) = profile.architectures() else {
        return Ok(());
    };
    if arches.is_empty()
        || arches
            .iter()
            .any(|a| *a == NATIVE.1 || *a == Arch::ScmpArchNative)
    {
        return Ok(());
    }
    Err(SeccompError::ForeignArchitectures(
        arches.iter().map(|a| format!("{a:?}")).collect(),
    ))
}

fn translate_flags(profile: &LinuxSeccomp) -> Result<u32, SeccompError> {
    let mut flags = 0u32;
    for flag in profile.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG as u32,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as u32
            }
            other => return Err(SeccompError::UnsupportedFlag(format!("{other:?}"))),
        };
    }
    Ok(flags)
}

fn action_json(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    field: &str,
) -> Result<Value, SeccompError> {
    Ok(match action {
        // libseccomp's SCMP_ACT_KILL is SECCOMP_RET_KILL_THREAD.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActErrno => {
            json!({ "errno": errno_ret.unwrap_or(libc::EPERM as u32) })
        }
        LinuxSeccompAction::ScmpActTrace => json!({ "trace": errno_ret.unwrap_or(0) }),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::NotifyAction {
                field: field.to_owned(),
            })
        }
    })
}

/// Returns the rules (each a list of and-bound conditions) for one OCI
/// syscall entry. Like runc: conditions on distinct arguments are and-bound
/// in one rule; when one argument has several conditions, each condition
/// becomes its own rule (or-bound), which is what libseccomp does.
fn translate_args(
    args: &[oci_spec::runtime::LinuxSeccompArg],
    field: &str,
) -> Result<Vec<Vec<Value>>, SeccompError> {
    let mut conditions = Vec::with_capacity(args.len());
    let mut indexes = BTreeSet::new();
    let mut repeated_index = false;
    for (j, arg) in args.iter().enumerate() {
        let arg_field = format!("{field}.args[{j}]");
        if arg.index() > 5 {
            return Err(SeccompError::ArgIndex {
                field: arg_field,
                index: arg.index(),
            });
        }
        repeated_index |= !indexes.insert(arg.index());
        let (op, val) = match arg.op() {
            LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), arg.value()),
            LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), arg.value()),
            LinuxSeccompOperator::ScmpCmpLe => (json!("le"), arg.value()),
            LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), arg.value()),
            LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), arg.value()),
            LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), arg.value()),
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                let Some(value_two) = arg.value_two() else {
                    return Err(SeccompError::MaskedEqWithoutValueTwo { field: arg_field });
                };
                (json!({ "masked_eq": arg.value() }), value_two)
            }
        };
        conditions.push(json!({ "index": arg.index(), "type": "qword", "op": op, "val": val }));
    }
    if conditions.is_empty() {
        return Ok(vec![Vec::new()]);
    }
    if repeated_index {
        return Ok(conditions.into_iter().map(|c| vec![c]).collect());
    }
    Ok(vec![conditions])
}

/// Whether seccompiler knows `name` on the native architecture.
fn is_native_syscall(name: &str) -> bool {
    let probe = json!({ "probe": {
        "mismatch_action": "allow",
        "match_action": "log",
        "filter": [{ "syscall": name }],
    }});
    match serde_json::to_vec(&probe) {
        Ok(bytes) => seccompiler::compile_from_json(bytes.as_slice(), NATIVE.0).is_ok(),
        Err(_) => false,
    }
}

/// Installs the compiled filters on the calling thread, in order. Does not
/// set no_new_privs: the caller does when the spec asks for it (without it
/// the caller needs CAP_SYS_ADMIN, as with runc).
pub fn install(plan: &SeccompPlan) -> std::io::Result<()> {
    for filter in &plan.filters {
        let instructions: Vec<libc::sock_filter> = filter
            .iter()
            .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
            .collect();
        let len = u16::try_from(instructions.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        let program = libc::sock_fprog {
            len,
            filter: instructions.as_ptr().cast_mut(),
        };
        // SAFETY: `program` points at `instructions`, which outlives the
        // call; the kernel copies the filter before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                plan.flags,
                &program as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn allowlist_profile_compiles_to_base_filter_only() {
        let plan = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{ "names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW" }]
        })))
        .unwrap();
        assert_eq!(plan.filters.len(), 1);
        assert!(plan.filters[0].len() > 6);
    }

    #[test]
    fn profile_with_two_actions_compiles_to_base_and_group() {
        let plan = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                { "names": ["read"], "action": "SCMP_ACT_ALLOW" },
                { "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38 },
                { "names": ["personality"], "action": "SCMP_ACT_ALLOW",
                  "args": [{ "index": 0, "value": 0, "op": "SCMP_CMP_EQ" }] }
            ]
        })))
        .unwrap();
        // base + errno(38) group (the allow group folds into the base)
        assert_eq!(plan.filters.len(), 2);
    }

    #[test]
    fn denylist_profile_with_allow_default_has_no_base_filter() {
        let plan = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["mkdir"], "action": "SCMP_ACT_ERRNO" }]
        })))
        .unwrap();
        assert_eq!(plan.filters.len(), 1);
    }

    #[test]
    fn unknown_syscall_names_are_skipped() {
        let plan = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{ "names": ["read", "_llseek", "no_such_call"], "action": "SCMP_ACT_ALLOW" }]
        })))
        .unwrap();
        assert_eq!(plan.filters.len(), 1);
    }

    #[test]
    fn notify_action_returns_error_naming_field() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                { "names": ["read"], "action": "SCMP_ACT_ALLOW" },
                { "names": ["mount"], "action": "SCMP_ACT_NOTIFY" }
            ]
        })))
        .unwrap_err();
        assert!(
            err.to_string().contains("linux.seccomp.syscalls[1]"),
            "{err}"
        );
    }

    #[test]
    fn foreign_architecture_returns_error() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_S390X"]
        })))
        .unwrap_err();
        assert!(matches!(err, SeccompError::ForeignArchitectures(_)));
    }

    #[test]
    fn arg_index_out_of_range_returns_error_naming_field() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["read"], "action": "SCMP_ACT_ERRNO",
                           "args": [{ "index": 6, "value": 0, "op": "SCMP_CMP_EQ" }] }]
        })))
        .unwrap_err();
        assert!(err.to_string().contains("syscalls[0].args[0]"), "{err}");
    }

    #[test]
    fn masked_eq_without_value_two_returns_error() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{ "names": ["clone"], "action": "SCMP_ACT_ERRNO",
                           "args": [{ "index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ" }] }]
        })))
        .unwrap_err();
        assert!(matches!(err, SeccompError::MaskedEqWithoutValueTwo { .. }));
    }

    #[test]
    fn repeated_argument_index_becomes_or_bound_rules() {
        let rules = translate_args(
            &serde_json::from_value::<Vec<oci_spec::runtime::LinuxSeccompArg>>(json!([
                { "index": 0, "value": 0, "op": "SCMP_CMP_EQ" },
                { "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }
            ]))
            .unwrap(),
            "f",
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        let and_rules = translate_args(
            &serde_json::from_value::<Vec<oci_spec::runtime::LinuxSeccompArg>>(json!([
                { "index": 0, "value": 0, "op": "SCMP_CMP_EQ" },
                { "index": 1, "value": 8, "op": "SCMP_CMP_EQ" }
            ]))
            .unwrap(),
            "f",
        )
        .unwrap();
        assert_eq!(and_rules.len(), 1);
        assert_eq!(and_rules[0].len(), 2);
    }

    #[test]
    fn unsupported_flag_returns_error() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]
        })));
        assert!(matches!(err, Err(SeccompError::UnsupportedFlag(_))));
    }
}
