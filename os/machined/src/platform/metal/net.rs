//! Links, addresses and routes on `metal`, through rtnetlink: the DHCP link's lease, and the
//! [`super::links`] plan of `machine.network` (bonds, bridges, VLANs, static addresses and
//! routes).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use nix::errno::Errno;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    BondLacpRate, BridgeStpState, InfoBond, InfoData, LinkAttribute, LinkFlags, LinkInfo,
    LinkLayerType, LinkMessage, State,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBond, LinkBridge, LinkUnspec, LinkVlan, RouteMessageBuilder};

use super::links::{BondSpec, LinkSettings, RouteSpec, Step};
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

/// Deletes every IPv4 default route of the main table; returns how many there were.
pub async fn delete_default_routes_v4(handle: &Handle) -> Result<usize, PlatformError> {
    const MAIN_TABLE: u8 = 254;
    let mut defaults = Vec::new();
    let mut stream = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(msg) = stream.try_next().await.map_err(net_err("listing routes"))? {
        if msg.header.table == MAIN_TABLE && msg.header.destination_prefix_length == 0 {
            defaults.push(msg);
        }
    }
    let count = defaults.len();
    for msg in defaults {
        handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(net_err("deleting the default route"))?;
    }
    Ok(count)
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

/// Adds `route` through link `index` (already present is fine).
pub async fn add_route(
    handle: &Handle,
    index: u32,
    name: &str,
    route: &RouteSpec,
) -> Result<(), PlatformError> {
    let step = || {
        format!(
            "adding the route to {}/{} via {} on {name}",
            route.destination,
            route.prefix,
            route
                .gateway
                .map_or_else(|| "the link".to_owned(), |g| g.to_string())
        )
    };
    let message = match (route.destination, route.gateway) {
        (IpAddr::V4(d), gw) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, route.prefix)
                .output_interface(index);
            if let Some(IpAddr::V4(g)) = gw {
                b = b.gateway(g);
            }
            if let Some(m) = route.metric {
                b = b.priority(m);
            }
            b.build()
        }
        (IpAddr::V6(d), gw) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, route.prefix)
                .output_interface(index);
            if let Some(IpAddr::V6(g)) = gw {
                b = b.gateway(g);
            }
            if let Some(m) = route.metric {
                b = b.priority(m);
            }
            b.build()
        }
    };
    match handle.route().add(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(net_err(step())(e)),
    }
}

/// Creates a link from `message` (one that already exists is left as it is: a retried
/// configuration meets its own links).
async fn create(
    handle: &Handle,
    name: &str,
    what: &str,
    message: LinkMessage,
) -> Result<(), PlatformError> {
    match handle.link().add(message).execute().await {
        Ok(()) => Ok(()),
        Err(e) if exists(&e) => Ok(()),
        Err(e) => Err(net_err(format!("creating the {what} {name}"))(e)),
    }
}

/// The `RTM_NEWLINK` message that makes bond `b`.
pub fn bond_message(b: &BondSpec) -> LinkMessage {
    let mut m = LinkBond::new(&b.name).mode(b.mode);
    if let Some(v) = b.miimon {
        m = m.miimon(v);
    }
    if let Some(v) = b.updelay {
        m = m.updelay(v);
    }
    if let Some(v) = b.downdelay {
        m = m.downdelay(v);
    }
    if let Some(fast) = b.lacp_fast {
        m = m.ad_lacp_rate(if fast {
            BondLacpRate::Fast
        } else {
            BondLacpRate::Slow
        });
    }
    if let Some(p) = b.xmit_hash_policy {
        m = m.xmit_hash_policy(p);
    }
    m.build()
}

/// The `RTM_NEWLINK` message that makes bridge `name`, with kernel spanning tree when `stp`.
pub fn bridge_message(name: &str, stp: bool) -> LinkMessage {
    LinkBridge::new(name)
        .stp_state(if stp {
            BridgeStpState::KernelStp
        } else {
            BridgeStpState::Disabled
        })
        .build()
}

/// Removes every address from link `index` (a link that becomes a port gives its addresses,
/// e.g. the boot's DHCP lease, to its master).
pub async fn flush_addresses(handle: &Handle, index: u32, name: &str) -> Result<(), PlatformError> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut found = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(net_err(format!("listing the addresses of {name}")))?
    {
        if msg.header.index == index {
            found.push(msg);
        }
    }
    for msg in found {
        match handle.address().del(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m))
                if m.raw_code() == -(Errno::EADDRNOTAVAIL as i32) => {}
            Err(e) => return Err(net_err(format!("removing an address of {name}"))(e)),
        }
    }
    Ok(())
}

/// Makes `member` a port of `master`: down, addresses flushed, enslaved, up.
async fn enslave(handle: &Handle, member: &str, master: &str) -> Result<(), PlatformError> {
    let m = index_of(handle, member).await?;
    let c = index_of(handle, master).await?;
    let step = format!("making {member} a port of {master}");
    handle
        .link()
        .set(LinkUnspec::new_with_index(m).down().build())
        .execute()
        .await
        .map_err(net_err(format!("{step}: setting {member} down")))?;
    flush_addresses(handle, m, member).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(m).controller(c).build())
        .execute()
        .await
        .map_err(net_err(step.clone()))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(m).up().build())
        .execute()
        .await
        .map_err(net_err(format!("{step}: setting {member} up")))
}

/// Sets a link up with its MTU, addresses and routes (DHCP is the caller's).
/// With `dhcp`, routes wait for the lease (a gateway must be reachable through an address of
/// the link): the caller adds them with [`add_routes`] after its DHCP exchange.
async fn configure(handle: &Handle, s: &LinkSettings) -> Result<(), PlatformError> {
    let index = index_of(handle, &s.link).await?;
    up(handle, index, &s.link, s.mtu).await?;
    for (ip, prefix) in &s.addresses {
        add_address(handle, index, &s.link, *ip, *prefix).await?;
    }
    if !s.dhcp {
        add_routes(handle, s).await?;
    }
    Ok(())
}

/// Adds the static routes of a link.
pub async fn add_routes(handle: &Handle, s: &LinkSettings) -> Result<(), PlatformError> {
    let index = index_of(handle, &s.link).await?;
    for r in &s.routes {
        add_route(handle, index, &s.link, r).await?;
    }
    Ok(())
}

/// Carries out one step of a plan. A link it creates is set up at once: a VLAN cannot go up
/// on a parent that is down (`ENETDOWN`), nor a port in a master that is.
pub async fn apply_step(handle: &Handle, step: &Step) -> Result<(), PlatformError> {
    create_step(handle, step).await?;
    if matches!(
        step,
        Step::Bond(_) | Step::Bridge { .. } | Step::Vlan { .. }
    ) {
        let name = step.link();
        let index = index_of(handle, name).await?;
        up(handle, index, name, None).await?;
    }
    Ok(())
}

async fn create_step(handle: &Handle, step: &Step) -> Result<(), PlatformError> {
    let module = match step {
        Step::Bond(_) => Some("bonding"),
        Step::Bridge { .. } => Some("bridge"),
        Step::Vlan { .. } => Some("8021q"),
        Step::Enslave { .. } | Step::Configure(_) => None,
    };
    if let Some(m) = module {
        // Usually loaded already (in the background since boot); if it cannot be, creating
        // the link says so.
        match tokio::task::spawn_blocking(move || super::init::ensure_module(m)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!("loading {m}: {e}"),
            Err(e) => tracing::debug!("loading {m}: {e}"),
        }
    }
    match step {
        Step::Bond(b) => create(handle, &b.name, "bond", bond_message(b)).await,
        Step::Bridge { name, stp } => {
            create(handle, name, "bridge", bridge_message(name, *stp)).await
        }
        Step::Vlan { name, parent, id } => {
            let p = index_of(handle, parent).await?;
            create(handle, name, "VLAN", LinkVlan::new(name, p, *id).build()).await
        }
        Step::Enslave { member, master } => enslave(handle, member, master).await,
        Step::Configure(s) => configure(handle, s).await,
    }
}

/// Carries out `steps` in order. A failed step is returned with its link, and the steps that
/// need that link are skipped (each reported too); the others go on.
pub async fn apply_plan(handle: &Handle, steps: &[Step]) -> Vec<(String, PlatformError)> {
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut problems = Vec::new();
    for step in steps {
        let link = step.link().to_owned();
        if let Some(missing) = step.needs().into_iter().find(|n| failed.contains(*n)) {
            problems.push((
                link.clone(),
                PlatformError::Network {
                    step: step.to_string(),
                    reason: format!("skipped: {missing} could not be set up (see above)"),
                },
            ));
            failed.insert(link);
            continue;
        }
        if let Err(e) = apply_step(handle, step).await {
            problems.push((link.clone(), e));
            failed.insert(link);
        }
    }
    problems
}

/// A link as `kiln get links` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// Index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// `bond`, `bridge`, `vlan`, ... (empty for a physical NIC or loopback).
    pub kind: String,
    /// Hardware address.
    pub hardware_addr: String,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Operational state (`up`, `down`, `lowerlayerdown`, ...).
    pub oper_state: String,
    /// The bond or bridge it is a port of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// The link a VLAN is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A bond's mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bond_mode: Option<String>,
    /// A bond's active port (active-backup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_port: Option<String>,
}

/// Every link with its kind, state and master.
pub async fn link_status(handle: &Handle) -> Result<Vec<LinkStatus>, PlatformError> {
    let mut raw = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(net_err("listing links"))? {
        raw.push(msg);
    }
    let names: std::collections::BTreeMap<u32, String> = raw
        .iter()
        .map(|m| {
            let name = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            (m.header.index, name)
        })
        .collect();
    let name_of = |i: u32| names.get(&i).cloned().unwrap_or_else(|| i.to_string());
    let mut out = Vec::new();
    for msg in raw {
        let mut l = LinkStatus {
            index: msg.header.index,
            name: name_of(msg.header.index),
            kind: String::new(),
            hardware_addr: String::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            oper_state: String::new(),
            master: None,
            parent: None,
            bond_mode: None,
            active_port: None,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::Address(a) => {
                    l.hardware_addr = a
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                }
                LinkAttribute::Mtu(m) => l.mtu = *m,
                LinkAttribute::OperState(s) => {
                    l.oper_state = match s {
                        State::Up => "up".to_owned(),
                        State::Down => "down".to_owned(),
                        State::LowerLayerDown => "lowerlayerdown".to_owned(),
                        State::Dormant => "dormant".to_owned(),
                        State::Unknown => "unknown".to_owned(),
                        other => format!("{other:?}").to_ascii_lowercase(),
                    }
                }
                LinkAttribute::Controller(c) => l.master = Some(name_of(*c)),
                LinkAttribute::Link(p) if *p != msg.header.index => l.parent = Some(name_of(*p)),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = k.to_string(),
                            LinkInfo::Data(InfoData::Bond(bond)) => {
                                for b in bond {
                                    match b {
                                        InfoBond::Mode(m) => {
                                            l.bond_mode = Some(bond_mode_name(*m));
                                        }
                                        InfoBond::ActivePort(p) => {
                                            l.active_port = Some(name_of(*p));
                                        }
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(l);
    }
    Ok(out)
}

fn bond_mode_name(m: rtnetlink::packet_route::link::BondMode) -> String {
    use rtnetlink::packet_route::link::BondMode;
    match m {
        BondMode::BalanceRr => "balance-rr".into(),
        BondMode::ActiveBackup => "active-backup".into(),
        BondMode::BalanceXor => "balance-xor".into(),
        BondMode::Broadcast => "broadcast".into(),
        BondMode::Ieee8023Ad => "802.3ad".into(),
        BondMode::BalanceTlb => "balance-tlb".into(),
        BondMode::BalanceAlb => "balance-alb".into(),
        other => format!("{other:?}"),
    }
}

/// An address on a link, as `kiln get addresses` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    /// `10.5.0.2/24`.
    pub address: String,
    /// The link's name.
    pub link_name: String,
    /// `inet4` or `inet6`.
    pub family: String,
}

/// Every address on every link.
pub async fn address_status(handle: &Handle) -> Result<Vec<AddressStatus>, PlatformError> {
    let names: std::collections::BTreeMap<u32, String> = links(handle)
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(net_err("listing addresses"))?
    {
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = ip else { continue };
        out.push(AddressStatus {
            address: format!("{ip}/{}", msg.header.prefix_len),
            link_name: names
                .get(&msg.header.index)
                .cloned()
                .unwrap_or_else(|| msg.header.index.to_string()),
            family: if ip.is_ipv4() { "inet4" } else { "inet6" }.to_owned(),
        });
    }
    Ok(out)
}

/// A route of the main table, as `kiln get routes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// `0.0.0.0/0`, `172.31.101.0/24`.
    pub destination: String,
    /// Next hop, if not on-link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The link it leaves through.
    pub out_link_name: String,
    /// Metric.
    pub metric: u32,
    /// `inet4` or `inet6`.
    pub family: String,
}

fn route_address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// Every route of the main table, IPv4 then IPv6.
pub async fn route_status(handle: &Handle) -> Result<Vec<RouteStatus>, PlatformError> {
    const MAIN_TABLE: u8 = 254;
    let names: std::collections::BTreeMap<u32, String> = links(handle)
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut out = Vec::new();
    for (family, query) in [
        ("inet4", RouteMessageBuilder::<Ipv4Addr>::new().build()),
        ("inet6", RouteMessageBuilder::<Ipv6Addr>::new().build()),
    ] {
        let mut stream = handle.route().get(query).execute();
        while let Some(msg) = stream.try_next().await.map_err(net_err("listing routes"))? {
            if msg.header.table != MAIN_TABLE {
                continue;
            }
            let mut r = RouteStatus {
                destination: String::new(),
                gateway: None,
                out_link_name: String::new(),
                metric: 0,
                family: family.to_owned(),
            };
            let mut dst = None;
            for a in &msg.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_address(d),
                    RouteAttribute::Gateway(g) => {
                        r.gateway = route_address(g).map(|g| g.to_string())
                    }
                    RouteAttribute::Oif(i) => {
                        r.out_link_name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
                    }
                    RouteAttribute::Priority(p) => r.metric = *p,
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(if family == "inet4" {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            });
            r.destination = format!("{dst}/{}", msg.header.destination_prefix_length);
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::link::{BondMode, InfoBridge, InfoKind};

    use super::*;

    fn info(m: &LinkMessage) -> Vec<LinkInfo> {
        m.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn an_active_backup_bond_is_asked_for_with_its_mode_and_timers() {
        let m = bond_message(&BondSpec {
            name: "bond0".into(),
            mode: BondMode::ActiveBackup,
            miimon: Some(100),
            updelay: Some(200),
            downdelay: None,
            lacp_fast: None,
            xmit_hash_policy: None,
        });
        assert!(
            m.attributes
                .contains(&LinkAttribute::IfName("bond0".into()))
        );
        let info = info(&m);
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Bond)), "{info:?}");
        let Some(LinkInfo::Data(InfoData::Bond(data))) =
            info.iter().find(|i| matches!(i, LinkInfo::Data(_)))
        else {
            panic!("no bond data in {info:?}")
        };
        assert!(data.contains(&InfoBond::Mode(BondMode::ActiveBackup)));
        assert!(data.contains(&InfoBond::MiiMon(100)));
        assert!(data.contains(&InfoBond::UpDelay(200)));
        assert!(!data.iter().any(|d| matches!(d, InfoBond::DownDelay(_))));
    }

    #[test]
    fn a_bridge_runs_kernel_spanning_tree_only_when_asked() {
        for (stp, want) in [
            (true, BridgeStpState::KernelStp),
            (false, BridgeStpState::Disabled),
        ] {
            let info = info(&bridge_message("br0", stp));
            assert!(info.contains(&LinkInfo::Kind(InfoKind::Bridge)));
            assert!(
                info.contains(&LinkInfo::Data(InfoData::Bridge(vec![
                    InfoBridge::StpState(want)
                ]))),
                "{info:?}"
            );
        }
    }
}
