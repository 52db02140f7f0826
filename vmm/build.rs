//! Compiles the VMM's seccomp filters when the VMM is built (seccompiler,
//! from the allowlists in `src/jail/seccomp/rules.rs`): one BPF program
//! per thread kind and mix of device kinds, written to
//! `$OUT_DIR/seccomp_filters.bin` (8 bytes per instruction: code u16, jt,
//! jf, k u32, little-endian) with their offsets in
//! `$OUT_DIR/seccomp_filters.rs`.

use std::fmt::Write as _;

// The same files the VMM compiles (`compile.rs` finds `rules` as
// `super::rules` in both).
#[allow(dead_code)]
#[path = "src/jail/seccomp/compile.rs"]
mod compile;
#[allow(dead_code)]
#[path = "src/jail/seccomp/rules.rs"]
mod rules;

use compile::{compile, thread_rules, ThreadKind};
use rules::{DeviceKinds, MASK_KINDS};

/// In the order `jail::seccomp` indexes them.
const KINDS: [ThreadKind; 5] = [
    ThreadKind::Main,
    ThreadKind::Helper,
    ThreadKind::Vcpu,
    ThreadKind::Virtio,
    ThreadKind::VhostUser,
];

fn main() {
    println!("cargo:rerun-if-changed=src/jail/seccomp/rules.rs");
    println!("cargo:rerun-if-changed=src/jail/seccomp/compile.rs");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut blob = Vec::new();
    let mut index = String::from(
        "/// (offset, instructions) of each filter in the blob, by thread kind and device mask.\n",
    );
    let masks = 1usize << MASK_KINDS;
    writeln!(
        index,
        "pub const FILTER_INDEX: [[(usize, usize); {masks}]; {}] = [",
        KINDS.len()
    )
    .unwrap();
    for kind in KINDS {
        index.push_str("    [");
        for mask in 0..masks {
            let rules = thread_rules(kind, DeviceKinds::from_mask(mask))
                .unwrap_or_else(|e| panic!("seccomp rules of {kind:?}/{mask}: {e}"));
            let program = compile(rules).unwrap_or_else(|e| panic!("seccomp {kind:?}/{mask}: {e}"));
            write!(index, "({}, {}), ", blob.len() / 8, program.len()).unwrap();
            for insn in program {
                blob.extend_from_slice(&insn.code.to_le_bytes());
                blob.push(insn.jt);
                blob.push(insn.jf);
                blob.extend_from_slice(&insn.k.to_le_bytes());
            }
        }
        index.push_str("],\n");
    }
    index.push_str("];\n");
    std::fs::write(out.join("seccomp_filters.bin"), blob).expect("write seccomp_filters.bin");
    std::fs::write(out.join("seccomp_filters.rs"), index).expect("write seccomp_filters.rs");
}
