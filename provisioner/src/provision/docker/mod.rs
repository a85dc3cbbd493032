//! The `docker` provisioner: every node is a container of the node image `kiln/node:<version>`
//! (machined as PID 1, platform `container`) on a user-defined bridge network with the
//! cluster's CIDR and MTU and a static address per node. STATE, EPHEMERAL and META are Docker
//! volumes. The container's restart policy is `on-failure`: machined ends with
//! `EXIT_CONTAINER_SHUTDOWN` (0) on power-off, so the container stays stopped, and with
//! `EXIT_REBOOT` on reboot (or a crash), so Docker starts it again.
//!
//! A/B slots: a fourth volume is the node's boot directory (`KILN_BOOT_DIR`); the entrypoint
//! plays the bootloader at every start of the container (machined's
//! `platform::container::bootloader`), so upgrades and rollback work as on `process`. A
//! cluster created with `--install-image` gets the release seeded into slot A of that volume
//! (through the Engine's archive API) before the container first starts.
//!
//! Ownership: every container, network and volume carries the label [`CLUSTER_LABEL`] with the
//! cluster's owner mark; `destroy` lists by that label (so it also finds what a create killed
//! halfway made before saving the state) and removes nothing else. Node images are shared by
//! clusters and removed by `destroy` once no container uses them.
//!
//! Power: stop = kill, start, reset = restart without grace, pause/unpause, and link down/up on
//! the host side of the container's veth (the container keeps its address and routes).
//!
//! Several engines (`--docker-host A,B`) spread the nodes over a Docker Swarm on an overlay
//! network; see [`swarm`].

pub mod console;
pub mod engine;
pub mod swarm;

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam, IpamConfig,
    NetworkCreateRequest, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, ListNetworksOptions,
    ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions, RestartContainerOptions,
};
use serde::{Deserialize, Serialize};

use super::{
    Capabilities, NodeStatus, PowerAction, PowerState, ProvisionError, Provisioner, require_node,
};
use crate::network::netlink;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, NetworkMode, StateDir};

pub use engine::EngineError;

/// The provisioner's name, also the key of its section in each node's state.
pub const NAME: &str = "docker";
/// Label carrying the cluster's owner mark on everything the cluster owns.
pub const CLUSTER_LABEL: &str = "dev.kiln.cluster";
/// Label carrying the node name on a node's container and volumes.
pub const NODE_LABEL: &str = "dev.kiln.node";
/// Where the volumes are mounted in the container.
const VOLUMES_ROOT: &str = kiln_image::rootfs::VOLUMES_ROOT;
/// The node's volumes, by their directory under [`VOLUMES_ROOT`]: STATE, EPHEMERAL, META and
/// the boot directory of the A/B slots.
const VOLUMES: [&str; 4] = ["state", "ephemeral", "meta", "boot"];
/// Seconds Docker waits after SIGTERM (graceful shutdown) before SIGKILL.
const STOP_TIMEOUT: i64 = 30;
/// Capabilities the node needs, by name (never `--privileged`): links and routes, mounts and
/// the host name.
pub const NODE_CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN"];

/// Options of `kiln cluster create` for this provisioner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DockerOptions {
    /// The engines (`unix:///...`); none: `DOCKER_HOST` or `/var/run/docker.sock`. Several:
    /// members of one Docker Swarm, the first a manager ([`swarm`]).
    pub hosts: Vec<String>,
    /// CPUs per node.
    pub cpus: Option<f64>,
    /// Memory per node in MiB.
    pub memory_mib: Option<u64>,
}

/// What the docker provisioner makes for one node (its section in `state.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DockerNode {
    /// The engine.
    pub host: String,
    /// Container name.
    pub container: String,
    /// Network name.
    pub network: String,
    /// Volume names: STATE, EPHEMERAL, META and the boot directory.
    pub volumes: Vec<String>,
    /// CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The node image, once imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// On a Docker Swarm overlay network (several engines), not a bridge of its engine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub swarm: bool,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct DockerProvisioner {
    options: DockerOptions,
}

impl DockerProvisioner {
    /// A provisioner creating clusters with `options` (power and destroy read the engine from
    /// the state).
    pub fn new(options: DockerOptions) -> Self {
        Self { options }
    }

    /// The engines nodes go to, in order (at least one).
    fn hosts(&self) -> Vec<String> {
        if self.options.hosts.is_empty() {
            vec![engine::default_host()]
        } else {
            self.options.hosts.clone()
        }
    }

    fn swarm(&self) -> bool {
        self.options.hosts.len() > 1
    }
}

/// The cluster network's bridge interface: `kd` and the cluster identity.
pub fn bridge_name(dir: &StateDir) -> String {
    format!("kd{}", dir.id())
}

/// The Docker name of a node's container (`<node>-<id>`: clusters of the same name under
/// other `--state` directories differ).
pub fn container_name(dir: &StateDir, node: &str) -> String {
    format!("{node}-{}", dir.id())
}

/// The section of `node`, or an empty one.
fn node_section(state: &ClusterState, node: &str) -> DockerNode {
    state
        .node(node)
        .and_then(|n| n.provider_state(NAME))
        .unwrap_or_default()
}

/// The engine of a cluster: the one its nodes were made on.
fn cluster_host(state: &ClusterState) -> String {
    state
        .nodes
        .first()
        .map(|n| node_section(state, &n.name).host)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(engine::default_host)
}

fn unavailable(e: EngineError) -> ProvisionError {
    ProvisionError::Unavailable {
        provisioner: NAME.to_owned(),
        reason: e.to_string(),
    }
}

fn unavailable_reason(reason: String) -> ProvisionError {
    ProvisionError::Unavailable {
        provisioner: NAME.to_owned(),
        reason,
    }
}

/// Every engine of the cluster, the first (the one of its first node, which holds the
/// network) first.
fn cluster_hosts(state: &ClusterState) -> Vec<String> {
    let mut hosts = vec![cluster_host(state)];
    for n in &state.nodes {
        let h = node_section(state, &n.name).host;
        if !h.is_empty() && !hosts.contains(&h) {
            hosts.push(h);
        }
    }
    hosts
}

fn api(
    host: &str,
    what: impl Into<String>,
) -> impl FnOnce(bollard::errors::Error) -> ProvisionError {
    let host = host.to_owned();
    let what = what.into();
    move |source| unavailable(EngineError::Api { host, what, source })
}

fn label_filter(mark: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_owned(), vec![format!("{CLUSTER_LABEL}={mark}")])])
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[async_trait]
impl Provisioner for DockerProvisioner {
    fn name(&self) -> &'static str {
        NAME
    }

    fn network_mode(&self) -> Result<NetworkMode, ProvisionError> {
        let hosts = self.hosts();
        for host in &hosts {
            let path = engine::socket_path(host).map_err(unavailable)?;
            if !std::path::Path::new(path).exists() {
                return Err(unavailable(EngineError::NoEngine { host: host.clone() }));
            }
        }
        if let Some(twice) = hosts
            .iter()
            .enumerate()
            .find_map(|(i, h)| hosts[..i].contains(h).then_some(h))
        {
            return Err(unavailable_reason(format!(
                "--docker-host names {twice} twice: name each engine once"
            )));
        }
        if self.swarm() && !nix::unistd::Uid::effective().is_root() {
            return Err(unavailable_reason(
                "a cluster over several engines routes the host into its overlay network (a veth pair and a network namespace), which needs root".into(),
            ));
        }
        Ok(NetworkMode::Bridge)
    }

    fn capabilities(&self, _mode: NetworkMode) -> Capabilities {
        let root = nix::unistd::Uid::effective().is_root();
        Capabilities {
            link_faults: if self.swarm() {
                Err("on a Docker Swarm overlay network a container's veth lives in the engine's hidden overlay namespace; cut an engine's link instead".into())
            } else if root {
                Ok(())
            } else {
                Err(
                    "cutting a container's link sets its host-side veth down, which needs root"
                        .into(),
                )
            },
            pause: Ok(()),
            slots: Ok(()),
            airgap: if self.swarm() {
                Err("an air-gapped cluster over several Docker engines is not supported yet (its proxy would run in the gateway container, which reaches outside through the engine)".into())
            } else {
                Ok(())
            },
        }
    }

    fn plan(&self, dir: &StateDir, state: &mut ClusterState) {
        let hosts = self.hosts();
        let swarm = self.swarm();
        let network = format!("kiln-{}-{}", state.name, dir.id());
        if swarm {
            state.network.bridge = None;
            state.network.lab_netns = Some(swarm::netns_name(dir));
        } else {
            state.network.bridge = Some(bridge_name(dir));
        }
        for (i, n) in state.nodes.iter_mut().enumerate() {
            let container = container_name(dir, &n.name);
            let node = DockerNode {
                host: hosts[i % hosts.len()].clone(),
                swarm,
                volumes: VOLUMES.iter().map(|v| format!("{container}-{v}")).collect(),
                container,
                network: network.clone(),
                cpus: n
                    .resources
                    .and_then(|r| r.cpus)
                    .map(f64::from)
                    .or(self.options.cpus),
                memory_mib: n
                    .resources
                    .and_then(|r| r.memory)
                    .or(self.options.memory_mib),
                image: None,
            };
            n.set_provider_state(NAME, &node);
        }
    }

    async fn create_network(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError> {
        let host = cluster_host(state);
        let docker = engine::connect(&host).await.map_err(unavailable)?;
        let mark = dir.owner_mark();
        let Some(first) = state.nodes.first() else {
            return Ok(());
        };
        let section = node_section(state, &first.name);
        let network = section.network;
        if section.swarm {
            let mut engines = vec![(host.clone(), docker.clone())];
            for h in cluster_hosts(state).into_iter().skip(1) {
                let d = engine::connect(&h).await.map_err(unavailable)?;
                engines.push((h, d));
            }
            swarm::check(&engines).await?;
        }
        if let Ok(existing) = docker
            .inspect_network(
                &network,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            let owner = existing
                .labels
                .as_ref()
                .and_then(|l| l.get(CLUSTER_LABEL).cloned())
                .unwrap_or_default();
            if owner != mark {
                return Err(ProvisionError::Taken {
                    object: format!("Docker network {network}"),
                    cluster: state.name.clone(),
                    found: if owner.is_empty() {
                        "no kiln label".into()
                    } else {
                        format!("labelled {owner:?}")
                    },
                    fix: format!("remove it with `docker network rm {network}` if nothing uses it"),
                });
            }
            if section.swarm {
                let image = engine::ensure_node_image(&docker, &host)
                    .await
                    .map_err(unavailable)?;
                swarm::start_gateway(dir, state, &docker, &host, &network, &image).await?;
            }
            return Ok(());
        }
        let labels = HashMap::from([(CLUSTER_LABEL.to_owned(), mark.clone())]);
        let bridge = state
            .network
            .bridge
            .clone()
            .unwrap_or_else(|| bridge_name(dir));
        // On an overlay VXLAN adds 50 bytes to every frame between engines: at most 1450
        // keeps them within a 1500-byte link unfragmented (Docker's own overlay default).
        let mtu = if section.swarm {
            state.network.mtu.min(swarm::OVERLAY_MTU)
        } else {
            state.network.mtu
        };
        let mut options =
            HashMap::from([("com.docker.network.driver.mtu".to_owned(), mtu.to_string())]);
        let (docker_gateway, ip_range) = if section.swarm {
            // The lab's gateway address is the gateway container's; Docker's own gateway of
            // the overlay (an address on each engine's hidden bridge) moves to the last one,
            // and what Docker allocates itself to the last quarter, away from the nodes.
            let small = || {
                unavailable_reason(format!(
                    "the cluster network {} is too small for a swarm: Docker's overlay needs the last quarter of it; use a /28 or larger",
                    state.network.cidr
                ))
            };
            let gateway = swarm::overlay_gateway(&state.network.cidr).ok_or_else(small)?;
            let (range, start) =
                swarm::overlay_dynamic_range(&state.network.cidr).ok_or_else(small)?;
            if let Some(n) = state
                .nodes
                .iter()
                .find(|n| matches!(n.address, IpAddr::V4(a) if a >= start))
            {
                return Err(unavailable_reason(format!(
                    "node {} at {} falls into {range}, which Docker's overlay keeps for itself: use a larger --cidr or fewer nodes",
                    n.name, n.address
                )));
            }
            (gateway.to_string(), Some(range))
        } else {
            options.insert("com.docker.network.bridge.name".to_owned(), bridge);
            (state.network.gateway.to_string(), None)
        };
        docker
            .create_network(NetworkCreateRequest {
                name: network.clone(),
                driver: Some(if section.swarm { "overlay" } else { "bridge" }.into()),
                attachable: section.swarm.then_some(true),
                // Air-gapped: an engine that manages iptables drops what leaves the bridge and
                // does not masquerade; machined removes the default route Docker still gives
                // (`NO_DEFAULT_ROUTE_ENV`). The bridge keeps the gateway address, where the
                // lab's DNS, proxy and registry listen.
                internal: Some(state.network.airgapped),
                ipam: Some(Ipam {
                    driver: Some("default".into()),
                    config: Some(vec![IpamConfig {
                        subnet: Some(state.network.cidr.clone()),
                        gateway: Some(docker_gateway),
                        ip_range,
                        ..Default::default()
                    }]),
                    options: None,
                }),
                options: Some(options),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map_err(api(&host, format!("creating network {network}")))?;
        if section.swarm {
            progress.note(format!(
                "Docker overlay network {network} ({}, MTU {mtu}) over {} engines of a swarm",
                state.network.cidr,
                cluster_hosts(state).len()
            ));
            let image = engine::ensure_node_image(&docker, &host)
                .await
                .map_err(unavailable)?;
            swarm::start_gateway(dir, state, &docker, &host, &network, &image).await?;
            progress.note(format!(
                "gateway container {} at {} on {host}: the lab's helpers run in its network namespace, the host reaches the cluster through {}",
                swarm::gateway_container(dir, state),
                state.network.gateway,
                swarm::veth_name(dir)
            ));
        } else {
            progress.note(format!(
                "Docker network {network} ({}) on {host}",
                state.network.cidr
            ));
        }
        Ok(())
    }

    async fn start_node(
        &self,
        dir: &StateDir,
        state: &mut ClusterState,
        node: &str,
    ) -> Result<(), ProvisionError> {
        let me = require_node(state, node)?.clone();
        let mut section = node_section(state, node);
        let host = section.host.clone();
        let docker = engine::connect(&host).await.map_err(unavailable)?;
        let image = engine::ensure_node_image(&docker, &host)
            .await
            .map_err(unavailable)?;
        section.image = Some(image.clone());
        if let Some(n) = state.nodes.iter_mut().find(|n| n.name == node) {
            n.set_provider_state(NAME, &section);
        }
        dir.save(state)?;
        let mark = dir.owner_mark();
        let labels = HashMap::from([
            (CLUSTER_LABEL.to_owned(), mark.clone()),
            (NODE_LABEL.to_owned(), node.to_owned()),
        ]);
        let mut mounts = Vec::new();
        for (volume, dirname) in section.volumes.iter().zip(VOLUMES) {
            docker
                .create_volume(VolumeCreateRequest {
                    name: Some(volume.clone()),
                    labels: Some(labels.clone()),
                    ..Default::default()
                })
                .await
                .map_err(api(&host, format!("creating volume {volume}")))?;
            mounts.push(format!("{volume}:{VOLUMES_ROOT}/{dirname}"));
        }
        let mut cmd = vec![
            "--platform".to_owned(),
            "container".to_owned(),
            "--root".to_owned(),
            VOLUMES_ROOT.to_owned(),
            "--hostname".to_owned(),
            node.to_owned(),
            "--etcd-bin".to_owned(),
            kiln_image::rootfs::ETCD.to_owned(),
            "--etcdctl-bin".to_owned(),
            kiln_image::rootfs::ETCDCTL.to_owned(),
        ];
        for p in state.control_plane() {
            cmd.push("--join-peer".into());
            cmd.push(p.address.to_string());
        }
        let boot_dir = format!("{VOLUMES_ROOT}/boot");
        let mut env = vec![];
        if state.network.airgapped {
            env.push(format!("{}=1", kiln_os_api::contract::NO_DEFAULT_ROUTE_ENV));
        }
        if section.volumes.len() == VOLUMES.len() {
            env.push(format!("{}={boot_dir}", kiln_os_api::slots::BOOT_DIR_ENV));
        }
        if me.inject_config {
            let config = std::fs::read(&me.config).map_err(|source| ProvisionError::Io {
                path: me.config.clone(),
                source,
            })?;
            use base64::Engine as _;
            env.push(format!(
                "{}={}",
                kiln_os_api::contract::CONFIG_DATA_ENV,
                base64::engine::general_purpose::STANDARD.encode(config)
            ));
        }
        let IpAddr::V4(address) = me.address else {
            return Err(ProvisionError::Unsupported {
                action: PowerAction::Start,
                reason: "the docker provisioner gives nodes IPv4 addresses only".into(),
            });
        };
        let body = ContainerCreateBody {
            image: Some(image),
            hostname: Some(node.to_owned()),
            cmd: Some(cmd),
            env: Some(env),
            labels: Some(labels),
            stop_timeout: Some(STOP_TIMEOUT),
            host_config: Some(HostConfig {
                binds: Some(mounts),
                cap_add: Some(NODE_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ON_FAILURE),
                    maximum_retry_count: Some(0),
                }),
                network_mode: Some(section.network.clone()),
                nano_cpus: section.cpus.map(|c| (c * 1e9) as i64),
                memory: section.memory_mib.map(|m| (m as i64) << 20),
                init: Some(false),
                ..Default::default()
            }),
            networking_config: Some(static_address(&section.network, address)),
            ..Default::default()
        };
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(section.container.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(api(
                &host,
                format!("creating container {}", section.container),
            ))?;
        // `--install-image`: the release `create` put into the host's boot directory of the
        // node goes into the container's boot volume before its first start.
        let seeded = crate::install::boot_dir(dir, node);
        if seeded.join(kiln_os_api::slots::RECORD).exists() {
            let tar = tokio::task::spawn_blocking(move || tar_of(&seeded))
                .await
                .map_err(|e| ProvisionError::Io {
                    path: crate::install::boot_dir(dir, node),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| ProvisionError::Io {
                    path: crate::install::boot_dir(dir, node),
                    source,
                })?;
            docker
                .upload_to_container(
                    &section.container,
                    Some(bollard::query_parameters::UploadToContainerOptions {
                        path: boot_dir.clone(),
                        ..Default::default()
                    }),
                    bollard::body_full(tar.into()),
                )
                .await
                .map_err(api(
                    &host,
                    format!("seeding the boot volume of {}", section.container),
                ))?;
        }
        docker
            .start_container(&section.container, None)
            .await
            .map_err(api(
                &host,
                format!("starting container {}", section.container),
            ))?;
        // One console follower per cluster copies `docker logs` into `<node>.log`.
        if !state.helpers.iter().any(|h| h.name == console::NAME) {
            state.helpers.push(HelperState {
                name: console::NAME.into(),
                kind: "console".into(),
            });
            dir.save(state)?;
            let args = vec![
                "cluster".to_owned(),
                "docker-console".to_owned(),
                "--state-dir".to_owned(),
                dir.dir.display().to_string(),
            ];
            crate::daemon::spawn(&args, &dir.log(console::NAME), &dir.pidfile(console::NAME))?;
        }
        Ok(())
    }

    async fn destroy(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError> {
        let mark = dir.owner_mark();
        let mut engines = Vec::new();
        for host in cluster_hosts(state) {
            match engine::connect(&host).await {
                Ok(d) => engines.push((host, d)),
                Err(EngineError::NoEngine { .. }) => progress.note(format!(
                    "no Docker engine at {host}: nothing of the cluster to remove there"
                )),
                Err(e) => return Err(unavailable(e)),
            }
        }
        // Every engine's containers before the network: a swarm's overlay network stays in
        // use while a container on any engine is attached.
        for (host, docker) in &engines {
            remove_containers(docker, host, &mark, progress).await?;
        }
        for (i, (host, docker)) in engines.iter().enumerate() {
            // A swarm's overlay network is removed on its manager, the first engine.
            remove_volumes_and_networks(docker, host, &mark, i == 0, progress).await?;
        }
        if state.network.lab_netns.is_some() {
            progress.phase("removing the route into the overlay network");
            swarm::remove_gateway_link(dir, state).await?;
        }
        Ok(())
    }

    async fn power(
        &self,
        _dir: &StateDir,
        state: &ClusterState,
        node: &str,
        action: PowerAction,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        let section = node_section(state, node);
        let host = section.host.clone();
        let docker = engine::connect(&host).await.map_err(unavailable)?;
        let c = section.container.as_str();
        let what = format!("{action:?} on container {c}");
        match action {
            PowerAction::Stop => {
                docker
                    .kill_container(
                        c,
                        Some(KillContainerOptions {
                            signal: "SIGKILL".into(),
                        }),
                    )
                    .await
                    .or_else(|e| match e {
                        // Already off.
                        bollard::errors::Error::DockerResponseServerError {
                            status_code: 409,
                            ..
                        } => Ok(()),
                        e => Err(e),
                    })
                    .map_err(api(&host, what))?;
            }
            PowerAction::Start => start_container(&docker, c)
                .await
                .map_err(api(&host, what))?,
            PowerAction::Reset => docker
                .restart_container(
                    c,
                    Some(RestartContainerOptions {
                        t: Some(0),
                        signal: Some("SIGKILL".into()),
                    }),
                )
                .await
                .map_err(api(&host, what))?,
            PowerAction::Pause => docker.pause_container(c).await.map_err(api(&host, what))?,
            PowerAction::Resume => docker
                .unpause_container(c)
                .await
                .map_err(api(&host, what))?,
            PowerAction::LinkDown | PowerAction::LinkUp => {
                let reason = if section.swarm {
                    DockerProvisioner::new(DockerOptions {
                        hosts: cluster_hosts(state),
                        ..Default::default()
                    })
                    .capabilities(state.network.mode)
                    .link_faults
                } else {
                    self.capabilities(state.network.mode).link_faults
                };
                if let Err(reason) = reason {
                    return Err(ProvisionError::Unsupported { action, reason });
                }
                let veth = host_veth(&docker, &host, c).await?;
                let handle = netlink::connect().map_err(|source| ProvisionError::Network {
                    cluster: state.name.clone(),
                    source,
                })?;
                netlink::set_link(&handle, &veth, action == PowerAction::LinkUp)
                    .await
                    .map_err(|source| ProvisionError::Network {
                        cluster: state.name.clone(),
                        source,
                    })?;
            }
        }
        status_of(&docker, &host, c, section.swarm).await
    }

    async fn status(
        &self,
        _dir: &StateDir,
        state: &ClusterState,
        node: &str,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        let section = node_section(state, node);
        let docker = engine::connect(&section.host).await.map_err(unavailable)?;
        status_of(&docker, &section.host, &section.container, section.swarm).await
    }
}

/// Removes the containers labelled with the cluster's `mark` on one engine.
async fn remove_containers(
    docker: &Docker,
    host: &str,
    mark: &str,
    progress: &Progress,
) -> Result<(), ProvisionError> {
    progress.phase(format!("removing containers on {host}"));
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(label_filter(mark)),
            ..Default::default()
        }))
        .await
        .map_err(api(host, "listing the cluster's containers"))?;
    for c in containers {
        let Some(id) = c.id else { continue };
        match docker
            .remove_container(
                &id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: false,
                    link: false,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api(host, format!("removing container {id}"))(e)),
        }
    }
    Ok(())
}

/// Removes the volumes and (with `networks`) networks labelled with the cluster's `mark` on
/// one engine, then its node images no container uses any more.
async fn remove_volumes_and_networks(
    docker: &Docker,
    host: &str,
    mark: &str,
    networks: bool,
    progress: &Progress,
) -> Result<(), ProvisionError> {
    progress.phase(format!("removing volumes on {host}"));
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(label_filter(mark)),
        }))
        .await
        .map_err(api(host, "listing the cluster's volumes"))?;
    for v in volumes.volumes.unwrap_or_default() {
        match docker
            .remove_volume(&v.name, Some(RemoveVolumeOptions { force: true }))
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api(host, format!("removing volume {}", v.name))(e)),
        }
    }
    if networks {
        progress.phase(format!("destroying the network on {host}"));
        let networks = docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(label_filter(mark)),
            }))
            .await
            .map_err(api(host, "listing the cluster's networks"))?;
        for n in networks {
            let Some(id) = n.id else { continue };
            // A swarm releases an overlay network's attachments on the other engines a moment
            // after their containers are gone ("in use by task").
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match docker.remove_network(&id).await {
                    Ok(()) => break,
                    Err(e) if is_not_found(&e) => break,
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 400,
                        message,
                    }) if message.contains("in use") && std::time::Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(api(host, format!("removing network {id}"))(e)),
                }
            }
        }
    }
    engine::remove_unused_node_images(docker).await;
    Ok(())
}

/// Attaches a container to `network` at `address`.
fn static_address(network: &str, address: std::net::Ipv4Addr) -> NetworkingConfig {
    NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            network.to_owned(),
            EndpointSettings {
                ipam_config: Some(EndpointIpamConfig {
                    ipv4_address: Some(address.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )])),
    }
}

/// Starts a container; one already running is fine (304).
async fn start_container(docker: &Docker, container: &str) -> Result<(), bollard::errors::Error> {
    match docker.start_container(container, None).await {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        r => r,
    }
}

/// A tar of the directory `dir`'s contents (paths relative to it).
fn tar_of(dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()
}

/// Power state, pid, boots and link of a container.
async fn status_of(
    docker: &Docker,
    host: &str,
    container: &str,
    swarm: bool,
) -> Result<NodeStatus, ProvisionError> {
    let info = docker
        .inspect_container(container, None)
        .await
        .map_err(api(host, format!("inspecting container {container}")))?;
    let st = info.state.unwrap_or_default();
    let power = if st.paused == Some(true) {
        PowerState::Paused
    } else if st.running == Some(true) {
        PowerState::Running
    } else {
        PowerState::Off
    };
    let pid = st
        .pid
        .filter(|p| *p > 0 && power != PowerState::Off)
        .and_then(|p| u32::try_from(p).ok());
    // On an overlay network the veth's peer is in the engine's overlay namespace, where an
    // interface of the same index on the host is another link.
    let veth = if swarm {
        None
    } else {
        host_veth(docker, host, container).await.ok()
    };
    let link_up = match (pid, veth) {
        (Some(_), Some(veth)) => std::fs::read_to_string(format!("/sys/class/net/{veth}/flags"))
            .ok()
            .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
            .is_none_or(|flags| flags & 1 == 1),
        _ => true,
    };
    Ok(NodeStatus {
        power,
        pid,
        boots: u32::try_from(info.restart_count.unwrap_or(0)).unwrap_or(0) + 1,
        link_up,
    })
}

/// The host side of a running container's veth: the host interface whose index is the
/// `iflink` of the container's non-loopback interface.
async fn host_veth(docker: &Docker, host: &str, container: &str) -> Result<String, ProvisionError> {
    let info = docker
        .inspect_container(container, None)
        .await
        .map_err(api(host, format!("inspecting container {container}")))?;
    let pid = info.state.and_then(|s| s.pid).filter(|p| *p > 0);
    let unsupported = |reason: String| ProvisionError::Unsupported {
        action: PowerAction::LinkDown,
        reason,
    };
    let Some(pid) = pid else {
        return Err(unsupported(format!("container {container} is not running")));
    };
    let net = format!("/proc/{pid}/root/sys/class/net");
    let read = |p: String| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let iflink = std::fs::read_dir(&net)
        .map_err(|e| unsupported(format!("reading {net}: {e}")))?
        .flatten()
        .filter(|e| e.file_name() != "lo")
        .find_map(|e| read(format!("{net}/{}/iflink", e.file_name().to_string_lossy())))
        .ok_or_else(|| unsupported(format!("container {container} has no interface but lo")))?;
    std::fs::read_dir("/sys/class/net")
        .map_err(|e| unsupported(format!("reading /sys/class/net: {e}")))?
        .flatten()
        .find(|e| {
            read(format!(
                "/sys/class/net/{}/ifindex",
                e.file_name().to_string_lossy()
            ))
            .as_deref()
                == Some(iflink.as_str())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .ok_or_else(|| {
            unsupported(format!(
                "no host interface with index {iflink} (the veth of {container})"
            ))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cluster_file::Resources;
    use crate::state::{NetworkMode, NetworkState, NodeState};

    #[test]
    fn a_node_with_resources_from_the_cluster_file_gets_them_and_others_the_flags() {
        let dir = StateDir::new(std::path::Path::new("/nonexistent"), "lab");
        let node = |name: &str, resources| NodeState {
            name: name.into(),
            role: kiln_config::MachineType::Worker,
            address: "10.5.0.3".parse().unwrap(),
            config: "/dev/null".into(),
            inject_config: true,
            provider: Default::default(),
            resources,
        };
        let mut state = ClusterState {
            name: "lab".into(),
            provisioner: NAME.into(),
            network: NetworkState {
                mode: NetworkMode::Bridge,
                cidr: "10.5.0.0/24".into(),
                gateway: "10.5.0.1".parse().unwrap(),
                bridge: None,
                mtu: 1500,
                firewall: vec![],
                airgapped: false,
                lab_netns: None,
            },
            nodes: vec![
                node(
                    "sized",
                    Some(Resources {
                        cpus: Some(3),
                        memory: Some(1536),
                    }),
                ),
                node("plain", None),
            ],
            helpers: vec![],
            endpoint: "https://10.5.0.1:6443".into(),
            created: String::new(),
        };
        let p = DockerProvisioner::new(DockerOptions {
            hosts: vec!["unix:///nonexistent.sock".into()],
            cpus: Some(0.5),
            memory_mib: None,
        });
        p.plan(&dir, &mut state);
        let sized: DockerNode = state.nodes[0].provider_state(NAME).unwrap();
        let plain: DockerNode = state.nodes[1].provider_state(NAME).unwrap();
        assert_eq!((sized.cpus, sized.memory_mib), (Some(3.0), Some(1536)));
        assert_eq!((plain.cpus, plain.memory_mib), (Some(0.5), None));
    }
}
