//! The built kernel's `.config` has every option `guest.config` asks for.
//!
//! Checks the output of `build-kernel.sh`: the folder in
//! `CLOISTER_KERNEL_DIR`, else `${CLOISTER_CACHE:-$HOME/.cache/cloister}/kernel/current`.

use cloister_guest_image::kconfig::Kconfig;
use cloister_guest_image::{paths, GUEST_FRAGMENT};

#[test]
fn built_kernel_config_has_every_fragment_option() {
    let dir = paths::kernel_dir();
    let config_path = dir.join("config");
    let Ok(text) = std::fs::read_to_string(&config_path) else {
        eprintln!(
            "SKIP: no built kernel config at {} (run kernel-config/build-kernel.sh, or set {})",
            config_path.display(),
            paths::KERNEL_DIR_ENV
        );
        return;
    };
    let fragment = Kconfig::parse(GUEST_FRAGMENT).expect("guest.config parses");
    let config = Kconfig::parse(&text).expect("built config parses");
    let mismatches = fragment.mismatches_in(&config);
    let listed: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
    assert!(
        mismatches.is_empty(),
        "{} differs from guest.config:\n  {}",
        config_path.display(),
        listed.join("\n  ")
    );
    eprintln!(
        "{}: all {} options of guest.config as asked",
        config_path.display(),
        fragment.len()
    );
}
