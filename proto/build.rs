//! Compiles `ferry/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! writes the encoded descriptor set next to the generated code for reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "ferry/v1/cluster.proto",
        "ferry/v1/config.proto",
        "ferry/v1/job.proto",
        "ferry/v1/lease.proto",
        "ferry/v1/probe.proto",
        "ferry/v1/raft.proto",
        "ferry/v1/registry.proto",
        "ferry/v1/worker.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("ferry_descriptor.bin"), fds.encode_to_vec())?;
    // Chunk frames are `bytes::Bytes`: decoded without a copy, handed to the
    // staging writer as they are.
    // A message that does not decode is the sender's fault: InvalidArgument.
    tonic_prost_build::configure()
        .codec_path("crate::codec::FerryCodec")
        .bytes(".ferry.v1.ChunkFrame.data")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
