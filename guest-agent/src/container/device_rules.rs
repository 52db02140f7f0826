//! OCI `linux.resources.devices` (and the nodes of `linux.devices`) →
//! [`DeviceRules`] for the cgroup device program.
//!
//! As runc does: the list starts from deny-all, the spec's rules apply in
//! order, then the spec's `linux.devices` nodes and the devices every
//! container gets are allowed (appended last, so a spec cannot take them
//! away). A rule of type `a` (or without a type) covers character and block
//! devices; with wildcard numbers and `rwm` it resets the list to allow-all
//! or deny-all. Rules are validated like runc validates them: type `a`,
//! `b` or `c`, access a non-empty subset of `rwm`.

use oci_spec::runtime::{Linux, LinuxDeviceCgroup, LinuxDeviceType, LinuxResources};

use super::spec::SpecError;
use crate::device_filter::{
    DeviceKind, DeviceRule, DeviceRules, ACCESS_ALL, ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE,
    MAX_MAJOR, MAX_MINOR,
};

/// More rules than any real spec has, few enough for one eBPF program.
pub const MAX_RULES: usize = 1000;

/// What every container may use, after runc's `AllowedDevices`: mknod of
/// any node (opening it is still filtered), /dev/null, zero, full, random,
/// urandom, tty, console, ptmx and the pts slaves.
pub const DEFAULT_ALLOWED: [DeviceRule; 11] = [
    DeviceRule {
        allow: true,
        kind: Some(DeviceKind::Char),
        major: None,
        minor: None,
        access: ACCESS_MKNOD,
    },
    DeviceRule {
        allow: true,
        kind: Some(DeviceKind::Block),
        major: None,
        minor: None,
        access: ACCESS_MKNOD,
    },
    DeviceRule::char_device(1, Some(3)),
    DeviceRule::char_device(1, Some(5)),
    DeviceRule::char_device(1, Some(7)),
    DeviceRule::char_device(1, Some(8)),
    DeviceRule::char_device(1, Some(9)),
    DeviceRule::char_device(5, Some(0)),
    DeviceRule::char_device(5, Some(1)),
    DeviceRule::char_device(5, Some(2)),
    DeviceRule::char_device(136, None),
];

fn invalid(field: String, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A major or minor: absent or -1 (runc's wildcard) match any number.
fn number(field: String, value: Option<i64>, max: u32) -> Result<Option<u32>, SpecError> {
    match value {
        None | Some(-1) => Ok(None),
        Some(v) => match u32::try_from(v) {
            Ok(n) if n <= max => Ok(Some(n)),
            _ => Err(invalid(
                field,
                format!("{v} is out of range (0..={max}, or -1 for any)"),
            )),
        },
    }
}

fn access_bits(field: String, access: Option<&str>) -> Result<u8, SpecError> {
    let access = access.unwrap_or_default();
    if access.is_empty() {
        return Err(invalid(field, "must not be empty (a subset of \"rwm\")"));
    }
    access.chars().try_fold(0u8, |bits, c| match c {
        'r' => Ok(bits | ACCESS_READ),
        'w' => Ok(bits | ACCESS_WRITE),
        'm' => Ok(bits | ACCESS_MKNOD),
        other => Err(invalid(
            field.clone(),
            format!("{access:?} has {other:?}; only r, w and m are allowed"),
        )),
    })
}

/// Validates one spec rule; `field` is its path, e.g.
/// `linux.resources.devices[2]`.
fn rule(field: &str, rule: &LinuxDeviceCgroup) -> Result<DeviceRule, SpecError> {
    let kind = match rule.typ() {
        None | Some(LinuxDeviceType::A) => None,
        Some(LinuxDeviceType::C) => Some(DeviceKind::Char),
        Some(LinuxDeviceType::B) => Some(DeviceKind::Block),
        Some(other) => {
            return Err(invalid(
                format!("{field}.type"),
                format!(
                    "{:?} is not a device cgroup type (a, b or c)",
                    other.as_str()
                ),
            ))
        }
    };
    Ok(DeviceRule {
        allow: rule.allow(),
        kind,
        major: number(format!("{field}.major"), rule.major(), MAX_MAJOR)?,
        minor: number(format!("{field}.minor"), rule.minor(), MAX_MINOR)?,
        access: access_bits(format!("{field}.access"), rule.access().as_deref())?,
    })
}

/// Validates a rule list; `field` is the list's path.
pub fn parse_rules(field: &str, list: &[LinuxDeviceCgroup]) -> Result<Vec<DeviceRule>, SpecError> {
    if list.len() > MAX_RULES {
        return Err(invalid(
            field.to_owned(),
            format!("{} rules, at most {MAX_RULES} are supported", list.len()),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| rule(&format!("{field}[{i}]"), r))
        .collect()
}

/// Allow rules for the nodes a spec's `linux.devices` creates (runc allows
/// them `rwm` too); FIFOs are not device-controlled and are skipped.
pub fn node_rules(linux: &Linux) -> Vec<DeviceRule> {
    linux
        .devices()
        .iter()
        .flatten()
        .filter_map(|d| {
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => DeviceKind::Char,
                LinuxDeviceType::B => DeviceKind::Block,
                LinuxDeviceType::A | LinuxDeviceType::P => return None,
            };
            // spec.rs has refused negative or oversized numbers already.
            Some(DeviceRule {
                allow: true,
                kind: Some(kind),
                major: Some(u32::try_from(d.major()).ok()?),
                minor: Some(u32::try_from(d.minor()).ok()?),
                access: ACCESS_ALL,
            })
        })
        .collect()
}

fn assemble(spec_rules: Vec<DeviceRule>, nodes: &[DeviceRule]) -> DeviceRules {
    let mut rules = DeviceRules::deny_all();
    for r in spec_rules
        .into_iter()
        .chain(nodes.iter().copied())
        .chain(DEFAULT_ALLOWED)
    {
        rules.push(r);
    }
    rules
}

/// The rules a new container's cgroup gets.
pub fn for_container(linux: &Linux) -> Result<DeviceRules, SpecError> {
    let listed = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().as_deref())
        .unwrap_or_default();
    let spec_rules = parse_rules("linux.resources.devices", listed)?;
    Ok(assemble(spec_rules, &node_rules(linux)))
}

/// The rules an UpdateContainer request sets, or None when it lists none
/// (an empty or absent list leaves the running program alone).
pub fn for_update(
    resources: &LinuxResources,
    nodes: &[DeviceRule],
) -> Result<Option<DeviceRules>, SpecError> {
    match resources.devices().as_deref() {
        None | Some([]) => Ok(None),
        Some(list) => Ok(Some(assemble(
            parse_rules("linux.resources.devices", list)?,
            nodes,
        ))),
    }
}

/// Explains why serde refused a device rule list (`list` is the raw JSON at
/// `field`): an unknown type letter or a field of the wrong JSON type. None
/// if the list is not the problem.
pub fn explain_malformed(field: &str, list: Option<&serde_json::Value>) -> Option<SpecError> {
    let list = list?;
    let Some(rules) = list.as_array() else {
        return Some(invalid(field.to_owned(), format!("{list} is not a list")));
    };
    rules.iter().enumerate().find_map(|(i, r)| {
        let at = |name: &str| format!("{field}[{i}].{name}");
        let Some(r) = r.as_object() else {
            return Some(invalid(
                format!("{field}[{i}]"),
                format!("{r} is not an object"),
            ));
        };
        if let Some(t) = r.get("type") {
            if !matches!(t.as_str(), Some("a" | "b" | "c" | "u" | "p")) {
                return Some(invalid(
                    at("type"),
                    format!("{t} is not a device cgroup type (a, b or c)"),
                ));
            }
        }
        if let Some(a) = r.get("access").filter(|a| !a.is_string() && !a.is_null()) {
            return Some(invalid(
                at("access"),
                format!("{a} is not a string of r, w and m"),
            ));
        }
        for name in ["major", "minor"] {
            if let Some(n) = r.get(name).filter(|n| !n.is_i64() && !n.is_null()) {
                return Some(invalid(at(name), format!("{n} is not an integer")));
            }
        }
        if let Some(a) = r.get("allow").filter(|a| !a.is_boolean()) {
            return Some(invalid(at("allow"), format!("{a} is not true or false")));
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(json: serde_json::Value) -> Linux {
        serde_json::from_value(json).unwrap()
    }

    fn container_rules(devices: serde_json::Value) -> Result<DeviceRules, SpecError> {
        for_container(&linux(
            serde_json::json!({ "resources": { "devices": devices } }),
        ))
    }

    #[test]
    fn deny_all_spec_allows_defaults_only() {
        let rules =
            container_rules(serde_json::json!([{ "allow": false, "access": "rwm" }])).unwrap();
        assert!(!rules.default_allow);
        assert_eq!(rules.rules, DEFAULT_ALLOWED.to_vec());
        let rw = ACCESS_READ | ACCESS_WRITE;
        assert!(rules.allows(DeviceKind::Char, 1, 3, rw));
        assert!(rules.allows(DeviceKind::Char, 136, 4, rw));
        assert!(rules.allows(DeviceKind::Char, 5, 2, rw));
        assert!(!rules.allows(DeviceKind::Char, 1, 11, ACCESS_READ));
        assert!(rules.allows(DeviceKind::Char, 1, 11, ACCESS_MKNOD));
        assert!(!rules.allows(DeviceKind::Block, 8, 0, ACCESS_READ));
    }

    #[test]
    fn spec_without_rules_denies_by_default_like_runc() {
        let rules = for_container(&linux(serde_json::json!({}))).unwrap();
        assert!(!rules.default_allow);
        assert!(!rules.allows(DeviceKind::Char, 1, 11, ACCESS_READ));
    }

    #[test]
    fn allow_all_spec_becomes_default_allow() {
        let rules = container_rules(serde_json::json!([
            { "allow": false, "access": "rwm" },
            { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "r" },
            { "allow": true, "access": "rwm" }
        ]))
        .unwrap();
        assert!(rules.default_allow);
        assert!(rules.allows(DeviceKind::Block, 8, 0, ACCESS_ALL));
    }

    #[test]
    fn allow_rule_and_linux_devices_nodes_are_allowed() {
        let rules = for_container(&linux(serde_json::json!({
            "devices": [{ "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229 },
                        { "path": "/dev/fifo", "type": "p", "major": 0, "minor": 0 }],
            "resources": { "devices": [
                { "allow": false, "access": "rwm" },
                { "allow": true, "type": "c", "major": 1, "minor": 11, "access": "r" },
                { "allow": true, "type": "b", "major": 7, "access": "rw" }
            ] }
        })))
        .unwrap();
        assert!(rules.allows(DeviceKind::Char, 1, 11, ACCESS_READ));
        assert!(!rules.allows(DeviceKind::Char, 1, 11, ACCESS_WRITE));
        assert!(rules.allows(DeviceKind::Block, 7, 3, ACCESS_READ | ACCESS_WRITE));
        assert!(rules.allows(DeviceKind::Char, 10, 229, ACCESS_ALL));
        assert!(!rules.allows(DeviceKind::Char, 0, 0, ACCESS_READ));
    }

    #[test]
    fn spec_cannot_deny_default_devices() {
        let rules = container_rules(serde_json::json!([
            { "allow": false, "type": "c", "major": 1, "minor": 3, "access": "rwm" }
        ]))
        .unwrap();
        assert!(rules.allows(DeviceKind::Char, 1, 3, ACCESS_ALL));
    }

    #[test]
    fn bad_access_char_returns_error_naming_field_and_value() {
        let err =
            container_rules(serde_json::json!([{ "allow": true, "type": "c", "access": "rwx" }]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("linux.resources.devices[0].access"), "{err}");
        assert!(err.contains("\"rwx\""), "{err}");
    }

    #[test]
    fn empty_access_returns_error() {
        let err = container_rules(serde_json::json!([{ "allow": true }]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux.resources.devices[0].access"), "{err}");
    }

    #[test]
    fn fifo_type_rule_returns_error_naming_field() {
        let err =
            container_rules(serde_json::json!([{ "allow": true, "type": "p", "access": "r" }]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("linux.resources.devices[0].type"), "{err}");
        assert!(err.contains("\"p\""), "{err}");
    }

    #[test]
    fn out_of_range_numbers_return_errors() {
        for (field, value) in [("major", -2i64), ("major", 4096), ("minor", 1 << 20)] {
            let mut r = serde_json::json!({ "allow": true, "type": "c", "access": "r" });
            r[field] = value.into();
            let err = container_rules(serde_json::json!([r]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("devices[0].{field}")), "{err}");
            assert!(err.contains(&value.to_string()), "{err}");
        }
        let wildcard = container_rules(serde_json::json!([
            { "allow": true, "type": "c", "major": -1, "minor": -1, "access": "r" }
        ]))
        .unwrap();
        assert!(wildcard.allows(DeviceKind::Char, 99, 99, ACCESS_READ));
    }

    #[test]
    fn too_many_rules_return_error() {
        let many =
            vec![serde_json::json!({ "allow": true, "type": "c", "access": "r" }); MAX_RULES + 1];
        let err = container_rules(serde_json::Value::Array(many))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1001 rules"), "{err}");
    }

    #[test]
    fn update_without_rules_keeps_program() {
        let resources: LinuxResources =
            serde_json::from_value(serde_json::json!({ "devices": [] })).unwrap();
        assert_eq!(for_update(&resources, &[]).unwrap(), None);
        let resources: LinuxResources = serde_json::from_value(serde_json::json!({
            "devices": [{ "allow": true, "type": "c", "major": 1, "minor": 11, "access": "r" }]
        }))
        .unwrap();
        let rules = for_update(&resources, &[]).unwrap().unwrap();
        assert!(rules.allows(DeviceKind::Char, 1, 11, ACCESS_READ));
    }

    #[test]
    fn unknown_type_letter_is_explained_with_field() {
        let value = serde_json::json!([{ "allow": true, "access": "r" }, { "allow": true, "type": "x", "access": "r" }]);
        let err = explain_malformed("linux.resources.devices", Some(&value))
            .unwrap()
            .to_string();
        assert!(err.contains("linux.resources.devices[1].type"), "{err}");
        assert!(err.contains("\"x\""), "{err}");
        let fine = serde_json::json!([{ "allow": true, "type": "c", "major": 1, "access": "r" }]);
        assert!(explain_malformed("linux.resources.devices", Some(&fine)).is_none());
        assert!(explain_malformed("linux.resources.devices", None).is_none());
    }

    #[test]
    fn non_integer_major_is_explained_with_field() {
        let value =
            serde_json::json!([{ "allow": true, "type": "c", "major": "1", "access": "r" }]);
        let err = explain_malformed("resources_json.devices", Some(&value))
            .unwrap()
            .to_string();
        assert!(err.contains("resources_json.devices[0].major"), "{err}");
    }
}
