//! Creating a cluster, written once for every provisioner and shared by `kiln cluster create`
//! and the scenario engine: validate the CIDR and reserve addresses → generate PKI and
//! configurations → create the state directory (`state.yaml` names everything before it is
//! made) → the provisioner's network → host firewall rules for the bridge → the load balancer
//! → control-plane nodes → workers → wait for the API → bootstrap → wait for health. A wait
//! that runs out names the nodes that are not ready, their stage and last event, and a hint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_config::{ClientConfig, GenerateInput, MachineType, Patch};
use kiln_os_api::client::Credentials;
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
use kiln_os_api::wait::{Poll, until};
use kiln_pki::SecretsBundle;
use tonic::transport::Channel;

use crate::health::{self, Topology};
use crate::network;
use crate::progress::Progress;
use crate::provision::{self, ProvisionError, Provisioner};
use crate::state::{ClusterState, NetworkMode, NetworkState, NodeState, StateDir};

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Provisioner name.
    pub provisioner: String,
    /// Cluster name.
    pub name: String,
    /// Directory holding cluster state directories.
    pub state_base: PathBuf,
    /// Control-plane nodes.
    pub controlplanes: usize,
    /// Workers.
    pub workers: usize,
    /// Network.
    pub cidr: String,
    /// MTU.
    pub mtu: u32,
    /// Patches for all nodes.
    pub patches: Vec<Patch>,
    /// Patches for control-plane nodes.
    pub control_plane_patches: Vec<Patch>,
    /// Patches for workers.
    pub worker_patches: Vec<Patch>,
    /// Wait for health.
    pub wait: bool,
    /// Deadline for the API, bootstrap and health.
    pub wait_timeout: Duration,
    /// Leave etcd waiting for bootstrap.
    pub skip_bootstrap: bool,
    /// Workers boot without a configuration (maintenance mode); theirs is kept in the state
    /// directory as `<node>.yaml` for `apply-config --insecure`.
    pub maintenance_workers: bool,
    /// Installer image the nodes start on (slot A), instead of the release built into `kiln`.
    pub install_image: Option<String>,
    /// Pull the installer over plain HTTP (a lab registry).
    pub install_plain_http: bool,
    /// CPUs and memory per role (qemu and docker; process nodes share the host).
    pub resources: crate::cluster_file::RoleResources,
    /// Options only some provisioners use (`--docker-host`, `--cpus`, `--memory`, qemu's).
    pub provisioner_options: provision::ProvisionerOptions,
    /// A directory laid out like a node image (`usr/local/etc/containers/*.yaml`,
    /// `usr/local/lib/containers/<name>/`), copied into every node's image: extension
    /// services.
    pub extensions: Option<PathBuf>,
    /// Extra kernel arguments every node boots with (`kiln.config=URL`,
    /// `kiln.config.oauth.*`). With `kiln.config=`, nodes fetch their configuration from the
    /// URL instead of being given the generated one.
    pub extra_boot_kernel_args: Vec<String>,
    /// `--registry-mirror HOST=URL`: written into every node's `machine.registries.mirrors`.
    pub registry_mirrors: Vec<crate::lab_registry::MirrorSpec>,
    /// Start the lab registry mirror on the gateway and point every registry host (`*`) at it
    /// unless `registry_mirrors` names another mirror for it.
    pub with_registry: bool,
    /// Air-gapped: the lab registry, DNS and egress proxy on the gateway, nodes without a
    /// route beyond the cluster network.
    pub airgapped: bool,
}

impl CreateOptions {
    /// Defaults of `kiln cluster create` for `name` under `state_base`.
    pub fn new(name: &str, state_base: PathBuf) -> Self {
        Self {
            provisioner: "process".into(),
            name: name.into(),
            state_base,
            controlplanes: 1,
            workers: 1,
            cidr: "10.5.0.0/24".into(),
            mtu: 1500,
            patches: vec![],
            control_plane_patches: vec![],
            worker_patches: vec![],
            wait: true,
            wait_timeout: Duration::from_secs(300),
            skip_bootstrap: false,
            maintenance_workers: false,
            install_image: None,
            install_plain_http: false,
            resources: Default::default(),
            provisioner_options: Default::default(),
            extensions: None,
            extra_boot_kernel_args: Vec::new(),
            registry_mirrors: vec![],
            with_registry: false,
            airgapped: false,
        }
    }
}

/// A created cluster.
#[derive(Debug, Clone)]
pub struct Created {
    /// Its state.
    pub state: ClusterState,
    /// Its state directory.
    pub dir: StateDir,
    /// A client config with one context for it (endpoint: the load balancer).
    pub client: ClientConfig,
    /// Its secrets.
    pub secrets: SecretsBundle,
    /// Admin credentials.
    pub credentials: Credentials,
    /// How long it took.
    pub elapsed: Duration,
}

/// Why a cluster could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A flag is out of range.
    #[error("{0}")]
    Invalid(String),
    /// `--install-image` could not be installed.
    #[error(transparent)]
    Install(#[from] crate::install::InstallError),
    /// The cluster exists.
    #[error(
        "cluster {name:?} already exists ({dir}); destroy it first with `kiln cluster destroy --name {name}`"
    )]
    Exists {
        /// Its name.
        name: String,
        /// Its state directory.
        dir: PathBuf,
    },
    /// The CIDR cannot be used.
    #[error(transparent)]
    Plan(#[from] network::PlanError),
    /// The host's routes could not be read.
    #[error("reading the host's routes: {0}")]
    Routes(#[from] network::netlink::NetlinkError),
    /// Secrets or configurations could not be generated.
    #[error("generating secrets and configurations: {0}")]
    Generate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The provisioner failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A node's image or kernel command line could not be prepared.
    #[error(transparent)]
    NodeImage(#[from] crate::node_image::NodeImageError),
    /// The host firewall could not be changed.
    #[error("letting the cluster bridge's traffic pass the host firewall: {0}")]
    Firewall(#[from] crate::firewall::FirewallError),
    /// The state could not be written.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A helper could not be started.
    #[error("starting the {helper}: {reason}")]
    Helper {
        /// Which.
        helper: &'static str,
        /// Why.
        reason: String,
    },
    /// A wait ran out; `nodes` explains each node that is not ready.
    #[error("{what}: not reached within {timeout:?}: {last}{explanation}")]
    Wait {
        /// What was awaited.
        what: String,
        /// The time allowed.
        timeout: Duration,
        /// Why it last failed.
        last: String,
        /// One line per node that is not ready, and hints.
        explanation: String,
    },
    /// Bootstrap was refused.
    #[error("bootstrap on {node}: {reason}")]
    Bootstrap {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The create failed after the state directory was made: it is kept for destroy.
    #[error(
        "{source}\ncreating cluster {name} failed; its state is kept in {dir} for inspection, remove it with `kiln cluster destroy --name {name}{state_flag}`"
    )]
    Failed {
        /// The cluster.
        name: String,
        /// Its state directory.
        dir: PathBuf,
        /// ` --state BASE` when the state is not in the default place.
        state_flag: String,
        /// What failed.
        source: Box<CreateError>,
    },
}

fn generate_error(e: impl std::error::Error + Send + Sync + 'static) -> CreateError {
    CreateError::Generate(Box::new(e))
}

/// The nodes health checks cover: every node that boots with a configuration.
pub fn topology(state: &ClusterState) -> Topology {
    let pick = |role: MachineType| {
        state
            .nodes
            .iter()
            .filter(|n| n.role == role && n.inject_config)
            .map(|n| (n.address.to_string(), n.name.clone()))
            .collect()
    };
    Topology {
        control_plane: pick(MachineType::Controlplane),
        workers: pick(MachineType::Worker),
    }
}

/// Connects to `endpoint`, retrying until `timeout`.
pub async fn connect_when_ready(
    endpoint: &str,
    creds: &Credentials,
    timeout: Duration,
) -> Result<MachineServiceClient<Channel>, kiln_os_api::wait::TimedOut<String>> {
    until(
        format!("the API at {endpoint}"),
        Poll::every(Duration::from_millis(100), timeout),
        || async {
            kiln_os_api::client::connect(endpoint, creds)
                .await
                .map(kiln_os_api::client::machine_client)
                .map_err(|e| e.to_string())
        },
    )
    .await
}

/// Maps a node name or address in a health error back to the cluster's node names.
fn node_names(state: &ClusterState, named: &[String]) -> Vec<String> {
    let mut out: Vec<String> = state
        .nodes
        .iter()
        .filter(|n| {
            named
                .iter()
                .any(|x| *x == n.name || *x == n.address.to_string())
        })
        .map(|n| n.name.clone())
        .collect();
    if out.is_empty() {
        // Nothing named: every node that boots with a configuration is suspect.
        out = state
            .nodes
            .iter()
            .filter(|n| n.inject_config)
            .map(|n| n.name.clone())
            .collect();
    }
    out
}

/// Creates the cluster. On failure after the state directory exists, it stays for `destroy`.
pub async fn create(opts: &CreateOptions, progress: &Progress) -> Result<Created, CreateError> {
    let started = Instant::now();
    if opts.controlplanes == 0 {
        return Err(CreateError::Invalid(
            "--controlplanes must be at least 1".into(),
        ));
    }
    let name = &opts.name;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(CreateError::Invalid(format!(
            "invalid cluster name {name:?}: use letters, digits and '-'"
        )));
    }
    let provisioner = provision::by_name_with(&opts.provisioner, &opts.provisioner_options)?;
    let mode = provisioner.network_mode()?;
    if opts.install_image.is_some()
        && let Err(why) = provisioner.capabilities(mode).slots
    {
        // Nodes without A/B slots would ignore the installer and boot the built-in release.
        return Err(CreateError::Invalid(format!(
            "--install-image needs A/B slots: {why}; boot the kernel directly (no --with-uefi), or use --provisioner process or docker"
        )));
    }
    let dir = StateDir::new(&opts.state_base, name);
    if dir.dir.exists() {
        return Err(CreateError::Exists {
            name: name.clone(),
            dir: dir.dir.clone(),
        });
    }
    let count = opts.controlplanes + opts.workers;

    progress.phase("validating CIDR and reserving IPs");
    // Held until the bridge exists: another create (with another state directory) waits
    // here and then sees this cluster's route.
    let mut network_lock = match mode {
        NetworkMode::Bridge => Some(
            network::HostNetworkLock::acquire(Path::new(network::HOST_NETWORK_LOCK))
                .await
                .map_err(|source| CreateError::Io {
                    path: network::HOST_NETWORK_LOCK.into(),
                    source,
                })?,
        ),
        NetworkMode::Loopback => None,
    };
    let routes = match mode {
        NetworkMode::Bridge => network::host_routes().await?,
        NetworkMode::Loopback => Vec::new(),
    };
    let plan = network::plan(&opts.cidr, count, mode, &opts.state_base, name, &routes)?;
    let endpoint = format!("https://{}:6443", plan.gateway);
    if opts.airgapped
        && let Err(why) = provisioner.capabilities(mode).airgap
    {
        return Err(CreateError::Invalid(format!("--airgapped: {why}")));
    }
    if opts.airgapped && mode != NetworkMode::Bridge {
        return Err(CreateError::Invalid(
            "--airgapped needs the bridge network (nodes in their own network namespaces): run cluster create as root".into(),
        ));
    }
    let with_registry = opts.with_registry || opts.airgapped;
    // The lab's own patches come first, so the user's patches can still change them.
    let mut patches = Vec::new();
    let mut mirrors = opts.registry_mirrors.clone();
    if with_registry && !mirrors.iter().any(|m| m.host == "*") {
        mirrors.push(crate::lab_registry::MirrorSpec {
            host: "*".into(),
            endpoint: format!(
                "http://{}",
                std::net::SocketAddr::new(plan.gateway, crate::lab_registry::PORT)
            ),
        });
    }
    patches.extend(crate::lab_registry::mirrors_patch(&mirrors));
    if opts.airgapped {
        patches.push(
            crate::airgap_helper::node_patch(plan.gateway, &plan.cidr.to_string())
                .map_err(generate_error)?,
        );
    }
    patches.extend(opts.patches.iter().cloned());

    progress.phase("generating PKI and tokens");
    let secrets = SecretsBundle::generate().map_err(generate_error)?;
    let generated = kiln_config::generate(&GenerateInput {
        cluster_name: name,
        endpoint: &endpoint,
        secrets: &secrets,
        install_disk: kiln_config::generate::DEFAULT_INSTALL_DISK,
        install_image: kiln_config::generate::DEFAULT_INSTALLER_IMAGE,
        patches: &patches,
        control_plane_patches: &opts.control_plane_patches,
        worker_patches: &opts.worker_patches,
    })
    .map_err(generate_error)?;
    if let Some(ext) = &opts.extensions {
        crate::node_image::check_extensions(ext)?;
    }
    let mut nodes = Vec::new();
    let mut configs = Vec::new();
    for i in 0..count {
        let (role, base_cfg, n) = if i < opts.controlplanes {
            (MachineType::Controlplane, &generated.controlplane, i + 1)
        } else {
            (
                MachineType::Worker,
                &generated.worker,
                i - opts.controlplanes + 1,
            )
        };
        let node_name = format!("{name}-{role}-{n}");
        let hostname = Patch::parse(
            &format!("machine: {{network: {{hostname: {node_name}}}}}"),
            "hostname",
        )
        .map_err(generate_error)?;
        let cfg = kiln_config::patch::apply(base_cfg, &[hostname]).map_err(generate_error)?;
        configs.push(kiln_config::to_yaml(&cfg).map_err(generate_error)?);
        nodes.push(NodeState {
            config: dir.dir.join(format!("{node_name}.yaml")),
            name: node_name,
            role,
            address: plan.nodes[i],
            inject_config: !(role == MachineType::Worker && opts.maintenance_workers),
            provider: Default::default(),
            resources: opts.resources.of(role),
        });
    }
    let mut client = generated.client.clone();
    if let Some(ctx) = client.contexts.get_mut(name.as_str()) {
        ctx.endpoints = vec![plan.gateway.to_string()];
        ctx.nodes = vec![plan.nodes[0].to_string()];
        ctx.lab = Some(dir.dir.clone());
    }
    let credentials = {
        let ca = secrets.os_ca().map_err(generate_error)?;
        let admin = ca
            .issue(&kiln_pki::LeafRequest::client(
                "admin",
                kiln_pki::ROLE_ADMIN,
            ))
            .map_err(generate_error)?;
        Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: admin.cert_pem,
            key_pem: admin.key_pem,
        }
    };
    let mut state = ClusterState {
        name: name.clone(),
        provisioner: provisioner.name().to_owned(),
        network: NetworkState {
            mode,
            cidr: plan.cidr.to_string(),
            gateway: plan.gateway,
            bridge: None,
            mtu: opts.mtu,
            firewall: Vec::new(),
            airgapped: opts.airgapped,
            lab_netns: None,
        },
        nodes,
        helpers: Vec::new(),
        endpoint,
        created: time_now(),
    };
    provisioner.plan(&dir, &mut state);

    progress.phase(format!(
        "creating state directory in {:?}",
        dir.dir.display().to_string()
    ));
    std::fs::create_dir_all(&dir.dir).map_err(|source| CreateError::Io {
        path: dir.dir.clone(),
        source,
    })?;
    // Saved before anything else exists, so destroy knows what to look for.
    dir.save(&state)?;
    let result = async {
        let files = [
            (
                "secrets.yaml".to_owned(),
                secrets.to_yaml().map_err(generate_error)?,
            ),
            (
                "kilnconfig".to_owned(),
                serde_yaml::to_string(&client).map_err(generate_error)?,
            ),
        ];
        for (file, content) in &files {
            write_private(&dir.dir.join(file), content)?;
        }
        for (n, config) in state.nodes.iter().zip(&configs) {
            write_private(&n.config, config)?;
        }
        for n in &state.nodes {
            crate::node_image::prepare(&dir, &n.name, opts)?;
        }

        progress.phase(format!("creating network {name}"));
        provisioner.create_network(&dir, &state, progress).await?;
        network_lock.take();
        if let Some(bridge) = state.network.bridge.clone() {
            let mark = dir.owner_mark();
            let mut recorded = Vec::new();
            let added = crate::firewall::allow_bridge(
                &crate::firewall::HostRunner,
                &bridge,
                &mark,
                &mut |r| {
                    recorded.push(r.clone());
                    let mut s = state.clone();
                    s.network.firewall = recorded.clone();
                    let _ = dir.save(&s);
                },
            )?;
            for rule in &added {
                progress.note(format!(
                    "host firewall drops forwarded traffic: added `{rule}`"
                ));
            }
            state.network.firewall = added;
            dir.save(&state)?;
        }

        progress.phase("creating load balancer");
        crate::lb_helper::start(&dir, &mut state, progress).map_err(|e| CreateError::Helper {
            helper: "load balancer",
            reason: format!("{e:#}"),
        })?;
        dir.save(&state)?;
        if with_registry {
            progress.phase("creating registry mirror");
            crate::lab_registry::start(&dir, &mut state, progress).map_err(|e| {
                CreateError::Helper {
                    helper: "registry mirror",
                    reason: format!("{e:#}"),
                }
            })?;
        }
        if opts.airgapped {
            progress.phase("creating lab DNS and egress proxy");
            crate::airgap_helper::start(&dir, &mut state, progress).map_err(|e| {
                CreateError::Helper {
                    helper: "lab DNS and egress proxy",
                    reason: format!("{e:#}"),
                }
            })?;
        }

        if let Some(image) = &opts.install_image {
            progress.phase(format!("pulling the installer {image}"));
            let release = dir.dir.join("installer");
            let pulled =
                crate::install::pull_release(image, opts.install_plain_http, &release).await?;
            progress.note(format!("release {} ({})", pulled.version, pulled.digest));
            let content = kiln_os_api::slots::SlotContent {
                version: pulled.version,
                source: format!("{image}@{}", pulled.digest),
                builtin: false,
            };
            for n in &state.nodes {
                crate::install::seed(
                    &crate::install::boot_dir(&dir, &n.name),
                    &release,
                    content.clone(),
                )?;
            }
        }

        for (phase, role) in [
            ("creating control-plane nodes", MachineType::Controlplane),
            ("creating worker nodes", MachineType::Worker),
        ] {
            progress.phase(phase);
            let names: Vec<String> = state
                .nodes
                .iter()
                .filter(|n| n.role == role)
                .map(|n| n.name.clone())
                .collect();
            for node in names {
                provisioner.start_node(&dir, &mut state, &node).await?;
                dir.save(&state)?;
                if let Some(n) = state.node(&node) {
                    progress.note(format!("{} ({}) at {}", n.name, n.role, n.address));
                }
            }
        }
        wait_and_bootstrap(
            opts,
            &dir,
            &state,
            provisioner.as_ref(),
            &credentials,
            progress,
        )
        .await?;
        Ok::<_, CreateError>(())
    }
    .await;
    match result {
        Ok(()) => Ok(Created {
            state,
            dir,
            client,
            secrets,
            credentials,
            elapsed: started.elapsed(),
        }),
        Err(e) => {
            progress.failed();
            let default = crate::state::default_base()
                .ok()
                .map(|b| StateDir::new(&b, name).dir);
            Err(CreateError::Failed {
                name: name.clone(),
                state_flag: if default.as_ref() == Some(&dir.dir) {
                    String::new()
                } else {
                    format!(" --state {}", opts.state_base.display())
                },
                dir: dir.dir.clone(),
                source: Box::new(e),
            })
        }
    }
}

fn write_private(path: &std::path::Path, content: &str) -> Result<(), CreateError> {
    kiln_config::client::write_private(path, content.as_bytes()).map_err(|source| CreateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

async fn wait_and_bootstrap(
    opts: &CreateOptions,
    dir: &StateDir,
    state: &ClusterState,
    provisioner: &dyn Provisioner,
    credentials: &Credentials,
    progress: &Progress,
) -> Result<(), CreateError> {
    let topo = topology(state);
    let deadline = Instant::now() + opts.wait_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    progress.phase("waiting for API");
    let gateway = state.network.gateway.to_string();
    let mut api = match connect_when_ready(&gateway, credentials, left()).await {
        Ok(api) => api,
        Err(t) => {
            let all: Vec<String> = state.nodes.iter().map(|n| n.name.clone()).collect();
            return Err(CreateError::Wait {
                what: t.what,
                timeout: t.timeout,
                last: t.last.unwrap_or_default(),
                explanation: crate::diagnose::explain(dir, state, provisioner, &all).await,
            });
        }
    };
    if opts.skip_bootstrap {
        return Ok(());
    }
    progress.phase("bootstrapping cluster");
    let first_cp = topo.control_plane[0].0.clone();
    let bootstrapped = until(
        format!("bootstrap on {first_cp}"),
        Poll::backoff(
            Duration::from_millis(100),
            Duration::from_millis(500),
            left(),
        ),
        || {
            let mut api = api.clone();
            let first_cp = first_cp.clone();
            async move {
                let req = kiln_os_api::client::request(
                    pb::BootstrapRequest::default(),
                    std::slice::from_ref(&first_cp),
                );
                let error = match api.bootstrap(req).await {
                    Ok(r) => r
                        .into_inner()
                        .messages
                        .into_iter()
                        .filter_map(|m| m.metadata)
                        .map(|m| m.error)
                        .filter(|e| !e.is_empty())
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(s) => s.message().to_owned(),
                };
                if error.is_empty() { Ok(()) } else { Err(error) }
            }
        },
    )
    .await;
    if let Err(t) = bootstrapped {
        return Err(CreateError::Bootstrap {
            node: first_cp,
            reason: format!(
                "{}{}",
                t.last.unwrap_or_else(|| "no answer".into()),
                crate::diagnose::explain(
                    dir,
                    state,
                    provisioner,
                    &[topo.control_plane[0].1.clone()]
                )
                .await
            ),
        });
    }
    if opts.wait
        && let Err(e) = health::check(&mut api, &topo, left(), progress).await
    {
        let names = node_names(state, &e.last.nodes);
        return Err(CreateError::Wait {
            what: e.what.to_owned(),
            timeout: opts.wait_timeout,
            last: e.last.message,
            explanation: crate::diagnose::explain(dir, state, provisioner, &names).await,
        });
    }
    Ok(())
}

fn time_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
