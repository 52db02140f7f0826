//! Whole-spec tests: real specs containerd writes, the process rules, and
//! malformed input.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::*;

/// Inspects a spec with no annotations.
pub(super) fn inspect(spec: Value) -> InspectionReport {
    inspect_spec(&spec, &HashMap::new())
}

fn ids(report: &InspectionReport) -> Vec<&'static str> {
    report.findings.iter().map(|f| f.id.as_str()).collect()
}

/// A spec with every baseline control in place.
fn hardened() -> Value {
    json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 1000, "gid": 1000},
            "args": ["/app"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_NET_BIND_SERVICE"], "effective": [], "permitted": []},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
            "resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 50000, "period": 100000}},
            "seccomp": {"defaultAction": "SCMP_ACT_ERRNO",
                        "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]},
            "maskedPaths": ["/proc/kcore"]
        }
    })
}

#[test]
fn hardened_spec_has_no_findings() {
    let report = inspect(hardened());
    assert!(report.findings.is_empty(), "{report}");
    assert_eq!(report.to_string(), "");
}

/// Each process rule: its deny case on the hardened spec, one field changed.
#[test]
fn each_process_rule_fires_on_its_field_alone() {
    let cases: [(&str, &str, Value, FindingId); 7] = [
        ("root", "readonly", json!(false), FindingId::WritableRootfs),
        (
            "process",
            "user",
            json!({"uid": 0, "gid": 0}),
            FindingId::RunsAsRoot,
        ),
        ("process", "user", Value::Null, FindingId::RunsAsRoot),
        ("linux", "seccomp", Value::Null, FindingId::NoSeccomp),
        (
            "process",
            "noNewPrivileges",
            json!(false),
            FindingId::NoNewPrivilegesOff,
        ),
        (
            "linux",
            "resources",
            json!({"cpu": {"quota": 50000}}),
            FindingId::NoMemoryLimit,
        ),
        (
            "linux",
            "resources",
            json!({"memory": {"limit": 1048576}, "cpu": {"quota": -1}}),
            FindingId::NoCpuLimit,
        ),
    ];
    for (section, key, value, expected) in cases {
        let mut spec = hardened();
        spec[section][key] = value.clone();
        let report = inspect(spec);
        assert_eq!(
            ids(&report),
            [expected.as_str()],
            "{section}.{key} = {value}: {report}"
        );
    }
}

#[test]
fn unconfined_seccomp_profile_is_no_seccomp() {
    let mut spec = hardened();
    spec["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"});
    let report = inspect(spec);
    assert_eq!(ids(&report), ["no-seccomp"]);
    assert!(
        report.findings[0].value.contains("SCMP_ACT_ALLOW"),
        "{report}"
    );
}

#[test]
fn cri_pod_level_limits_count_as_limits() {
    let mut spec = hardened();
    spec["linux"]["resources"] = json!({});
    let annotations = HashMap::from([
        (
            crate::config::CRI_MEMORY.to_string(),
            "134217728".to_string(),
        ),
        (
            crate::config::CRI_CPU_QUOTA.to_string(),
            "50000".to_string(),
        ),
    ]);
    assert!(inspect_spec(&spec, &annotations).findings.is_empty());
    // Unlimited CRI quota (-1, 0) is no limit.
    let annotations = HashMap::from([(crate::config::CRI_CPU_QUOTA.to_string(), "-1".to_string())]);
    let report = inspect_spec(&spec, &annotations);
    assert_eq!(ids(&report), ["no-memory-limit", "no-cpu-limit"]);
}

/// What `ctr run docker.io/library/alpine:latest demo sh` writes (containerd
/// 1.7's default Unix spec): no high finding; root user, writable root, no
/// seccomp (ctr adds it only with --seccomp), and no limits.
#[test]
fn ctr_run_default_spec_has_no_high_findings() {
    let spec: Value = serde_json::from_str(include_str!("testdata/ctr-run-default.json")).unwrap();
    let report = inspect(spec);
    assert_eq!(report.high_count(), 0, "{report}");
    assert_eq!(
        ids(&report),
        [
            "runs-as-root",
            "no-seccomp",
            "writable-rootfs",
            "no-memory-limit",
            "no-cpu-limit"
        ],
        "{report}"
    );
}

/// A CRI privileged debug pod (hostPID, hostNetwork, hostPath / at /host):
/// what containerd's CRI plugin writes for it.
#[test]
fn cri_privileged_pod_is_privileged_with_host_namespaces_and_host_root() {
    let spec: Value =
        serde_json::from_str(include_str!("testdata/cri-privileged-pod.json")).unwrap();
    let report = inspect(spec);
    let lines = report.to_string();
    assert!(
        lines.contains("HIGH privileged process.capabilities.bounding: CAP_SYS_ADMIN — fix: "),
        "{lines}"
    );
    assert!(
        lines.contains("HIGH privileged linux.resources.devices: all devices allowed"),
        "{lines}"
    );
    let host_ns: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.id == FindingId::HostNamespace)
        .map(|f| f.value.as_str())
        .collect();
    // ipc joins the pause container's (/proc/<pid>/ns/ipc): the pod's.
    assert_eq!(
        host_ns,
        [
            "network (absent: the host's)",
            "pid (absent: the host's)",
            "uts (absent: the host's)"
        ]
    );
    let host_paths: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.id == FindingId::HostPathMount)
        .map(|f| format!("{} {}", f.severity, f.value))
        .collect();
    // containerd's hostname/resolv.conf/shm and kubelet's pod files are not listed.
    assert_eq!(host_paths, ["HIGH / -> /host (rw)"]);
    let added = report
        .findings
        .iter()
        .find(|f| f.id == FindingId::AddedCapabilities)
        .unwrap();
    assert!(
        added.value.contains("CAP_SYS_MODULE") && !added.value.contains("CAP_CHOWN"),
        "{added}"
    );
    // Most severe first.
    assert!(report
        .findings
        .windows(2)
        .all(|w| w[0].severity >= w[1].severity));
}

#[test]
fn malformed_fields_are_findings_naming_the_field() {
    let spec = json!({
        "process": {"user": {"uid": "root"}, "capabilities": {"bounding": ["CAP_CHOWN", 7]},
                    "noNewPrivileges": "yes"},
        "root": "rootfs",
        "mounts": {"destination": "/"},
        "linux": {"namespaces": [{"type": 1}], "resources": {"memory": {"limit": 1.5}}}
    });
    let report = inspect(spec);
    let malformed: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.id == FindingId::MalformedSpec)
        .map(|f| f.field.as_str())
        .collect();
    assert_eq!(
        malformed,
        [
            "linux.namespaces[0].type",
            "linux.resources.memory.limit",
            "mounts",
            "process.capabilities.bounding[1]",
            "process.noNewPrivileges",
            "process.user.uid",
            "root",
        ],
        "{report}"
    );
    let uid = report
        .findings
        .iter()
        .find(|f| f.field == "process.user.uid")
        .unwrap();
    assert_eq!(uid.value, "a string where an integer belongs");
}

#[test]
fn non_object_spec_is_one_malformed_finding() {
    for spec in [json!([]), json!("config"), Value::Null, json!(3)] {
        let report = inspect(spec.clone());
        assert_eq!(ids(&report), ["malformed-spec"], "{spec}");
        assert_eq!(report.findings[0].field, "(spec)");
    }
}

#[test]
fn report_serializes_ids_and_severities_as_strings() {
    let report = inspect(json!({"process": {"capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}}));
    let json = serde_json::to_value(&report).unwrap();
    let first = &json["findings"][0];
    assert_eq!(first["id"], "privileged");
    assert_eq!(first["severity"], "high");
    assert_eq!(first["field"], "process.capabilities.bounding");
    assert_eq!(first["value"], "CAP_SYS_ADMIN");
    assert!(first["fix"].as_str().is_some_and(|f| !f.is_empty()));
}

#[test]
fn finding_ids_round_trip() {
    for id in FindingId::ALL {
        assert_eq!(FindingId::parse(id.as_str()), Some(id));
        assert_eq!(serde_json::to_value(id).unwrap(), id.as_str());
    }
    assert_eq!(FindingId::parse("hostPID"), None);
}

/// The table: each spec, the hardened one with one thing a pod
/// author might ask for, gives exactly the findings of that thing.
#[test]
fn table_of_risky_specs_each_gives_its_finding() {
    type Edit = fn(&mut Value);
    /// (finding id, field) pairs, in report order.
    type Expected = &'static [(&'static str, &'static str)];
    let table: [(&str, Edit, Expected); 10] = [
        (
            "privileged",
            |s| {
                s["process"]["capabilities"]["bounding"] =
                    json!(["CAP_SYS_ADMIN", "CAP_SYS_MODULE"]);
                s["linux"]["maskedPaths"] = json!([]);
                s["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
            },
            &[
                ("privileged", "linux.resources.devices"),
                ("privileged", "process.capabilities.bounding"),
                ("added-capabilities", "process.capabilities"),
            ],
        ),
        (
            "capabilities.add SYS_ADMIN",
            |s| {
                s["process"]["capabilities"]["effective"] = json!(["CAP_SYS_ADMIN"]);
            },
            &[
                ("privileged", "process.capabilities.effective"),
                ("added-capabilities", "process.capabilities"),
            ],
        ),
        (
            "capabilities.add NET_ADMIN",
            |s| {
                s["process"]["capabilities"]["permitted"] = json!(["CAP_NET_ADMIN"]);
            },
            &[("added-capabilities", "process.capabilities")],
        ),
        (
            "hostPID",
            |s| {
                s["linux"]["namespaces"] = json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]);
            },
            &[("host-namespace", "linux.namespaces")],
        ),
        (
            "hostNetwork",
            |s| {
                s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                                              {"type": "network", "path": "/proc/1/ns/net"}]);
            },
            &[("host-namespace", "linux.namespaces")],
        ),
        (
            "hostPath /",
            |s| {
                s["mounts"] = json!([{"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]}]);
            },
            &[("host-path-mount", "mounts[0].source")],
        ),
        (
            "runAsUser 0",
            |s| {
                s["process"]["user"]["uid"] = json!(0);
            },
            &[("runs-as-root", "process.user.uid")],
        ),
        (
            "readOnlyRootFilesystem false",
            |s| {
                s["root"]["readonly"] = json!(false);
            },
            &[("writable-rootfs", "root.readonly")],
        ),
        (
            "seccompProfile Unconfined",
            |s| {
                s["linux"].as_object_mut().unwrap().remove("seccomp");
            },
            &[("no-seccomp", "linux.seccomp")],
        ),
        (
            "allowPrivilegeEscalation true, no limits",
            |s| {
                s["process"]["noNewPrivileges"] = json!(false);
                s["linux"]["resources"] = json!({});
            },
            &[
                ("no-new-privileges-off", "process.noNewPrivileges"),
                ("no-memory-limit", "linux.resources.memory.limit"),
                ("no-cpu-limit", "linux.resources.cpu.quota"),
            ],
        ),
    ];
    for (name, edit, expected) in table {
        let mut spec = hardened();
        edit(&mut spec);
        let report = inspect(spec);
        let found: Vec<(&str, &str)> = report
            .findings
            .iter()
            .map(|f| (f.id.as_str(), f.field.as_str()))
            .collect();
        assert_eq!(found, expected, "{name}:\n{report}");
    }
}
