//! Links, addresses and routes on `metal`, through rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use nix::errno::Errno;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::platform::PlatformError;

fn net_err(step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PlatformError {
    let step = step.into();
    move |e| PlatformError::Network {
        step,
        reason: e.to_string(),
    }
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -(Errno::EEXIST as i32))
}

/// Opens a netlink connection (its driver runs on the current runtime).
pub fn connect() -> Result<Handle, PlatformError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| PlatformError::Network {
        step: "opening a netlink socket".into(),
        reason: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A link the kernel knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Index.
    pub index: u32,
    /// Name (`eth0`).
    pub name: String,
    /// Hardware address.
    pub mac: Option<[u8; 6]>,
    /// Ethernet (not loopback, not a tunnel).
    pub ethernet: bool,
}

/// All links.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, PlatformError> {
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(net_err("listing links"))? {
        let mut name = String::new();
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(a);
                    mac = Some(m);
                }
                _ => {}
            }
        }
        out.push(Link {
            index: msg.header.index,
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether
                && !msg.header.flags.contains(LinkFlags::Loopback),
            name,
            mac,
        });
    }
    Ok(out)
}

/// The index of link `name`.
pub async fn index_of(handle: &Handle, name: &str) -> Result<u32, PlatformError> {
    links(handle)
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| PlatformError::Network {
            step: format!("looking up link {name}"),
            reason: "no such link: check machine.network.interfaces against `kiln get links`"
                .into(),
        })
}

/// Sets link `index` up, with `mtu` when given.
pub async fn up(
    handle: &Handle,
    index: u32,
    name: &str,
    mtu: Option<u32>,
) -> Result<(), PlatformError> {
    let mut msg = LinkUnspec::new_with_index(index).up();
    if let Some(mtu) = mtu {
        msg = msg.mtu(mtu);
    }
    handle
        .link()
        .set(msg.build())
        .execute()
        .await
        .map_err(net_err(format!("link {name} up")))
}

/// Adds `address/prefix` to link `index` (already present is fine).
pub async fn add_address(
    handle: &Handle,
    index: u32,
    name: &str,
    address: IpAddr,
    prefix: u8,
) -> Result<(), PlatformError> {
    match handle.address().add(index, address, prefix).execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(net_err(format!("adding {address}/{prefix} to {name}"))(e)),
    }
}

/// Adds an IPv4 route to `destination/prefix` via `gateway` (or on-link) through link `index`.
pub async fn add_route_v4(
    handle: &Handle,
    index: u32,
    destination: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    metric: Option<u32>,
) -> Result<(), PlatformError> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination, prefix)
        .output_interface(index);
    if let Some(gw) = gateway {
        b = b.gateway(gw);
    }
    if let Some(m) = metric {
        b = b.priority(m);
    }
    match handle.route().add(b.build()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(net_err(format!(
            "adding the route to {destination}/{prefix} via {gateway:?}"
        ))(e)),
    }
}
