//! Compiles the node API protos with protoc (Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/machine.proto");
    tonic_prost_build::configure().compile_protos(&["proto/machine.proto"], &["proto"])?;
    Ok(())
}
