//! The proxy's allow list: destinations by host name (exact or `*.suffix`) or by network
//! (CIDR), each optionally limited to ports. Everything not listed is denied.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork as IpNet;
use serde::{Deserialize, Serialize};

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Any destination.
    Any,
    /// One host name (lower case, without a trailing dot).
    Host(String),
    /// Every name under a domain (`*.lab` matches `registry.lab`, not `lab`).
    Suffix(String),
    /// An IP network; a host name matches when every address it resolves to is inside.
    Net(IpNet),
}

/// One entry: a target and the ports it allows (empty: every port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What it matches.
    pub target: Target,
    /// Allowed ports; empty allows every port.
    pub ports: Vec<u16>,
}

/// A rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "allow rule {rule:?}: {problem}; write HOST, *.DOMAIN, CIDR or `*`, optionally followed by \
     :PORT or :PORT,PORT (IPv6 networks in brackets: [fd00::/64]:443)"
)]
pub struct RuleError {
    /// The rule as written.
    pub rule: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |problem: &str| RuleError {
            rule: s.to_owned(),
            problem: problem.to_owned(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        // Split off the ports: `[v6net]:ports`, `v4-or-name:ports`, or a bare v6 net (two colons).
        let (target, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(|| err("missing ']'"))?;
            match after {
                "" => (inner, None),
                p => (
                    inner,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| err("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((t, p)) => (t, Some(p)),
                None => (s, None),
            }
        };
        let ports = match ports {
            None => Vec::new(),
            Some(p) => p
                .split(',')
                .map(|p| p.trim().parse::<u16>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| err("ports must be numbers from 0 to 65535"))?,
        };
        let target = if target == "*" {
            Target::Any
        } else if let Ok(ip) = target.parse::<IpAddr>() {
            Target::Net(IpNet::from(ip))
        } else if let Ok(net) = target.parse::<IpNet>() {
            // Keep the network address only: 10.5.0.7/24 means 10.5.0.0/24.
            Target::Net(IpNet::new(net.network(), net.prefix()).map_err(|e| err(&e.to_string()))?)
        } else if let Some(domain) = target.strip_prefix("*.") {
            Target::Suffix(valid_name(domain).ok_or_else(|| err("not a domain name"))?)
        } else {
            Target::Host(valid_name(target).ok_or_else(|| err("not a host name, IP or CIDR"))?)
        };
        Ok(Rule { target, ports })
    }
}

fn valid_name(name: &str) -> Option<String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(name)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = matches!(&self.target, Target::Net(IpNet::V6(_)));
        let target = match &self.target {
            Target::Any => "*".to_owned(),
            Target::Host(h) => h.clone(),
            Target::Suffix(d) => format!("*.{d}"),
            Target::Net(n) => n.to_string(),
        };
        if self.ports.is_empty() {
            return f.write_str(&target);
        }
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        if v6 {
            write!(f, "[{target}]:{}", ports.join(","))
        } else {
            write!(f, "{target}:{}", ports.join(","))
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The allow list. Empty denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllowList(pub Vec<Rule>);

impl AllowList {
    /// Whether `host:port` is allowed by name alone (host rules, and network rules when `host`
    /// is an IP literal).
    pub fn allows_name(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        self.0.iter().any(|r| {
            port_ok(r, port)
                && match (&r.target, ip) {
                    (Target::Any, _) => true,
                    (Target::Net(n), Some(ip)) => n.contains(ip),
                    (Target::Net(_), None) => false,
                    (Target::Host(h), _) => *h == host,
                    (Target::Suffix(d), None) => host
                        .strip_suffix(d.as_str())
                        .is_some_and(|p| p.len() > 1 && p.ends_with('.')),
                    (Target::Suffix(_), Some(_)) => false,
                }
        })
    }

    /// Whether the list has network rules for `port`, so that resolving a name is worth it.
    pub fn has_networks_for(&self, port: u16) -> bool {
        self.0
            .iter()
            .any(|r| matches!(r.target, Target::Net(_)) && port_ok(r, port))
    }

    /// Whether every address in `addrs` (non-empty) is inside a network rule for `port`.
    pub fn allows_addresses(&self, addrs: &[IpAddr], port: u16) -> bool {
        !addrs.is_empty()
            && addrs.iter().all(|ip| {
                self.0.iter().any(|r| {
                    port_ok(r, port)
                        && match &r.target {
                            Target::Any => true,
                            Target::Net(n) => n.contains(*ip),
                            _ => false,
                        }
                })
            })
    }
}

fn port_ok(r: &Rule, port: u16) -> bool {
    r.ports.is_empty() || r.ports.contains(&port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(rules: &[&str]) -> AllowList {
        AllowList(rules.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn rules_parse_and_print_back() {
        for r in [
            "registry.lab",
            "*.lab:443",
            "10.5.0.0/24",
            "10.5.0.1/32:5000,6000",
            "[fd00::/64]:443",
            "fd00::/64",
            "*",
        ] {
            let rule: Rule = r.parse().unwrap();
            assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule, "{r}");
        }
        assert_eq!(
            "10.5.0.7".parse::<Rule>().unwrap().target,
            Target::Net("10.5.0.7/32".parse().unwrap())
        );
        for bad in ["", "host:http", "bad name", "[fd00::/64", "a..b", "x:70000"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn names_suffixes_networks_and_ports() {
        let l = list(&["registry.lab:5000", "*.kiln.local", "10.5.0.0/24:443"]);
        assert!(l.allows_name("registry.lab", 5000));
        assert!(l.allows_name("REGISTRY.lab.", 5000));
        assert!(!l.allows_name("registry.lab", 5001));
        assert!(l.allows_name("cp-1.kiln.local", 80));
        assert!(!l.allows_name("kiln.local", 80));
        assert!(!l.allows_name("evilkiln.local", 80));
        assert!(l.allows_name("10.5.0.9", 443));
        assert!(!l.allows_name("10.5.0.9", 80));
        assert!(!l.allows_name("10.6.0.9", 443));
        assert!(!l.allows_name("example.com", 443));
        assert!(l.has_networks_for(443) && !l.has_networks_for(80));
        let ips = ["10.5.0.3".parse().unwrap(), "10.5.0.4".parse().unwrap()];
        assert!(l.allows_addresses(&ips, 443));
        let mixed = ["10.5.0.3".parse().unwrap(), "1.1.1.1".parse().unwrap()];
        assert!(!l.allows_addresses(&mixed, 443));
        assert!(!l.allows_addresses(&[], 443));
        assert!(!AllowList::default().allows_name("anything", 1));
    }
}
