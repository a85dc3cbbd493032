//! The `process` provisioner: every node is `kiln machined` under a node launcher; as root the
//! nodes live in network namespaces on a bridge, otherwise on 127.x addresses.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;

use super::{CreateRequest, PowerAction, Provisioner};
use crate::daemon;
use crate::launcher::{self, LauncherStatus};
use crate::network::{self, netlink};
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, NetworkMode, NetworkState, NodeState, StateDir};

/// See the module documentation.
#[derive(Debug)]
pub struct ProcessProvisioner;

fn launcher_name(node: &str) -> String {
    format!("{node}-launcher")
}

#[async_trait]
impl Provisioner for ProcessProvisioner {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn create(
        &self,
        req: &CreateRequest,
        progress: &Progress,
    ) -> anyhow::Result<ClusterState> {
        let dir = &req.dir;
        progress.phase(format!(
            "creating state directory in {:?}",
            dir.dir.display().to_string()
        ));
        std::fs::create_dir_all(&dir.dir)
            .with_context(|| format!("creating {}", dir.dir.display()))?;
        let bridge_mode = req.plan.mode == NetworkMode::Bridge;
        let mut state = ClusterState {
            name: req.name.clone(),
            provisioner: self.name().to_owned(),
            network: NetworkState {
                mode: req.plan.mode,
                cidr: req.plan.cidr.to_string(),
                gateway: req.plan.gateway,
                bridge: bridge_mode.then(|| network::bridge_name(&req.name)),
                mtu: req.mtu,
            },
            nodes: req
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| NodeState {
                    name: n.name.clone(),
                    role: n.role.clone(),
                    address: n.address,
                    netns: bridge_mode.then(|| network::netns_name(&n.name)),
                    veth: bridge_mode.then(|| network::veth_name(&req.name, i)),
                    config: dir.dir.join(format!("{}.yaml", n.name)),
                    inject_config: n.inject_config,
                })
                .collect(),
            helpers: Vec::new(),
            endpoint: req.endpoint.clone(),
            created: time_now(),
        };
        // Saved before anything else exists, so destroy knows what to look for.
        dir.save(&state)?;
        for (name, content) in &req.files {
            let path = dir.dir.join(name);
            kiln_config::client::write_private(&path, content.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        for (n, r) in state.nodes.iter().zip(&req.nodes) {
            kiln_config::client::write_private(&n.config, r.config.as_bytes())
                .with_context(|| format!("writing {}", n.config.display()))?;
        }

        progress.phase(format!("creating network {}", req.name));
        if bridge_mode {
            let handle = netlink::connect()?;
            let (IpAddr::V4(gw), bridge) = (
                state.network.gateway,
                state.network.bridge.clone().unwrap_or_default(),
            ) else {
                anyhow::bail!("IPv6 networks are not supported yet");
            };
            let prefix = req.plan.cidr.prefix_len();
            netlink::create_bridge(&handle, &bridge, gw, prefix, req.mtu).await?;
            for n in &state.nodes {
                let IpAddr::V4(address) = n.address else {
                    continue;
                };
                netlink::create_node(
                    &handle,
                    &netlink::NodeLink {
                        netns: n.netns.clone().unwrap_or_default(),
                        veth: n.veth.clone().unwrap_or_default(),
                        bridge: bridge.clone(),
                        address,
                        prefix,
                        gateway: gw,
                        mtu: req.mtu,
                    },
                )
                .await?;
            }
        } else {
            progress.note(format!(
                "no root: nodes use loopback addresses {}..",
                state
                    .nodes
                    .first()
                    .map(|n| n.address.to_string())
                    .unwrap_or_default()
            ));
        }

        progress.phase("creating load balancer");
        crate::lb_helper::start(dir, &mut state, progress)?;
        dir.save(&state)?;

        for (phase, role) in [
            ("creating control-plane nodes", "controlplane"),
            ("creating worker nodes", "worker"),
        ] {
            progress.phase(phase);
            let nodes: Vec<NodeState> = state
                .nodes
                .iter()
                .filter(|n| n.role == role)
                .cloned()
                .collect();
            for n in nodes {
                let name = launcher_name(&n.name);
                state.helpers.push(HelperState {
                    name: name.clone(),
                    kind: "node-launcher".into(),
                });
                dir.save(&state)?;
                let args = vec![
                    "cluster".to_owned(),
                    "launch-node".to_owned(),
                    "--state-dir".to_owned(),
                    dir.dir.display().to_string(),
                    "--node".to_owned(),
                    n.name.clone(),
                ];
                daemon::spawn(&args, &dir.log(&name), &dir.pidfile(&name))?;
                progress.note(format!("{} ({}) at {}", n.name, n.role, n.address));
            }
        }
        // Every launcher answers before create goes on.
        for n in &state.nodes {
            let socket = dir.socket(&n.name);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                match launcher::send(&socket, "status").await {
                    Ok(_) => break,
                    Err(e) if std::time::Instant::now() > deadline => {
                        return Err(e).with_context(|| {
                            format!(
                                "the launcher of {} did not start; see {}",
                                n.name,
                                dir.log(&launcher_name(&n.name)).display()
                            )
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(state)
    }

    async fn destroy(
        &self,
        dir: &StateDir,
        cluster: &str,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let state = dir.load().ok();
        let marker = daemon::marker(&dir.dir);
        progress.phase("stopping nodes and helpers");
        // Launchers first (they power their nodes off), then anything else that mentions the
        // state directory (the load balancer, orphans of a crashed create).
        if let Ok(entries) = std::fs::read_dir(&dir.dir) {
            let pidfiles: Vec<_> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "pid"))
                .collect();
            let launchers: Vec<_> = pidfiles
                .iter()
                .filter(|p| p.to_string_lossy().ends_with("-launcher.pid"))
                .collect();
            let pids: Vec<i32> = launchers
                .iter()
                .filter_map(|p| daemon::running_pid(p, &marker))
                .collect();
            std::thread::scope(|s| {
                for pid in pids {
                    s.spawn(move || daemon::stop(pid, Duration::from_secs(10)));
                }
            });
        }
        for _ in 0..3 {
            let left = daemon::processes_mentioning(&marker);
            if left.is_empty() {
                break;
            }
            std::thread::scope(|s| {
                for (pid, _) in left {
                    s.spawn(move || daemon::stop(pid, Duration::from_secs(5)));
                }
            });
        }
        // Processes that do not mention the directory but are children of ours (etcd) die with
        // machined (parent-death signal); wait briefly for them.
        progress.phase(format!("destroying network {cluster}"));
        if nix::unistd::Uid::effective().is_root() {
            let handle = netlink::connect()?;
            let bridge = state
                .as_ref()
                .and_then(|s| s.network.bridge.clone())
                .unwrap_or_else(|| network::bridge_name(cluster));
            let mut veths: Vec<String> = state
                .as_ref()
                .map(|s| s.nodes.iter().filter_map(|n| n.veth.clone()).collect())
                .unwrap_or_default();
            let prefix = network::veth_name(cluster, 0);
            let prefix = prefix
                .trim_end_matches('0')
                .trim_end_matches('n')
                .to_owned();
            veths.extend(netlink::links_with_prefix(&handle, &prefix).await?);
            veths.sort();
            veths.dedup();
            for v in veths {
                netlink::delete_link(&handle, &v).await?;
            }
            netlink::delete_link(&handle, &bridge).await?;
            let ns_prefix = network::netns_name(&format!("{cluster}-"));
            if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
                for e in entries.filter_map(Result::ok) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&ns_prefix) {
                        netlink::delete_netns(&name).await?;
                    }
                }
            }
        }
        // Sockets that live outside the state directory (long paths) go too.
        if let Some(state) = &state {
            for n in &state.nodes {
                let _ = std::fs::remove_file(dir.socket(&n.name));
            }
        }
        let _ = std::fs::remove_file(dir.socket(crate::lb_helper::NAME));
        progress.phase(format!("removing state directory {}", dir.dir.display()));
        match std::fs::remove_dir_all(&dir.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", dir.dir.display()))
            }
            _ => Ok(()),
        }
    }

    async fn node_power(
        &self,
        dir: &StateDir,
        node: &str,
        action: PowerAction,
    ) -> anyhow::Result<LauncherStatus> {
        launcher::send(&dir.socket(node), action.command()).await
    }

    async fn node_status(&self, dir: &StateDir, node: &str) -> anyhow::Result<LauncherStatus> {
        launcher::send(&dir.socket(node), "status").await
    }
}

fn time_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
