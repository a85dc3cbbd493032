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
