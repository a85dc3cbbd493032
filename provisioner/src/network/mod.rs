//! The cluster network: checking the CIDR, reserving addresses, and (as root) the bridge,
//! namespaces and veth pairs; without root, 127.x addresses on the loopback.

pub mod netlink;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::Ipv4Net;

use crate::state::NetworkMode;

/// Addresses reserved for a cluster.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Bridge or loopback.
    pub mode: NetworkMode,
    /// The CIDR.
    pub cidr: Ipv4Net,
    /// Gateway: the bridge address, where the load balancer listens.
    pub gateway: IpAddr,
    /// Node addresses in order.
    pub nodes: Vec<IpAddr>,
}

/// Why a CIDR cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Not an IPv4 CIDR.
    #[error("--cidr {0:?} is not an IPv4 CIDR; write e.g. 10.5.0.0/24")]
    Invalid(String),
    /// Too small for the nodes.
    #[error(
        "--cidr {cidr} has room for {room} nodes but {wanted} are asked for; use a larger network, e.g. /24"
    )]
    TooSmall {
        /// The CIDR.
        cidr: String,
        /// Usable node addresses.
        room: usize,
        /// Nodes wanted.
        wanted: usize,
    },
    /// Overlaps a route of this host.
    #[error(
        "--cidr {cidr} overlaps the host route {route} (dev {dev}); choose another range with --cidr, e.g. --cidr {suggestion}"
    )]
    HostRoute {
        /// The CIDR.
        cidr: String,
        /// The route.
        route: String,
        /// Its device.
        dev: String,
        /// A free range.
        suggestion: String,
    },
    /// Overlaps another cluster.
    #[error(
        "--cidr {cidr} overlaps cluster {other:?} ({other_cidr}); choose another range with --cidr, e.g. --cidr {suggestion}"
    )]
    OtherCluster {
        /// The CIDR.
        cidr: String,
        /// The other cluster.
        other: String,
        /// Its CIDR.
        other_cidr: String,
        /// A free range.
        suggestion: String,
    },
}

/// IPv4 routes of this host (destination, device), from /proc/net/route.
pub fn host_routes() -> Vec<(Ipv4Net, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            let dest = Ipv4Addr::from(u32::from_be(dest));
            let prefix = u32::from_be(mask).leading_ones() as u8;
            if prefix == 0 {
                return None; // the default route overlaps everything; it is not a conflict
            }
            Some((Ipv4Net::new(dest, prefix).ok()?, (*f.first()?).to_owned()))
        })
        .collect()
}

/// CIDRs of the other clusters under `base`.
pub fn other_clusters(base: &Path, except: &str) -> Vec<(String, Ipv4Net)> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy() != except)
        .filter_map(|e| {
            let state = crate::state::StateDir { dir: e.path() }.load().ok()?;
            Some((state.name, state.network.cidr.parse().ok()?))
        })
        .collect()
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A free /24 in 10.5.0.0/16 .. 10.254.0.0/16 for suggestions.
fn suggest(taken: &[Ipv4Net]) -> String {
    for second in 5u8..=254 {
        for third in 0u8..=255 {
            let Ok(net) = Ipv4Net::new(Ipv4Addr::new(10, second, third, 0), 24) else {
                continue;
            };
            if !taken.iter().any(|t| overlaps(t, &net)) {
                return net.to_string();
            }
        }
    }
    "10.99.0.0/24".to_owned()
}

/// Checks `cidr` and reserves the gateway and `count` node addresses.
pub fn plan(
    cidr: &str,
    count: usize,
    mode: NetworkMode,
    base: &Path,
    cluster: &str,
) -> Result<Plan, PlanError> {
    let net: Ipv4Net = cidr
        .parse()
        .map_err(|_| PlanError::Invalid(cidr.to_owned()))?;
    let net = net.trunc();
    let mut taken: Vec<Ipv4Net> = Vec::new();
    let others = other_clusters(base, cluster);
    taken.extend(others.iter().map(|(_, n)| *n));
    if mode == NetworkMode::Bridge {
        let routes = host_routes();
        taken.extend(routes.iter().map(|(n, _)| *n));
        // Our own bridge from an earlier, destroyed-but-leftover run is not a conflict: the
        // bridge name is checked when it is created.
        if let Some((route, dev)) = routes.iter().find(|(r, _)| overlaps(r, &net)) {
            return Err(PlanError::HostRoute {
                cidr: net.to_string(),
                route: route.to_string(),
                dev: dev.clone(),
                suggestion: suggest(&taken),
            });
        }
    }
    if let Some((other, other_net)) = others.iter().find(|(_, n)| overlaps(n, &net)) {
        return Err(PlanError::OtherCluster {
            cidr: net.to_string(),
            other: other.clone(),
            other_cidr: other_net.to_string(),
            suggestion: suggest(&taken),
        });
    }
    let room = net.hosts().count().saturating_sub(1);
    if room < count {
        return Err(PlanError::TooSmall {
            cidr: net.to_string(),
            room,
            wanted: count,
        });
    }
    let map = |a: Ipv4Addr| -> IpAddr {
        match mode {
            NetworkMode::Bridge => IpAddr::V4(a),
            // Without root every node gets 127.B.C.D for the CIDR's B.C.D: distinct per node
            // and per cluster, and routed to the loopback by the kernel.
            NetworkMode::Loopback => {
                let [_, b, c, d] = a.octets();
                IpAddr::V4(Ipv4Addr::new(127, b, c, d))
            }
        }
    };
    let mut hosts = net.hosts();
    let gateway = map(hosts.next().ok_or_else(|| PlanError::TooSmall {
        cidr: net.to_string(),
        room: 0,
        wanted: count,
    })?);
    let nodes = hosts.take(count).map(map).collect();
    Ok(Plan {
        mode,
        cidr: net,
        gateway,
        nodes,
    })
}

/// Bridge name for a cluster: `kiln` and 8 hex digits of a hash of the name (15 characters
/// at most, the kernel's limit).
pub fn bridge_name(cluster: &str) -> String {
    format!("kiln{:08x}", fnv(cluster) as u32)
}

/// Host-side veth name for node `index` of `cluster`.
pub fn veth_name(cluster: &str, index: usize) -> String {
    format!("kv{:06x}n{index}", (fnv(cluster) as u32) & 0xff_ffff)
}

/// Network namespace name for a node (node names start with the cluster name).
pub fn netns_name(node: &str) -> String {
    format!("kiln-{node}")
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit() {
        let long = "a-very-long-cluster-name-indeed";
        assert!(bridge_name(long).len() <= 15);
        assert!(veth_name(long, 29).len() <= 15);
        assert_ne!(bridge_name("a"), bridge_name("b"));
    }

    #[test]
    fn plan_reserves_gateway_and_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan("10.5.0.0/24", 5, NetworkMode::Loopback, dir.path(), "x").unwrap();
        assert_eq!(p.gateway.to_string(), "127.5.0.1");
        assert_eq!(p.nodes[4].to_string(), "127.5.0.6");
        let err = plan("10.5.0.0/30", 5, NetworkMode::Loopback, dir.path(), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("room for 1 nodes"), "{err}");
        assert!(
            plan("nope", 1, NetworkMode::Loopback, dir.path(), "x")
                .unwrap_err()
                .to_string()
                .contains("10.5.0.0/24")
        );
    }

    #[test]
    fn overlapping_clusters_are_refused_with_a_suggestion() {
        let dir = tempfile::tempdir().unwrap();
        let sd = crate::state::StateDir::new(dir.path(), "first");
        std::fs::create_dir_all(&sd.dir).unwrap();
        sd.save(&crate::state::ClusterState {
            name: "first".into(),
            provisioner: "process".into(),
            network: crate::state::NetworkState {
                mode: NetworkMode::Loopback,
                cidr: "10.5.0.0/24".into(),
                gateway: "127.5.0.1".parse().unwrap(),
                bridge: None,
                mtu: 1500,
            },
            nodes: vec![],
            helpers: vec![],
            endpoint: String::new(),
            created: String::new(),
        })
        .unwrap();
        let err = plan(
            "10.5.0.0/16",
            2,
            NetworkMode::Loopback,
            dir.path(),
            "second",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("overlaps cluster \"first\"") && err.contains("--cidr 10.5.1.0/24"),
            "{err}"
        );
        plan("10.5.0.0/24", 2, NetworkMode::Loopback, dir.path(), "first").unwrap();
    }
}
