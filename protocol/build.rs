//! Generates the protobuf messages and async ttrpc client/server for
//! `proto/agent.proto` with ttrpc-codegen (pure Rust parser: no protoc).
//!
//! The code goes into `src/generated/` rather than OUT_DIR because the
//! generated `mod.rs` carries inner attributes, which `include!` rejects.

use std::path::Path;

fn main() {
    let proto_dir = Path::new("proto");
    let out_dir = Path::new("src/generated");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(err) = std::fs::create_dir_all(out_dir) {
        panic!("cannot create {}: {err}", out_dir.display());
    }
    let result = ttrpc_codegen::Codegen::new()
        .out_dir(out_dir)
        .include(proto_dir)
        .input(proto_dir.join("agent.proto"))
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            gen_mod: true,
            ..Default::default()
        })
        .run();
    if let Err(err) = result {
        panic!("ttrpc-codegen failed on proto/agent.proto: {err}");
    }
}
