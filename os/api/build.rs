//! Compiles the node API protos with protoc (Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/machine.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("machine_descriptor.bin"))
        .compile_protos(&["proto/machine.proto"], &["proto"])?;
    Ok(())
}
