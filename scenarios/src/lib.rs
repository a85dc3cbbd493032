//! Kiln scenarios: scripted faults, operations and assertions run against real clusters, as
//! integration tests (`cargo test -p scenarios`) and from `kiln scenario run`.
//!
//! # Design
//!
//! - A [`Scenario`] is a YAML file ([`file`]): a name, a cluster (the document of
//!   `kiln cluster create -f`) and a list of [`Step`]s; [`catalog()`] holds the built-in
//!   ones, shipped as files in `builtin/`.
//! - Steps act on a [`ClusterHandle`], which drives any provisioner through the
//!   `Provisioner` trait (power, link faults) and the nodes through the OS API and etcd.
//! - Data checks follow the Jepsen set rule ([`workload::Workload`]): every write etcd
//!   acknowledged before the recovery point must be present afterwards; the report counts lost
//!   and unexpected keys.
//! - [`maintenance`] holds the guide's etcd maintenance steps (NOSPACE, alarms, compaction,
//!   defragmentation).
//! - [`kubeadm`] builds a kubeadm-style control plane (real etcd, kubeadm's PKI, HAProxy) for
//!   the migration rehearsal.
//! - [`runner::run`] times each step, and on failure writes a crash dump (every node's console
//!   log, service logs and events, `state.yaml`) into the artifacts directory, then destroys
//!   the cluster unless asked to keep it. [`junit`] writes JUnit XML.
//!
//! # Limitations
//!
//! Only the `process` provisioner exists; `qemu` and `docker` scenarios report themselves as
//! ignored. Cutting a node's link needs the bridge network, so `network-partition` needs root.
//! Networks reserved for parallel trials are known to this process only: two `kiln scenario
//! run --jobs` processes started at the same instant may still pick the same free network
//! (the second `create` then fails naming the conflict).

pub mod airgap;
pub mod catalog;
pub mod cluster;
pub mod file;
pub mod junit;
pub mod kubeadm;
pub mod maintenance;
pub mod runner;
pub mod step;
pub mod upgrade;
pub mod workload;

pub use catalog::{catalog, find};
pub use cluster::ClusterHandle;
pub use file::{Scenario, ScenarioFileError};
pub use runner::{Outcome, RunOptions, StepReport, run};
pub use step::{NodeRef, Step};
