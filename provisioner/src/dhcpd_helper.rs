//! The cluster's DHCP server as a helper process: `kiln dhcpd run` on the cluster bridge,
//! with a static lease per node (MAC → address, host name, MTU, gateway, DNS), its
//! configuration (`dhcpd.yaml`), pid file and log in the state directory and its lease
//! journal in `dhcpd/`. Provisioners whose nodes configure their network by DHCP (QEMU) start
//! it; `kiln cluster show` lists its leases.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use kiln_dhcpd::{Config, Lease, Mac, StaticLease};

use crate::daemon;
use crate::output;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, StateDir};

/// The helper's name (`dhcpd.pid`, `dhcpd.log`, `dhcpd.yaml`).
pub const NAME: &str = "dhcpd";

/// The directory of the lease journal.
pub fn lease_dir(dir: &StateDir) -> PathBuf {
    dir.dir.join(NAME)
}

/// The MAC address of a node: `52:54:00` (QEMU's prefix) and three bytes derived from the
/// cluster and node names, so that a node keeps its MAC (and so its lease) across reboots and
/// two clusters side by side do not collide in practice.
pub fn node_mac(cluster: &str, node: &str) -> Mac {
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in cluster.bytes().chain([b'/']).chain(node.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    Mac([0x52, 0x54, 0x00, a, b, c])
}

/// The DHCP configuration of a cluster: the gateway is the server, router and DNS server;
/// every IPv4 node has a static lease with its name as host name.
pub fn config(state: &ClusterState) -> anyhow::Result<Config> {
    let IpAddr::V4(gateway) = state.network.gateway else {
        anyhow::bail!(
            "the cluster gateway {} is not IPv4: the lab's DHCP server is IPv4 only; use an IPv4 --cidr",
            state.network.gateway
        );
    };
    let subnet: ipnetwork::Ipv4Network = state.network.cidr.parse().with_context(|| {
        format!(
            "the cluster CIDR {} is not an IPv4 network",
            state.network.cidr
        )
    })?;
    let mut config = Config::new(gateway, kiln_dhcpd::config::trunc(subnet));
    // Air-gapped nodes get no route beyond the cluster network.
    config.router = (!state.network.airgapped).then_some(gateway);
    config.dns_servers = vec![gateway];
    config.mtu = u16::try_from(state.network.mtu).ok();
    config.static_leases = state
        .nodes
        .iter()
        .filter_map(|n| match n.address {
            IpAddr::V4(a) => Some((n, a)),
            IpAddr::V6(_) => None,
        })
        .map(|(n, address)| StaticLease {
            mac: node_mac(&state.name, &n.name),
            address,
            hostname: Some(n.name.clone()),
            mtu: None,
            router: None,
            dns_servers: None,
        })
        .collect();
    config.validate()?;
    Ok(config)
}

/// Starts the DHCP server on the cluster bridge and records it as a helper.
pub fn start(dir: &StateDir, state: &mut ClusterState, progress: &Progress) -> anyhow::Result<()> {
    let Some(bridge) = state.network.bridge.clone() else {
        anyhow::bail!(
            "the DHCP server needs the cluster bridge, and this cluster has none (loopback mode: run as root)"
        );
    };
    let path = dir.dir.join(format!("{NAME}.yaml"));
    let config = config(state)?;
    config.save(&path)?;
    state.helpers.push(HelperState {
        name: NAME.to_owned(),
        kind: "dhcp".to_owned(),
    });
    dir.save(state)?;
    let args: Vec<String> = vec![
        "dhcpd".into(),
        "run".into(),
        "--config".into(),
        path.display().to_string(),
        "--state-dir".into(),
        lease_dir(dir).display().to_string(),
        "--interface".into(),
        bridge.clone(),
    ];
    daemon::spawn(&args, &dir.log(NAME), &dir.pidfile(NAME))?;
    progress.note(format!(
        "DHCP on {bridge} with {} static leases",
        config.static_leases.len()
    ));
    Ok(())
}

/// The live leases, as the server last recorded them.
pub fn leases(dir: &StateDir) -> anyhow::Result<Vec<Lease>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(kiln_dhcpd::lease::current_leases(&lease_dir(dir), now)?)
}

/// Renders leases (`kiln cluster show`).
pub fn table(leases: &[Lease]) -> String {
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            let expiry = time::OffsetDateTime::from_unix_timestamp(l.expires as i64)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| l.expires.to_string());
            vec![
                l.mac.to_string(),
                l.address.to_string(),
                l.hostname.clone().unwrap_or_else(|| "-".into()),
                expiry,
            ]
        })
        .collect();
    output::table(&["MAC", "ADDRESS", "HOST NAME", "EXPIRES"], &rows)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

    use crate::state::{NetworkMode, NetworkState, NodeState};

    fn state() -> ClusterState {
        let node = |name: &str, role: kiln_config::MachineType, address: &str| NodeState {
            name: name.into(),
            role,
            address: address.parse().unwrap(),
            config: PathBuf::from("/dev/null"),
            inject_config: true,
            provider: Default::default(),
            resources: None,
        };
        ClusterState {
            name: "lab".into(),
            provisioner: "qemu".into(),
            network: NetworkState {
                mode: NetworkMode::Bridge,
                cidr: "10.5.0.0/24".into(),
                gateway: "10.5.0.1".parse().unwrap(),
                bridge: Some("kiln-lab".into()),
                mtu: 1450,
                firewall: vec![],
                airgapped: false,
                lab_netns: None,
            },
            nodes: vec![
                node("cp-1", kiln_config::MachineType::Controlplane, "10.5.0.2"),
                node("w-1", kiln_config::MachineType::Worker, "10.5.0.3"),
            ],
            helpers: vec![],
            endpoint: "https://10.5.0.1:6443".into(),
            created: String::new(),
        }
    }

    #[test]
    fn every_node_gets_a_static_lease_with_the_lab_options() {
        let c = config(&state()).unwrap();
        assert_eq!(c.server_address, Ipv4Addr::new(10, 5, 0, 1));
        assert_eq!(c.router, Some(Ipv4Addr::new(10, 5, 0, 1)));
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(c.static_leases.len(), 2);
        assert_eq!(c.static_leases[0].hostname.as_deref(), Some("cp-1"));
        assert_eq!(c.static_leases[0].mac, node_mac("lab", "cp-1"));
        assert_ne!(node_mac("lab", "cp-1"), node_mac("lab", "w-1"));
        assert_ne!(node_mac("lab", "cp-1"), node_mac("lab-2", "cp-1"));
        assert_eq!(node_mac("lab", "cp-1"), node_mac("lab", "cp-1"));
    }
}
