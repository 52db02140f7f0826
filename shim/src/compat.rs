//! containerd 1.6/1.7 compatibility.
//!
//! containerd-shim 0.12 speaks what containerd 2.x expects: the task API as
//! `containerd.task.v3.Task`, and a `start` reply in JSON
//! (`{"version":3,"address":…,"protocol":"ttrpc"}`) or, from 2.3, the
//! bootstrap protobuf. containerd 1.6 takes `start`'s output as a bare
//! address and calls `containerd.task.v2.Task` (1.7 also accepts JSON, but
//! only up to version 2). v3 is a renamed copy of v2, so the same service
//! answers both: for a containerd older than 2.0 the shim prints a bare
//! address of a second socket (`<socket>.v2`) on which the task service is
//! registered under the v2 name.
//!
//! Which containerd runs us: `<publish-binary> --version`, the binary
//! containerd names on our command line. An unreadable answer means 2.x.

use std::collections::HashMap;
use std::path::Path;

/// Set in the serving shim's environment by a legacy `start`.
pub const TASK_API_V2_ENV: &str = "CLOISTER_TASK_API_V2";
/// containerd 2.x's service name, as generated in containerd-shim-protos.
pub const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
/// containerd 1.x's name for the same service.
pub const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";

/// `containerd github.com/containerd/containerd v1.6.20 …` → (1, 6).
pub fn parse_containerd_version(output: &str) -> Option<(u32, u32)> {
    output.split_whitespace().find_map(|word| {
        let version = word.strip_prefix('v').unwrap_or(word);
        let mut parts = version.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor_text = parts.next()?;
        let digits: String = minor_text
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let minor = digits.parse().ok()?;
        // A version has at least a patch part (`1.6.20`, `2.1.4~ds1`).
        parts.next()?;
        Some((major, minor))
    })
}

/// The version of the containerd binary at `path`, if it says.
pub fn containerd_version(path: &Path) -> Option<(u32, u32)> {
    let output = std::process::Command::new(path)
        .arg("--version")
        .output()
        .ok()?;
    parse_containerd_version(&String::from_utf8_lossy(&output.stdout))
}

/// Whether the containerd at `publish_binary` predates the task API v3.
pub fn needs_task_api_v2(publish_binary: &str) -> bool {
    if publish_binary.is_empty() {
        return false;
    }
    matches!(containerd_version(Path::new(publish_binary)), Some((major, _)) if major < 2)
}

/// The v2 socket beside the shim's socket address.
pub fn v2_address(address: &str) -> String {
    format!("{address}.v2")
}

/// The task service map with the service renamed to the v2 name.
pub fn as_task_api_v2<S>(mut services: HashMap<String, S>) -> HashMap<String, S> {
    if let Some(service) = services.remove(TASK_SERVICE_V3) {
        services.insert(TASK_SERVICE_V2.to_owned(), service);
    }
    services
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_debian_and_upstream_builds_parse() {
        assert_eq!(
            parse_containerd_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n"
            ),
            Some((1, 6))
        );
        assert_eq!(
            parse_containerd_version(
                "containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7\n"
            ),
            Some((2, 1))
        );
        assert_eq!(parse_containerd_version("containerd dev"), None);
        assert_eq!(parse_containerd_version(""), None);
    }

    #[test]
    fn unknown_or_missing_binary_means_current_api() {
        assert!(!needs_task_api_v2(""));
        assert!(!needs_task_api_v2("/nonexistent/containerd"));
    }

    #[test]
    fn fake_containerd_1_6_needs_v2() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("containerd");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert!(needs_task_api_v2(&fake.display().to_string()));
    }

    #[test]
    fn service_is_renamed_to_v2() {
        let mut services = HashMap::new();
        services.insert(TASK_SERVICE_V3.to_owned(), 1);
        let renamed = as_task_api_v2(services);
        assert_eq!(renamed.get(TASK_SERVICE_V2), Some(&1));
        assert!(!renamed.contains_key(TASK_SERVICE_V3));
        assert_eq!(
            v2_address("unix:///run/containerd/s/ab"),
            "unix:///run/containerd/s/ab.v2"
        );
    }

    #[test]
    fn generated_service_name_is_v3() {
        let service: std::sync::Arc<dyn containerd_shim_protos::shim_async::Task + Send + Sync> =
            std::sync::Arc::new(Dummy);
        let services = containerd_shim_protos::shim_async::create_task(service);
        assert!(
            services.contains_key(TASK_SERVICE_V3),
            "{:?}",
            services.keys()
        );
    }

    struct Dummy;
    impl containerd_shim_protos::shim_async::Task for Dummy {}
}
