//! The VMM links this crate for `measure` and `initdata` only, with
//! `default-features = false`. This guards that choice: if a dependency of
//! the crate's base (or a `cloister-vmm` dependency line) drags an HTTP stack,
//! TLS, an async runtime or the verifier's crypto back into the VMM's trusted
//! code base, the test names the crate. `cargo tree` only resolves the locked graph (no build,
//! well under a second), so the check is cheap enough for every test run.

use std::path::Path;
use std::process::Command;

/// Crates of the KBS client/server and of evidence verification (features
/// `kbs-client`, `kbs-server`, `verify`), never needed by the VMM.
const FORBIDDEN_IN_VMM: &[&str] = &[
    "axum",
    "hyper",
    "reqwest",
    "rustls",
    "tokio",
    "tokio-rustls",
    "tower",
    "rsa",
    "x509-cert",
    "p256",
    "p384",
];

#[test]
fn vmm_normal_dependency_graph_has_no_kbs_network_stack() {
    let workspace_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = match Command::new(&cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["--format", "{p}", "-p", "cloister-vmm", "--manifest-path"])
        .arg(&workspace_manifest)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            eprintln!("SKIP: cannot run {cargo} tree: {e}");
            return;
        }
    };
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8(output.stdout).unwrap();
    // Each line is "<name> v<version>[ (<path>)][ (*)]".
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"cloister-attestation"),
        "cloister-vmm no longer depends on cloister-attestation; update this test"
    );
    let forbidden: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| FORBIDDEN_IN_VMM.contains(name))
        .collect();
    assert!(
        forbidden.is_empty(),
        "cloister-vmm's normal dependency graph contains {forbidden:?}; \
         see `cargo tree -p cloister-vmm -e normal -i <crate>`"
    );
}
