//! Compiles `bert2bert/v1/*.proto` with the vendored protoc (no system protoc needed) and writes
//! the file descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["bert2bert/v1/jobs.proto", "bert2bert/v1/workers.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("bert2bert_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
