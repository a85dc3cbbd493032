//! machined: the init of Kiln OS. It acquires the machine configuration (or waits in
//! maintenance mode), prepares volumes and network, serves the node API over mutual TLS,
//! supervises services and runs real etcd on control-plane nodes.
//!
//! # Design
//!
//! - [`platform::Platform`] holds what differs between `metal`, `container` and `process`;
//!   everything else is shared.
//! - [`boot`] is the sequence of phases; each publishes events ([`events`]).
//! - [`supervisor`] runs services ([`supervisor::Service`]): states, dependencies, health
//!   checks, restart policies, bounded logs.
//! - [`etcd`] is the etcd service: bootstrap, join as learner and promotion, recovery.
//! - [`api`] is the gRPC API: one authorization table, one error mapping, forwarding to other
//!   nodes.
//!
//! # Limitations
//!
//! Only the `process` platform exists so far. The Kubernetes control plane is rendered (static
//! pods, kubeconfig) but not run: no Kubernetes binaries can be installed where Kiln is built.

pub mod api;
pub mod boot;
pub mod config_source;
pub mod entry;
pub mod etcd;
pub mod events;
pub mod logbuf;
pub mod meta;
pub mod node;
pub mod platform;
pub mod supervisor;
pub mod volumes;
