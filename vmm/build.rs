//! Compiles the VMM's seccomp filters when the VMM is built (seccompiler,
//! from the allowlists in `src/jail/seccomp/rules.rs`): one BPF program
//! per thread kind, confidential variant (`TeeThreads`) and mix of device
//! kinds, identical programs stored once, written to
//! `$OUT_DIR/seccomp_filters.bin` (8 bytes per instruction: code u16, jt,
//! jf, k u32, little-endian) with their offsets in
//! `$OUT_DIR/seccomp_filters.rs`.

use std::collections::HashMap;
use std::fmt::Write as _;

// The same files the VMM compiles (`compile.rs` finds `rules` as
// `super::rules` in both).
#[allow(dead_code)]
#[path = "src/jail/seccomp/compile.rs"]
mod compile;
#[allow(dead_code)]
#[path = "src/jail/seccomp/rules.rs"]
mod rules;

use compile::{compile, tee_thread_rules, ThreadKind};
use rules::{DeviceKinds, TeeThreads, MASK_KINDS, TEE_VARIANTS};

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
        "/// (offset, instructions) of each filter in the blob, by thread kind, TEE variant and device mask.\n",
    );
    let masks = 1usize << MASK_KINDS;
    writeln!(
        index,
        "pub const FILTER_INDEX: [[[(usize, usize); {masks}]; {TEE_VARIANTS}]; {}] = [",
        KINDS.len()
    )
    .unwrap();
    // Only vCPU threads differ by TEE variant: the others' programs repeat.
    let mut stored: HashMap<Vec<u8>, usize> = HashMap::new();
    for kind in KINDS {
        index.push_str("    [");
        for variant in 0..TEE_VARIANTS {
            let tee = TeeThreads::from_index(variant);
            index.push('[');
            for mask in 0..masks {
                let rules = tee_thread_rules(kind, DeviceKinds::from_mask(mask), tee)
                    .unwrap_or_else(|e| panic!("seccomp rules of {kind:?}/{tee:?}/{mask}: {e}"));
                let program = compile(rules)
                    .unwrap_or_else(|e| panic!("seccomp {kind:?}/{tee:?}/{mask}: {e}"));
                let mut bytes = Vec::with_capacity(program.len() * 8);
                for insn in &program {
                    bytes.extend_from_slice(&insn.code.to_le_bytes());
                    bytes.push(insn.jt);
                    bytes.push(insn.jf);
                    bytes.extend_from_slice(&insn.k.to_le_bytes());
                }
                let offset = *stored.entry(bytes.clone()).or_insert_with(|| {
                    let offset = blob.len() / 8;
                    blob.extend_from_slice(&bytes);
                    offset
                });
                write!(index, "({offset}, {}), ", program.len()).unwrap();
            }
            index.push_str("], ");
        }
        index.push_str("],\n");
    }
    index.push_str("];\n");
    std::fs::write(out.join("seccomp_filters.bin"), blob).expect("write seccomp_filters.bin");
    std::fs::write(out.join("seccomp_filters.rs"), index).expect("write seccomp_filters.rs");
}
