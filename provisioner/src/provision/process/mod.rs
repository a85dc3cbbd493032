//! The `process` provisioner: every node is `kiln machined` under a node launcher (its power
//! switch, [`launcher`]); as root the nodes live in network namespaces with a veth pair into
//! the cluster bridge, otherwise on 127.x addresses.
//!
//! Ownership: the bridge and each host-side veth carry the cluster's owner mark as their
//! alias, and are deleted only while they do; namespaces are the ones named in `state.yaml`,
//! which `create` refuses to reuse when they already exist; processes are found by pid file
//! and start time.

pub mod launcher;

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use kiln_os_api::wait::{Poll, until};
use serde::{Deserialize, Serialize};

use super::{Capabilities, NodeStatus, PowerAction, ProvisionError, Provisioner, require_node};
use crate::daemon;
use crate::network::netlink;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, NetworkMode, StateDir};

/// The provisioner's name, also the key of its section in each node's state.
pub const NAME: &str = "process";

/// See the module documentation.
#[derive(Debug)]
pub struct ProcessProvisioner;

/// What the process provisioner makes for one node (its section in `state.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessNode {
    /// Network namespace (bridge mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Host side of its veth pair (bridge mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
}

/// The launcher helper of `node` (`<node>-launcher.pid`, `<node>-launcher.log`).
pub fn launcher_name(node: &str) -> String {
    format!("{node}-launcher")
}

/// Bridge name of a cluster: `kiln` and 8 hex digits of its identity (15 characters at most,
/// the kernel's limit).
pub fn bridge_name(dir: &StateDir) -> String {
    format!("kiln{}", dir.id())
}

/// Host-side veth name of node `index`: `kv`, 6 hex digits of the cluster identity, `n`, index.
pub fn veth_name(dir: &StateDir, index: usize) -> String {
    format!("kv{}n{index}", &dir.id()[2..])
}

/// Network namespace of a node: `kiln-<node>` (node names start with the cluster name).
pub fn netns_name(node: &str) -> String {
    format!("kiln-{node}")
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new(&format!("/var/run/netns/{name}")).exists()
}

fn network_error(cluster: &str) -> impl FnOnce(netlink::NetlinkError) -> ProvisionError + '_ {
    move |source| ProvisionError::Network {
        cluster: cluster.to_owned(),
        source,
    }
}

#[async_trait]
impl Provisioner for ProcessProvisioner {
    fn name(&self) -> &'static str {
        NAME
    }

    fn network_mode(&self) -> Result<NetworkMode, ProvisionError> {
        Ok(if nix::unistd::Uid::effective().is_root() {
            NetworkMode::Bridge
        } else {
            NetworkMode::Loopback
        })
    }

    fn capabilities(&self, mode: NetworkMode) -> Capabilities {
        Capabilities {
            link_faults: match mode {
                NetworkMode::Bridge => Ok(()),
                NetworkMode::Loopback => Err(
                    "cutting a node's link needs the bridge network, which needs root (nodes share the loopback otherwise)"
                        .to_owned(),
                ),
            },
            pause: Ok(()),
            slots: Ok(()),
            airgap: Ok(()),
        }
    }

    fn plan(&self, dir: &StateDir, state: &mut ClusterState) {
        let bridge = state.network.mode == NetworkMode::Bridge;
        state.network.bridge = bridge.then(|| bridge_name(dir));
        for (i, n) in state.nodes.iter_mut().enumerate() {
            let node = ProcessNode {
                netns: bridge.then(|| netns_name(&n.name)),
                veth: bridge.then(|| veth_name(dir, i)),
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
        let cluster = state.name.as_str();
        let (Some(bridge), IpAddr::V4(gw)) = (&state.network.bridge, state.network.gateway) else {
            progress.note(format!(
                "no root: nodes use loopback addresses {}..",
                state
                    .nodes
                    .first()
                    .map(|n| n.address.to_string())
                    .unwrap_or_default()
            ));
            return Ok(());
        };
        let mark = dir.owner_mark();
        let handle = netlink::connect().map_err(network_error(cluster))?;
        // Nothing of another cluster is reused: refuse before making anything.
        let mut links = vec![bridge.clone()];
        for n in &state.nodes {
            let p: ProcessNode = n.provider_state(NAME).unwrap_or_default();
            if let Some(ns) = &p.netns
                && netns_exists(ns)
            {
                return Err(ProvisionError::Taken {
                    object: format!("network namespace {ns}"),
                    cluster: cluster.to_owned(),
                    found: "a namespace of another cluster with this name, or one left by hand"
                        .into(),
                    fix: format!(
                        "destroy the other cluster called {cluster} (another --state?), remove it with `ip netns del {ns}`, or choose another --name"
                    ),
                });
            }
            links.extend(p.veth);
        }
        for l in &links {
            if let Some(alias) = netlink::alias_of(&handle, l)
                .await
                .map_err(network_error(cluster))?
                && alias != mark
            {
                return Err(ProvisionError::Taken {
                    object: format!("link {l}"),
                    cluster: cluster.to_owned(),
                    found: if alias.is_empty() {
                        "no owner mark".to_owned()
                    } else {
                        format!("marked {alias:?}")
                    },
                    fix: format!("remove it with `ip link del {l}` if nothing uses it"),
                });
            }
        }
        let prefix = state
            .network
            .cidr
            .parse::<ipnetwork::Ipv4Network>()
            .map(|n| n.prefix())
            .unwrap_or(24);
        netlink::create_bridge(&handle, bridge, gw, prefix, state.network.mtu)
            .await
            .map_err(network_error(cluster))?;
        netlink::set_alias(&handle, bridge, &mark)
            .await
            .map_err(network_error(cluster))?;
        for n in &state.nodes {
            let p: ProcessNode = n.provider_state(NAME).unwrap_or_default();
            let (IpAddr::V4(address), Some(netns), Some(veth)) = (n.address, p.netns, p.veth)
            else {
                continue;
            };
            netlink::create_node(
                &handle,
                &netlink::NodeLink {
                    netns,
                    veth: veth.clone(),
                    bridge: bridge.clone(),
                    address,
                    prefix,
                    gateway: gw,
                    default_route: !state.network.airgapped,
                    mtu: state.network.mtu,
                },
            )
            .await
            .map_err(network_error(cluster))?;
            netlink::set_alias(&handle, &veth, &mark)
                .await
                .map_err(network_error(cluster))?;
        }
        Ok(())
    }

    async fn start_node(
        &self,
        dir: &StateDir,
        state: &mut ClusterState,
        node: &str,
    ) -> Result<(), ProvisionError> {
        let name = launcher_name(node);
        state.helpers.push(HelperState {
            name: name.clone(),
            kind: "node-launcher".into(),
        });
        dir.save(state)?;
        let args = vec![
            "cluster".to_owned(),
            "launch-node".to_owned(),
            "--state-dir".to_owned(),
            dir.dir.display().to_string(),
            "--node".to_owned(),
            node.to_owned(),
        ];
        daemon::spawn(&args, &dir.log(&name), &dir.pidfile(&name))?;
        // The launcher answers before create goes on.
        let socket = dir.socket(node);
        until(
            format!("the launcher of {node}"),
            Poll::every(Duration::from_millis(50), Duration::from_secs(20)),
            || launcher::send(&socket, launcher::Command::Status),
        )
        .await
        .map_err(|t| ProvisionError::Launcher {
            node: node.to_owned(),
            source: launcher::LauncherError::NotStarted {
                log: dir.log(&name),
                last: t.last.map(|e| e.to_string()).unwrap_or_default(),
            },
        })?;
        Ok(())
    }

    async fn destroy(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError> {
        progress.phase("stopping nodes");
        // Launchers first (they power their nodes off), then any node whose launcher is gone.
        std::thread::scope(|s| {
            for n in &state.nodes {
                s.spawn(|| {
                    daemon::stop_pidfile(
                        &dir.pidfile(&launcher_name(&n.name)),
                        Duration::from_secs(10),
                    );
                    daemon::stop_pidfile(&dir.pidfile(&n.name), Duration::from_secs(5));
                });
            }
        });
        for n in &state.nodes {
            let _ = std::fs::remove_file(dir.socket(&n.name));
        }
        if state.network.mode == NetworkMode::Bridge {
            progress.phase(format!("destroying network {}", state.name));
            let cluster = state.name.as_str();
            let mark = dir.owner_mark();
            let handle = netlink::connect().map_err(network_error(cluster))?;
            for n in &state.nodes {
                let p: ProcessNode = n.provider_state(NAME).unwrap_or_default();
                if let Some(veth) = &p.veth
                    && !netlink::delete_marked_link(&handle, veth, &mark)
                        .await
                        .map_err(network_error(cluster))?
                    && netlink::alias_of(&handle, veth)
                        .await
                        .ok()
                        .flatten()
                        .is_some()
                {
                    progress.note(format!("left link {veth} alone: it is not marked {mark}"));
                }
                if let Some(ns) = &p.netns {
                    netlink::delete_netns(ns)
                        .await
                        .map_err(network_error(cluster))?;
                }
            }
            if let Some(bridge) = &state.network.bridge
                && !netlink::delete_marked_link(&handle, bridge, &mark)
                    .await
                    .map_err(network_error(cluster))?
                && netlink::alias_of(&handle, bridge)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            {
                progress.note(format!(
                    "left bridge {bridge} alone: it is not marked {mark}"
                ));
            }
        }
        Ok(())
    }

    async fn power(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
        action: PowerAction,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        if matches!(action, PowerAction::LinkDown | PowerAction::LinkUp)
            && let Err(reason) = self.capabilities(state.network.mode).link_faults
        {
            return Err(ProvisionError::Unsupported { action, reason });
        }
        launcher::send(&dir.socket(node), launcher::Command::from(action))
            .await
            .map_err(|source| ProvisionError::Launcher {
                node: node.to_owned(),
                source,
            })
    }

    async fn status(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        launcher::send(&dir.socket(node), launcher::Command::Status)
            .await
            .map_err(|source| ProvisionError::Launcher {
                node: node.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_and_differ_per_state_directory() {
        let a = StateDir::new(
            std::path::Path::new("/tmp/one"),
            "a-very-long-cluster-name-indeed",
        );
        let b = StateDir::new(
            std::path::Path::new("/tmp/two"),
            "a-very-long-cluster-name-indeed",
        );
        assert!(bridge_name(&a).len() <= 15);
        assert!(veth_name(&a, 29).len() <= 15);
        assert_ne!(bridge_name(&a), bridge_name(&b), "same name, other --state");
        let c = StateDir::new(std::path::Path::new("/tmp/one"), "a");
        let d = StateDir::new(std::path::Path::new("/tmp/one"), "a-2");
        assert_ne!(veth_name(&c, 0), veth_name(&d, 0));
    }
}
