//! The containerd snippets in shim/deploy/ parse and name our runtime.

fn runtime_entry(text: &str, plugin: &str) -> toml::Table {
    let doc: toml::Table = text.parse().unwrap();
    let mut node = &doc["plugins"];
    for key in [plugin, "containerd", "runtimes", "cloister"] {
        node = &node[key];
    }
    node.as_table().unwrap().clone()
}

fn check(entry: &toml::Table) {
    assert_eq!(
        entry["runtime_type"].as_str(),
        Some(cloister_shim::lifecycle::RUNTIME_ID)
    );
    assert_eq!(
        entry["options"]["ConfigPath"].as_str(),
        Some(cloister_shim::config::DEFAULT_CONFIG_PATH)
    );
    let annotations = entry["pod_annotations"].as_array().unwrap();
    assert_eq!(annotations[0].as_str(), Some("io.cloister.*"));
}

#[test]
fn containerd_1_snippet() {
    check(&runtime_entry(
        include_str!("../deploy/containerd-1.x.toml"),
        "io.containerd.grpc.v1.cri",
    ));
}

#[test]
fn containerd_2_snippet() {
    check(&runtime_entry(
        include_str!("../deploy/containerd-2.x.toml"),
        "io.containerd.cri.v1.runtime",
    ));
}

#[test]
fn runtime_class_names_the_handler() {
    let text = include_str!("../deploy/runtimeclass.yaml");
    assert!(text.lines().any(|l| l == "handler: cloister"));
    assert!(text.lines().any(|l| l == "kind: RuntimeClass"));
}
