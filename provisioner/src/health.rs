//! Cluster health, as `kiln health` and the last phase of `kiln cluster create` check it: the
//! API answers on every node, etcd is healthy on every control-plane node, the member list is
//! the same on all of them and matches the control-plane nodes, and no service has failed.
//! Each check prints as it passes or fails; all share one deadline.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::bail;
use kiln_os_api::client::request;
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
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

fn node_errors<'a>(mds: impl Iterator<Item = Option<&'a pb::Metadata>>) -> Vec<String> {
    mds.filter_map(|m| {
        m.filter(|m| !m.error.is_empty())
            .map(|m| format!("{}: {}", m.hostname, m.error))
    })
    .collect()
}

async fn api_answers(c: &mut MachineServiceClient<Channel>, t: &Topology) -> Result<(), String> {
    let r = c
        .version(request(pb::Empty {}, &t.all()))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let errors = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let booting: Vec<String> = r
        .messages
        .iter()
        .filter(|m| m.stage != "running")
        .map(|m| {
            format!(
                "{} is {}",
                m.metadata
                    .as_ref()
                    .map(|m| m.hostname.as_str())
                    .unwrap_or(""),
                m.stage
            )
        })
        .collect();
    if booting.is_empty() {
        Ok(())
    } else {
        Err(booting.join("; "))
    }
}

async fn etcd_healthy(c: &mut MachineServiceClient<Channel>, t: &Topology) -> Result<(), String> {
    let r = c
        .etcd_status(request(pb::Empty {}, &t.cp()))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut errors = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    for m in &r.messages {
        if let Some(s) = &m.member_status {
            if !s.errors.is_empty() {
                errors.push(format!(
                    "{}: {}",
                    m.metadata
                        .as_ref()
                        .map(|m| m.hostname.as_str())
                        .unwrap_or(""),
                    s.errors.join(", ")
                ));
            }
            if s.is_learner {
                errors.push(format!(
                    "{} is still a learner",
                    m.metadata
                        .as_ref()
                        .map(|m| m.hostname.as_str())
                        .unwrap_or("")
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

async fn members_consistent(
    c: &mut MachineServiceClient<Channel>,
    t: &Topology,
) -> Result<(), String> {
    let r = c
        .etcd_member_list(request(pb::Empty {}, &t.cp()))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let errors = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let want: BTreeSet<String> = t.control_plane.iter().map(|(_, h)| h.clone()).collect();
    for m in &r.messages {
        let got: BTreeSet<String> = m.members.iter().map(|m| m.hostname.clone()).collect();
        if got != want {
            return Err(format!(
                "{} sees members {:?}, expected {:?}",
                m.metadata
                    .as_ref()
                    .map(|m| m.hostname.as_str())
                    .unwrap_or(""),
                got,
                want
            ));
        }
    }
    Ok(())
}

async fn no_failed_services(
    c: &mut MachineServiceClient<Channel>,
    t: &Topology,
) -> Result<(), String> {
    let r = c
        .service_list(request(pb::Empty {}, &t.all()))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut errors = node_errors(r.messages.iter().map(|m| m.metadata.as_ref()));
    for l in &r.messages {
        for s in l.services.iter().filter(|s| s.state == "Failed") {
            errors.push(format!(
                "{}: service {} failed: {}",
                l.metadata
                    .as_ref()
                    .map(|m| m.hostname.as_str())
                    .unwrap_or(""),
                s.id,
                s.events.last().map(|e| e.message.as_str()).unwrap_or("")
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Runs every check until it passes or `timeout` (for all of them) runs out.
pub async fn check(
    client: &mut MachineServiceClient<Channel>,
    topology: &Topology,
    timeout: Duration,
    progress: &Progress,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    macro_rules! step {
        ($what:expr, $f:ident) => {{
            progress.phase(format!("waiting for {}", $what));
            loop {
                let last = match tokio::time::timeout(Duration::from_secs(10), $f(client, topology))
                    .await
                {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => e,
                    Err(_) => "no answer within 10s".to_owned(),
                };
                if Instant::now() >= deadline {
                    progress.failed();
                    bail!("{} : not reached within {:?}: {last}", $what, timeout);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }};
    }
    step!("the API on all nodes", api_answers);
    if !topology.control_plane.is_empty() {
        step!(
            "etcd to be healthy on all control-plane nodes",
            etcd_healthy
        );
        step!(
            "etcd members to be consistent across nodes",
            members_consistent
        );
    }
    step!("all services to be non-failed", no_failed_services);
    progress.done();
    Ok(())
}
