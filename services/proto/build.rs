//! Compiles proto/sdlm/v1 and the etcd v3 subset in proto/etcd with protox (a Rust protobuf
//! compiler, so no `protoc` on the machine) and generates tonic clients and servers. sdlm's
//! descriptor set is kept for server reflection.

use std::path::{Path, PathBuf};

use prost::Message;

const SDLM: [&str; 3] = [
    "sdlm/v1/generation.proto",
    "sdlm/v1/worker.proto",
    "sdlm/v1/scheduler.proto",
];
const ETCD: [&str; 3] = ["etcd/kv.proto", "etcd/rpc.proto", "etcd/v3election.proto"];

fn compile(
    root: &Path,
    files: &[&str],
    descriptor_path: &Path,
    servers: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(files, [root])?;
    std::fs::write(descriptor_path, descriptors.encode_to_vec())?;
    let mut config = prost_build::Config::new();
    config
        .file_descriptor_set_path(descriptor_path)
        .skip_protoc_run();
    let protos: Vec<PathBuf> = files.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        .build_server(servers)
        .compile_with_config(config, &protos, &[root.to_path_buf()])?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    compile(&root, &SDLM, &out.join("sdlm_descriptor.bin"), true)?;
    // etcd is a server we call, never one we implement.
    compile(&root, &ETCD, &out.join("etcd_descriptor.bin"), false)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
