//! Compiles `proto/` with a vendored `protoc`, so a fresh machine needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; PROTOC is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = std::fs::read_dir("proto/llmops/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("proto"))
        .collect::<Vec<_>>();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("llmops_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto")])?;
    // The subset of etcd's API the shared registry speaks (a client only).
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &[PathBuf::from("proto/etcd/rpc.proto")],
            &[PathBuf::from("proto")],
        )?;
    println!("cargo:rerun-if-changed=proto");
    // The default model is compiled in when its files are present.
    println!("cargo::rustc-check-cfg=cfg(llmops_embedded)");
    println!("cargo:rerun-if-changed=models/default");
    let dir = std::path::Path::new("models/default");
    if [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .all(|f| dir.join(f).exists())
    {
        println!("cargo:rustc-cfg=llmops_embedded");
    }
    Ok(())
}
