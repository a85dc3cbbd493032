//! Creating a cluster, shared by `kiln cluster create` and the scenario engine: reserve
//! addresses, generate PKI and configurations, let the provisioner create network, helpers and
//! nodes, wait for the API, bootstrap, wait for health.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_config::{ClientConfig, GenerateInput, Patch};
use kiln_os_api::client::Credentials;
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
use kiln_pki::SecretsBundle;
use tonic::transport::Channel;

use crate::health::{self, Topology};
use crate::network;
use crate::progress::Progress;
use crate::provision::{self, CreateRequest, NodeRequest};
use crate::state::{ClusterState, NetworkMode, StateDir};

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

/// The nodes health checks cover: every node that boots with a configuration.
pub fn topology(state: &ClusterState) -> Topology {
    let pick = |role: &str| {
        state
            .nodes
            .iter()
            .filter(|n| n.role == role && n.inject_config)
            .map(|n| (n.address.to_string(), n.name.clone()))
            .collect()
    };
    Topology {
        control_plane: pick("controlplane"),
        workers: pick("worker"),
    }
}

/// Connects to `endpoint`, retrying until `deadline`.
pub async fn connect_when_ready(
    endpoint: &str,
    creds: &Credentials,
    deadline: Instant,
) -> anyhow::Result<MachineServiceClient<Channel>> {
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

/// Creates the cluster. On failure the state directory stays for `destroy`.
pub async fn create(opts: &CreateOptions, progress: &Progress) -> anyhow::Result<Created> {
    let started = Instant::now();
    if opts.controlplanes == 0 {
        bail!("--controlplanes must be at least 1");
    }
    let name = &opts.name;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("invalid cluster name {name:?}: use letters, digits and '-'");
    }
    let provisioner = provision::by_name(&opts.provisioner)?;
    let dir = StateDir::new(&opts.state_base, name);
    if dir.dir.exists() {
        bail!(
            "cluster {name:?} already exists ({}); destroy it first with `kiln cluster destroy --name {name}`",
            dir.dir.display()
        );
    }
    let count = opts.controlplanes + opts.workers;

    progress.phase("validating CIDR and reserving IPs");
    let mode = if nix::unistd::Uid::effective().is_root() {
        NetworkMode::Bridge
    } else {
        NetworkMode::Loopback
    };
    let plan = network::plan(&opts.cidr, count, mode, &opts.state_base, name)?;
    let endpoint = format!("https://{}:6443", plan.gateway);

    progress.phase("generating PKI and tokens");
    let secrets = SecretsBundle::generate()?;
    let generated = kiln_config::generate(&GenerateInput {
        cluster_name: name,
        endpoint: &endpoint,
        secrets: &secrets,
        install_disk: kiln_config::generate::DEFAULT_INSTALL_DISK,
        install_image: kiln_config::generate::DEFAULT_INSTALLER_IMAGE,
        patches: &opts.patches,
        control_plane_patches: &opts.control_plane_patches,
        worker_patches: &opts.worker_patches,
    })?;
    let mut nodes = Vec::new();
    for i in 0..count {
        let (role, base_cfg, n) = if i < opts.controlplanes {
            ("controlplane", &generated.controlplane, i + 1)
        } else {
            ("worker", &generated.worker, i - opts.controlplanes + 1)
        };
        let node_name = format!("{name}-{role}-{n}");
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
            inject_config: !(role == "worker" && opts.maintenance_workers),
        });
    }
    let mut client = generated.client.clone();
    if let Some(ctx) = client.contexts.get_mut(name.as_str()) {
        ctx.endpoints = vec![plan.gateway.to_string()];
        ctx.nodes = vec![plan.nodes[0].to_string()];
    }
    let files = vec![
        ("secrets.yaml".to_owned(), secrets.to_yaml()?),
        ("kilnconfig".to_owned(), serde_yaml::to_string(&client)?),
    ];
    let request = CreateRequest {
        name: name.clone(),
        dir: dir.clone(),
        plan: plan.clone(),
        mtu: opts.mtu,
        nodes,
        endpoint,
        files,
    };
    let credentials = {
        let ca = secrets.os_ca()?;
        let admin = ca.issue(&kiln_pki::LeafRequest::client(
            "admin",
            kiln_pki::ROLE_ADMIN,
        ))?;
        Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: admin.cert_pem,
            key_pem: admin.key_pem,
        }
    };
    let result = async {
        let state = provisioner.create(&request, progress).await?;
        let topo = topology(&state);
        progress.phase("waiting for API");
        let deadline = Instant::now() + opts.wait_timeout;
        let mut api = connect_when_ready(&plan.gateway.to_string(), &credentials, deadline).await?;
        if !opts.skip_bootstrap {
            progress.phase("bootstrapping cluster");
            let first_cp = topo.control_plane[0].0.clone();
            loop {
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
                if error.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("bootstrap: {error}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if opts.wait {
                health::check(&mut api, &topo, opts.wait_timeout, progress).await?;
            }
        }
        anyhow::Ok(state)
    }
    .await;
    match result {
        Ok(state) => Ok(Created {
            state,
            dir,
            client,
            secrets,
            credentials,
            elapsed: started.elapsed(),
        }),
        Err(e) => {
            progress.failed();
            Err(e.context(format!(
                "creating cluster {name} failed; its state is kept in {} for inspection, remove it with `kiln cluster destroy --name {name}`",
                dir.dir.display()
            )))
        }
    }
}
