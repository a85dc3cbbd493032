//! `kiln cluster create|destroy|show|node` and `kiln health`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use kiln_config::{ClientConfig, GenerateInput, MachineType, Patch};
use kiln_os_api::pb;
use serde::Serialize;

use super::GlobalArgs;
use crate::health::{self, Topology};
use crate::network;
use crate::output::{self, OutputFormat};
use crate::progress::Progress;
use crate::provision::{self, CreateRequest, NodeRequest, PowerAction};
use crate::state::{ClusterState, NetworkMode, StateDir};

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
    /// Patch for every node's configuration (inline or @file; repeatable).
    #[arg(long, value_name = "PATCH")]
    config_patch: Vec<String>,
    /// Patch for control-plane nodes.
    #[arg(long, value_name = "PATCH")]
    config_patch_control_plane: Vec<String>,
    /// Patch for workers.
    #[arg(long, value_name = "PATCH")]
    config_patch_worker: Vec<String>,
    /// Set debug: true in the configurations.
    #[arg(long)]
    with_debug: bool,
    /// Wait for the cluster to be healthy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// How long to wait for health.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    wait_timeout: Duration,
    /// Do not bootstrap etcd (nodes wait in Preparing).
    #[arg(long)]
    skip_bootstrap: bool,
    /// Client config to merge the cluster's context into (default: the global one).
    #[arg(long, value_name = "PATH")]
    kilnconfig_destination: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: write e.g. 90s or 5m"))?;
    Ok(Duration::from_secs(match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m or h")),
    }))
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
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    wait_timeout: Duration,
}

fn topology(state: &ClusterState) -> Topology {
    let pick = |role: &str| {
        state
            .nodes
            .iter()
            .filter(|n| n.role == role)
            .map(|n| (n.address.to_string(), n.name.clone()))
            .collect()
    };
    Topology {
        control_plane: pick("controlplane"),
        workers: pick("worker"),
    }
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
                && !matches!(e, crate::state::StateError::NotFound { .. })
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
            crate::launcher::run(state_dir, node).await
        }
    }
}

async fn create(args: CreateArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.controlplanes == 0 {
        bail!("--controlplanes must be at least 1");
    }
    let name = args.target.name.clone();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("invalid cluster name {name:?}: use letters, digits and '-'");
    }
    let provisioner = provision::by_name(&args.provisioner)?;
    let base = provision::state_base(args.target.state.clone())?;
    let dir = StateDir::new(&base, &name);
    if dir.dir.exists() {
        bail!(
            "cluster {name:?} already exists ({}); destroy it first with `kiln cluster destroy --name {name}`",
            dir.dir.display()
        );
    }
    let progress = Progress::new();
    let count = args.controlplanes + args.workers;

    progress.phase("validating CIDR and reserving IPs");
    let mode = if nix::unistd::Uid::effective().is_root() {
        NetworkMode::Bridge
    } else {
        NetworkMode::Loopback
    };
    let plan = network::plan(&args.cidr, count, mode, &base, &name)?;
    let endpoint = format!("https://{}:6443", plan.gateway);

    progress.phase("generating PKI and tokens");
    let secrets = kiln_pki::SecretsBundle::generate()?;
    let load = |list: &[String]| -> anyhow::Result<Vec<Patch>> {
        list.iter().map(|p| Ok(Patch::load(p)?)).collect()
    };
    let mut patches = load(&args.config_patch)?;
    if args.with_debug {
        patches.push(Patch::parse("debug: true", "--with-debug")?);
    }
    let generated = kiln_config::generate(&GenerateInput {
        cluster_name: &name,
        endpoint: &endpoint,
        secrets: &secrets,
        install_disk: kiln_config::generate::DEFAULT_INSTALL_DISK,
        install_image: kiln_config::generate::DEFAULT_INSTALLER_IMAGE,
        patches: &patches,
        control_plane_patches: &load(&args.config_patch_control_plane)?,
        worker_patches: &load(&args.config_patch_worker)?,
    })?;
    let mut nodes = Vec::new();
    for i in 0..count {
        let (role, base_cfg, n) = if i < args.controlplanes {
            ("controlplane", &generated.controlplane, i + 1)
        } else {
            ("worker", &generated.worker, i - args.controlplanes + 1)
        };
        let node_name = format!(
            "{name}-{}-{n}",
            if role == "controlplane" {
                "controlplane"
            } else {
                "worker"
            }
        );
        let hostname = Patch::parse(
            &format!("machine: {{network: {{hostname: {node_name}}}}}"),
            "hostname",
        )?;
        let cfg = kiln_config::patch::apply(base_cfg, &[hostname])?;
        nodes.push(NodeRequest {
            name: node_name,
            role: role.to_owned(),
            address: plan.nodes[i],
            config: kiln_config::to_yaml(&cfg)?,
        });
    }
    let mut client_for_state = generated.client.clone();
    if let Some(ctx) = client_for_state.contexts.get_mut(&name) {
        ctx.endpoints = vec![plan.gateway.to_string()];
        ctx.nodes = vec![plan.nodes[0].to_string()];
    }
    let files = vec![
        ("secrets.yaml".to_owned(), secrets.to_yaml()?),
        (
            "kilnconfig".to_owned(),
            serde_yaml::to_string(&client_for_state)?,
        ),
    ];
    let request = CreateRequest {
        name: name.clone(),
        dir: dir.clone(),
        plan: plan.clone(),
        mtu: args.mtu,
        nodes,
        endpoint: endpoint.clone(),
        files,
    };
    let result = async {
        let state = provisioner.create(&request, &progress).await?;
        let topo = topology(&state);
        let gateway = plan.gateway.to_string();
        let creds = {
            let ca = secrets.os_ca()?;
            let admin = ca.issue(&kiln_pki::LeafRequest::client(
                "admin",
                kiln_pki::ROLE_ADMIN,
            ))?;
            kiln_os_api::client::Credentials {
                ca_pem: ca.cert_pem().to_owned(),
                cert_pem: admin.cert_pem,
                key_pem: admin.key_pem,
            }
        };

        progress.phase("waiting for API");
        let mut client =
            connect_when_ready(&gateway, &creds, Instant::now() + args.wait_timeout).await?;
        let first_cp = topo.control_plane[0].0.clone();
        if !args.skip_bootstrap {
            progress.phase("bootstrapping cluster");
            let deadline = Instant::now() + args.wait_timeout;
            loop {
                let req = kiln_os_api::client::request(
                    pb::BootstrapRequest::default(),
                    std::slice::from_ref(&first_cp),
                );
                match client.bootstrap(req).await {
                    Ok(r)
                        if r.get_ref()
                            .messages
                            .iter()
                            .all(|m| m.metadata.as_ref().is_none_or(|m| m.error.is_empty())) =>
                    {
                        break;
                    }
                    Ok(r) => {
                        let e = r
                            .into_inner()
                            .messages
                            .into_iter()
                            .filter_map(|m| m.metadata)
                            .map(|m| m.error)
                            .collect::<Vec<_>>()
                            .join("; ");
                        if Instant::now() > deadline {
                            bail!("bootstrap: {e}");
                        }
                    }
                    Err(s) if Instant::now() > deadline => bail!("bootstrap: {}", s.message()),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if args.wait {
                health::check(&mut client, &topo, args.wait_timeout, &progress).await?;
            }
        }
        anyhow::Ok(state)
    }
    .await;
    let state = match result {
        Ok(s) => s,
        Err(e) => {
            progress.failed();
            return Err(e.context(format!(
                "creating cluster {name} failed; its state is kept in {} for inspection, remove it with `kiln cluster destroy --name {name}`",
                dir.dir.display()
            )));
        }
    };

    let destination = match &args.kilnconfig_destination {
        Some(p) => p.clone(),
        None => global.kilnconfig_path()?,
    };
    progress.phase(format!(
        "merging kilnconfig into {:?}",
        destination.display().to_string()
    ));
    let mut client_cfg = ClientConfig::load(&destination)?;
    let ours = client_for_state;
    // A context of the same name from an earlier cluster is replaced, not kept as name-1.
    client_cfg.contexts.remove(&name);
    client_cfg.merge(&ours);
    client_cfg.save(&destination)?;
    progress.done();
    eprintln!(
        "cluster {name} is ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    print_nodes(&state);
    Ok(())
}

async fn connect_when_ready(
    endpoint: &str,
    creds: &kiln_os_api::client::Credentials,
    deadline: Instant,
) -> anyhow::Result<
    kiln_os_api::pb::machine_service_client::MachineServiceClient<tonic::transport::Channel>,
> {
    loop {
        match kiln_os_api::client::connect(endpoint, creds).await {
            Ok(ch) => return Ok(kiln_os_api::client::machine_client(ch)),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the API did not come up");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
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
    network: crate::state::NetworkState,
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
    let marker = crate::daemon::marker(&dir.dir);
    let helpers = state
        .helpers
        .iter()
        .map(|h| {
            let pid = crate::daemon::running_pid(&dir.pidfile(&h.name), &marker);
            ShowHelper {
                name: h.name.clone(),
                kind: h.kind.clone(),
                pid,
                running: pid.is_some(),
            }
        })
        .collect();
    let load_balancer = crate::lb_helper::status(&dir).await.ok();
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
            s += &crate::lb_helper::table(lb);
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
    let _ = MachineType::Controlplane;
    health::check(
        &mut api.client,
        &topology(&state),
        args.wait_timeout,
        &Progress::new(),
    )
    .await?;
    eprintln!("cluster {name} is healthy");
    Ok(())
}
