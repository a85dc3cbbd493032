//! `kiln cluster create|destroy|show|node` and `kiln health`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use kiln_config::{ClientConfig, Patch};
use kiln_os_api::pb;
use serde::Serialize;

use super::GlobalArgs;
use kiln_provisioner::cluster_file::ClusterFile;
use kiln_provisioner::create::CreateOptions;
use kiln_provisioner::health;

use kiln_provisioner::destroy::{self, Outcome};
use kiln_provisioner::output::{self, OutputFormat};
use kiln_provisioner::progress::Progress;
use kiln_provisioner::provision::{self, PowerAction};
use kiln_provisioner::state::{ClusterState, NetworkMode, StateDir};

/// `kiln cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create a local cluster and wait until it is healthy.
    Create(Box<CreateArgs>),
    /// Destroy a cluster: nodes, helpers, network and state.
    Destroy {
        #[command(flatten)]
        target: Target,
        /// Also remove a state directory whose state file is unreadable.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
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
        /// With link-down / link-up: the NIC, counted from 0 (qemu nodes created with
        /// `--nics`); default: the first.
        #[arg(long, value_name = "N")]
        nic: Option<usize>,
        #[command(flatten)]
        target: Target,
    },
    /// Follow the console of a docker cluster's nodes (started by `cluster create`).
    #[command(hide = true)]
    DockerConsole {
        /// The cluster's state directory.
        #[arg(long)]
        state_dir: PathBuf,
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
    /// A cluster file (provisioner, name, network, nodes, patches, mirrors; see
    /// docs/cluster.md); the flags below override what it says.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Provisioner [default: process].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(provision::NAMES))]
    provisioner: Option<String>,
    /// Cluster name [default: kiln-default].
    #[arg(long)]
    name: Option<String>,
    /// Directory holding cluster state directories (default ~/.kiln/clusters).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Control-plane nodes [default: 1].
    #[arg(long)]
    controlplanes: Option<usize>,
    /// Worker nodes [default: 1].
    #[arg(long)]
    workers: Option<usize>,
    /// Network of the cluster (without root, nodes use 127.B.C.D for its B.C.D)
    /// [default: 10.5.0.0/24].
    #[arg(long)]
    cidr: Option<String>,
    /// MTU of the node links [default: 1500].
    #[arg(long)]
    mtu: Option<u32>,
    #[command(flatten)]
    patches: super::generate::PatchArgs,
    /// Set debug: true in the configurations.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    with_debug: bool,
    /// Wait for the cluster to be healthy.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// How long to wait for health.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    wait_timeout: Duration,
    /// Do not bootstrap etcd (nodes wait in Preparing).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    skip_bootstrap: bool,
    /// Workers boot without a configuration and wait in maintenance mode for
    /// `kiln apply-config --insecure` (their configuration is `<node>.yaml` in the state
    /// directory).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    maintenance_workers: bool,
    /// Installer image to start the nodes on (e.g. an older release, to test an upgrade path);
    /// default: the release built into this kiln.
    #[arg(long, value_name = "REF")]
    install_image: Option<String>,
    /// Pull --install-image over plain HTTP (a lab registry).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    install_plain_http: bool,
    /// Directory laid out like a node image (`usr/local/etc/containers/<name>.yaml` and
    /// `usr/local/lib/containers/<name>/`), copied into every node's image: its extension
    /// services run as `ext-<name>`.
    #[arg(long, value_name = "DIR")]
    extensions: Option<PathBuf>,
    /// Extra kernel arguments every node boots with, space-separated (may be repeated), e.g.
    /// "kiln.config=URL kiln.config.oauth.client_id=ID"; with `kiln.config=` nodes fetch their
    /// configuration from the URL.
    #[arg(long, value_name = "ARGS")]
    extra_boot_kernel_args: Vec<String>,
    /// Point the nodes' pulls of registry HOST at mirror URL (`machine.registries.mirrors`);
    /// repeat for several hosts or several mirrors of one host, HOST `*` for every host.
    #[arg(long = "registry-mirror", value_name = "HOST=URL")]
    registry_mirrors: Vec<kiln_provisioner::lab_registry::MirrorSpec>,
    /// Start the lab registry mirror on the gateway (port 5000, filled by `kiln image cache`)
    /// and point every registry host the nodes pull from at it.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    with_registry: bool,
    /// Air-gapped: the lab registry, a lab DNS answering only the cluster's names and an
    /// egress-auditing proxy allowing only lab destinations on the gateway; nodes get no route
    /// beyond the cluster network. `kiln airgap audit` proves what they reached. Needs root.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    airgapped: bool,
    /// Client config to merge the cluster's context into (default: the global one).
    #[arg(long, value_name = "PATH")]
    kilnconfig_destination: Option<PathBuf>,
    /// CPUs per node (qemu: whole vCPUs, default 2; docker: a CPU quota, default none).
    #[arg(long, value_name = "CPUS")]
    cpus: Option<f64>,
    /// Memory per node in MiB (qemu: default 1024; docker: default no limit).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Docker engine of a docker cluster (default: DOCKER_HOST, else
    /// unix:///var/run/docker.sock). Several (comma-separated or repeated): engines of one
    /// Docker Swarm, the first a manager; nodes go round robin over them on an overlay network.
    #[arg(long, value_name = "unix:///PATH", value_delimiter = ',')]
    docker_host: Vec<String>,
    #[command(flatten)]
    qemu: QemuArgs,
}

/// `kiln cluster create --provisioner qemu` flags.
#[derive(Debug, Args)]
pub struct QemuArgs {
    /// Disk size per node in MiB (qemu; default: the image's).
    #[arg(long, default_value_t = 0)]
    disk: u64,
    /// Boot through UEFI firmware (OVMF) and the disk's systemd-boot (qemu).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    with_uefi: bool,
    /// Boot through the disk's bootloader; `=false` loads kernel and initramfs directly, so a
    /// rebuilt initramfs is picked up by a reboot (qemu). Direct boot is what this build does
    /// without --with-uefi.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    with_bootloader: bool,
    /// NICs per node (qemu), each a tap on the cluster bridge; the first has the DHCP lease,
    /// the others are for bonds and VLANs in `machine.network` (eth1, eth2, ... in the guest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    nics: u8,
    /// Kernel to boot (qemu; default: the newest `kiln image build`'s vmlinux).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initramfs to boot (qemu; default: the newest image's).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Image version to boot (qemu; default: the newest in `kiln image ls`).
    #[arg(long, value_name = "VERSION")]
    image: Option<String>,
}

impl QemuArgs {
    /// The provisioner's options: the flags over the chosen image's files.
    fn options(
        &self,
        cpus: Option<f64>,
        memory: Option<u64>,
        extra_cmdline: String,
    ) -> anyhow::Result<provision::qemu::QemuOptions> {
        use kiln_image::builder::names;
        let cpus = match cpus {
            None => 2,
            Some(c) if c >= 1.0 && c.fract() == 0.0 && c <= 64.0 => c as u32,
            Some(c) => anyhow::bail!(
                "--cpus {c}: a qemu node has whole vCPUs (1 to 64); use e.g. --cpus 2"
            ),
        };
        let memory = match memory {
            None => 1024,
            Some(m) if (128..=u64::from(u32::MAX)).contains(&m) => m as u32,
            Some(m) => anyhow::bail!(
                "--memory {m}: a qemu node needs at least 128 MiB; use e.g. --memory 1024"
            ),
        };
        let root = kiln_image::store::default_root()
            .ok_or_else(|| anyhow::anyhow!("no home directory for ~/.kiln/images"))?;
        let images = kiln_image::store::list(&root)?;
        let image = match &self.image {
            Some(v) => images.iter().find(|m| &m.version == v).ok_or_else(|| {
                anyhow::anyhow!("no image {v} in {}: see `kiln image ls`", root.display())
            })?,
            None => images.iter().max_by_key(|m| m.created).ok_or_else(|| {
                anyhow::anyhow!(
                    "no image in {}: build one with `kiln image build` (needs scripts/install-deps)",
                    root.display()
                )
            })?,
        };
        let dir = root.join(&image.version);
        let uefi = self.with_uefi || self.with_bootloader;
        Ok(provision::qemu::QemuOptions {
            cpus,
            memory_mib: memory,
            disk_mib: self.disk,
            uefi,
            kernel: self
                .kernel
                .clone()
                .unwrap_or_else(|| dir.join(names::VMLINUX)),
            initrd: self
                .initrd
                .clone()
                .unwrap_or_else(|| dir.join(names::INITRAMFS)),
            disk_image: dir.join(names::DISK),
            extra_cmdline,
            qemu: "qemu-system-x86_64".into(),
            image_store: (self.image.is_none() && self.kernel.is_none() && self.initrd.is_none())
                .then_some(root),
            extra_nics: self.nics - 1,
        })
    }
}

/// `kiln health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Lab cluster name (its state gives the nodes); default: the context's lab cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Directory holding lab cluster state directories.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Control-plane nodes to check (comma-separated or repeated); default: the lab state, or
    /// the etcd members.
    #[arg(long, value_name = "NODES", value_delimiter = ',')]
    control_plane_nodes: Vec<String>,
    /// Worker nodes to check (comma-separated or repeated).
    #[arg(long, value_name = "NODES", value_delimiter = ',')]
    worker_nodes: Vec<String>,
    /// How long to wait.
    #[arg(long, default_value = "3m", value_parser = super::parse_duration)]
    wait_timeout: Duration,
}

/// Runs a cluster command.
pub async fn run(cmd: ClusterCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Create(args) => create(*args, global).await,
        ClusterCommand::Destroy { target, force } => {
            let dir = target.dir()?;
            let progress = Progress::new();
            match destroy::destroy(&dir, force, &progress).await? {
                Outcome::Absent => {
                    progress.done();
                    eprintln!(
                        "cluster {:?} does not exist; nothing to destroy",
                        target.name
                    );
                }
                Outcome::Destroyed(state) => {
                    progress.done();
                    if let Some(state) = state {
                        let path = global.kilnconfig_path()?;
                        if let Some(ctx) = destroy::remove_context(&path, &state)? {
                            eprintln!("removed context {ctx:?} from {}", path.display());
                        }
                    }
                    eprintln!("cluster {} destroyed", target.name);
                }
            }
            Ok(())
        }
        ClusterCommand::Show { target, output } => show(&target, output, global).await,
        ClusterCommand::Node {
            action,
            node,
            nic,
            target,
        } => {
            let dir = target.dir()?;
            let state = dir.load()?;
            let provisioner = provision::by_name(&state.provisioner)?;
            let status = match (nic, action) {
                (None, _) => provisioner.power(&dir, &state, &node, action).await?,
                (Some(nic), PowerAction::LinkDown | PowerAction::LinkUp) => {
                    let up = action == PowerAction::LinkUp;
                    provisioner.nic_link(&dir, &state, &node, nic, up).await?
                }
                (Some(_), _) => {
                    anyhow::bail!("--nic goes with link-down or link-up only")
                }
            };
            println!("{node}: {}", status.power);
            Ok(())
        }
        ClusterCommand::DockerConsole { state_dir } => {
            kiln_provisioner::provision::docker::console::run(state_dir).await
        }
        ClusterCommand::LaunchNode { state_dir, node } => {
            let state = StateDir {
                dir: state_dir.clone(),
            }
            .load()?;
            if state.provisioner == provision::qemu::NAME {
                Ok(provision::qemu::launcher::run(state_dir, node).await?)
            } else {
                Ok(kiln_provisioner::provision::process::launcher::run(state_dir, node).await?)
            }
        }
    }
}

async fn create(args: CreateArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let (mut patches, control_plane_patches, worker_patches) = args.patches.load()?;
    if args.with_debug {
        patches.push(Patch::parse("debug: true", "--with-debug")?);
    }
    let mut opts = create_options(&args)?;
    opts.patches.extend(patches);
    opts.control_plane_patches.extend(control_plane_patches);
    opts.worker_patches.extend(worker_patches);
    if opts.provisioner == provision::qemu::NAME {
        opts.provisioner_options.qemu = args.qemu.options(
            args.cpus,
            args.memory,
            args.extra_boot_kernel_args.join(" "),
        )?;
    }
    // The cluster file's per-role resources, except what --cpus/--memory set for every node.
    opts.resources = opts
        .resources
        .overridden(args.cpus.is_some(), args.memory.is_some());
    opts.provisioner_options.docker = provision::docker::DockerOptions {
        hosts: args.docker_host.clone(),
        cpus: args.cpus,
        memory_mib: args.memory,
    };
    opts.install_image = args.install_image.clone();
    opts.install_plain_http = args.install_plain_http;
    opts.extensions = args.extensions.clone();
    opts.registry_mirrors = args.registry_mirrors.clone();
    // The flags add to what a cluster file says.
    opts.with_registry |= args.with_registry;
    opts.airgapped |= args.airgapped;
    opts.extra_boot_kernel_args = args
        .extra_boot_kernel_args
        .iter()
        .flat_map(|a| a.split_whitespace().map(str::to_owned))
        .collect();
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

/// What `create` is asked for: the cluster file (if any), then the flags over it. Patches from
/// flags are added by the caller, after the file's.
fn create_options(args: &CreateArgs) -> anyhow::Result<CreateOptions> {
    let mut opts = CreateOptions::new("kiln-default", provision::state_base(args.state.clone())?);
    if let Some(file) = &args.file {
        let cluster = ClusterFile::load(file)?;
        let base = file.parent().unwrap_or(std::path::Path::new("."));
        cluster.apply(&mut opts, base)?;
        if let Some(p) = &cluster.provisioner
            && !provision::NAMES.contains(&p.as_str())
        {
            bail!(
                "{}: unknown provisioner {p:?}; provisioners: {}",
                file.display(),
                provision::NAMES.join(", ")
            );
        }
    }
    // Flags override the file.
    if let Some(v) = &args.provisioner {
        opts.provisioner = v.clone();
    }
    if let Some(v) = &args.name {
        opts.name = v.clone();
    }
    if let Some(v) = args.controlplanes {
        opts.controlplanes = v;
    }
    if let Some(v) = args.workers {
        opts.workers = v;
    }
    if let Some(v) = &args.cidr {
        opts.cidr = v.clone();
    }
    if let Some(v) = args.mtu {
        opts.mtu = v;
    }
    opts.wait = args.wait;
    opts.wait_timeout = args.wait_timeout;
    opts.skip_bootstrap = args.skip_bootstrap;
    opts.maintenance_workers |= args.maintenance_workers;
    Ok(opts)
}

/// The Docker engine running a node, when the cluster spreads over several (a Swarm).
fn swarm_engine(n: &kiln_provisioner::state::NodeState) -> Option<String> {
    n.provider_state::<provision::docker::DockerNode>(provision::docker::NAME)
        .filter(|d| d.swarm)
        .map(|d| d.host)
}

fn print_nodes(state: &ClusterState) {
    let engines: Vec<Option<String>> = state.nodes.iter().map(swarm_engine).collect();
    let swarm = engines.iter().any(Option::is_some);
    let rows: Vec<Vec<String>> = state
        .nodes
        .iter()
        .zip(&engines)
        .map(|(n, engine)| {
            let mut row = vec![n.name.clone(), n.role.to_string(), n.address.to_string()];
            if swarm {
                row.push(engine.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    println!(
        "\nPROVISIONER   {}\nNAME          {}\nNETWORK       {} ({})\nENDPOINT      {}\n",
        state.provisioner,
        state.name,
        state.network.cidr,
        match (
            state.network.mode,
            &state.network.bridge,
            &state.network.lab_netns
        ) {
            (NetworkMode::Bridge, Some(bridge), _) => format!("bridge {bridge}"),
            (NetworkMode::Bridge, None, Some(ns)) => {
                format!("Docker Swarm overlay; the lab's helpers in network namespace {ns}")
            }
            (NetworkMode::Bridge, None, None) => "bridge".to_owned(),
            (NetworkMode::Loopback, _, _) => "loopback".to_owned(),
        },
        state.endpoint
    );
    let headers: &[&str] = if swarm {
        &["NODE", "ROLE", "ADDRESS", "ENGINE"]
    } else {
        &["NODE", "ROLE", "ADDRESS"]
    };
    print!("{}", output::table(headers, &rows));
}

#[derive(Serialize)]
struct ShowNode {
    name: String,
    role: String,
    address: String,
    state: String,
    boots: u32,
    os_version: String,
    /// The Docker engine running it, on a cluster over several engines (a Swarm).
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    dhcp_leases: Option<Vec<kiln_dhcpd::Lease>>,
    helpers: Vec<ShowHelper>,
    /// The accelerator QEMU nodes use (kvm or tcg) and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    accel: Option<provision::qemu::accel::AccelChoice>,
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
        let status = provisioner.status(&dir, &state, &n.name).await.ok();
        nodes.push(ShowNode {
            name: n.name.clone(),
            role: n.role.to_string(),
            address: n.address.to_string(),
            state: status.as_ref().map_or(
                "unknown (its power switch does not answer)".to_owned(),
                |s| s.power.to_string(),
            ),
            boots: status.as_ref().map_or(0, |s| s.boots),
            os_version: versions
                .get(&n.address.to_string())
                .cloned()
                .unwrap_or_default(),
            engine: swarm_engine(n),
        });
    }
    let helpers = state
        .helpers
        .iter()
        .map(|h| {
            let pid = kiln_provisioner::daemon::running(&dir.pidfile(&h.name)).map(|id| id.pid);
            ShowHelper {
                name: h.name.clone(),
                kind: h.kind.clone(),
                pid,
                running: pid.is_some(),
            }
        })
        .collect();
    let load_balancer = kiln_provisioner::lb_helper::status(&dir).await.ok();
    let dhcp_leases = state
        .helpers
        .iter()
        .any(|h| h.name == kiln_provisioner::dhcpd_helper::NAME)
        .then(|| kiln_provisioner::dhcpd_helper::leases(&dir))
        .transpose()?;
    let out = ShowCluster {
        name: state.name.clone(),
        provisioner: state.provisioner.clone(),
        network: state.network.clone(),
        endpoint: state.endpoint.clone(),
        nodes,
        load_balancer,
        dhcp_leases,
        helpers,
        accel: std::fs::read(provision::qemu::launcher::accel_file(&dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
    };
    output::print(format, &out, |c| {
        let mut s = format!(
            "NAME         {}\nPROVISIONER  {}\nNETWORK      {} gateway {} ({:?})\nENDPOINT     {}\n",
            c.name, c.provisioner, c.network.cidr, c.network.gateway, c.network.mode, c.endpoint
        );
        if let Some(ns) = &c.network.lab_netns {
            s += &format!(
                "LAB NETNS    {ns} (a Docker Swarm overlay: the lab's helpers run in its gateway container's namespace)\n"
            );
        }
        if let Some(a) = &c.accel {
            s += &format!("ACCELERATOR  {} ({})\n", a.accel, a.reason);
        }
        s += "\n";
        let swarm = c.nodes.iter().any(|n| n.engine.is_some());
        let rows: Vec<Vec<String>> = c
            .nodes
            .iter()
            .map(|n| {
                let mut row = vec![
                    n.name.clone(),
                    n.role.clone(),
                    n.address.clone(),
                    n.state.clone(),
                    n.boots.to_string(),
                    n.os_version.clone(),
                ];
                if swarm {
                    row.push(n.engine.clone().unwrap_or_default());
                }
                row
            })
            .collect();
        let mut headers = vec!["NODE", "ROLE", "ADDRESS", "STATE", "BOOTS", "OS VERSION"];
        if swarm {
            headers.push("ENGINE");
        }
        s += &output::table(&headers, &rows);
        if let Some(lb) = &c.load_balancer {
            s += "\n";
            s += &kiln_provisioner::lb_helper::table(lb);
        }
        if let Some(leases) = &c.dhcp_leases {
            s += "\n";
            s += &kiln_provisioner::dhcpd_helper::table(leases);
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

/// `kiln health`: the nodes come from `--control-plane-nodes` / `--worker-nodes`, else from
/// the lab state of the cluster (`--cluster`/`--state`, or the one the context names), else
/// from the cluster itself (the etcd members are the control plane; the context's nodes that
/// are not members are workers).
pub async fn health(args: HealthArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let path = global.kilnconfig_path()?;
    let cfg = ClientConfig::load(&path)?;
    let context = cfg.context(global.context.as_deref(), &path).ok();
    let mut api = super::connect::Api::connect(global).await?;
    let split = |v: &[String]| -> Vec<(String, String)> {
        v.iter()
            .filter(|s| !s.is_empty())
            .map(|a| (a.clone(), String::new()))
            .collect()
    };
    let (name, topology) = if !args.control_plane_nodes.is_empty() {
        (
            context
                .as_ref()
                .map(|(n, _)| n.to_string())
                .unwrap_or_default(),
            health::Topology {
                control_plane: split(&args.control_plane_nodes),
                workers: split(&args.worker_nodes),
            },
        )
    } else if let Some(state) = lab_state(&args, context)? {
        (
            state.name.clone(),
            kiln_provisioner::create::topology(&state),
        )
    } else {
        let members = api
            .client
            .etcd_member_list(kiln_os_api::client::request(pb::Empty {}, &[]))
            .await?
            .into_inner();
        let mut cps: Vec<(String, String)> = Vec::new();
        for m in members.messages.iter().flat_map(|l| &l.members) {
            let host = m
                .client_urls
                .first()
                .and_then(|u| url::Url::parse(u).ok())
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            if !host.is_empty() && !cps.iter().any(|(a, _)| *a == host) {
                cps.push((host, m.hostname.clone()));
            }
        }
        if cps.is_empty() {
            bail!(
                "no control-plane nodes found: the endpoint lists no etcd members; pass --control-plane-nodes"
            );
        }
        let workers = context
            .as_ref()
            .map(|(_, c)| {
                c.nodes
                    .iter()
                    .filter(|n| !cps.iter().any(|(a, _)| a == *n))
                    .map(|n| (n.clone(), String::new()))
                    .collect()
            })
            .unwrap_or_default();
        let workers = if args.worker_nodes.is_empty() {
            workers
        } else {
            split(&args.worker_nodes)
        };
        (
            context
                .as_ref()
                .map(|(n, _)| n.to_string())
                .unwrap_or_default(),
            health::Topology {
                control_plane: cps,
                workers,
            },
        )
    };
    health::check(
        &mut api.client,
        &topology,
        args.wait_timeout,
        &Progress::new(),
    )
    .await?;
    eprintln!("cluster {name} is healthy");
    Ok(())
}

/// The lab state `kiln health` should use, if any: `--cluster`/`--state`, else the context's.
fn lab_state(
    args: &HealthArgs,
    context: Option<(&str, &kiln_config::client::Context)>,
) -> anyhow::Result<Option<ClusterState>> {
    if args.cluster.is_some() || args.state.is_some() {
        let name = match (&args.cluster, context) {
            (Some(n), _) => n.clone(),
            (None, Some((n, _))) => n.to_owned(),
            (None, None) => bail!("pass --cluster NAME with --state"),
        };
        let dir = StateDir::new(&provision::state_base(args.state.clone())?, &name);
        return Ok(Some(dir.load()?));
    }
    Ok(context
        .and_then(|(_, c)| c.lab.clone())
        .and_then(|dir| StateDir { dir }.load().ok()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Create {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn options(argv: &[&str]) -> CreateOptions {
        let c =
            Create::try_parse_from(std::iter::once("create").chain(argv.iter().copied())).unwrap();
        create_options(&c.args).unwrap()
    }

    #[test]
    fn a_cluster_file_asks_for_what_the_flags_do_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lab.yaml");
        std::fs::write(
            &file,
            "provisioner: process\nname: scen-lab\nnetwork: {cidr: 10.77.0.0/24, mtu: 1400}\n\
             nodes:\n  - role: controlplane\n    count: 3\n  - role: worker\n    count: 2\n",
        )
        .unwrap();
        let f = file.display().to_string();
        let from_file = options(&["-f", &f, "--state", "/tmp/s"]);
        let from_flags = options(&[
            "--name",
            "scen-lab",
            "--cidr",
            "10.77.0.0/24",
            "--mtu",
            "1400",
            "--controlplanes",
            "3",
            "--workers",
            "2",
            "--state",
            "/tmp/s",
        ]);
        assert_eq!(format!("{from_file:?}"), format!("{from_flags:?}"));
        let overridden = options(&["-f", &f, "--workers", "0", "--name", "other"]);
        assert_eq!((overridden.controlplanes, overridden.workers), (3, 0));
        assert_eq!(overridden.name, "other");
        assert_eq!(overridden.cidr, "10.77.0.0/24");
    }

    #[test]
    fn an_unknown_field_is_an_error_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lab.yaml");
        std::fs::write(
            &file,
            "name: scen-lab\nnodes:\n  - role: worker\n    cpus: 2\n",
        )
        .unwrap();
        let c = Create::try_parse_from(["create", "-f", &file.display().to_string()]).unwrap();
        let err = format!("{:#}", create_options(&c.args).unwrap_err());
        assert!(
            err.contains(&format!("{}:4:5: unknown field \"cpus\"", file.display())),
            "{err}"
        );
    }
}
