//! Commands against nodes through the OS API: `version`, `services`, `logs`, `reboot`,
//! `apply-config`, `bootstrap`, `etcd ...`, `get`, `meta`, `kubeconfig`, `ls`, `read`, `cp`.
//!
//! This module holds the command definitions and the dispatch; each area's commands live in
//! their own module, one function per command.

mod config;
mod etcd;
mod files;
mod info;
mod logs;
mod meta;
mod power;
mod resources;
mod upgrade;

use std::path::PathBuf;

use clap::Subcommand;
use kiln_os_api::pb;

use super::GlobalArgs;
use super::connect::{Api, NodeErrors, node_name};
use kiln_provisioner::output::OutputFormat;

/// Commands that talk to nodes.
#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Show the client and node versions.
    Version {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List services and their state.
    Services,
    /// Show a service, or start, stop or restart it.
    Service {
        /// Service id (e.g. etcd).
        id: String,
        /// What to do; without it, show the service with its events.
        #[arg(value_enum)]
        action: Option<info::ServiceAction>,
    },
    /// Print a service's log (`machined` for machined's own).
    Logs {
        /// Service id.
        id: String,
        /// Keep printing new lines.
        #[arg(short, long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        follow: bool,
        /// Print only the last N lines.
        #[arg(long)]
        tail: Option<i32>,
    },
    /// Print the node's console log.
    Dmesg {
        /// Keep printing new lines.
        #[arg(short, long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        follow: bool,
        /// Print only the last N lines.
        #[arg(long)]
        tail: Option<i32>,
    },
    /// Print the node's events (boot phases, service transitions).
    Events {
        /// Keep printing new events.
        #[arg(short, long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        follow: bool,
        /// Print only the last N events.
        #[arg(long)]
        tail: Option<i32>,
    },
    /// Upgrade the nodes to the release in an installer image (A/B: the old release stays for
    /// rollback) and follow each node until the new release is confirmed or rolled back.
    Upgrade(upgrade::UpgradeArgs),
    /// Boot the nodes' other slot (the release before the last upgrade) and reboot.
    Rollback,
    /// Reboot the nodes.
    Reboot,
    /// Power the nodes off.
    Shutdown,
    /// Wipe the nodes' volumes and reboot or power off.
    Reset(power::ResetArgs),
    /// Apply a machine configuration.
    ApplyConfig(config::ApplyArgs),
    /// Bootstrap etcd on one control-plane node (once per cluster).
    Bootstrap {
        /// Recover etcd from this snapshot (from `kiln etcd snapshot` or a copied db file).
        #[arg(long, value_name = "FILE")]
        recover_from: Option<PathBuf>,
        /// Accept a snapshot without its integrity hash (a raw member/snap/db copy).
        #[arg(long, requires = "recover_from", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        recover_skip_hash_check: bool,
    },
    /// Manage etcd.
    #[command(subcommand)]
    Etcd(etcd::EtcdCommand),
    /// Show resources (machinetype, machinestatus, services, members, etcdmembers,
    /// addresses, links, routes, hostname, staticpods, meta, machineconfig).
    Get {
        /// Resource type.
        resource: String,
        /// Resource id.
        id: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Write or delete META records.
    #[command(subcommand)]
    Meta(meta::MetaCommand),
    /// Download an admin kubeconfig for the cluster.
    Kubeconfig {
        /// Where to write it.
        #[arg(default_value = "kubeconfig")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        force: bool,
    },
    /// List files on a node's volumes (/system/state, /var, /system/meta).
    Ls {
        /// Directory.
        #[arg(default_value = "/")]
        path: String,
        /// Levels to descend.
        #[arg(short, long, default_value_t = 1)]
        depth: i32,
    },
    /// Print a file from a node.
    Read {
        /// File path on the node.
        path: String,
    },
    /// Copy a file or directory from a node into a local directory.
    Cp {
        /// Path on the node.
        path: String,
        /// Local directory.
        #[arg(default_value = ".")]
        destination: PathBuf,
    },
}

/// Runs a node command.
pub async fn run(cmd: MachineCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    if let MachineCommand::ApplyConfig(args) = &cmd
        && args.insecure
    {
        return config::apply_insecure(args, global).await;
    }
    let mut api = Api::connect(global).await?;
    let mut errors = NodeErrors::default();
    match cmd {
        MachineCommand::Version { output } => info::version(&mut api, &mut errors, output).await?,
        MachineCommand::Services => info::services(&mut api, &mut errors).await?,
        MachineCommand::Service { id, action } => {
            info::service(&mut api, &mut errors, id, action).await?
        }
        MachineCommand::Logs { id, follow, tail } => logs::logs(&mut api, id, follow, tail).await?,
        MachineCommand::Dmesg { follow, tail } => logs::dmesg(&mut api, follow, tail).await?,
        MachineCommand::Events { follow, tail } => logs::events(&mut api, follow, tail).await?,
        MachineCommand::Upgrade(args) => upgrade::upgrade(&mut api, &mut errors, args).await?,
        MachineCommand::Rollback => upgrade::rollback(&mut api, &mut errors).await?,
        MachineCommand::Reboot => power::reboot(&mut api, &mut errors).await?,
        MachineCommand::Shutdown => power::shutdown(&mut api, &mut errors).await?,
        MachineCommand::Reset(args) => power::reset(&mut api, &mut errors, args).await?,
        MachineCommand::ApplyConfig(args) => config::apply(&mut api, &mut errors, args).await?,
        MachineCommand::Bootstrap {
            recover_from,
            recover_skip_hash_check,
        } => etcd::bootstrap(&mut api, &mut errors, recover_from, recover_skip_hash_check).await?,
        MachineCommand::Etcd(cmd) => etcd::etcd(&mut api, &mut errors, cmd).await?,
        MachineCommand::Get {
            resource,
            id,
            output,
        } => resources::get(&mut api, &mut errors, resource, id, output).await?,
        MachineCommand::Meta(cmd) => meta::meta(&mut api, &mut errors, cmd).await?,
        MachineCommand::Kubeconfig { path, force } => {
            config::kubeconfig(&mut api, &mut errors, path, force).await?
        }
        MachineCommand::Ls { path, depth } => files::ls(&mut api, path, depth).await?,
        MachineCommand::Read { path } => files::read(&mut api, path).await?,
        MachineCommand::Cp { path, destination } => files::cp(&mut api, path, destination).await?,
    }
    errors.finish()
}

/// Prints each node's action message, collecting the nodes' errors.
fn print_actions(resp: pb::ActionResponse, errors: &mut NodeErrors) {
    for m in resp.messages {
        if errors.check(m.metadata.as_ref()) {
            println!("{}: {}", node_name(m.metadata.as_ref()), m.message);
        }
    }
}
