//! `machine.network.interfaces` as an ordered plan of link operations: `deviceSelector`s
//! resolved to link names ([`resolve`]), then create bonds, bridges and VLANs (each after the
//! links it is made of), enslave members, then set MTU, addresses, routes and DHCP on every
//! configured link ([`plan`]). Pure, so the order and the netlink parameters are tested
//! without a kernel; [`super::net::apply_plan`] carries it out through rtnetlink.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kiln_config::types::{DeviceSelector, NetworkConfig, Route};
use rtnetlink::packet_route::link::{BondMode, BondXmitHashPolicy};

/// A bond to create (`ip link add NAME type bond mode ... miimon ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BondSpec {
    /// Link name.
    pub name: String,
    /// Bonding mode (default `balance-rr`, as the kernel's).
    pub mode: BondMode,
    /// Link monitoring interval, ms.
    pub miimon: Option<u32>,
    /// Delay before enabling a recovered member, ms.
    pub updelay: Option<u32>,
    /// Delay before disabling a failed member, ms.
    pub downdelay: Option<u32>,
    /// LACP rate: `true` for fast (802.3ad only).
    pub lacp_fast: Option<bool>,
    /// Transmit hash policy.
    pub xmit_hash_policy: Option<BondXmitHashPolicy>,
}

/// A static route of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination.
    pub destination: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// Next hop (`None`: on-link).
    pub gateway: Option<IpAddr>,
    /// Metric.
    pub metric: Option<u32>,
}

/// Addresses, routes, MTU and DHCP of one link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkSettings {
    /// Link name.
    pub link: String,
    /// MTU.
    pub mtu: Option<u32>,
    /// Static addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Static routes.
    pub routes: Vec<RouteSpec>,
    /// Acquire an address with DHCP.
    pub dhcp: bool,
}

/// One operation on the kernel's links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create a bond.
    Bond(BondSpec),
    /// Create a bridge (with spanning tree when `stp`).
    Bridge {
        /// Link name.
        name: String,
        /// Run spanning tree.
        stp: bool,
    },
    /// Create VLAN `id` on `parent`, named `parent.id`.
    Vlan {
        /// Link name (`eth0.100`).
        name: String,
        /// The link it is on.
        parent: String,
        /// VLAN id.
        id: u16,
    },
    /// Make `member` a port of `master` (set down, addresses flushed, enslaved, set up).
    Enslave {
        /// The bond's or bridge's member.
        member: String,
        /// The bond or bridge.
        master: String,
    },
    /// Set the link up with its MTU, addresses, routes, DHCP.
    Configure(LinkSettings),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Bond(b) => write!(f, "creating the bond {}", b.name),
            Step::Bridge { name, .. } => write!(f, "creating the bridge {name}"),
            Step::Vlan { name, parent, id } => {
                write!(f, "creating VLAN {id} on {parent} as {name}")
            }
            Step::Enslave { member, master } => write!(f, "making {member} a port of {master}"),
            Step::Configure(s) => write!(f, "setting up {}", s.link),
        }
    }
}

impl Step {
    /// The link this step makes or changes.
    pub fn link(&self) -> &str {
        match self {
            Step::Bond(b) => &b.name,
            Step::Bridge { name, .. } | Step::Vlan { name, .. } => name,
            Step::Enslave { member, .. } => member,
            Step::Configure(s) => &s.link,
        }
    }

    /// Links that must exist (and have been set up without error) before this step.
    pub fn needs(&self) -> Vec<&str> {
        match self {
            Step::Bond(_) | Step::Bridge { .. } => vec![],
            Step::Vlan { parent, .. } => vec![parent],
            Step::Enslave { member, master } => vec![member, master],
            Step::Configure(s) => vec![&s.link],
        }
    }
}

/// A part of the configuration that cannot be applied; the rest of the plan goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanProblem {
    /// The interface (`machine.network.interfaces[].interface`, or a VLAN link) it is about.
    pub interface: String,
    /// What is wrong and what to do.
    pub reason: String,
}

/// What a `deviceSelector` can see of a link.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkFacts {
    /// Name.
    pub name: String,
    /// Hardware address, `52:54:00:12:34:56`.
    pub hardware_addr: String,
    /// Kernel driver of its device (`virtio_net`), none for a virtual link.
    pub driver: Option<String>,
    /// Backed by a device (not a bond, bridge, VLAN or loopback).
    pub physical: bool,
}

/// `pattern` with `*` for any characters, against `text`, ignoring ASCII case. By hand: one
/// wildcard is all the guides' selectors use, not worth a glob crate.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.to_ascii_lowercase(), text.to_ascii_lowercase());
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == t;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !t.starts_with(first) || !t[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &t[first.len()..t.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether `link` has everything `selector` asks for.
pub fn selects(selector: &DeviceSelector, link: &LinkFacts) -> bool {
    !selector.is_empty()
        && selector
            .hardware_addr
            .as_deref()
            .is_none_or(|p| glob(p, &link.hardware_addr))
        && selector
            .driver
            .as_deref()
            .is_none_or(|p| link.driver.as_deref().is_some_and(|d| glob(p, d)))
        && selector.physical.is_none_or(|p| p == link.physical)
}

/// `network` with each `deviceSelector` replaced by the name of the first link (by name) it
/// selects, and each bond's `deviceSelectors` by the names of every link they select.
/// An entry that selects no link is left out and reported.
pub fn resolve(network: &NetworkConfig, links: &[LinkFacts]) -> (NetworkConfig, Vec<PlanProblem>) {
    let mut links = links.to_vec();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = network.clone();
    let mut problems = Vec::new();
    out.interfaces.retain_mut(|dev| {
        if let Some(sel) = dev.device_selector.take() {
            match links.iter().find(|l| selects(&sel, l)) {
                Some(l) => dev.interface = l.name.clone(),
                None => {
                    problems.push(PlanProblem {
                        interface: format!("deviceSelector {sel:?}"),
                        reason: format!(
                            "selects none of the links ({}): see `kiln get links` for their hardware addresses",
                            links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                    return false;
                }
            }
        }
        if let Some(bond) = dev.bond.as_mut() {
            for sel in std::mem::take(&mut bond.device_selectors) {
                let picked: Vec<&LinkFacts> = links.iter().filter(|l| selects(&sel, l)).collect();
                if picked.is_empty() {
                    problems.push(PlanProblem {
                        interface: dev.interface.clone(),
                        reason: format!("bond.deviceSelectors {sel:?} selects no link"),
                    });
                }
                for l in picked {
                    if l.name != dev.interface && !bond.interfaces.contains(&l.name) {
                        bond.interfaces.push(l.name.clone());
                    }
                }
            }
        }
        true
    });
    (out, problems)
}

/// The name of VLAN `id` on `parent`, as the guides name it (`eth0.100`).
pub fn vlan_name(parent: &str, id: u16) -> String {
    format!("{parent}.{id}")
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

fn bond_mode(mode: Option<&str>) -> Result<BondMode, String> {
    Ok(match mode.unwrap_or("balance-rr") {
        "balance-rr" => BondMode::BalanceRr,
        "active-backup" => BondMode::ActiveBackup,
        "balance-xor" => BondMode::BalanceXor,
        "broadcast" => BondMode::Broadcast,
        "802.3ad" => BondMode::Ieee8023Ad,
        "balance-tlb" => BondMode::BalanceTlb,
        "balance-alb" => BondMode::BalanceAlb,
        other => {
            return Err(format!(
                "bond mode {other:?} is unknown: use active-backup, 802.3ad, balance-rr, balance-xor, broadcast, balance-tlb or balance-alb"
            ));
        }
    })
}

fn xmit_hash_policy(policy: &str) -> Result<BondXmitHashPolicy, String> {
    Ok(match policy {
        "layer2" => BondXmitHashPolicy::Layer2,
        "layer3+4" => BondXmitHashPolicy::Layer34,
        "layer2+3" => BondXmitHashPolicy::Layer23,
        "encap2+3" => BondXmitHashPolicy::Encap23,
        "encap3+4" => BondXmitHashPolicy::Encap34,
        other => {
            return Err(format!(
                "xmitHashPolicy {other:?} is unknown: use layer2, layer3+4, layer2+3, encap2+3 or encap3+4"
            ));
        }
    })
}

fn settings(
    link: &str,
    mtu: Option<u32>,
    addresses: &[String],
    routes: &[Route],
    dhcp: Option<bool>,
) -> Result<LinkSettings, String> {
    let mut s = LinkSettings {
        link: link.to_owned(),
        mtu,
        dhcp: dhcp == Some(true),
        ..LinkSettings::default()
    };
    for a in addresses {
        s.addresses.push(parse_cidr(a).ok_or_else(|| {
            format!("address {a:?} is not in CIDR notation (e.g. 192.168.2.10/24)")
        })?);
    }
    for r in routes {
        let (destination, prefix) = parse_cidr(&r.network).ok_or_else(|| {
            format!(
                "route {:?} is not in CIDR notation (e.g. 0.0.0.0/0)",
                r.network
            )
        })?;
        let gateway = match r.gateway.as_deref().filter(|g| !g.is_empty()) {
            None => None,
            Some(g) => Some(
                g.parse::<IpAddr>()
                    .map_err(|e| format!("gateway {g:?} of the route to {}: {e}", r.network))?,
            ),
        };
        if gateway.is_some_and(|g| g.is_ipv4() != destination.is_ipv4()) {
            return Err(format!(
                "the route to {} has a gateway of another address family",
                r.network
            ));
        }
        s.routes.push(RouteSpec {
            destination,
            prefix,
            gateway,
            metric: r.metric,
        });
    }
    Ok(s)
}

/// The plan for `network`: steps in an order the kernel accepts, and what was left out.
/// Ignored interfaces (`ignore: true`) are left alone.
pub fn plan(network: &NetworkConfig) -> (Vec<Step>, Vec<PlanProblem>) {
    let mut problems = Vec::new();
    // Links to create, with the links each is made of.
    let mut creates: Vec<(Step, Vec<String>)> = Vec::new();
    let mut enslave: Vec<Step> = Vec::new();
    let mut configure: Vec<Step> = Vec::new();
    for dev in &network.interfaces {
        if dev.ignore == Some(true) {
            continue;
        }
        let name = dev.interface.clone();
        let problem = |reason: String| PlanProblem {
            interface: name.clone(),
            reason,
        };
        if let Some(bond) = &dev.bond {
            let spec = (|| -> Result<BondSpec, String> {
                Ok(BondSpec {
                    name: name.clone(),
                    mode: bond_mode(bond.mode.as_deref())?,
                    miimon: bond.miimon,
                    updelay: bond.updelay,
                    downdelay: bond.downdelay,
                    lacp_fast: match bond.lacp_rate.as_deref() {
                        None => None,
                        Some("fast") => Some(true),
                        Some("slow") => Some(false),
                        Some(o) => return Err(format!("lacpRate {o:?}: use slow or fast")),
                    },
                    xmit_hash_policy: bond
                        .xmit_hash_policy
                        .as_deref()
                        .map(xmit_hash_policy)
                        .transpose()?,
                })
            })();
            match spec {
                Ok(spec) => {
                    creates.push((Step::Bond(spec), bond.interfaces.clone()));
                    enslave.extend(bond.interfaces.iter().map(|m| Step::Enslave {
                        member: m.clone(),
                        master: name.clone(),
                    }));
                }
                Err(reason) => {
                    problems.push(problem(reason));
                    continue;
                }
            }
        } else if let Some(bridge) = &dev.bridge {
            creates.push((
                Step::Bridge {
                    name: name.clone(),
                    stp: bridge.stp.as_ref().is_some_and(|s| s.enabled),
                },
                bridge.interfaces.clone(),
            ));
            enslave.extend(bridge.interfaces.iter().map(|m| Step::Enslave {
                member: m.clone(),
                master: name.clone(),
            }));
        }
        match settings(&name, dev.mtu, &dev.addresses, &dev.routes, dev.dhcp) {
            Ok(s) => configure.push(Step::Configure(s)),
            Err(reason) => problems.push(problem(reason)),
        }
        for vlan in &dev.vlans {
            let vname = vlan_name(&name, vlan.vlan_id);
            if vname.len() > 15 {
                problems.push(PlanProblem {
                    interface: vname.clone(),
                    reason: format!(
                        "the VLAN link name {vname:?} is longer than Linux's 15 characters: use a shorter parent name"
                    ),
                });
                continue;
            }
            creates.push((
                Step::Vlan {
                    name: vname.clone(),
                    parent: name.clone(),
                    id: vlan.vlan_id,
                },
                vec![name.clone()],
            ));
            match settings(&vname, vlan.mtu, &vlan.addresses, &vlan.routes, vlan.dhcp) {
                Ok(s) => configure.push(Step::Configure(s)),
                Err(reason) => problems.push(PlanProblem {
                    interface: vname,
                    reason,
                }),
            }
        }
    }

    // Create each link after the created links it is made of (a bridge over a bond, a VLAN on
    // a bond, a bridge over a VLAN); its members are enslaved right after it is made.
    let created: BTreeSet<String> = creates.iter().map(|(s, _)| s.link().to_owned()).collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut steps = Vec::new();
    let mut pending: BTreeMap<usize, (Step, Vec<String>)> =
        creates.into_iter().enumerate().collect();
    while !pending.is_empty() {
        let ready: Vec<usize> = pending
            .iter()
            .filter(|(_, (_, deps))| {
                deps.iter()
                    .all(|d| !created.contains(d) || done.contains(d))
            })
            .map(|(i, _)| *i)
            .collect();
        if ready.is_empty() {
            for (step, deps) in pending.into_values() {
                problems.push(PlanProblem {
                    interface: step.link().to_owned(),
                    reason: format!(
                        "it is made of {} and they form a loop: a link cannot contain itself",
                        deps.join(", ")
                    ),
                });
            }
            break;
        }
        for i in ready {
            let (step, _) = pending.remove(&i).unwrap_or_else(|| unreachable!());
            let name = step.link().to_owned();
            steps.push(step);
            steps.extend(
                enslave
                    .iter()
                    .filter(|e| matches!(e, Step::Enslave { master, .. } if *master == name))
                    .cloned(),
            );
            done.insert(name);
        }
    }
    // Links of a loop were not made: leave out what needs them.
    let lost: BTreeSet<String> = created.difference(&done).cloned().collect();
    steps.extend(
        configure
            .into_iter()
            .filter(|s| !s.needs().iter().any(|n| lost.contains(*n))),
    );
    (steps, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(yaml: &str) -> NetworkConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Bond(b) => format!("bond {}", b.name),
                Step::Bridge { name, stp } => format!("bridge {name} stp={stp}"),
                Step::Vlan { name, parent, id } => format!("vlan {name} on {parent} id {id}"),
                Step::Enslave { member, master } => format!("enslave {member} to {master}"),
                Step::Configure(s) => format!("configure {}", s.link),
            })
            .collect()
    }

    /// The guides' examples in one document: a bond over both NICs, a VLAN on it, a bridge
    /// over another VLAN, static addresses and routes.
    const COMBINED: &str = r#"
interfaces:
  - interface: br0
    addresses: [172.16.200.2/24]
    bridge:
      stp: {enabled: true}
      interfaces: [bond0.200]
  - interface: bond0
    mtu: 1400
    addresses: [10.5.0.2/24]
    routes:
      - network: 0.0.0.0/0
        gateway: 10.5.0.1
    bond:
      mode: active-backup
      miimon: 100
      updelay: 200
      downdelay: 200
      interfaces: [eth0, eth1]
    vlans:
      - vlanId: 100
        addresses: [172.16.100.2/24]
        routes:
          - network: 172.16.101.0/24
            gateway: 172.16.100.1
            metric: 1024
      - vlanId: 200
"#;

    #[test]
    fn links_are_made_after_what_they_are_made_of_and_configured_last() {
        let (steps, problems) = plan(&network(COMBINED));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            names(&steps),
            [
                "bond bond0",
                "enslave eth0 to bond0",
                "enslave eth1 to bond0",
                "vlan bond0.100 on bond0 id 100",
                "vlan bond0.200 on bond0 id 200",
                "bridge br0 stp=true",
                "enslave bond0.200 to br0",
                "configure br0",
                "configure bond0",
                "configure bond0.100",
                "configure bond0.200",
            ]
        );
    }

    #[test]
    fn a_bond_carries_its_mode_timers_and_the_links_settings() {
        let (steps, _) = plan(&network(COMBINED));
        assert_eq!(
            steps[0],
            Step::Bond(BondSpec {
                name: "bond0".into(),
                mode: BondMode::ActiveBackup,
                miimon: Some(100),
                updelay: Some(200),
                downdelay: Some(200),
                lacp_fast: None,
                xmit_hash_policy: None,
            })
        );
        let bond0 = steps
            .iter()
            .find_map(|s| match s {
                Step::Configure(c) if c.link == "bond0" => Some(c.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(bond0.mtu, Some(1400));
        assert_eq!(bond0.addresses, [("10.5.0.2".parse().unwrap(), 24)]);
        assert_eq!(
            bond0.routes,
            [RouteSpec {
                destination: "0.0.0.0".parse().unwrap(),
                prefix: 0,
                gateway: Some("10.5.0.1".parse().unwrap()),
                metric: None,
            }]
        );
        let vlan = steps
            .iter()
            .find_map(|s| match s {
                Step::Configure(c) if c.link == "bond0.100" => Some(c.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(vlan.routes[0].metric, Some(1024));
    }

    #[test]
    fn the_guides_lacp_bond_maps_to_netlink_values() {
        let (steps, problems) = plan(&network(
            r#"
interfaces:
  - interface: bond0
    dhcp: true
    bond:
      mode: 802.3ad
      lacpRate: fast
      xmitHashPolicy: layer3+4
      miimon: 100
      interfaces: [eth0, eth1]
"#,
        ));
        assert!(problems.is_empty(), "{problems:?}");
        let Step::Bond(b) = &steps[0] else {
            panic!("{steps:?}")
        };
        assert_eq!(b.mode, BondMode::Ieee8023Ad);
        assert_eq!(b.lacp_fast, Some(true));
        assert_eq!(b.xmit_hash_policy, Some(BondXmitHashPolicy::Layer34));
        assert!(matches!(steps.last(), Some(Step::Configure(c)) if c.dhcp));
    }

    #[test]
    fn a_broken_interface_is_reported_and_the_others_still_apply() {
        let (steps, problems) = plan(&network(
            r#"
interfaces:
  - interface: eth2
    addresses: [10.9.0.5]
  - interface: bond1
    bond: {mode: round-robin, interfaces: [eth3]}
  - interface: eth0
    addresses: [192.168.2.10/24]
    vlans:
      - vlanId: 7
        routes: [{network: 10.0.0.0/8, gateway: "fe80::1"}]
"#,
        ));
        assert_eq!(
            problems
                .iter()
                .map(|p| p.interface.as_str())
                .collect::<Vec<_>>(),
            ["eth2", "bond1", "eth0.7"]
        );
        assert!(problems[0].reason.contains("CIDR"), "{problems:?}");
        assert!(problems[1].reason.contains("active-backup"), "{problems:?}");
        assert!(problems[2].reason.contains("family"), "{problems:?}");
        assert_eq!(
            names(&steps),
            ["vlan eth0.7 on eth0 id 7", "configure eth0"]
        );
    }

    #[test]
    fn links_that_contain_each_other_are_a_problem_not_a_hang() {
        let (steps, problems) = plan(&network(
            r#"
interfaces:
  - interface: br0
    bridge: {interfaces: [br1]}
  - interface: br1
    bridge: {interfaces: [br0]}
  - interface: eth0
    addresses: [192.168.2.10/24]
"#,
        ));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].reason.contains("loop"), "{problems:?}");
        assert_eq!(names(&steps), ["configure eth0"]);
    }

    fn nic(name: &str, mac: &str) -> LinkFacts {
        LinkFacts {
            name: name.into(),
            hardware_addr: mac.into(),
            driver: Some("virtio_net".into()),
            physical: true,
        }
    }

    #[test]
    fn selectors_pick_links_by_address_driver_and_kind() {
        let links = [
            nic("eth1", "52:54:00:aa:00:02"),
            nic("eth0", "52:54:00:AA:00:01"),
            LinkFacts {
                name: "lo".into(),
                hardware_addr: "00:00:00:00:00:00".into(),
                driver: None,
                physical: false,
            },
        ];
        let (net, problems) = resolve(
            &network(
                r#"
interfaces:
  - deviceSelector: {hardwareAddr: "52:54:00:aa:*:02"}
    addresses: [10.0.0.2/24]
  - interface: bond0
    bond:
      mode: active-backup
      deviceSelectors: [{driver: "virtio*", physical: true}]
  - deviceSelector: {driver: e1000}
    dhcp: true
"#,
            ),
            &links,
        );
        assert_eq!(net.interfaces.len(), 2, "{net:?}");
        assert_eq!(net.interfaces[0].interface, "eth1");
        assert_eq!(net.interfaces[0].device_selector, None);
        // Every match, in name order.
        assert_eq!(
            net.interfaces[1].bond.as_ref().unwrap().interfaces,
            ["eth0", "eth1"]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].reason.contains("eth0, eth1, lo"),
            "{problems:?}"
        );
    }

    #[test]
    fn globs_match_whole_text_case_blind() {
        assert!(glob("52:54:00:*", "52:54:00:12:34:56"));
        assert!(glob("*:56", "52:54:00:12:34:56"));
        assert!(glob("52:*:12:*", "52:54:00:12:34:56"));
        assert!(glob("AA:BB", "aa:bb"));
        assert!(!glob("52:54:01:*", "52:54:00:12:34:56"));
        assert!(!glob("virtio", "virtio_net"));
        assert!(!glob("a*b*a", "ab"));
    }

    #[test]
    fn ignored_links_are_left_alone() {
        let (steps, problems) = plan(&network(
            "interfaces:\n  - interface: eth1\n    ignore: true\n    addresses: [10.0.0.1/8]\n",
        ));
        assert!(steps.is_empty() && problems.is_empty());
    }
}
