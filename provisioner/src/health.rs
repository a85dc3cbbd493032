//! Cluster health, as `kiln health` and the last phase of `kiln cluster create` check it: the
//! API answers on every node, etcd is healthy on every control-plane node, the member list is
//! the same on all of them and matches the control-plane nodes, and no service has failed.
//! Each check prints as it passes or fails; all share one deadline.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_os_api::client::request;
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
use kiln_os_api::wait::{Poll, until};
use tonic::transport::Channel;

use crate::progress::Progress;

/// The nodes to check.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Control-plane nodes: (address, host name).
    pub control_plane: Vec<(String, String)>,
    /// Workers: (address, host name).
    pub workers: Vec<(String, String)>,
}

impl Topology {
    fn all(&self) -> Vec<String> {
        self.control_plane
            .iter()
            .chain(&self.workers)
            .map(|(a, _)| a.clone())
            .collect()
    }
    fn cp(&self) -> Vec<String> {
        self.control_plane.iter().map(|(a, _)| a.clone()).collect()
    }
}

/// Why a check did not pass: the message, and the nodes (host names or addresses) it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unready {
    /// What is wrong.
    pub message: String,
    /// The nodes that are not ready (host names or addresses).
    pub nodes: Vec<String>,
}

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<tonic::Status> for Unready {
    fn from(s: tonic::Status) -> Self {
        Unready {
            message: s.message().to_owned(),
            nodes: Vec::new(),
        }
    }
}

impl Unready {
    fn from_parts(parts: Vec<(String, String)>) -> Result<(), Unready> {
        if parts.is_empty() {
            return Ok(());
        }
        Err(Unready {
            message: parts
                .iter()
                .map(|(_, m)| m.clone())
                .collect::<Vec<_>>()
                .join("; "),
            nodes: parts.into_iter().map(|(n, _)| n).collect(),
        })
    }
}

/// A health check that did not pass in time.
#[derive(Debug, thiserror::Error)]
#[error("{what}: not reached within {timeout:?}: {last}")]
pub struct HealthError {
    /// The check.
    pub what: &'static str,
    /// The time allowed for all checks.
    pub timeout: Duration,
    /// Why it last failed.
    pub last: Unready,
}

fn hostname(m: Option<&pb::Metadata>) -> String {
    m.map(|m| m.hostname.clone()).unwrap_or_default()
}

fn node_errors<'a>(mds: impl Iterator<Item = Option<&'a pb::Metadata>>) -> Vec<(String, String)> {
    mds.filter_map(|m| {
        m.filter(|m| !m.error.is_empty())
            .map(|m| (m.hostname.clone(), format!("{}: {}", m.hostname, m.error)))
    })
    .collect()
}

async fn api_answers(c: &mut MachineServiceClient<Channel>, t: &Topology) -> Result<(), Unready> {
    let r = c
        .version(request(pb::Empty {}, &t.all()))
        .await?
        .into_inner();
    let mut parts = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    for m in r.messages.iter().filter(|m| !node_is_running(m)) {
        let h = hostname(m.metadata.as_ref());
        parts.push((h.clone(), format!("{h} is {}", m.stage())));
    }
    Unready::from_parts(parts)
}

fn node_is_running(m: &pb::VersionInfo) -> bool {
    m.metadata.as_ref().is_some_and(|md| md.error.is_empty()) && m.stage() == pb::Stage::Running
}

async fn etcd_healthy(c: &mut MachineServiceClient<Channel>, t: &Topology) -> Result<(), Unready> {
    let r = c
        .etcd_status(request(pb::Empty {}, &t.cp()))
        .await?
        .into_inner();
    let mut parts = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    for m in &r.messages {
        let h = hostname(m.metadata.as_ref());
        if let Some(s) = &m.member_status {
            if !s.errors.is_empty() {
                parts.push((h.clone(), format!("{h}: {}", s.errors.join(", "))));
            }
            if s.is_learner {
                parts.push((h.clone(), format!("{h} is still a learner")));
            }
        }
    }
    Unready::from_parts(parts)
}

async fn members_consistent(
    c: &mut MachineServiceClient<Channel>,
    t: &Topology,
) -> Result<(), Unready> {
    let r = c
        .etcd_member_list(request(pb::Empty {}, &t.cp()))
        .await?
        .into_inner();
    Unready::from_parts(node_errors(r.messages.iter().map(|m| m.metadata.as_ref())))?;
    // Nodes given by address only (no host name) are checked by count and agreement.
    let names_known = t.control_plane.iter().all(|(_, h)| !h.is_empty());
    let want: BTreeSet<String> = if names_known {
        t.control_plane.iter().map(|(_, h)| h.clone()).collect()
    } else {
        r.messages
            .first()
            .map(|m| m.members.iter().map(|m| m.hostname.clone()).collect())
            .unwrap_or_default()
    };
    let mut parts = Vec::new();
    if want.len() != t.control_plane.len() {
        parts.push((
            String::new(),
            format!(
                "{} members {want:?} for {} control-plane nodes",
                want.len(),
                t.control_plane.len()
            ),
        ));
    }
    for m in &r.messages {
        let got: BTreeSet<String> = m.members.iter().map(|m| m.hostname.clone()).collect();
        if got != want {
            let h = hostname(m.metadata.as_ref());
            let missing: Vec<String> = want.difference(&got).cloned().collect();
            parts.push((
                h.clone(),
                format!("{h} sees members {got:?}, expected {want:?}"),
            ));
            parts.extend(
                missing
                    .into_iter()
                    .map(|n| (n.clone(), format!("{n} is not a member"))),
            );
        }
    }
    Unready::from_parts(parts)
}

async fn no_failed_services(
    c: &mut MachineServiceClient<Channel>,
    t: &Topology,
) -> Result<(), Unready> {
    let r = c
        .service_list(request(pb::Empty {}, &t.all()))
        .await?
        .into_inner();
    let mut parts = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    for l in &r.messages {
        let h = hostname(l.metadata.as_ref());
        for s in l
            .services
            .iter()
            .filter(|s| s.state() == pb::ServiceState::Failed)
        {
            parts.push((
                h.clone(),
                format!(
                    "{h}: service {} failed: {}",
                    s.id,
                    s.events.last().map(|e| e.message.as_str()).unwrap_or("")
                ),
            ));
        }
    }
    Unready::from_parts(parts)
}

/// The checks, in order.
#[derive(Debug, Clone, Copy)]
enum Check {
    Api,
    Etcd,
    Members,
    Services,
}

impl Check {
    fn what(self) -> &'static str {
        match self {
            Check::Api => "the API on all nodes",
            Check::Etcd => "etcd to be healthy on all control-plane nodes",
            Check::Members => "etcd members to be consistent across nodes",
            Check::Services => "all services to be non-failed",
        }
    }
}

/// Runs every check until it passes or `timeout` (for all of them) runs out; the error names
/// the check and the nodes that were not ready.
pub async fn check(
    client: &mut MachineServiceClient<Channel>,
    topology: &Topology,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), HealthError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut steps = vec![Check::Api];
    if !topology.control_plane.is_empty() {
        steps.extend([Check::Etcd, Check::Members]);
    }
    steps.push(Check::Services);
    for check in steps {
        let what = check.what();
        progress.phase(format!("waiting for {what}"));
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let poll = Poll::every(
            Duration::from_millis(250),
            left.max(Duration::from_millis(1)),
        );
        let result = until(what, poll, || {
            let mut c = client.clone();
            async move {
                let attempt = async {
                    match check {
                        Check::Api => api_answers(&mut c, topology).await,
                        Check::Etcd => etcd_healthy(&mut c, topology).await,
                        Check::Members => members_consistent(&mut c, topology).await,
                        Check::Services => no_failed_services(&mut c, topology).await,
                    }
                };
                match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(Unready {
                        message: "no answer within 10s".to_owned(),
                        nodes: Vec::new(),
                    }),
                }
            }
        })
        .await;
        if let Err(t) = result {
            progress.failed();
            return Err(HealthError {
                what,
                timeout,
                last: t.last.unwrap_or_default(),
            });
        }
    }
    progress.done();
    Ok(())
}
