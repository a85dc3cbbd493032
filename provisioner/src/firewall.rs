//! Living beside Docker and other host firewalls: when the host's firewall would drop the
//! cluster bridge's forwarded traffic (Docker's engine sets the `FORWARD` policy to `DROP` and
//! turns on `bridge-nf-call-iptables`, so frames between two nodes on the bridge go through
//! it), `cluster create` adds one rule that accepts traffic from the bridge to the bridge, and
//! `destroy` removes exactly the rules it recorded in `state.yaml`.
//!
//! - iptables (legacy or nft-based, as Docker uses it): into `DOCKER-USER` when that chain
//!   exists (Docker jumps to it first and never touches it), else at the top of `FORWARD`;
//!   the rule carries the cluster's owner mark as its comment and is removed by exact match.
//! - native nftables: into every base chain on the forward hook whose policy is `drop`, other
//!   than the table iptables manages, found by handle and removed only while it still carries
//!   the mark.
//!
//! No crate fits: the rules must stay readable by the host's own `iptables-save` and by Docker,
//! which manage them through the iptables binary's compat encoding; writing them through raw
//! netlink (rustables, nftnl) would make `iptables` refuse the table ("incompatible"). So this
//! module drives the same binaries Docker drives, behind the [`Runner`] seam with a fake for
//! tests.

use std::process::Command;

use serde::{Deserialize, Serialize};

/// A rule the lab added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum Rule {
    /// An iptables rule in the filter table, removed with `-D CHAIN SPEC`.
    Iptables {
        /// `DOCKER-USER` or `FORWARD`.
        chain: String,
        /// The rule's arguments after the chain name.
        spec: Vec<String>,
    },
    /// A native nftables rule, removed by handle.
    Nft {
        /// `inet`, `ip`, `bridge`.
        family: String,
        /// The table.
        table: String,
        /// The chain.
        chain: String,
        /// The rule's handle.
        handle: u64,
        /// Its comment (the owner mark), checked before the rule is removed.
        comment: String,
    },
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Iptables { chain, spec } => write!(f, "iptables -A {chain} {}", spec.join(" ")),
            Rule::Nft {
                family,
                table,
                chain,
                handle,
                ..
            } => write!(f, "nft rule {family} {table} {chain} handle {handle}"),
        }
    }
}

/// Why the firewall could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The tool could not be run.
    #[error("running {program}: {source}")]
    Run {
        /// `iptables` or `nft`.
        program: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The tool refused.
    #[error("{command} failed: {stderr}")]
    Refused {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// `nft -j` printed something that is not its JSON.
    #[error("reading the nftables ruleset: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs the firewall tools: the real one runs the binaries; tests use a fake.
pub trait Runner {
    /// Runs `program args...`; `Ok(None)` when the program is not installed, else its stdout
    /// on success.
    fn run(&self, program: &str, args: &[&str]) -> Result<Option<String>, FirewallError>;
}

/// Runs the host's `iptables` and `nft`.
#[derive(Debug, Default)]
pub struct HostRunner;

impl Runner for HostRunner {
    fn run(&self, program: &str, args: &[&str]) -> Result<Option<String>, FirewallError> {
        let out = match Command::new(program).args(args).output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FirewallError::Run {
                    program: program.to_owned(),
                    source,
                });
            }
        };
        if out.status.success() {
            Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
        } else {
            Err(FirewallError::Refused {
                command: format!("{program} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

/// What the host's iptables filter table says about forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IptablesForward {
    policy_drops: bool,
    docker_user: bool,
}

fn iptables_forward(r: &dyn Runner) -> Result<Option<IptablesForward>, FirewallError> {
    let Some(rules) = r.run("iptables", &["-w", "-t", "filter", "-S"])? else {
        return Ok(None);
    };
    let mut f = IptablesForward {
        policy_drops: false,
        docker_user: false,
    };
    for line in rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["-P", "FORWARD", policy] => f.policy_drops = *policy != "ACCEPT",
            ["-N", "DOCKER-USER"] => f.docker_user = true,
            _ => {}
        }
    }
    Ok(Some(f))
}

/// Base chains on the forward hook whose policy drops, as (family, table, chain).
fn nft_dropping_forward_chains(
    r: &dyn Runner,
) -> Result<Vec<(String, String, String)>, FirewallError> {
    let Some(json) = r.run("nft", &["-j", "list", "chains"])? else {
        return Ok(Vec::new());
    };
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let c = &item["chain"];
        if c["hook"] == "forward" && c["policy"] == "drop" {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            out.push((s("family"), s("table"), s("name")));
        }
    }
    Ok(out)
}

/// Adds the rules that let `bridge`'s traffic pass the host firewall, recording each in
/// `record` before it is added (so a create killed halfway still removes it). Adds nothing when
/// nothing would drop it.
pub fn allow_bridge(
    r: &dyn Runner,
    bridge: &str,
    mark: &str,
    record: &mut dyn FnMut(&Rule),
) -> Result<Vec<Rule>, FirewallError> {
    let mut added = Vec::new();
    let iptables = iptables_forward(r)?;
    if let Some(f) = &iptables
        && (f.policy_drops || f.docker_user)
    {
        let chain = if f.docker_user {
            "DOCKER-USER"
        } else {
            "FORWARD"
        };
        let rule = Rule::Iptables {
            chain: chain.to_owned(),
            spec: iptables_spec(bridge, mark),
        };
        record(&rule);
        let mut args = vec!["-w", "-t", "filter", "-I", chain, "1"];
        let spec = iptables_spec(bridge, mark);
        args.extend(spec.iter().map(String::as_str));
        r.run("iptables", &args)?;
        added.push(rule);
    }
    for (family, table, chain) in nft_dropping_forward_chains(r)? {
        // The table iptables manages is handled above, in iptables' own encoding.
        if iptables.is_some() && table == "filter" && (family == "ip" || family == "ip6") {
            continue;
        }
        let out = r
            .run(
                "nft",
                &[
                    "--echo",
                    "--handle",
                    "insert",
                    "rule",
                    &family,
                    &table,
                    &chain,
                    "iifname",
                    bridge,
                    "oifname",
                    bridge,
                    "accept",
                    "comment",
                    &format!("\"{mark}\""),
                ],
            )?
            .unwrap_or_default();
        let handle = out
            .split("# handle ")
            .nth(1)
            .and_then(|h| h.split_whitespace().next())
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| FirewallError::Refused {
                command: format!("nft insert rule {family} {table} {chain}"),
                stderr: format!("no rule handle in its answer {out:?}"),
            })?;
        let rule = Rule::Nft {
            family,
            table,
            chain,
            handle,
            comment: mark.to_owned(),
        };
        record(&rule);
        added.push(rule);
    }
    Ok(added)
}

fn iptables_spec(bridge: &str, mark: &str) -> Vec<String> {
    [
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        mark,
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Removes `rule` if it is still there and still ours; a rule already gone is not an error.
pub fn remove(r: &dyn Runner, rule: &Rule) -> Result<(), FirewallError> {
    match rule {
        Rule::Iptables { chain, spec } => {
            let mut check = vec!["-w", "-t", "filter", "-C", chain.as_str()];
            check.extend(spec.iter().map(String::as_str));
            match r.run("iptables", &check) {
                Ok(Some(_)) => {}
                // Not installed any more, or no such rule (or chain): nothing to remove.
                Ok(None) | Err(FirewallError::Refused { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
            let mut del = vec!["-w", "-t", "filter", "-D", chain.as_str()];
            del.extend(spec.iter().map(String::as_str));
            r.run("iptables", &del)?;
            Ok(())
        }
        Rule::Nft {
            family,
            table,
            chain,
            handle,
            comment,
        } => {
            let listed = match r.run("nft", &["-j", "list", "chain", family, table, chain]) {
                Ok(Some(j)) => j,
                Ok(None) | Err(FirewallError::Refused { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            let v: serde_json::Value = serde_json::from_str(&listed)?;
            let ours = v["nftables"].as_array().into_iter().flatten().any(|i| {
                i["rule"]["handle"].as_u64() == Some(*handle)
                    && i["rule"]["comment"].as_str() == Some(comment)
            });
            if ours {
                r.run(
                    "nft",
                    &[
                        "delete",
                        "rule",
                        family,
                        table,
                        chain,
                        "handle",
                        &handle.to_string(),
                    ],
                )?;
            }
            Ok(())
        }
    }
}

/// Whether the host firewall would drop forwarded traffic on a bridge that has no rule of
/// ours (for the hint of a wait that timed out).
pub fn drops_forwarded(r: &dyn Runner) -> bool {
    let bridged = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1");
    let iptables_drops = iptables_forward(r)
        .ok()
        .flatten()
        .is_some_and(|f| f.policy_drops);
    let nft_drops = nft_dropping_forward_chains(r).is_ok_and(|c| !c.is_empty());
    (bridged && iptables_drops) || nft_drops
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Answers like a host whose iptables and nft print `iptables` and `nft`, and records calls.
    struct Fake {
        iptables: Option<&'static str>,
        nft: Option<&'static str>,
        calls: RefCell<Vec<String>>,
    }

    impl Runner for Fake {
        fn run(&self, program: &str, args: &[&str]) -> Result<Option<String>, FirewallError> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.borrow_mut().push(line.clone());
            let out = match program {
                "iptables" => self.iptables,
                "nft" => self.nft,
                _ => None,
            };
            let Some(out) = out else { return Ok(None) };
            if args.contains(&"-S") || args.contains(&"list") {
                return Ok(Some(out.to_owned()));
            }
            if args.contains(&"insert") {
                return Ok(Some(
                    "add rule inet fw fwd iifname ... # handle 42\n".to_owned(),
                ));
            }
            Ok(Some(String::new()))
        }
    }

    const DOCKER: &str = "-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-N DOCKER\n-N DOCKER-USER\n-A FORWARD -j DOCKER-USER\n";
    const OPEN: &str = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n";

    #[test]
    fn with_docker_the_rule_goes_into_docker_user_and_is_recorded_first() {
        let fake = Fake {
            iptables: Some(DOCKER),
            nft: None,
            calls: RefCell::new(vec![]),
        };
        let mut recorded = vec![];
        let added = allow_bridge(&fake, "kilnabc", "kiln:1:a", &mut |r| {
            recorded.push(r.clone())
        })
        .unwrap();
        assert_eq!(added, recorded);
        assert_eq!(added.len(), 1);
        assert!(matches!(&added[0], Rule::Iptables { chain, .. } if chain == "DOCKER-USER"));
        assert!(
            fake.calls.borrow().iter().any(|c| c
                == "iptables -w -t filter -I DOCKER-USER 1 -i kilnabc -o kilnabc -m comment --comment kiln:1:a -j ACCEPT"),
            "{:?}",
            fake.calls.borrow()
        );
    }

    #[test]
    fn an_open_host_gets_no_rule() {
        let fake = Fake {
            iptables: Some(OPEN),
            nft: None,
            calls: RefCell::new(vec![]),
        };
        assert!(
            allow_bridge(&fake, "b", "m", &mut |_| {})
                .unwrap()
                .is_empty()
        );
        assert!(!fake.calls.borrow().iter().any(|c| c.contains(" -I ")));
    }

    #[test]
    fn a_native_nftables_forward_drop_chain_gets_a_rule_by_handle() {
        let fake = Fake {
            iptables: None,
            nft: Some(
                r#"{"nftables":[{"metainfo":{}},{"chain":{"family":"inet","table":"fw","name":"fwd","handle":1,"type":"filter","hook":"forward","prio":0,"policy":"drop"}},{"chain":{"family":"inet","table":"fw","name":"in","handle":2,"type":"filter","hook":"input","prio":0,"policy":"drop"}}]}"#,
            ),
            calls: RefCell::new(vec![]),
        };
        let added = allow_bridge(&fake, "br", "kiln:1:a", &mut |_| {}).unwrap();
        assert_eq!(
            added,
            vec![Rule::Nft {
                family: "inet".into(),
                table: "fw".into(),
                chain: "fwd".into(),
                handle: 42,
                comment: "kiln:1:a".into()
            }]
        );
    }

    #[test]
    fn removal_deletes_only_a_rule_that_is_still_there() {
        let rule = Rule::Iptables {
            chain: "FORWARD".into(),
            spec: iptables_spec("b", "m"),
        };
        struct Gone;
        impl Runner for Gone {
            fn run(&self, program: &str, args: &[&str]) -> Result<Option<String>, FirewallError> {
                assert!(!args.contains(&"-D"), "must not delete a rule that is gone");
                Err(FirewallError::Refused {
                    command: program.into(),
                    stderr: "Bad rule (does a matching rule exist in that chain?)".into(),
                })
            }
        }
        remove(&Gone, &rule).unwrap();
    }
}
