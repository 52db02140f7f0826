//! OCI `linux.resources` → cgroup v2 file writes.
//!
//! `devices` is checked here too, but cgroup v2 has no file for it: the
//! rules become an eBPF program (`device_rules` → `crate::device_filter`)
//! that `Cgroup::set_device_rules` attaches before the container's first
//! process runs. Every other field we cannot honour is an error, never
//! skipped.

use oci_spec::runtime::LinuxResources;

use super::spec::SpecError;

/// One write into a container's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupWrite {
    /// The controller the file belongs to (must be enabled), or "" for core
    /// files.
    pub controller: &'static str,
    pub file: String,
    pub value: String,
}

fn write(controller: &'static str, file: &str, value: impl ToString) -> CgroupWrite {
    CgroupWrite {
        controller,
        file: file.to_owned(),
        value: value.to_string(),
    }
}

fn unsupported(field: &str) -> SpecError {
    SpecError::Invalid {
        field: field.to_owned(),
        reason: "not supported by the guest agent".to_owned(),
    }
}

/// Checks `resources` and returns the writes that apply them.
pub fn validate(resources: &LinuxResources) -> Result<Vec<CgroupWrite>, SpecError> {
    super::device_rules::parse_rules(
        "linux.resources.devices",
        resources.devices().as_deref().unwrap_or_default(),
    )?;
    let mut writes = Vec::new();
    if let Some(memory) = resources.memory() {
        let limit = memory.limit();
        if let Some(limit) = limit {
            writes.push(write("memory", "memory.max", max_or(limit)));
        }
        if let Some(reservation) = memory.reservation() {
            writes.push(write("memory", "memory.low", max_or(reservation)));
        }
        if let Some(swap) = memory.swap() {
            // OCI's swap is memory + swap; cgroup v2 counts swap alone.
            let value = match (swap, limit) {
                (s, _) if s < 0 => "max".to_owned(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(SpecError::Invalid {
                            field: "linux.resources.memory.swap".into(),
                            reason: format!("{s} is below memory.limit {l}"),
                        });
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            writes.push(write("memory", "memory.swap.max", value));
        }
        if memory.kernel().is_some() || memory.kernel_tcp().is_some() {
            // Deprecated in the runtime spec and absent from cgroup v2; runc
            // ignores them the same way.
        }
    }
    if let Some(pids) = resources.pids() {
        writes.push(write("pids", "pids.max", max_or(pids.limit())));
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares() {
            if shares > 0 {
                let shares = shares.clamp(2, 262_144);
                writes.push(write(
                    "cpu",
                    "cpu.weight",
                    1 + ((shares - 2) * 9999) / 262_142,
                ));
            }
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_owned(),
            };
            let period = cpu.period().unwrap_or(100_000);
            writes.push(write("cpu", "cpu.max", format!("{quota} {period}")));
        }
        if cpu.realtime_runtime().is_some() || cpu.realtime_period().is_some() {
            return Err(unsupported("linux.resources.cpu.realtimeRuntime"));
        }
        if let Some(cpus) = cpu.cpus().as_deref().filter(|c| !c.is_empty()) {
            writes.push(write("cpuset", "cpuset.cpus", cpus));
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|m| !m.is_empty()) {
            writes.push(write("cpuset", "cpuset.mems", mems));
        }
    }
    if resources.block_io().is_some() {
        return Err(unsupported("linux.resources.blockIO"));
    }
    if resources
        .hugepage_limits()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        return Err(unsupported("linux.resources.hugepageLimits"));
    }
    if resources.network().is_some() {
        return Err(unsupported("linux.resources.network"));
    }
    for (key, value) in resources.unified().iter().flatten() {
        if key.is_empty() || key.contains('/') || key.contains("..") || !key.contains('.') {
            return Err(SpecError::Invalid {
                field: format!("linux.resources.unified[{key:?}]"),
                reason: "not a cgroup file name".into(),
            });
        }
        let controller = match key.split('.').next().unwrap_or_default() {
            "memory" => "memory",
            "pids" => "pids",
            "cpu" => "cpu",
            "cpuset" => "cpuset",
            "io" => "io",
            "cgroup" => "",
            other => {
                return Err(SpecError::Invalid {
                    field: format!("linux.resources.unified[{key:?}]"),
                    reason: format!("controller {other:?} not supported"),
                })
            }
        };
        writes.push(write(controller, key, value));
    }
    Ok(writes)
}

fn max_or(value: i64) -> String {
    if value <= 0 {
        "max".to_owned()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: serde_json::Value) -> LinuxResources {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn memory_cpu_pids_become_v2_files() {
        let writes = validate(&resources(serde_json::json!({
            "memory": { "limit": 67108864, "swap": 134217728 },
            "cpu": { "shares": 1024, "quota": 50000, "period": 100000, "cpus": "0" },
            "pids": { "limit": 64 },
            "devices": [{ "allow": false, "access": "rwm" }]
        })))
        .unwrap();
        let get = |f: &str| writes.iter().find(|w| w.file == f).map(|w| w.value.clone());
        assert_eq!(get("memory.max").as_deref(), Some("67108864"));
        assert_eq!(get("memory.swap.max").as_deref(), Some("67108864"));
        assert_eq!(get("cpu.weight").as_deref(), Some("39"));
        assert_eq!(get("cpu.max").as_deref(), Some("50000 100000"));
        assert_eq!(get("cpuset.cpus").as_deref(), Some("0"));
        assert_eq!(get("pids.max").as_deref(), Some("64"));
    }

    #[test]
    fn unlimited_values_become_max() {
        let writes = validate(&resources(serde_json::json!({
            "memory": { "limit": -1, "swap": -1 }, "pids": { "limit": 0 }
        })))
        .unwrap();
        assert!(writes.iter().all(|w| w.value == "max"), "{writes:?}");
    }

    #[test]
    fn block_io_returns_error_naming_field() {
        let err = validate(&resources(
            serde_json::json!({ "blockIO": { "weight": 10 } }),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("linux.resources.blockIO"));
    }

    #[test]
    fn unified_key_with_slash_returns_error() {
        let err = validate(&resources(
            serde_json::json!({ "unified": { "../memory.max": "1" } }),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("unified"));
    }

    #[test]
    fn swap_below_limit_returns_error() {
        assert!(validate(&resources(serde_json::json!({
            "memory": { "limit": 1000, "swap": 10 }
        })))
        .is_err());
    }
}
