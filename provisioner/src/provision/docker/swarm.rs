//! Docker clusters spread over the engines of a Docker Swarm (`--docker-host A,B,...`).
//!
//! Nodes go round robin over the engines (node `i` on engine `i mod n`). The cluster network
//! is an attachable overlay network created on the first engine, which must be a Swarm manager;
//! every engine must be an active member of the same swarm.
//!
//! The host is not on an overlay network: its gateway address lives on a bridge inside each
//! engine's hidden overlay namespace. So the lab gets a foothold on it, the **gateway
//! container** (`<cluster>-gateway-<id>`, the node image running `machined --hold`) on the first
//! engine, at the cluster's gateway address (`.1`; Docker's own gateway of the overlay is moved
//! to the last address of the CIDR). Its network namespace is bind-mounted at
//! `/var/run/netns/kgw-<id>` and the lab's helpers (load balancer, registry) run in it
//! ([`crate::daemon::spawn_in`]), so nodes reach them at `.1` exactly as on a bridge. The
//! host reaches the cluster through a veth pair (`kg<id>` on the host, `lab0` in the gateway's
//! namespace, `169.254.250.1/30` and `.2`): a host route for the cluster CIDR through it, and
//! in the gateway's namespace forwarding and a masquerade to its overlay address, so nodes
//! answer `.1` (an address the overlay knows; other addresses get no ARP answer across
//! engines).
//!
//! Everything here is the cluster's by name and label: the container carries the cluster's
//! label (removed with the nodes), the veth and the namespace mount carry the cluster's id.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, LocalNodeState};
use bollard::query_parameters::CreateContainerOptions;

use super::{CLUSTER_LABEL, api, unavailable_reason};
use crate::network::netlink;
use crate::provision::ProvisionError;
use crate::state::{ClusterState, StateDir};

/// The host's end of the veth pair into the gateway's namespace.
pub const HOST_LINK: Ipv4Addr = Ipv4Addr::new(169, 254, 250, 1);
/// The gateway namespace's end.
pub const LAB_LINK: Ipv4Addr = Ipv4Addr::new(169, 254, 250, 2);
/// Prefix of both.
const LINK_PREFIX: u8 = 30;
/// The name of the veth's end inside the gateway's namespace.
const LAB_LINK_NAME: &str = "lab0";

/// The most an overlay network's MTU is: a 1500-byte link less VXLAN's 50 bytes.
pub const OVERLAY_MTU: u32 = 1450;

/// The gateway container's name.
pub fn gateway_container(dir: &StateDir, state: &ClusterState) -> String {
    format!("{}-gateway-{}", state.name, dir.id())
}

/// The name of the gateway's network namespace under `/var/run/netns`.
pub fn netns_name(dir: &StateDir) -> String {
    format!("kgw-{}", dir.id())
}

/// The host's end of the veth pair.
pub fn veth_name(dir: &StateDir) -> String {
    format!("kg{}", dir.id())
}

/// Docker's own gateway of the overlay network: the last host address of `cidr`, so the
/// lab's gateway address (the first) is free for the gateway container.
pub fn overlay_gateway(cidr: &str) -> Option<Ipv4Addr> {
    let (network, mask, _) = swarm_cidr(cidr)?;
    Some(Ipv4Addr::from((network | !mask) - 1))
}

/// The network address, mask and prefix of an IPv4 `cidr` a swarm cluster can use: `/28` or
/// larger (its last quarter goes to Docker, see [`overlay_dynamic_range`]).
fn swarm_cidr(cidr: &str) -> Option<(u32, u32, u32)> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u32 = prefix.parse().ok()?;
    if !(1..=28).contains(&prefix) {
        return None;
    }
    let mask = u32::MAX << (32 - prefix);
    Some((u32::from(addr) & mask, mask, prefix))
}

/// The range Docker allocates from on its own (the last quarter of `cidr`, `/28` or larger),
/// away from the addresses the lab gives: the swarm takes one address per engine for the
/// network's load-balancer endpoint, and without a range it takes the first free ones, the
/// nodes' (`Address already in use` when a node's container starts).
pub fn overlay_dynamic_range(cidr: &str) -> Option<(String, Ipv4Addr)> {
    let (network, _, prefix) = swarm_cidr(cidr)?;
    let quarter = 1u32 << (32 - prefix - 2);
    let start = network + 3 * quarter;
    Some((
        format!("{}/{}", Ipv4Addr::from(start), prefix + 2),
        Ipv4Addr::from(start),
    ))
}

/// Checks that every engine is an active member of one swarm and the first is a manager.
pub async fn check(engines: &[(String, Docker)]) -> Result<(), ProvisionError> {
    let mut ids = Vec::new();
    for (i, (host, docker)) in engines.iter().enumerate() {
        let info = docker
            .info()
            .await
            .map_err(api(host, "reading the engine's swarm state"))?;
        let swarm = info.swarm.unwrap_or_default();
        let state = swarm.local_node_state.unwrap_or(LocalNodeState::INACTIVE);
        if state != LocalNodeState::ACTIVE {
            return Err(unavailable_reason(format!(
                "engine {host} is not an active member of a Docker Swarm (its state is {:?}): several --docker-host engines spread a cluster over one swarm; run `docker -H {} swarm init` on the first engine and `docker swarm join` on the others",
                state.to_string(),
                engines[0].0
            )));
        }
        if i == 0 && swarm.control_available != Some(true) {
            return Err(unavailable_reason(format!(
                "engine {host} is not a Swarm manager: the first --docker-host creates the cluster's overlay network, so name a manager first"
            )));
        }
        ids.push((host.clone(), swarm.node_id.unwrap_or_default()));
    }
    let (first, docker) = &engines[0];
    let members: HashSet<String> = docker
        .list_nodes(None)
        .await
        .map_err(api(first, "listing the swarm's nodes"))?
        .into_iter()
        .filter_map(|n| n.id)
        .collect();
    for (host, id) in &ids {
        if !members.contains(id) {
            return Err(unavailable_reason(format!(
                "engine {host} is in another swarm than {first}: join it to {first}'s swarm (`docker swarm join-token worker` on {first})"
            )));
        }
    }
    Ok(())
}

/// Starts the gateway container on the overlay `network` of the first engine, mounts its
/// network namespace, links it to the host and routes the cluster through it.
pub async fn start_gateway(
    dir: &StateDir,
    state: &ClusterState,
    docker: &Docker,
    host: &str,
    network: &str,
    image: &str,
) -> Result<(), ProvisionError> {
    let name = gateway_container(dir, state);
    let IpAddr::V4(gateway) = state.network.gateway else {
        return Err(unavailable_reason(
            "the docker provisioner gives clusters IPv4 networks only".into(),
        ));
    };
    if docker.inspect_container(&name, None).await.is_err() {
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            hostname: Some(name.clone()),
            cmd: Some(vec![kiln_os_api::contract::HOLD_ARG.to_owned()]),
            labels: Some(HashMap::from([(
                CLUSTER_LABEL.to_owned(),
                dir.owner_mark(),
            )])),
            host_config: Some(HostConfig {
                network_mode: Some(network.to_owned()),
                // It forwards between the host's veth and the overlay.
                sysctls: Some(HashMap::from([(
                    "net.ipv4.ip_forward".to_owned(),
                    "1".to_owned(),
                )])),
                init: Some(false),
                ..Default::default()
            }),
            networking_config: Some(super::static_address(network, gateway)),
            ..Default::default()
        };
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(api(host, format!("creating the gateway container {name}")))?;
    }
    super::start_container(docker, &name)
        .await
        .map_err(api(host, format!("starting the gateway container {name}")))?;
    let pid = docker
        .inspect_container(&name, None)
        .await
        .map_err(api(
            host,
            format!("inspecting the gateway container {name}"),
        ))?
        .state
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            unavailable_reason(format!("the gateway container {name} is not running"))
        })?;
    let ns = netns_name(dir);
    mount_netns(pid, &ns)?;
    let net_err = |source| ProvisionError::Network {
        cluster: state.name.clone(),
        source,
    };
    let handle = netlink::connect().map_err(net_err)?;
    netlink::create_routed_link(
        &handle,
        &netlink::RoutedLink {
            netns: ns.clone(),
            veth: veth_name(dir),
            inside: LAB_LINK_NAME.to_owned(),
            host_address: HOST_LINK,
            inside_address: LAB_LINK,
            prefix: LINK_PREFIX,
            mtu: state.network.mtu.min(OVERLAY_MTU),
            routed: state.network.cidr.clone(),
        },
    )
    .await
    .map_err(net_err)?;
    masquerade(&ns, &state.network.cidr)
}

/// Bind-mounts `/proc/<pid>/ns/net` at `/var/run/netns/<name>` (what `ip netns attach` does),
/// so the namespace has a name helpers and netlink can open.
fn mount_netns(pid: i64, name: &str) -> Result<(), ProvisionError> {
    let dir = std::path::Path::new("/var/run/netns");
    let target = dir.join(name);
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| ProvisionError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if std::fs::metadata(&target).is_ok() {
        // A mount left by a create killed halfway: replaced.
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&target);
    }
    std::fs::File::create(&target).map_err(io(&target))?;
    let source = format!("/proc/{pid}/ns/net");
    nix::mount::mount(
        Some(source.as_str()),
        &target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ProvisionError::Io {
        path: target.clone(),
        source: std::io::Error::from(e),
    })
}

/// Masquerades what the host sends through the gateway's namespace to the cluster, so nodes
/// answer the gateway's address.
fn masquerade(ns: &str, cidr: &str) -> Result<(), ProvisionError> {
    let from = format!("{}/{LINK_PREFIX}", HOST_LINK);
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args([
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            &from,
            "-d",
            cidr,
        ])
        .args(["-j", "MASQUERADE"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| ProvisionError::Io {
            path: "nsenter".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(unavailable_reason(format!(
            "adding the masquerade in the gateway's namespace {ns} (iptables): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Removes the host's veth (its route goes with it) and the namespace mount. Missing pieces
/// are fine: destroy is idempotent.
pub async fn remove_gateway_link(
    dir: &StateDir,
    state: &ClusterState,
) -> Result<(), ProvisionError> {
    let net_err = |source| ProvisionError::Network {
        cluster: state.name.clone(),
        source,
    };
    let handle = netlink::connect().map_err(net_err)?;
    netlink::delete_link(&handle, &veth_name(dir))
        .await
        .map_err(net_err)?;
    let target = std::path::Path::new("/var/run/netns").join(netns_name(dir));
    if std::fs::symlink_metadata(&target).is_ok() {
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        std::fs::remove_file(&target).map_err(|source| ProvisionError::Io {
            path: target.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn docker_takes_the_last_address_of_the_overlay_and_leaves_the_first_to_the_lab() {
        assert_eq!(
            overlay_gateway("10.5.0.0/24"),
            Some(Ipv4Addr::new(10, 5, 0, 254))
        );
        assert_eq!(
            overlay_gateway("10.6.0.0/16"),
            Some(Ipv4Addr::new(10, 6, 255, 254))
        );
        assert_eq!(overlay_gateway("10.5.0.0/31"), None);
        assert_eq!(
            overlay_dynamic_range("10.5.0.0/24"),
            Some(("10.5.0.192/26".to_owned(), Ipv4Addr::new(10, 5, 0, 192)))
        );
        assert_eq!(
            overlay_dynamic_range("10.6.0.0/16"),
            Some(("10.6.192.0/18".to_owned(), Ipv4Addr::new(10, 6, 192, 0)))
        );
        assert_eq!(overlay_dynamic_range("10.7.1.0/29"), None);
        assert_eq!(overlay_gateway("nonsense"), None);
    }
}
