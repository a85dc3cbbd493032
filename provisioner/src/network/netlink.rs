//! Root mode, through rtnetlink: one Linux bridge per cluster with the gateway address, and per
//! node a network namespace with a veth pair into the bridge, the node's address, a default
//! route through the gateway and the MTU. Teardown removes each object and ignores ones that
//! are already gone, so it also cleans up after a create that was killed halfway.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;

use futures::TryStreamExt as _;
use nix::errno::Errno;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, NetworkNamespace, RouteMessageBuilder};

/// A netlink operation that failed, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {reason}")]
pub struct NetlinkError {
    /// What was being done.
    pub action: String,
    /// The kernel's or library's message.
    pub reason: String,
}

fn err(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let action = action.into();
    move |e| NetlinkError {
        action,
        reason: e.to_string(),
    }
}

fn io_err(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetlinkError {
    let action = action.into();
    move |e| NetlinkError {
        action,
        reason: e.to_string(),
    }
}

/// Opens a netlink connection in the current network namespace.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(io_err("opening a netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(Errno::ENODEV as i32) => {
            Ok(None)
        }
        Err(e) => Err(err(format!("looking up link {name}"))(e)),
    }
}

/// Creates the bridge with the gateway address (idempotent).
pub async fn create_bridge(
    handle: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<(), NetlinkError> {
    if index_of(handle, name).await?.is_none() {
        handle
            .link()
            .add(LinkBridge::new(name).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(err(format!("creating bridge {name}")))?;
    }
    let idx = index_of(handle, name).await?.ok_or_else(|| NetlinkError {
        action: format!("creating bridge {name}"),
        reason: "it vanished".into(),
    })?;
    match handle
        .address()
        .add(idx, IpAddr::V4(gateway), prefix)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(Errno::EEXIST as i32) => {}
        Err(e) => return Err(err(format!("adding {gateway}/{prefix} to {name}"))(e)),
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(err(format!("bringing {name} up")))?;
    Ok(())
}

/// Everything about one node's link.
#[derive(Debug, Clone)]
pub struct NodeLink {
    /// Namespace name.
    pub netns: String,
    /// Host-side veth name.
    pub veth: String,
    /// Bridge to attach to.
    pub bridge: String,
    /// Node address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Gateway.
    pub gateway: Ipv4Addr,
    /// Whether the node gets a default route through the gateway (not when air-gapped: then
    /// it reaches the cluster network only).
    pub default_route: bool,
    /// MTU.
    pub mtu: u32,
}

/// Creates the node's namespace and veth pair and configures its side.
pub async fn create_node(handle: &Handle, link: &NodeLink) -> Result<(), NetlinkError> {
    let ns_path = format!("/var/run/netns/{}", link.netns);
    if !std::path::Path::new(&ns_path).exists() {
        NetworkNamespace::add(link.netns.clone())
            .await
            .map_err(err(format!("creating network namespace {}", link.netns)))?;
    }
    let peer = format!("{}p", link.veth);
    if index_of(handle, &link.veth).await?.is_none() {
        handle
            .link()
            .add(LinkVeth::new(&link.veth, &peer).mtu(link.mtu).build())
            .execute()
            .await
            .map_err(err(format!("creating veth {}", link.veth)))?;
    }
    let bridge = index_of(handle, &link.bridge)
        .await?
        .ok_or_else(|| NetlinkError {
            action: format!("attaching {} to {}", link.veth, link.bridge),
            reason: "the bridge does not exist".into(),
        })?;
    let host = index_of(handle, &link.veth)
        .await?
        .ok_or_else(|| NetlinkError {
            action: format!("creating veth {}", link.veth),
            reason: "it vanished".into(),
        })?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(host)
                .controller(bridge)
                .mtu(link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(err(format!("attaching {} to {}", link.veth, link.bridge)))?;
    let ns = std::fs::File::open(&ns_path).map_err(io_err(format!("opening {ns_path}")))?;
    if let Some(peer_idx) = index_of(handle, &peer).await? {
        move_into(handle, peer_idx, &ns, &link.netns).await?;
    }
    let link = link.clone();
    in_netns(ns, link.netns.clone(), move || async move {
        configure_inside(&link, &peer).await
    })
}

/// Moves the link with index `idx` into the namespace `ns` (called `name`).
async fn move_into(
    handle: &Handle,
    idx: u32,
    ns: &std::fs::File,
    name: &str,
) -> Result<(), NetlinkError> {
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(idx)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(err(format!("moving link {idx} into {name}")))
}

/// Runs `f` in the network namespace `ns` (called `name`): configuring the inside needs a
/// netlink socket there, so a thread enters it and runs `f` on a runtime of its own.
fn in_netns<F, Fut>(ns: std::fs::File, name: String, f: F) -> Result<(), NetlinkError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), NetlinkError>>,
{
    std::thread::spawn(move || -> Result<(), NetlinkError> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| NetlinkError {
            action: format!("entering {name}"),
            reason: e.to_string(),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("starting a runtime"))?;
        rt.block_on(f())
    })
    .join()
    .map_err(|_| NetlinkError {
        action: "configuring a network namespace".into(),
        reason: "the thread panicked".into(),
    })?
}

async fn configure_inside(link: &NodeLink, peer: &str) -> Result<(), NetlinkError> {
    let handle = connect()?;
    if let Some(lo) = index_of(&handle, "lo").await? {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(err("bringing lo up"))?;
    }
    let idx = match index_of(&handle, peer).await? {
        Some(idx) => {
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .name("eth0".to_owned())
                        .build(),
                )
                .execute()
                .await
                .map_err(err("renaming the node link to eth0"))?;
            idx
        }
        None => index_of(&handle, "eth0")
            .await?
            .ok_or_else(|| NetlinkError {
                action: format!("configuring {}", link.netns),
                reason: "eth0 is missing".into(),
            })?,
    };
    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).mtu(link.mtu).up().build())
        .execute()
        .await
        .map_err(err("bringing eth0 up"))?;
    match handle
        .address()
        .add(idx, IpAddr::V4(link.address), link.prefix)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(Errno::EEXIST as i32) => {}
        Err(e) => return Err(err(format!("adding {}/{}", link.address, link.prefix))(e)),
    }
    if !link.default_route {
        return Ok(());
    }
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(link.gateway)
        .build();
    match handle.route().add(route).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(Errno::EEXIST as i32) => Ok(()),
        Err(e) => Err(err(format!(
            "adding the default route via {}",
            link.gateway
        ))(e)),
    }
}

/// A veth pair from the host into a named network namespace that the host routes a network
/// through (a Docker Swarm cluster's gateway container, see `provision::docker::swarm`).
#[derive(Debug, Clone)]
pub struct RoutedLink {
    /// The namespace (`/var/run/netns/<netns>`), which exists.
    pub netns: String,
    /// The host's end.
    pub veth: String,
    /// The name of the end inside the namespace.
    pub inside: String,
    /// The host end's address.
    pub host_address: Ipv4Addr,
    /// The inside end's address.
    pub inside_address: Ipv4Addr,
    /// Prefix length of both.
    pub prefix: u8,
    /// MTU of both.
    pub mtu: u32,
    /// The network (`a.b.c.d/n`) the host routes through the inside end.
    pub routed: String,
}

/// Creates `link`'s veth pair, addresses both ends and adds the host's route.
pub async fn create_routed_link(handle: &Handle, link: &RoutedLink) -> Result<(), NetlinkError> {
    let ns_path = format!("/var/run/netns/{}", link.netns);
    let peer = format!("{}p", link.veth);
    // A pair left by a create killed halfway is made again.
    delete_link(handle, &link.veth).await?;
    handle
        .link()
        .add(LinkVeth::new(&link.veth, &peer).mtu(link.mtu).build())
        .execute()
        .await
        .map_err(err(format!("creating veth {}", link.veth)))?;
    let ns = std::fs::File::open(&ns_path).map_err(io_err(format!("opening {ns_path}")))?;
    let peer_idx = index_of(handle, &peer).await?.ok_or_else(|| NetlinkError {
        action: format!("creating veth {}", link.veth),
        reason: "its peer vanished".into(),
    })?;
    move_into(handle, peer_idx, &ns, &link.netns).await?;
    let host = index_of(handle, &link.veth)
        .await?
        .ok_or_else(|| NetlinkError {
            action: format!("creating veth {}", link.veth),
            reason: "it vanished".into(),
        })?;
    handle
        .address()
        .add(host, IpAddr::V4(link.host_address), link.prefix)
        .execute()
        .await
        .map_err(err(format!(
            "adding {} to {}",
            link.host_address, link.veth
        )))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(host).up().build())
        .execute()
        .await
        .map_err(err(format!("bringing {} up", link.veth)))?;
    let inside = link.clone();
    in_netns(ns, link.netns.clone(), move || async move {
        let handle = connect()?;
        let idx = index_of(&handle, &peer)
            .await?
            .ok_or_else(|| NetlinkError {
                action: format!("configuring {}", inside.netns),
                reason: format!("{peer} is missing"),
            })?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .name(inside.inside.clone())
                    .mtu(inside.mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(err(format!("renaming {peer} to {}", inside.inside)))?;
        handle
            .address()
            .add(idx, IpAddr::V4(inside.inside_address), inside.prefix)
            .execute()
            .await
            .map_err(err(format!("adding {}", inside.inside_address)))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(err(format!("bringing {} up", inside.inside)))
    })?;
    let (dest, prefix) = link
        .routed
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .ok_or_else(|| NetlinkError {
            action: format!("routing {}", link.routed),
            reason: "not an IPv4 network".into(),
        })?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dest, prefix)
        .gateway(link.inside_address)
        .output_interface(host)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(err(format!(
            "routing {} through {} on {}",
            link.routed, link.inside_address, link.veth
        )))
}

/// Attaches link `name` (a tap) to `bridge` with `mtu` and sets it up.
pub async fn attach(
    handle: &Handle,
    name: &str,
    bridge: &str,
    mtu: u32,
) -> Result<(), NetlinkError> {
    let action = format!("attaching {name} to {bridge}");
    let br = index_of(handle, bridge)
        .await?
        .ok_or_else(|| NetlinkError {
            action: action.clone(),
            reason: "the bridge does not exist".into(),
        })?;
    let idx = index_of(handle, name).await?.ok_or_else(|| NetlinkError {
        action: action.clone(),
        reason: "no such link".into(),
    })?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(idx)
                .controller(br)
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(err(action))
}

/// Sets the host side of a node's veth down or up (cutting or restoring its link).
pub async fn set_link(handle: &Handle, veth: &str, up: bool) -> Result<(), NetlinkError> {
    let idx = index_of(handle, veth).await?.ok_or_else(|| NetlinkError {
        action: format!("setting {veth} {}", if up { "up" } else { "down" }),
        reason: "no such link".into(),
    })?;
    let msg = if up {
        LinkUnspec::new_with_index(idx).up().build()
    } else {
        LinkUnspec::new_with_index(idx).down().build()
    };
    handle.link().set(msg).execute().await.map_err(err(format!(
        "setting {veth} {}",
        if up { "up" } else { "down" }
    )))
}

/// Deletes a link if it exists.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<(), NetlinkError> {
    if let Some(idx) = index_of(handle, name).await? {
        handle
            .link()
            .del(idx)
            .execute()
            .await
            .map_err(err(format!("deleting {name}")))?;
    }
    Ok(())
}

/// Deletes a network namespace if it exists.
pub async fn delete_netns(name: &str) -> Result<(), NetlinkError> {
    if std::path::Path::new(&format!("/var/run/netns/{name}")).exists() {
        NetworkNamespace::del(name.to_owned())
            .await
            .map_err(err(format!("deleting network namespace {name}")))?;
    }
    Ok(())
}

/// The alias (`ip link set X alias ...`) of link `name`: `Ok(None)` when the link does not
/// exist, `Some("")` when it has no alias.
pub async fn alias_of(handle: &Handle, name: &str) -> Result<Option<String>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(
            l.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfAlias(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
        )),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(Errno::ENODEV as i32) => {
            Ok(None)
        }
        Err(e) => Err(err(format!("looking up link {name}"))(e)),
    }
}

/// Sets the alias of link `name` (the cluster's ownership mark).
pub async fn set_alias(handle: &Handle, name: &str, alias: &str) -> Result<(), NetlinkError> {
    let idx = index_of(handle, name).await?.ok_or_else(|| NetlinkError {
        action: format!("marking {name}"),
        reason: "no such link".into(),
    })?;
    let mut msg = LinkUnspec::new_with_index(idx).build();
    msg.attributes
        .push(LinkAttribute::IfAlias(alias.to_owned()));
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(err(format!("marking {name} as {alias}")))
}

/// Deletes link `name` only if it carries `mark` as its alias; returns whether it was deleted.
/// A link without the mark belongs to someone else and is left alone.
pub async fn delete_marked_link(
    handle: &Handle,
    name: &str,
    mark: &str,
) -> Result<bool, NetlinkError> {
    match alias_of(handle, name).await? {
        Some(alias) if alias == mark => {
            delete_link(handle, name).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// IPv4 routes of the main table as (destination, prefix length, device), from a netlink dump.
/// Default routes are left out: they overlap everything and are no conflict.
pub async fn routes_v4(handle: &Handle) -> Result<Vec<(Ipv4Addr, u8, String)>, NetlinkError> {
    let mut names = std::collections::HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links.try_next().await.map_err(err("listing links"))? {
        for a in &l.attributes {
            if let LinkAttribute::IfName(n) = a {
                names.insert(l.header.index, n.clone());
            }
        }
    }
    let mut out = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes.try_next().await.map_err(err("listing routes"))? {
        let prefix = r.header.destination_prefix_length;
        // RT_TABLE_MAIN: the table `ip route` and /proc/net/route show.
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(r.header.table));
        if prefix == 0 || table != 254 {
            continue;
        }
        let mut dest = None;
        let mut dev = String::new();
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dest = Some(*d),
                RouteAttribute::Oif(i) => dev = names.get(i).cloned().unwrap_or_default(),
                _ => {}
            }
        }
        if let Some(d) = dest {
            out.push((d, prefix, dev));
        }
    }
    Ok(out)
}
