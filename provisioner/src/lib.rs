//! The Kiln lab: the generic lab (create, destroy, health, waits that explain themselves), the
//! cluster state directory, the network plan and netlink primitives, the host firewall, the
//! load balancer helper, and the provisioners behind one trait.
//!
//! # Design
//!
//! `kiln cluster create` ([`create::create`]) plans addresses, generates PKI and
//! configurations, writes `state.yaml` naming everything it will make, and asks a
//! [`provision::Provisioner`] for the network and the nodes; helpers, firewall rules, waiting,
//! bootstrap and health are done once above the trait. Every background helper is the `kiln`
//! binary started again with a hidden subcommand ([`daemon`]), with its pid file (pid and start
//! time) and log in the state directory ([`state`]). [`destroy::destroy`] removes exactly what
//! the state names and the cluster's owner mark confirms.
//!
//! # Limitations
//!
//! Only the `process` provisioner exists so far; IPv4 only.

pub mod airgap_helper;
pub mod cluster_file;
pub mod create;
pub mod daemon;
pub mod destroy;
pub mod dhcpd_helper;
pub mod diagnose;
pub mod firewall;
pub mod health;
pub mod install;
pub mod lab_registry;
pub mod lb_helper;
pub mod network;
pub mod node_image;
pub mod output;
pub mod progress;
pub mod provision;
pub mod spanned;
pub mod state;
