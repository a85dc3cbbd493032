//! The Kiln OS node API: the gRPC protos (`proto/machine.proto`), the contract between `kiln`
//! and `machined` (ports, exit codes, metadata keys) and the client used by `kiln`, by
//! `machined` when it forwards calls, and by tests.
//!
//! # Design
//!
//! Every unary response is a list of per-node messages, each with [`pb::Metadata`], so a node
//! that forwards a call to several nodes merges the answers by concatenating their encodings.
//!
//! # Limitations
//!
//! Streaming calls (logs, snapshots, file reads) reach one node each; the client opens one
//! stream per node.

pub mod client;
pub mod contract;
pub mod slots;
pub mod upgrade;
pub mod wait;

/// The encoded `FileDescriptorSet` of `proto/machine.proto`, as protoc compiled it.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/machine_descriptor.bin"));

/// The fully qualified name of the node API service.
pub const MACHINE_SERVICE: &str = "kiln.machine.MachineService";

/// The method names of `service` (e.g. [`MACHINE_SERVICE`]) as the compiled proto declares
/// them; empty when the proto has no such service.
///
/// # Panics
///
/// Never in practice: the descriptor set is produced by protoc at build time, and a test
/// decodes it.
pub fn service_methods(service: &str) -> Vec<String> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
        .expect("the build script wrote a valid descriptor set");
    set.file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .filter(move |s| format!("{}.{}", f.package(), s.name()) == service)
        })
        .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_descriptor_lists_the_methods() {
        let methods = super::service_methods(super::MACHINE_SERVICE);
        assert!(methods.iter().any(|m| m == "Version"), "{methods:?}");
        assert!(methods.iter().any(|m| m == "EtcdRecover"), "{methods:?}");
        assert!(super::service_methods("kiln.machine.Nope").is_empty());
    }
}

/// Generated protobuf and gRPC code.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod pb {
    tonic::include_proto!("kiln.machine");
}
