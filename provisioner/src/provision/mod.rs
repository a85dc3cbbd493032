//! Provisioners: one trait for creating, destroying and powering the nodes of a cluster, with an
//! implementation per platform chosen by name. `process` (machined processes in network
//! namespaces, or on 127.x addresses without root) is the one that works everywhere; `qemu` and
//! `docker` only add implementations of the same trait.

mod process;

use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;

pub use process::ProcessProvisioner;

use crate::launcher::LauncherStatus;
use crate::network::Plan;
use crate::progress::Progress;
use crate::state::{ClusterState, StateDir};

/// A node to create.
#[derive(Debug, Clone)]
pub struct NodeRequest {
    /// Name (also host name).
    pub name: String,
    /// `controlplane` or `worker`.
    pub role: String,
    /// Address.
    pub address: IpAddr,
    /// Its machine configuration document.
    pub config: String,
    /// Whether the node boots with it (else it waits in maintenance mode).
    pub inject_config: bool,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Cluster name.
    pub name: String,
    /// State directory.
    pub dir: StateDir,
    /// Addresses.
    pub plan: Plan,
    /// MTU.
    pub mtu: u32,
    /// Nodes, control plane first.
    pub nodes: Vec<NodeRequest>,
    /// Control-plane endpoint.
    pub endpoint: String,
    /// Files written into the state directory before anything starts (`secrets.yaml`,
    /// `kilnconfig`), name and content.
    pub files: Vec<(String, String)>,
}

/// Power actions on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PowerAction {
    /// Power off (hard).
    Stop,
    /// Power on.
    Start,
    /// Hard reset.
    Reset,
    /// Freeze the node's processes.
    Pause,
    /// Thaw them.
    Resume,
    /// Cut the node's network link (bridge mode).
    LinkDown,
    /// Restore it.
    LinkUp,
}

impl PowerAction {
    /// The launcher command.
    pub fn command(self) -> &'static str {
        match self {
            Self::Stop => "poweroff",
            Self::Start => "poweron",
            Self::Reset => "reset",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::LinkDown => "link-down",
            Self::LinkUp => "link-up",
        }
    }
}

/// A way to run nodes.
#[async_trait]
pub trait Provisioner: Send + Sync {
    /// Its name (`process`).
    fn name(&self) -> &'static str;
    /// Creates the network, helpers and nodes; the state is saved as it goes.
    async fn create(
        &self,
        request: &CreateRequest,
        progress: &Progress,
    ) -> anyhow::Result<ClusterState>;
    /// Removes everything `create` made, also after a create that was killed halfway.
    async fn destroy(
        &self,
        dir: &StateDir,
        cluster: &str,
        progress: &Progress,
    ) -> anyhow::Result<()>;
    /// Powers a node.
    async fn node_power(
        &self,
        dir: &StateDir,
        node: &str,
        action: PowerAction,
    ) -> anyhow::Result<LauncherStatus>;
    /// The launcher's view of a node.
    async fn node_status(&self, dir: &StateDir, node: &str) -> anyhow::Result<LauncherStatus>;
}

/// The provisioner called `name`.
pub fn by_name(name: &str) -> anyhow::Result<Box<dyn Provisioner>> {
    match name {
        "process" => Ok(Box::new(ProcessProvisioner)),
        "qemu" | "docker" => anyhow::bail!(
            "the {name} provisioner is not available in this build yet; use --provisioner process"
        ),
        other => anyhow::bail!("unknown provisioner {other:?}: use process"),
    }
}

/// Directories of cluster states.
pub fn state_base(state: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match state {
        Some(p) => Ok(p),
        None => crate::state::default_base(),
    }
}
