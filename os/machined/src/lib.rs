//! machined: the init of Kiln OS. It acquires the machine configuration (or waits in
//! maintenance mode), prepares volumes and network, serves the node API over mutual TLS,
//! supervises services and runs real etcd on control-plane nodes.
//!
//! # Design
//!
//! - [`platform::Platform`] holds what differs between `metal`, `container` and `process`
//!   (volumes and their wipes, the network in two async steps, the address learned after
//!   start, power); everything else is shared. `platform::fake` drives unit tests of the
//!   boot.
//! - [`boot`] is the sequence of phases; each phase and each wait publishes events
//!   ([`events`]), which are also console lines ([`kiln_os_api::contract::ConsoleEvent`]).
//!   Its errors are [`boot::BootError`]; every retry goes through [`kiln_os_api::wait`].
//! - [`supervisor`] runs services ([`supervisor::Service`]): states, dependencies, health
//!   checks, restart policies, bounded logs.
//! - [`etcd`] is the etcd service: bootstrap, join as learner and promotion, recovery.
//! - [`api`] is the gRPC API: one authorization table that denies what it does not list, one
//!   error mapping, and the forwarding shape written once (`api::machine`).
//!
//! # Limitations
//!
//! The node's address is learned once per boot: a DHCP lease that changes address later is
//! not followed. The Kubernetes control plane is rendered (static pods, kubeconfig) but not
//! run: no Kubernetes binaries can be installed where Kiln is built, so `extraManifests` are
//! downloaded and kept ([`manifests`]), not applied.

pub mod api;
pub mod boot;
pub mod config_source;
pub mod entry;
pub mod etcd;
pub mod events;
pub mod extensions;
pub mod logbuf;
pub mod machine_files;
pub mod manifests;
pub mod meta;
pub mod node;
pub mod oauth;
pub mod pid1;
pub mod platform;
pub mod resolver;
pub mod supervisor;
pub mod upgrade;
pub mod volumes;
