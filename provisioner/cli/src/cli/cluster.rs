//! `kiln cluster create|destroy|show|node` and `kiln health`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use kiln_config::{ClientConfig, Patch};
use kiln_os_api::pb;
use serde::Serialize;

use super::GlobalArgs;
use kiln_provisioner::create::CreateOptions;
use kiln_provisioner::health;

use kiln_provisioner::output::{self, OutputFormat};
use kiln_provisioner::progress::Progress;
use kiln_provisioner::provision::{self, PowerAction};
use kiln_provisioner::state::{ClusterState, NetworkMode, StateDir};

/// `kiln cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create a local cluster and wait until it is healthy.
    Create(CreateArgs),
    /// Destroy a cluster: nodes, helpers, network and state.
    Destroy {
        #[command(flatten)]
        target: Target,
        /// Also remove a state directory whose state file is unreadable.
        #[arg(long)]
        force: bool,
    },
    /// Show a cluster's nodes, load balancer and helpers.
    Show {
        #[command(flatten)]
        target: Target,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Power a node: stop (hard power-off), start, reset, pause, resume, link-down, link-up.
    Node {
        /// What to do.
        #[arg(value_enum)]
        action: PowerAction,
        /// Node name.
        node: String,
        #[command(flatten)]
        target: Target,
    },
    /// Run a node launcher (started by `cluster create`).
    #[command(hide = true)]
    LaunchNode {
        /// The cluster's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The node.
        #[arg(long)]
        node: String,
    },
}

/// Which cluster.
#[derive(Debug, Args)]
pub struct Target {
    /// Cluster name.
    #[arg(long, default_value = "kiln-default")]
    name: String,
    /// Directory holding cluster state directories (default ~/.kiln/clusters).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

impl Target {
    fn dir(&self) -> anyhow::Result<StateDir> {
        Ok(StateDir::new(
            &provision::state_base(self.state.clone())?,
            &self.name,
        ))
    }
}

/// `kiln cluster create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Provisioner: process.
    #[arg(long, default_value = "process")]
    provisioner: String,
    #[command(flatten)]
    target: Target,
    /// Control-plane nodes.
    #[arg(long, default_value_t = 1)]
    controlplanes: usize,
    /// Worker nodes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Network of the cluster (without root, nodes use 127.B.C.D for its B.C.D).
    #[arg(long, default_value = "10.5.0.0/24")]
    cidr: String,
    /// MTU of the node links.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    #[command(flatten)]
    patches: super::generate::PatchArgs,
    /// Set debug: true in the configurations.
    #[arg(long)]
    with_debug: bool,
    /// Wait for the cluster to be healthy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// How long to wait for health.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    wait_timeout: Duration,
    /// Do not bootstrap etcd (nodes wait in Preparing).
    #[arg(long)]
    skip_bootstrap: bool,
    /// Workers boot without a configuration and wait in maintenance mode for
    /// `kiln apply-config --insecure` (their configuration is `<node>.yaml` in the state
    /// directory).
    #[arg(long)]
    maintenance_workers: bool,
    /// Client config to merge the cluster's context into (default: the global one).
    #[arg(long, value_name = "PATH")]
    kilnconfig_destination: Option<PathBuf>,
}

/// `kiln health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Cluster name (its state gives the nodes); default: the current context's name.
    #[arg(long)]
    cluster: Option<String>,
    /// Directory holding cluster state directories.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// How long to wait.
    #[arg(long, default_value = "3m", value_parser = super::parse_duration)]
    wait_timeout: Duration,
}

/// Runs a cluster command.
pub async fn run(cmd: ClusterCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Create(args) => create(args, global).await,
        ClusterCommand::Destroy { target, force } => {
            let dir = target.dir()?;
            let state = dir.load();
            if let Err(e) = &state
                && dir.dir.exists()
                && !force
                && !matches!(e, kiln_provisioner::state::StateError::NotFound { .. })
            {
                bail!("{e}; pass --force to remove what can be found anyway");
            }
            if !dir.dir.exists() {
                eprintln!(
                    "cluster {:?} does not exist; nothing to destroy",
                    target.name
                );
                return Ok(());
            }
            let provisioner = provision::by_name(
                state
                    .as_ref()
                    .map(|s| s.provisioner.as_str())
                    .unwrap_or("process"),
            )?;
            let progress = Progress::new();
            provisioner.destroy(&dir, &target.name, &progress).await?;
            progress.done();
            Ok(())
        }
        ClusterCommand::Show { target, output } => show(&target, output, global).await,
        ClusterCommand::Node {
            action,
            node,
            target,
        } => {
            let dir = target.dir()?;
            let state = dir.load()?;
            if !state.nodes.iter().any(|n| n.name == node) {
                bail!(
                    "no node {node:?} in cluster {}; nodes: {}",
                    state.name,
                    state
                        .nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let status = provision::by_name(&state.provisioner)?
                .node_power(&dir, &node, action)
                .await?;
            println!("{node}: {}", status.state);
            Ok(())
        }
        ClusterCommand::LaunchNode { state_dir, node } => {
            kiln_provisioner::launcher::run(state_dir, node).await
        }
    }
}

async fn create(args: CreateArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let (mut patches, control_plane_patches, worker_patches) = args.patches.load()?;
    if args.with_debug {
        patches.push(Patch::parse("debug: true", "--with-debug")?);
    }
    let opts = CreateOptions {
        provisioner: args.provisioner.clone(),
        name: args.target.name.clone(),
        state_base: provision::state_base(args.target.state.clone())?,
        controlplanes: args.controlplanes,
        workers: args.workers,
        cidr: args.cidr.clone(),
        mtu: args.mtu,
        patches,
        control_plane_patches,
        worker_patches,
        wait: args.wait,
        wait_timeout: args.wait_timeout,
        skip_bootstrap: args.skip_bootstrap,
        maintenance_workers: args.maintenance_workers,
    };
    let progress = Progress::new();
    let created = kiln_provisioner::create::create(&opts, &progress).await?;
    let name = &opts.name;
    let destination = match &args.kilnconfig_destination {
        Some(p) => p.clone(),
        None => global.kilnconfig_path()?,
    };
    progress.phase(format!(
        "merging kilnconfig into {:?}",
        destination.display().to_string()
    ));
    let mut client_cfg = ClientConfig::load(&destination)?;
    // A context of the same name from an earlier cluster is replaced, not kept as name-1.
    client_cfg.contexts.remove(name.as_str());
    client_cfg.merge(&created.client);
    client_cfg.save(&destination)?;
    progress.done();
    eprintln!(
        "cluster {name} is ready in {:.1}s",
        created.elapsed.as_secs_f64()
    );
    print_nodes(&created.state);
    Ok(())
}

fn print_nodes(state: &ClusterState) {
    let rows: Vec<Vec<String>> = state
        .nodes
        .iter()
        .map(|n| vec![n.name.clone(), n.role.clone(), n.address.to_string()])
        .collect();
    println!(
        "\nPROVISIONER   {}\nNAME          {}\nNETWORK       {} ({})\nENDPOINT      {}\n",
        state.provisioner,
        state.name,
        state.network.cidr,
        match state.network.mode {
            NetworkMode::Bridge => format!(
                "bridge {}",
                state.network.bridge.clone().unwrap_or_default()
            ),
            NetworkMode::Loopback => "loopback".to_owned(),
        },
        state.endpoint
    );
    print!("{}", output::table(&["NODE", "ROLE", "ADDRESS"], &rows));
}

#[derive(Serialize)]
struct ShowNode {
    name: String,
    role: String,
    address: String,
    state: String,
    boots: u32,
    os_version: String,
}

#[derive(Serialize)]
struct ShowHelper {
    name: String,
    kind: String,
    pid: Option<i32>,
    running: bool,
}

#[derive(Serialize)]
struct ShowCluster {
    name: String,
    provisioner: String,
    network: kiln_provisioner::state::NetworkState,
    endpoint: String,
    nodes: Vec<ShowNode>,
    load_balancer: Option<kiln_lb::Snapshot>,
    helpers: Vec<ShowHelper>,
}

async fn show(target: &Target, format: OutputFormat, global: &GlobalArgs) -> anyhow::Result<()> {
    let dir = target.dir()?;
    let state = dir.load()?;
    let provisioner = provision::by_name(&state.provisioner)?;
    // OS versions through the API when the client config has a context for the cluster.
    let mut versions = std::collections::HashMap::new();
    if let Ok((creds, _, _)) = super::connect::target(&GlobalArgs {
        context: Some(state.name.clone()),
        ..global.clone()
    }) && let Ok(Ok(ch)) = tokio::time::timeout(
        Duration::from_secs(3),
        kiln_os_api::client::connect(&state.network.gateway.to_string(), &creds),
    )
    .await
    {
        let mut c = kiln_os_api::client::machine_client(ch);
        let all: Vec<String> = state.nodes.iter().map(|n| n.address.to_string()).collect();
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(5),
            c.version(kiln_os_api::client::request(pb::Empty {}, &all)),
        )
        .await
        {
            for m in r.into_inner().messages {
                if let Some(md) = m.metadata
                    && md.error.is_empty()
                {
                    versions.insert(md.hostname, m.tag);
                }
            }
        }
    }
    let mut nodes = Vec::new();
    for n in &state.nodes {
        let status = provisioner.node_status(&dir, &n.name).await.ok();
        nodes.push(ShowNode {
            name: n.name.clone(),
            role: n.role.clone(),
            address: n.address.to_string(),
            state: status
                .as_ref()
                .map_or("unknown (launcher not running)".to_owned(), |s| {
                    s.state.clone()
                }),
            boots: status.as_ref().map_or(0, |s| s.boots),
            os_version: versions
                .get(&n.address.to_string())
                .cloned()
                .unwrap_or_default(),
        });
    }
    let marker = kiln_provisioner::daemon::marker(&dir.dir);
    let helpers = state
        .helpers
        .iter()
        .map(|h| {
            let pid = kiln_provisioner::daemon::running_pid(&dir.pidfile(&h.name), &marker);
            ShowHelper {
                name: h.name.clone(),
                kind: h.kind.clone(),
                pid,
                running: pid.is_some(),
            }
        })
        .collect();
    let load_balancer = kiln_provisioner::lb_helper::status(&dir).await.ok();
    let out = ShowCluster {
        name: state.name.clone(),
        provisioner: state.provisioner.clone(),
        network: state.network.clone(),
        endpoint: state.endpoint.clone(),
        nodes,
        load_balancer,
        helpers,
    };
    output::print(format, &out, |c| {
        let mut s = format!(
            "NAME         {}\nPROVISIONER  {}\nNETWORK      {} gateway {} ({:?})\nENDPOINT     {}\n\n",
            c.name, c.provisioner, c.network.cidr, c.network.gateway, c.network.mode, c.endpoint
        );
        let rows: Vec<Vec<String>> = c
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.role.clone(),
                    n.address.clone(),
                    n.state.clone(),
                    n.boots.to_string(),
                    n.os_version.clone(),
                ]
            })
            .collect();
        s += &output::table(
            &["NODE", "ROLE", "ADDRESS", "STATE", "BOOTS", "OS VERSION"],
            &rows,
        );
        if let Some(lb) = &c.load_balancer {
            s += "\n";
            s += &kiln_provisioner::lb_helper::table(lb);
        }
        let rows: Vec<Vec<String>> = c
            .helpers
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    h.kind.clone(),
                    h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    if h.running { "running" } else { "stopped" }.into(),
                ]
            })
            .collect();
        s += "\n";
        s += &output::table(&["HELPER", "KIND", "PID", "STATE"], &rows);
        s
    })
}

/// `kiln health`.
pub async fn health(args: HealthArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let path = global.kilnconfig_path()?;
    let cfg = ClientConfig::load(&path)?;
    let name = match args
        .cluster
        .clone()
        .or_else(|| global.context.clone())
        .or(cfg.context.clone())
    {
        Some(n) => n,
        None => bail!("no cluster given: pass --cluster NAME or select a context"),
    };
    let dir = StateDir::new(&provision::state_base(args.state.clone())?, &name);
    let state = dir.load()?;
    let mut api = super::connect::Api::connect(&GlobalArgs {
        context: Some(global.context.clone().unwrap_or(name.clone())),
        ..global.clone()
    })
    .await?;
    health::check(
        &mut api.client,
        &kiln_provisioner::create::topology(&state),
        args.wait_timeout,
        &Progress::new(),
    )
    .await?;
    eprintln!("cluster {name} is healthy");
    Ok(())
}
