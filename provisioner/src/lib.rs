//! The Kiln lab: provisioners (one trait, `process` first), the cluster state directory, the
//! network (bridge and namespaces as root, loopback otherwise), node launchers, the load
//! balancer helper and cluster health.
//!
//! # Design
//!
//! `kiln cluster create` ([`create::create`]) reserves addresses, generates PKI and
//! configurations, and hands the rest to a [`provision::Provisioner`]; every background helper
//! is the `kiln` binary started again with a hidden subcommand ([`daemon`]), with its pid file
//! and log in the state directory ([`state`]).
//!
//! # Limitations
//!
//! Only the `process` provisioner exists so far; IPv4 only.

pub mod create;
pub mod daemon;
pub mod health;
pub mod launcher;
pub mod lb_helper;
pub mod network;
pub mod output;
pub mod progress;
pub mod provision;
pub mod state;
