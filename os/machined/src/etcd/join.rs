//! Joining control-plane nodes to etcd without waiting on timers: the serving side of
//! `EtcdMemberAdd` (which holds the request until this node's etcd runs and etcd's one learner
//! slot is free), the promotion of a learner as soon as etcd accepts it, and the joining side,
//! which asks every known control-plane node at once and starts etcd on the first answer.
//!
//! Decisions are made on etcd's state (the member list, a member's learner flag), never on the
//! text of an error: etcd 3.4 answers every membership conflict (too many learners, peer URL
//! exists, learner not ready, member not a learner) with the same gRPC code,
//! `FailedPrecondition`, so after such an answer the member list says what happened.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Member, MemberAddOptions};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use kiln_os_api::pb;
use kiln_os_api::wait::{Poll, until};
use tokio::time::Instant;
use tonic::Code;

use super::ops::{self, EtcdOpError};
use super::{EtcdPki, SERVICE_ID, client_url, peer_url};
use crate::api::status::ApiError;
use crate::node::Node;
use crate::supervisor::{ServiceState, SupervisorError};

/// How long a member-add request is held on the serving node (its etcd starting, the learner
/// slot being taken) before it answers with an error and the joining node asks again.
pub const SERVE_WAIT: Duration = Duration::from_secs(15);

/// While the learner slot is taken by a learner this node did not add (so no local event
/// announces its promotion), the member list is read again this often.
const FOREIGN_LEARNER_RECHECK: Duration = Duration::from_millis(100);

/// A key that is only read (never written), for a linearizable read before a membership change.
const BARRIER_KEY: &str = "/kiln/etcd/membership-barrier";

/// Pause between promotion attempts while the learner catches up: the first retry comes after
/// this, doubling up to [`PROMOTE_MAX_INTERVAL`]. etcd refuses a promotion until the learner's
/// log is within 90 % of the leader's, which on a new cluster takes a few round trips.
const PROMOTE_INTERVAL: Duration = Duration::from_millis(10);
/// Longest pause between promotion attempts.
const PROMOTE_MAX_INTERVAL: Duration = Duration::from_millis(50);
/// How long a learner is tried to be promoted before giving up (its node is then considered
/// gone; `kiln etcd remove-member` frees the slot).
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a member could not be added through this node.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The request came from this node itself (through the load-balanced endpoint).
    #[error(
        "member-add for {peer} reached the joining node itself; ask another control-plane node"
    )]
    AskedItself {
        /// The joining node's peer URL.
        peer: String,
    },
    /// etcd did not run on this node within the wait.
    #[error(
        "etcd is not running on this node yet ({state}); bootstrap the cluster or ask another control-plane node"
    )]
    NotRunning {
        /// The service state when the wait ended.
        state: &'static str,
    },
    /// This node's etcd did not answer within the wait.
    #[error("etcd on this node did not answer within {after:?}: {source}")]
    NotAnswering {
        /// How long it was tried.
        after: Duration,
        /// The last error.
        source: EtcdOpError,
    },
    /// This node is itself still a learner and cannot change the membership.
    #[error("this node is still an etcd learner; ask a voting member")]
    Learner,
    /// Another learner held etcd's one learner slot for the whole wait.
    #[error(
        "learner {learner} ({id:x}) was not promoted within {after:?}; if its node is gone, remove it with `kiln etcd remove-member`"
    )]
    SlotTaken {
        /// The learner's name (empty before it started).
        learner: String,
        /// Its member id.
        id: u64,
        /// How long this request waited.
        after: Duration,
    },
    /// etcd refused the member-add for a reason the member list does not explain.
    #[error("etcd refused to add {peer}: {source}")]
    Refused {
        /// The peer URL.
        peer: String,
        /// etcd's answer.
        source: EtcdOpError,
    },
    /// Talking to etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdOpError),
    /// The etcd service is not known to the supervisor (not a control-plane node).
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

impl From<JoinError> for ApiError {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::AskedItself { .. }
            | JoinError::NotRunning { .. }
            | JoinError::Learner
            | JoinError::SlotTaken { .. } => ApiError::FailedPrecondition(e.to_string()),
            JoinError::NotAnswering { .. } => ApiError::Unavailable(e.to_string()),
            JoinError::Refused { source, .. } | JoinError::Etcd(source) => ApiError::Etcd(source),
            JoinError::Supervisor(s) => ApiError::Supervisor(s),
        }
    }
}

/// Whether etcd answered with a gRPC status of `code` (as opposed to a transport error).
fn has_code(e: &EtcdOpError, code: Code) -> bool {
    matches!(e, EtcdOpError::Etcd { source: etcd_client::Error::GRpcStatus(s), .. } if s.code() == code)
}

/// Tells the waiting member-add requests on this node that the membership may have changed.
pub(super) fn announce(node: &Node) {
    node.etcd.membership.send_modify(|n| *n = n.wrapping_add(1));
}

/// Waits until this node's etcd service runs and its etcd answers, then returns a client.
async fn own_client(node: &Node, deadline: Instant) -> Result<Client, JoinError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let status = node
        .supervisor
        .wait_for(SERVICE_ID, "running", left, |s| {
            s.state == ServiceState::Running
        })
        .await;
    match status {
        Ok(_) => {}
        Err(SupervisorError::Timeout { state, .. }) => return Err(JoinError::NotRunning { state }),
        Err(e) => return Err(e.into()),
    }
    let pki = node.etcd.pki().ok_or(JoinError::NotRunning {
        state: ServiceState::Preparing.as_str(),
    })?;
    let endpoints = [client_url(node)];
    let left = deadline.saturating_duration_since(Instant::now());
    // The process runs; its client port opens a moment later.
    until(
        "etcd on this node to answer",
        Poll::backoff(Duration::from_millis(10), Duration::from_millis(100), left),
        || async {
            let mut c = ops::connect(&pki, &endpoints).await?;
            c.status().await.map_err(ops::op_err(&endpoints))?;
            Ok::<_, EtcdOpError>(c)
        },
    )
    .await
    .map_err(|t| match t.last {
        Some(source) => JoinError::NotAnswering {
            after: left,
            source,
        },
        None => JoinError::NotRunning {
            state: ServiceState::Running.as_str(),
        },
    })
}

fn member_pb(m: &Member) -> pb::EtcdMember {
    pb::EtcdMember {
        id: m.id(),
        hostname: m.name().to_owned(),
        peer_urls: m.peer_urls().to_vec(),
        client_urls: m.client_urls().to_vec(),
        is_learner: m.is_learner(),
    }
}

fn answer(id: u64, members: &[Member]) -> pb::EtcdMemberAddResult {
    pb::EtcdMemberAddResult {
        metadata: None,
        member_id: id,
        members: members.iter().map(member_pb).collect(),
        client_urls: members
            .iter()
            .filter(|m| !m.is_learner())
            .flat_map(|m| m.client_urls().iter().cloned())
            .collect(),
    }
}

/// Serves `EtcdMemberAdd` on this node: waits (up to [`SERVE_WAIT`]) until this node's etcd
/// runs as a voting member and, for a learner, until etcd's one learner slot is free; adds the
/// member (or finds it, when an earlier request added it) and starts promoting it. A promotion
/// on this node wakes the waiting requests at once.
pub async fn add_member(
    node: &Arc<Node>,
    request: pb::EtcdMemberAddRequest,
) -> Result<pb::EtcdMemberAddResult, JoinError> {
    let own_peer = peer_url(node);
    if request.peer_urls.contains(&own_peer) {
        return Err(JoinError::AskedItself { peer: own_peer });
    }
    let start = Instant::now();
    let deadline = start + SERVE_WAIT;
    let mut changes = node.etcd.membership.subscribe();
    let mut client = own_client(node, deadline).await?;
    let endpoints = [client_url(node)];
    let peer = request.peer_urls.first().cloned().unwrap_or_default();
    loop {
        changes.borrow_and_update();
        // A learner cannot read the member list: wait for this node's own promotion.
        let own = client.status().await.map_err(ops::op_err(&endpoints))?;
        let busy = if own.is_learner() {
            Some(None)
        } else {
            let list = client
                .member_list()
                .await
                .map_err(ops::op_err(&endpoints))?;
            let members = list.members();
            if let Some(m) = members
                .iter()
                .find(|m| m.peer_urls().iter().any(|u| request.peer_urls.contains(u)))
            {
                return Ok(answer(m.id(), members));
            }
            if request.learner {
                members
                    .iter()
                    .find(|m| m.is_learner())
                    .map(|m| Some((m.name().to_owned(), m.id())))
            } else {
                None
            }
        };
        match busy {
            None => {}
            Some(learner) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(match learner {
                        None => JoinError::Learner,
                        Some((learner, id)) => JoinError::SlotTaken {
                            learner,
                            id,
                            after: now - start,
                        },
                    });
                }
                // A promotion made here (by this node's promoter or its own post-start)
                // announces itself; one made elsewhere is seen on the next read.
                let recheck = (now + FOREIGN_LEARNER_RECHECK).min(deadline);
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep_until(recheck) => {}
                }
                continue;
            }
        }
        // etcd's raft drops a membership change proposed while the previous one (a promotion
        // that just returned) is not yet marked applied, and the request then hangs until
        // etcd's timeout. A linearizable read completes only once raft moved past it.
        client
            .get(BARRIER_KEY, None)
            .await
            .map_err(ops::op_err(&endpoints))?;
        let options = request
            .learner
            .then(|| MemberAddOptions::new().with_is_learner());
        match client
            .member_add(request.peer_urls.clone(), options)
            .await
            .map_err(ops::op_err(&endpoints))
        {
            Ok(added) => {
                let id = added.member().map(Member::id).unwrap_or_default();
                let members = added.member_list().to_vec();
                tracing::info!(%peer, id = format!("{id:x}"), learner = request.learner, "added etcd member");
                announce(node);
                if request.learner {
                    tokio::spawn(promote_from_here(node.clone(), id));
                }
                return Ok(answer(id, &members));
            }
            // A conflict (another learner, the peer URL added meanwhile): the member list on
            // the next round says which, unless the time is up.
            Err(e) if has_code(&e, Code::FailedPrecondition) && Instant::now() < deadline => {
                tracing::debug!(%peer, error = %e, "member-add conflicted; reading the member list again");
            }
            Err(source) => return Err(JoinError::Refused { peer, source }),
        }
    }
}

/// How a promotion attempt ended, when it did not promote.
#[derive(Debug, thiserror::Error)]
enum PromoteError {
    /// etcd refused (the learner is still catching up) or could not be reached.
    #[error(transparent)]
    Etcd(#[from] EtcdOpError),
    /// The member is gone from the cluster.
    #[error("member {0:x} was removed from the cluster")]
    Removed(u64),
}

/// What became of a learner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promoted {
    /// This call promoted it.
    Now,
    /// Someone else promoted it first.
    Already,
}

/// One attempt: promote `id` through `endpoints`; on a refusal, the member list says whether
/// the member is already a voting member (done), gone, or still a learner (try again).
async fn promote_once(
    pki: &EtcdPki,
    endpoints: &[String],
    id: u64,
) -> Result<Promoted, PromoteError> {
    let mut c = ops::connect(pki, endpoints).await?;
    let refused = match c.member_promote(id).await {
        Ok(_) => return Ok(Promoted::Now),
        Err(e) => ops::op_err(endpoints)(e),
    };
    let list = c.member_list().await.map_err(ops::op_err(endpoints))?;
    match list.members().iter().find(|m| m.id() == id) {
        Some(m) if !m.is_learner() => Ok(Promoted::Already),
        Some(_) => Err(refused.into()),
        None => Err(PromoteError::Removed(id)),
    }
}

/// Promotes learner `id` through the voting members at `endpoints` as soon as etcd accepts it,
/// retrying every [`PROMOTE_INTERVAL`] to [`PROMOTE_MAX_INTERVAL`] while the learner catches up.
pub async fn promote(
    pki: &EtcdPki,
    endpoints: &[String],
    id: u64,
) -> Result<Promoted, kiln_os_api::wait::TimedOut<String>> {
    until(
        format!("promotion of learner {id:x}"),
        Poll::backoff(PROMOTE_INTERVAL, PROMOTE_MAX_INTERVAL, PROMOTE_TIMEOUT),
        || async {
            match promote_once(pki, endpoints, id).await {
                Ok(p) => Ok(Ok(p)),
                // Nothing left to promote: stop trying.
                Err(PromoteError::Removed(id)) => Ok(Err(PromoteError::Removed(id))),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
    .and_then(|r| {
        r.map_err(|e| kiln_os_api::wait::TimedOut {
            what: format!("promotion of learner {id:x}"),
            timeout: PROMOTE_TIMEOUT,
            attempts: 0,
            last: Some(e.to_string()),
        })
    })
}

/// The serving node's half of a join: promote the learner it added through its own etcd, and
/// wake the member-add requests waiting here for the learner slot.
async fn promote_from_here(node: Arc<Node>, id: u64) {
    let Some(pki) = node.etcd.pki() else {
        return;
    };
    let endpoints = [client_url(&node)];
    match promote(&pki, &endpoints, id).await {
        Ok(how) => tracing::info!(id = format!("{id:x}"), ?how, "etcd learner promoted"),
        Err(e) => tracing::warn!("{e}"),
    }
    announce(&node);
}

/// What a successful join returned: the `--initial-cluster` value and the learner to promote.
#[derive(Debug, Clone)]
pub(super) struct Joined {
    pub(super) initial_cluster: String,
    pub(super) member_id: u64,
    pub(super) client_urls: Vec<String>,
}

/// Why one candidate did not add this node.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The candidate could not be reached or refused.
    #[error("{candidate}: {message}")]
    Rpc {
        /// Who was asked.
        candidate: String,
        /// The gRPC status message.
        message: String,
    },
    /// The candidate answered without a result.
    #[error("{candidate}: empty answer")]
    Empty {
        /// Who was asked.
        candidate: String,
    },
}

/// Asks the OS API of `candidate` to add this node as a learner.
async fn ask(node: &Node, candidate: &str) -> Result<Joined, AskError> {
    let rpc = |s: tonic::Status| AskError::Rpc {
        candidate: candidate.to_owned(),
        message: s.message().to_owned(),
    };
    let ch = node.channel_to(candidate).await.map_err(rpc)?;
    let mut client = kiln_os_api::client::machine_client(ch);
    let mut req = tonic::Request::new(pb::EtcdMemberAddRequest {
        name: node.hostname(),
        peer_urls: vec![peer_url(node)],
        learner: true,
    });
    crate::api::auth::set_forwarded_role(&mut req, kiln_pki::ROLE_ADMIN);
    let resp = client.etcd_member_add(req).await.map_err(|s| {
        if matches!(s.code(), Code::Unavailable | Code::Unknown) {
            node.forget_channel(candidate);
        }
        rpc(s)
    })?;
    let result = resp
        .into_inner()
        .messages
        .into_iter()
        .next()
        .ok_or_else(|| AskError::Empty {
            candidate: candidate.to_owned(),
        })?;
    if let Some(m) = result.metadata.as_ref().filter(|m| !m.error.is_empty()) {
        return Err(AskError::Rpc {
            candidate: candidate.to_owned(),
            message: m.error.clone(),
        });
    }
    Ok(joined(node, &result))
}

/// The `--initial-cluster` value and promotion targets from a member-add answer.
fn joined(node: &Node, result: &pb::EtcdMemberAddResult) -> Joined {
    let me = result.member_id;
    let mut parts = Vec::new();
    for m in &result.members {
        let name = if m.id == me {
            node.hostname()
        } else {
            m.hostname.clone()
        };
        if name.is_empty() {
            continue;
        }
        for p in &m.peer_urls {
            parts.push(format!("{name}={p}"));
        }
    }
    Joined {
        initial_cluster: parts.join(","),
        member_id: me,
        client_urls: result.client_urls.clone(),
    }
}

/// Joins through etcd itself at `endpoints`, for a cluster whose members run no Kiln API (a
/// kubeadm control plane being migrated, reached at the control-plane endpoint): adds this
/// node as a learner with machined's client certificate from the configuration's etcd CA (or
/// finds it added by an earlier attempt). The members it answers with promote it, as after a
/// join through a Kiln node.
pub(super) async fn join_through_etcd(
    node: &Node,
    pki: &EtcdPki,
    endpoints: &[String],
) -> Result<Joined, EtcdOpError> {
    let mut c = ops::connect(pki, endpoints).await?;
    let peer = peer_url(node);
    let list = c.member_list().await.map_err(ops::op_err(endpoints))?;
    let (id, members) = match list
        .members()
        .iter()
        .find(|m| m.peer_urls().contains(&peer))
    {
        Some(m) => (m.id(), list.members().to_vec()),
        None => {
            let added = c
                .member_add(
                    vec![peer.clone()],
                    Some(MemberAddOptions::new().with_is_learner()),
                )
                .await
                .map_err(ops::op_err(endpoints))?;
            let id = added.member().map(Member::id).unwrap_or_default();
            tracing::info!(%peer, id = format!("{id:x}"), "added this node to etcd as a learner");
            (id, added.member_list().to_vec())
        }
    };
    Ok(joined(node, &answer(id, &members)))
}

/// Asks every candidate at once; the first to add this node wins (the others' requests are
/// dropped, and a late duplicate finds the member already added). Every error otherwise.
pub(super) async fn ask_all(node: &Node, candidates: &[String]) -> Result<Joined, Vec<AskError>> {
    let mut asks: FuturesUnordered<_> = candidates.iter().map(|c| ask(node, c)).collect();
    let mut errors = Vec::new();
    while let Some(result) = asks.next().await {
        match result {
            Ok(joined) => return Ok(joined),
            Err(e) => errors.push(e),
        }
    }
    Err(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_are_told_apart_by_code_not_text() {
        let conflict = EtcdOpError::Etcd {
            endpoints: "https://127.0.0.1:2379".into(),
            source: etcd_client::Error::GRpcStatus(tonic::Status::failed_precondition(
                "anything at all",
            )),
        };
        assert!(has_code(&conflict, Code::FailedPrecondition));
        let down = EtcdOpError::Etcd {
            endpoints: "https://127.0.0.1:2379".into(),
            source: etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
                "too many learner members in cluster",
            )),
        };
        assert!(!has_code(&down, Code::FailedPrecondition));
        assert!(!has_code(
            &EtcdOpError::NotRunning("stopped".into()),
            Code::FailedPrecondition
        ));
    }

    #[test]
    fn every_join_error_maps_to_a_status_code() {
        let cases = [
            (
                JoinError::AskedItself {
                    peer: "https://10.5.0.2:2380".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                JoinError::NotRunning { state: "Preparing" },
                Code::FailedPrecondition,
            ),
            (JoinError::Learner, Code::FailedPrecondition),
            (
                JoinError::SlotTaken {
                    learner: "cp-2".into(),
                    id: 0xab,
                    after: SERVE_WAIT,
                },
                Code::FailedPrecondition,
            ),
            (
                JoinError::NotAnswering {
                    after: SERVE_WAIT,
                    source: EtcdOpError::NotRunning("x".into()),
                },
                Code::Unavailable,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let status = tonic::Status::from(ApiError::from(e));
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }
}
