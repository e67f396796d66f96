//! Generates the gRPC types from `proto/weir.proto` with a vendored `protoc`, so building weir
//! needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../../proto/weir.proto");
    tonic_prost_build::configure()
        // Record payloads stay `Bytes` slices of the request buffer: no per-record copy.
        .bytes(".")
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::WeirCodec")
        .compile_protos(&["../../proto/weir.proto"], &["../../proto"])?;
    Ok(())
}
