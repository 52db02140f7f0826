//! The confidential deployment files in shim/deploy/confidential/ load
//! with the real config loader and agree with each other.

use std::path::Path;

use cloister_shim::confidential::launch::{QuoteService, SnpVcpu, TeeSettingsKind};
use cloister_shim::config::RuntimeConfig;

fn load(text: &str, name: &str) -> RuntimeConfig {
    RuntimeConfig::from_toml(text, Path::new(name)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn snp_runtime_config_loads_and_is_measurable() {
    let config = load(include_str!("../deploy/confidential/snp.toml"), "snp.toml");
    let settings = config
        .confidential
        .tee_settings(&config.guest.kernel)
        .unwrap()
        .unwrap();
    assert_eq!(settings.kernel, Path::new("/usr/share/cloister/bzImage"));
    assert_eq!(
        settings.kind,
        TeeSettingsKind::Snp {
            policy: 0x30000,
            vcpu: Some(SnpVcpu::Type("EPYC-Milan".into())),
        }
    );
    assert!(config.annotations.allowed.is_empty());
}

#[test]
fn tdx_runtime_config_loads_with_the_qgs_socket() {
    let config = load(include_str!("../deploy/confidential/tdx.toml"), "tdx.toml");
    // cloister-vmm cannot give a TD the agent's vsock yet.
    assert_eq!(
        config.hypervisor,
        cloister_shim::config::HypervisorKind::Qemu
    );
    assert_eq!(config.qemu.accel, cloister_shim::config::QemuAccel::Kvm);
    let settings = config
        .confidential
        .tee_settings(&config.guest.kernel)
        .unwrap()
        .unwrap();
    assert_eq!(
        settings.kind,
        TeeSettingsKind::Tdx {
            attributes: None,
            xfam: None,
            quote_service: Some(QuoteService::Unix("/var/run/tdx-qgs/qgs.socket".into())),
        }
    );
    // What the qemu backend will launch with.
    let pod = cloister_shim::confidential::PodConfidential::resolve(
        &config.confidential,
        &Default::default(),
    )
    .unwrap()
    .unwrap();
    let qemu_tee = cloister_shim::vmm_client::QemuTee::from_launch(&settings.launch(&pod)).unwrap();
    assert!(matches!(
        qemu_tee,
        cloister_shim::vmm_client::QemuTee::Tdx { ref ovmf, .. } if ovmf == Path::new("/usr/share/ovmf/OVMF.inteltdx.fd")
    ));
}

fn runtime_entry(text: &str, plugin: &str, runtime: &str) -> toml::Table {
    let doc: toml::Table = text.parse().unwrap();
    let mut node = &doc["plugins"];
    for key in [plugin, "containerd", "runtimes", runtime] {
        node = &node[key];
    }
    node.as_table().unwrap().clone()
}

fn check_snippet(text: &str, plugin: &str) {
    for (runtime, config) in [
        ("cloister-snp", "/etc/cloister/snp.toml"),
        ("cloister-tdx", "/etc/cloister/tdx.toml"),
    ] {
        let entry = runtime_entry(text, plugin, runtime);
        assert_eq!(
            entry["runtime_type"].as_str(),
            Some(cloister_shim::lifecycle::RUNTIME_ID)
        );
        assert_eq!(entry["options"]["ConfigPath"].as_str(), Some(config));
        let annotations: Vec<&str> = entry["pod_annotations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(annotations.contains(&"io.cloister.*"), "{annotations:?}");
        assert!(cloister_protocol::annotations::INIT_DATA.starts_with("io.cloister."));
        assert!(
            annotations.contains(&cloister_protocol::annotations::KATA_INIT_DATA),
            "{annotations:?}"
        );
    }
}

#[test]
fn containerd_1_snippet_names_both_runtimes_and_their_configs() {
    check_snippet(
        include_str!("../deploy/confidential/containerd-1.x.toml"),
        "io.containerd.grpc.v1.cri",
    );
}

#[test]
fn containerd_2_snippet_names_both_runtimes_and_their_configs() {
    check_snippet(
        include_str!("../deploy/confidential/containerd-2.x.toml"),
        "io.containerd.cri.v1.runtime",
    );
}

#[test]
fn runtime_classes_name_the_handlers() {
    let text = include_str!("../deploy/confidential/runtimeclass.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let handlers: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| {
            assert_eq!(d["kind"].as_str(), Some("RuntimeClass"));
            (
                d["metadata"]["name"].as_str().unwrap(),
                d["handler"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        handlers,
        [
            ("cloister-snp", "cloister-snp"),
            ("cloister-tdx", "cloister-tdx")
        ]
    );
}
