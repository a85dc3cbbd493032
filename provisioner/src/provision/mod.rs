//! Provisioners: one trait for making and powering the nodes of a cluster, with an
//! implementation per kind of node chosen by name ([`by_name`]). Everything else a cluster
//! needs (planning, secrets and configurations, the state directory, helpers, waiting,
//! bootstrap, health, teardown of helpers and firewall rules) is the generic lab in
//! [`crate::create`] and [`crate::destroy`], written once above this trait.
//!
//! Adding a provisioner is a module here implementing [`Provisioner`] and one line in
//! [`by_name`]. What it records about its nodes goes into the node's provider section of
//! `state.yaml` ([`crate::state::NodeState::set_provider_state`]), under its own name.

pub mod docker;
pub mod process;
pub mod qemu;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use process::ProcessProvisioner;

use crate::progress::Progress;
use crate::state::{ClusterState, NetworkMode, StateDir};

/// Power and fault actions on one node, the same words for every provisioner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    /// Power off (hard).
    Stop,
    /// Power on.
    Start,
    /// Hard reset.
    Reset,
    /// Freeze the node.
    Pause,
    /// Thaw it.
    Resume,
    /// Cut the node's network link.
    LinkDown,
    /// Restore it.
    LinkUp,
}

/// Whether a node is powered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// Running.
    Running,
    /// Frozen by `pause`.
    Paused,
    /// Off.
    Off,
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PowerState::Running => "running",
            PowerState::Paused => "paused",
            PowerState::Off => "off",
        })
    }
}

/// A provisioner's view of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Powered, paused or off.
    pub power: PowerState,
    /// The node's main process (machined, QEMU, the container's init) when running.
    pub pid: Option<u32>,
    /// How many times the node started.
    pub boots: u32,
    /// Whether the node's link is up.
    pub link_up: bool,
}

/// What a provisioner supports; scenarios skip a step it lacks, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Link faults (`link-down` / `link-up`), or why not.
    pub link_faults: Result<(), String>,
    /// Pausing nodes, or why not.
    pub pause: Result<(), String>,
    /// A/B slots: nodes started on an installer image (`CreateOptions::install_image`) that
    /// upgrade and roll back, or why not.
    pub slots: Result<(), String>,
    /// Air-gapped clusters (`CreateOptions::airgapped`), or why not.
    pub airgap: Result<(), String>,
}

/// Why a provisioner could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The provisioner cannot run for this user or on this machine.
    #[error("the {provisioner} provisioner cannot run here: {reason}")]
    Unavailable {
        /// Its name.
        provisioner: String,
        /// Why, and what to do.
        reason: String,
    },
    /// No such provisioner.
    #[error("unknown provisioner {name:?}: use one of {}", NAMES.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// The node is not in the cluster.
    #[error("no node {node:?} in cluster {cluster}; nodes: {nodes}")]
    NoSuchNode {
        /// The node asked for.
        node: String,
        /// The cluster.
        cluster: String,
        /// Its nodes.
        nodes: String,
    },
    /// The network could not be made or removed.
    #[error("network of cluster {cluster}: {source}")]
    Network {
        /// The cluster.
        cluster: String,
        /// What failed.
        #[source]
        source: crate::network::netlink::NetlinkError,
    },
    /// An object the cluster expected to make already exists and is not the cluster's.
    #[error("{object} already exists and is not cluster {cluster}'s ({found}); {fix}")]
    Taken {
        /// What (a network namespace, a link).
        object: String,
        /// The cluster.
        cluster: String,
        /// What owns it, as far as known.
        found: String,
        /// What to do.
        fix: String,
    },
    /// A helper could not be started.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// The state could not be written.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A node launcher did not answer or refused.
    #[error("node {node}: {source}")]
    Launcher {
        /// The node.
        node: String,
        /// What failed.
        #[source]
        source: process::launcher::LauncherError,
    },
    /// The action is not supported by this provisioner in this cluster.
    #[error("{action:?} is not supported here: {reason}")]
    Unsupported {
        /// The action.
        action: PowerAction,
        /// Why.
        reason: String,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A way to run nodes. The generic lab calls these in order: [`Provisioner::network_mode`],
/// [`Provisioner::plan`] (names what will be made; saved before anything exists),
/// [`Provisioner::create_network`], [`Provisioner::start_node`] per node; and
/// [`Provisioner::destroy`] to undo all of it, also after a create killed halfway.
#[async_trait]
pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// Its name (`process`).
    fn name(&self) -> &'static str;
    /// The network this caller gets (bridge as root, loopback otherwise for `process`), or why
    /// the provisioner cannot run here.
    fn network_mode(&self) -> Result<NetworkMode, ProvisionError>;
    /// What it supports in a cluster with this network.
    fn capabilities(&self, mode: NetworkMode) -> Capabilities;
    /// Names every object it will make (links, namespaces, containers) in the state, before
    /// any exists, so that `destroy` finds them by name after a crash.
    fn plan(&self, dir: &StateDir, state: &mut ClusterState);
    /// Makes the cluster network (for `process` as root: the bridge, marked as the
    /// cluster's). Fails without touching anything that is not the cluster's.
    async fn create_network(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError>;
    /// Starts a node and returns once its power switch (launcher) answers; recorded helpers
    /// go into `state.helpers` (the caller saves the state).
    async fn start_node(
        &self,
        dir: &StateDir,
        state: &mut ClusterState,
        node: &str,
    ) -> Result<(), ProvisionError>;
    /// Stops every node and removes what `plan` named: only objects that are the cluster's.
    /// Idempotent.
    async fn destroy(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError>;
    /// Powers a node or injects a fault.
    async fn power(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
        action: PowerAction,
    ) -> Result<NodeStatus, ProvisionError>;
    /// Link down or up (`up`) of one of the node's NICs, counted from 0; NIC 0 is what
    /// `link-down` / `link-up` cut. Only qemu nodes can have more than one (`--nics`).
    async fn nic_link(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
        nic: usize,
        up: bool,
    ) -> Result<NodeStatus, ProvisionError> {
        if nic != 0 {
            return Err(ProvisionError::Unavailable {
                provisioner: self.name().to_owned(),
                reason: format!(
                    "its nodes have one link: there is no NIC {nic} (NICs are counted from 0; only qemu nodes get more, with `cluster create --nics N`)"
                ),
            });
        }
        let action = if up {
            PowerAction::LinkUp
        } else {
            PowerAction::LinkDown
        };
        self.power(dir, state, node, action).await
    }
    /// The node's power state.
    async fn status(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
    ) -> Result<NodeStatus, ProvisionError>;
    /// Where the node's console (kernel and machined output) is written.
    fn console(&self, dir: &StateDir, node: &str) -> PathBuf {
        dir.log(node)
    }
}

/// Every provisioner name, in the order help texts list them.
pub const NAMES: &[&str] = &["process", "qemu", "docker"];

/// Options of `kiln cluster create` that only some provisioners use (the others ignore them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProvisionerOptions {
    /// `docker`: engine, CPUs and memory per node.
    pub docker: docker::DockerOptions,
    /// `qemu`: kernel, initrd or disk image, CPUs, memory, firmware.
    pub qemu: qemu::QemuOptions,
}

/// The provisioner called `name`, for a cluster that exists (what it needs is in the state).
pub fn by_name(name: &str) -> Result<Box<dyn Provisioner>, ProvisionError> {
    by_name_with(name, &ProvisionerOptions::default())
}

/// The provisioner called `name`, with the options of `create`.
pub fn by_name_with(
    name: &str,
    options: &ProvisionerOptions,
) -> Result<Box<dyn Provisioner>, ProvisionError> {
    match name {
        "docker" => Ok(Box::new(docker::DockerProvisioner::new(
            options.docker.clone(),
        ))),
        "process" => Ok(Box::new(ProcessProvisioner)),
        "qemu" => Ok(Box::new(qemu::QemuProvisioner {
            options: options.qemu.clone(),
        })),
        other => Err(ProvisionError::Unknown {
            name: other.to_owned(),
        }),
    }
}

/// Directories of cluster states.
pub fn state_base(state: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match state {
        Some(p) => Ok(p),
        None => crate::state::default_base(),
    }
}

/// Looks up `node` in `state`, or says which nodes there are.
pub fn require_node<'a>(
    state: &'a ClusterState,
    node: &str,
) -> Result<&'a crate::state::NodeState, ProvisionError> {
    state.node(node).ok_or_else(|| ProvisionError::NoSuchNode {
        node: node.to_owned(),
        cluster: state.name.clone(),
        nodes: state
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
