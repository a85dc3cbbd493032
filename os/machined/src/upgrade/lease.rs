//! The etcd side of an upgrade: the quorum check, the upgrade lease that lets one control-plane
//! node upgrade at a time (a key held under an etcd lease, so a node that never comes back
//! frees it after [`LEASE_TTL`]), and leaving the membership without `--preserve`.
//!
//! The quorum rule: while the node is away, the other healthy voting members must be a quorum
//! of the membership it leaves behind (all members with `--preserve`, the others without). A
//! single member with `--preserve` is allowed (its data comes back with it, as in the guide);
//! a single member without it is refused (it would remove the last member).

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use kiln_os_api::wait::{Poll, until};

use super::{UpgradeError, event};
use crate::etcd;
use crate::node::Node;

/// The key of the upgrade lease.
pub const LEASE_KEY: &str = "/kiln/upgrade/lease";
/// Seconds the lease lives without its holder (a node that never comes back frees it).
pub const LEASE_TTL: i64 = 300;
/// How long a node waits for the lease.
pub const LEASE_WAIT: Duration = Duration::from_secs(900);

fn etcd_err(e: impl std::fmt::Display) -> UpgradeError {
    UpgradeError::Etcd(e.to_string())
}

async fn own_client(node: &Node) -> Result<Client, UpgradeError> {
    let pki = node
        .etcd
        .pki()
        .ok_or_else(|| UpgradeError::Etcd("etcd has not started on this node yet".into()))?;
    etcd::ops::connect(&pki, &[etcd::client_url(node)])
        .await
        .map_err(etcd_err)
}

/// Whether this node's etcd member answers a status request without errors.
pub async fn local_etcd_healthy(node: &Node) -> Result<(), String> {
    let mut c = own_client(node).await.map_err(|e| e.to_string())?;
    let s = tokio::time::timeout(Duration::from_secs(3), c.status())
        .await
        .map_err(|_| "etcd did not answer within 3s".to_owned())?
        .map_err(|e| format!("etcd: {e}"))?;
    if s.errors().is_empty() {
        Ok(())
    } else {
        Err(format!("etcd reports {}", s.errors().join(", ")))
    }
}

/// One voting member as the quorum check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    /// Its name.
    pub name: String,
    /// This node.
    pub me: bool,
    /// `None` when healthy, else why not.
    pub problem: Option<String>,
}

/// Whether upgrading (away from) the member marked `me` keeps quorum; `Err` says why not, in
/// the words of [`UpgradeError::Quorum`].
pub fn quorum_verdict(
    node: &str,
    members: &[MemberHealth],
    preserve: bool,
) -> Result<(), UpgradeError> {
    let list = members
        .iter()
        .map(|m| match (&m.problem, m.me) {
            (_, true) => format!("{} (this node)", m.name),
            (None, false) => format!("{} (healthy)", m.name),
            (Some(p), false) => format!("{} (unhealthy: {p})", m.name),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let total = members.len();
    if preserve && total == 1 {
        return Ok(());
    }
    let after = if preserve { total } else { total - 1 };
    let refuse = |detail: String| UpgradeError::Quorum {
        node: node.to_owned(),
        detail,
        members: list.clone(),
    };
    if after == 0 {
        return Err(refuse(
            "it is the only member and leaving would remove the cluster's last member".into(),
        ));
    }
    let healthy = members
        .iter()
        .filter(|m| !m.me && m.problem.is_none())
        .count();
    let needed = after / 2 + 1;
    if healthy < needed {
        return Err(refuse(format!(
            "while it is away {healthy} of {after} members would be healthy and {needed} are needed"
        )));
    }
    Ok(())
}

/// The voting members and their health.
async fn members(node: &Node) -> Result<Vec<MemberHealth>, UpgradeError> {
    let mut c = own_client(node).await?;
    let list = c.member_list().await.map_err(etcd_err)?;
    let pki = node
        .etcd
        .pki()
        .ok_or_else(|| UpgradeError::Etcd("etcd has not started on this node yet".into()))?;
    let peer = etcd::peer_url(node);
    let mut out = Vec::new();
    for m in list.members().iter().filter(|m| !m.is_learner()) {
        let me = m.peer_urls().contains(&peer);
        let problem = if me {
            None
        } else {
            match etcd::ops::connect(&pki, m.client_urls()).await {
                Err(e) => Some(e.to_string()),
                Ok(mut mc) => match tokio::time::timeout(Duration::from_secs(3), mc.status()).await
                {
                    Err(_) => Some("no answer within 3s".to_owned()),
                    Ok(Err(e)) => Some(e.to_string()),
                    Ok(Ok(s)) if !s.errors().is_empty() => Some(s.errors().join(", ")),
                    Ok(Ok(_)) => None,
                },
            }
        };
        let name = if m.name().is_empty() {
            m.peer_urls().join(",")
        } else {
            m.name().to_owned()
        };
        out.push(MemberHealth { name, me, problem });
    }
    Ok(out)
}

/// Refuses when upgrading this node would lose quorum.
pub async fn check_quorum(node: &Node, preserve: bool) -> Result<(), UpgradeError> {
    let members = members(node).await?;
    quorum_verdict(&node.hostname(), &members, preserve)
}

/// Takes the upgrade lease, waiting while another node holds it or while taking it would lose
/// quorum (unless `force`).
pub async fn acquire(node: &Node, preserve: bool, force: bool) -> Result<(), UpgradeError> {
    let me = node.hostname();
    let last_holder = std::sync::Mutex::new(String::new());
    until(
        "the upgrade lease",
        Poll::every(Duration::from_secs(1), LEASE_WAIT),
        || {
            let me = me.clone();
            let last_holder = &last_holder;
            async move {
                if !force {
                    check_quorum(node, preserve)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let mut c = own_client(node).await.map_err(|e| e.to_string())?;
                let lease = c
                    .lease_grant(LEASE_TTL, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let txn = Txn::new()
                    .when([Compare::create_revision(LEASE_KEY, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        LEASE_KEY,
                        me.as_str(),
                        Some(PutOptions::new().with_lease(lease.id())),
                    )])
                    .or_else([TxnOp::get(LEASE_KEY, None)]);
                let resp = c.txn(txn).await.map_err(|e| e.to_string())?;
                if resp.succeeded() {
                    return Ok(());
                }
                let _ = c.lease_revoke(lease.id()).await;
                let holder = c
                    .get(LEASE_KEY, None)
                    .await
                    .ok()
                    .and_then(|r| {
                        r.kvs()
                            .first()
                            .map(|kv| kv.value_str().unwrap_or("").to_owned())
                    })
                    .unwrap_or_default();
                if holder == me {
                    return Ok(());
                }
                let changed = {
                    let mut last = last_holder.lock().unwrap_or_else(|e| e.into_inner());
                    let changed = *last != holder;
                    last.clone_from(&holder);
                    changed
                };
                if changed {
                    event(
                        node,
                        "waiting",
                        format!("waiting for the upgrade lease, held by {holder}"),
                    );
                }
                Err(format!("the upgrade lease is held by {holder}"))
            }
        },
    )
    .await
    .map_err(|t| UpgradeError::Etcd(t.to_string()))?;
    event(
        node,
        "lease",
        format!("took the upgrade lease ({LEASE_KEY})"),
    );
    Ok(())
}

/// The node holding the upgrade lease, if any.
pub async fn holder(node: &Node) -> Result<Option<String>, UpgradeError> {
    let mut c = own_client(node).await?;
    let r = c.get(LEASE_KEY, None).await.map_err(etcd_err)?;
    Ok(r.kvs()
        .first()
        .map(|kv| kv.value_str().unwrap_or("").to_owned()))
}

/// Releases the lease if this node holds it; `Ok(true)` when it did.
pub async fn release(node: &Node) -> Result<bool, UpgradeError> {
    let mut c = own_client(node).await?;
    let me = node.hostname();
    let txn = Txn::new()
        .when([Compare::value(LEASE_KEY, CompareOp::Equal, me.as_str())])
        .and_then([TxnOp::delete(LEASE_KEY, None)]);
    let resp = c.txn(txn).await.map_err(etcd_err)?;
    Ok(resp.succeeded())
}

/// Removes this node from the etcd membership and stops etcd (its data goes with EPHEMERAL).
pub async fn leave_etcd(node: &Node) -> Result<(), UpgradeError> {
    let mut c = own_client(node).await?;
    let list = c.member_list().await.map_err(etcd_err)?;
    let peer = etcd::peer_url(node);
    let me = list
        .members()
        .iter()
        .find(|m| m.peer_urls().contains(&peer))
        .ok_or_else(|| UpgradeError::Etcd("this node is not an etcd member".into()))?
        .id();
    // The lease key stays: it is released by the new boot (or expires).
    c.member_remove(me).await.map_err(etcd_err)?;
    node.supervisor
        .stop(etcd::SERVICE_ID)
        .await
        .map_err(etcd_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, me: bool, ok: bool) -> MemberHealth {
        MemberHealth {
            name: name.into(),
            me,
            problem: (!ok).then(|| "connection refused".to_owned()),
        }
    }

    #[test]
    fn three_healthy_members_upgrade_one_at_a_time() {
        let all = [
            m("cp-1", true, true),
            m("cp-2", false, true),
            m("cp-3", false, true),
        ];
        quorum_verdict("cp-1", &all, true).unwrap();
        quorum_verdict("cp-1", &all, false).unwrap();
    }

    #[test]
    fn a_member_down_refuses_and_names_the_members() {
        let all = [
            m("cp-1", true, true),
            m("cp-2", false, true),
            m("cp-3", false, false),
        ];
        let e = quorum_verdict("cp-1", &all, true).unwrap_err().to_string();
        assert!(
            e.contains("1 of 3 members would be healthy and 2 are needed"),
            "{e}"
        );
        assert!(e.contains("cp-3 (unhealthy: connection refused)"), "{e}");
        assert!(
            e.contains("cp-2 (healthy)") && e.contains("cp-1 (this node)"),
            "{e}"
        );
        // Leaving: 2 members remain, 1 of them healthy, 2 needed.
        assert!(quorum_verdict("cp-1", &all, false).is_err());
    }

    #[test]
    fn a_single_member_needs_preserve() {
        let one = [m("cp-1", true, true)];
        quorum_verdict("cp-1", &one, true).unwrap();
        let e = quorum_verdict("cp-1", &one, false).unwrap_err().to_string();
        assert!(e.contains("last member"), "{e}");
    }
}
