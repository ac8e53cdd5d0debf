//! Compiles the gRPC client for `llmops.v1.Inference` with a vendored `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; PROTOC is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let proto = PathBuf::from("../proto/llmops/v1/inference.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&[proto], &[PathBuf::from("../proto")])?;
    println!("cargo:rerun-if-changed=../proto/llmops/v1/inference.proto");
    Ok(())
}
