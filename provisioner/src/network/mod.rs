//! The cluster network: checking the CIDR, reserving addresses, and (as root) the bridge,
//! namespaces and veth pairs; without root, 127.x addresses on the loopback.

pub mod netlink;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnetwork::Ipv4Network as Ipv4Net;

use crate::state::NetworkMode;

/// Where [`HostNetworkLock`] lives: one file for the whole host, since bridges and routes are.
pub const HOST_NETWORK_LOCK: &str = "/run/kiln/networks.lock";

/// A host-wide lock, held by `cluster create` from checking its CIDR against the host's routes
/// until its bridge (and so its route) exists. Without it two creates with different state
/// directories (two users, a CI job beside a developer) can both find the same range free.
/// Released when dropped.
#[derive(Debug)]
pub struct HostNetworkLock {
    _file: std::fs::File,
}

impl HostNetworkLock {
    /// Waits for the lock at `path`.
    pub async fn acquire(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .map_err(std::io::Error::other)??;
        Ok(Self { _file: file })
    }
}

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

/// IPv4 routes of this host's main table (destination, device), from a netlink dump; the
/// default route is left out (it overlaps everything and is no conflict).
pub async fn host_routes() -> Result<Vec<(Ipv4Net, String)>, netlink::NetlinkError> {
    let handle = netlink::connect()?;
    Ok(netlink::routes_v4(&handle)
        .await?
        .into_iter()
        .filter_map(|(dest, prefix, dev)| Some((Ipv4Net::new(dest, prefix).ok()?, dev)))
        .collect())
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
    a.contains(b.network()) || b.contains(a.network())
}

/// The usable host addresses of `net` (all but the network and broadcast addresses, except
/// in /31 and /32).
fn hosts(net: &Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
    let (first, last) = if net.prefix() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    };
    (first..=last).map(Ipv4Addr::from)
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

/// Checks `cidr` against the host's `routes` (bridge mode) and the other clusters under
/// `base`, and reserves the gateway and `count` node addresses.
pub fn plan(
    cidr: &str,
    count: usize,
    mode: NetworkMode,
    base: &Path,
    cluster: &str,
    routes: &[(Ipv4Net, String)],
) -> Result<Plan, PlanError> {
    let net: Ipv4Net = cidr
        .parse()
        .map_err(|_| PlanError::Invalid(cidr.to_owned()))?;
    let net = Ipv4Net::new(net.network(), net.prefix())
        .map_err(|_| PlanError::Invalid(cidr.to_owned()))?;
    let mut taken: Vec<Ipv4Net> = Vec::new();
    let others = other_clusters(base, cluster);
    taken.extend(others.iter().map(|(_, n)| *n));
    if mode == NetworkMode::Bridge {
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
    let room = hosts(&net).count().saturating_sub(1);
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
    let mut hosts = hosts(&net);
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

/// A free /24 for a test or a second cluster: the first in 10.5.0.0/16 .. 10.254.0.0/16 that
/// overlaps neither a host route nor a cluster under `base`, at or after `10.<second>.0.0`.
pub async fn free_cidr(base: &Path, from_second: u8) -> String {
    free_cidr_excluding(base, from_second, &[]).await
}

/// As [`free_cidr`], also avoiding `reserved` (networks handed out to clusters not created
/// yet, as when scenarios start in parallel).
pub async fn free_cidr_excluding(base: &Path, from_second: u8, reserved: &[Ipv4Net]) -> String {
    let mut taken: Vec<Ipv4Net> = reserved.to_vec();
    taken.extend(
        host_routes()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(n, _)| n),
    );
    taken.extend(other_clusters(base, "").into_iter().map(|(_, n)| n));
    for second in from_second.max(5)..=254 {
        for third in 0u8..=255 {
            let Ok(net) = Ipv4Net::new(Ipv4Addr::new(10, second, third, 0), 24) else {
                continue;
            };
            if !taken.iter().any(|t| overlaps(t, &net)) {
                return net.to_string();
            }
        }
    }
    suggest(&taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_host_network_lock_is_held_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/networks.lock");
        let first = HostNetworkLock::acquire(&path).await.unwrap();
        let second = tokio::spawn({
            let path = path.clone();
            async move { HostNetworkLock::acquire(&path).await.unwrap() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "a second holder got the lock");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the lock was not released")
            .unwrap();
    }

    #[test]
    fn a_host_route_is_refused_with_a_free_suggestion() {
        let dir = tempfile::tempdir().unwrap();
        let routes = vec![("10.77.0.0/24".parse().unwrap(), "br-test".to_owned())];
        let err = plan(
            "10.77.0.0/16",
            2,
            NetworkMode::Bridge,
            dir.path(),
            "x",
            &routes,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("overlaps the host route 10.77.0.0/24 (dev br-test)"),
            "{err}"
        );
        assert!(err.contains("--cidr 10.5.0.0/24"), "{err}");
        plan(
            "10.78.0.0/24",
            2,
            NetworkMode::Bridge,
            dir.path(),
            "x",
            &routes,
        )
        .unwrap();
    }

    #[test]
    fn plan_reserves_gateway_and_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(
            "10.5.0.0/24",
            5,
            NetworkMode::Loopback,
            dir.path(),
            "x",
            &[],
        )
        .unwrap();
        assert_eq!(p.gateway.to_string(), "127.5.0.1");
        assert_eq!(p.nodes[4].to_string(), "127.5.0.6");
        let err = plan(
            "10.5.0.0/30",
            5,
            NetworkMode::Loopback,
            dir.path(),
            "x",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("room for 1 nodes"), "{err}");
        assert!(
            plan("nope", 1, NetworkMode::Loopback, dir.path(), "x", &[])
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
                firewall: vec![],
                airgapped: false,
                lab_netns: None,
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
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("overlaps cluster \"first\"") && err.contains("--cidr 10.5.1.0/24"),
            "{err}"
        );
        plan(
            "10.5.0.0/24",
            2,
            NetworkMode::Loopback,
            dir.path(),
            "first",
            &[],
        )
        .unwrap();
    }
}
