//! The etcd maintenance steps of the guide: fill etcd past its space quota (`NOSPACE`), read
//! alarms and database sizes from every member through the OS API, compact, defragment one
//! node at a time, disarm.

use std::time::Duration;

use anyhow::{Context as _, bail};
use kiln_os_api::client::request;
use kiln_os_api::pb;

use crate::cluster::{ClusterHandle, node_error};

/// A byte count as `kiln etcd status` prints it.
fn size(n: i64) -> String {
    let n = n as f64;
    if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

impl ClusterHandle {
    /// Overwrites eight keys with `value_bytes`-byte values until etcd answers
    /// `ResourceExhausted` (its `NOSPACE`); returns how much was written.
    pub async fn fill_until_no_space(&self, value_bytes: usize, limit: u64) -> anyhow::Result<u64> {
        let mut clients = self.etcd_clients().await?;
        let prefix = format!("/kiln-fill/{}", self.created.state.name);
        let value = vec![b'x'; value_bytes];
        let mut written = 0u64;
        let mut i = 0u64;
        let mut transient = 0;
        while written < limit {
            let key = format!("{prefix}/{}", i % 8);
            let mut refused = None;
            let mut acked = false;
            for c in clients.iter_mut() {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    c.put(key.as_str(), value.clone(), None),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        acked = true;
                        break;
                    }
                    Ok(Err(etcd_client::Error::GRpcStatus(s)))
                        if s.code() == tonic::Code::ResourceExhausted =>
                    {
                        refused = Some(s.message().to_owned());
                        break;
                    }
                    _ => {}
                }
            }
            if refused.is_some() {
                return Ok(written);
            }
            if acked {
                written += value_bytes as u64;
                i += 1;
                transient = 0;
            } else {
                transient += 1;
                if transient > 20 {
                    bail!("etcd stopped answering after {written} bytes, without NOSPACE");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        bail!("wrote {limit} bytes and etcd never ran out of space; is quota-backend-bytes set?")
    }

    /// Alarms per control-plane node: (node, [(member id, alarm)]).
    pub async fn alarms(&self, disarm: bool) -> anyhow::Result<Vec<(String, Vec<(u64, String)>)>> {
        let cps = self.control_plane_addresses();
        let mut api = self.api().await?;
        let r = if disarm {
            api.etcd_alarm_disarm(request(pb::Empty {}, &cps)).await
        } else {
            api.etcd_alarm_list(request(pb::Empty {}, &cps)).await
        }
        .map_err(|s| anyhow::anyhow!("etcd alarm: {}", s.message()))?
        .into_inner();
        node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
        Ok(r.messages
            .into_iter()
            .map(|m| {
                (
                    m.metadata.map(|m| m.hostname).unwrap_or_default(),
                    m.alarms
                        .into_iter()
                        .map(|a| (a.member_id, a.alarm))
                        .collect(),
                )
            })
            .collect())
    }

    /// Member ids of the cluster.
    pub async fn member_ids(&self) -> anyhow::Result<Vec<u64>> {
        let mut api = self.api().await?;
        let r = api
            .etcd_member_list(request(pb::Empty {}, &self.control_plane_addresses()[..1]))
            .await
            .map_err(|s| anyhow::anyhow!("etcd members: {}", s.message()))?
            .into_inner();
        node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
        Ok(r.messages
            .first()
            .context("no answer")?
            .members
            .iter()
            .map(|m| m.id)
            .collect())
    }

    /// `etcd status` of every control-plane node: node → (DB size, in use).
    pub async fn db_sizes(&self) -> anyhow::Result<Vec<(String, i64, i64)>> {
        let cps = self.control_plane_addresses();
        let mut api = self.api().await?;
        let r = api
            .etcd_status(request(pb::Empty {}, &cps))
            .await
            .map_err(|s| anyhow::anyhow!("etcd status: {}", s.message()))?
            .into_inner();
        node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
        Ok(r.messages
            .into_iter()
            .map(|m| {
                let s = m.member_status.unwrap_or_default();
                (
                    m.metadata.map(|m| m.hostname).unwrap_or_default(),
                    s.db_size,
                    s.db_size_in_use,
                )
            })
            .collect())
    }

    /// Compacts up to the current revision; returns it.
    pub async fn compact(&self) -> anyhow::Result<i64> {
        let mut last = None;
        for mut c in self.etcd_clients().await? {
            let rev = match c.get("/", None).await {
                Ok(r) => r.header().map_or(0, |h| h.revision()),
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match c
                .compact(
                    rev,
                    Some(etcd_client::CompactionOptions::new().with_physical()),
                )
                .await
            {
                Ok(_) => return Ok(rev),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("no etcd answered"), anyhow::Error::from))
    }

    /// Defragments each control-plane node in turn.
    pub async fn defrag(&self) -> anyhow::Result<()> {
        for addr in self.control_plane_addresses() {
            let mut api = self.api().await?;
            let r = api
                .etcd_defragment(request(pb::Empty {}, std::slice::from_ref(&addr)))
                .await
                .map_err(|s| anyhow::anyhow!("etcd defrag on {addr}: {}", s.message()))?
                .into_inner();
            node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
        }
        Ok(())
    }
}

/// `db_sizes` as a report line: `node 21.0 MB (in use 6.0 MB)`.
pub fn describe_sizes(sizes: &[(String, i64, i64)]) -> String {
    sizes
        .iter()
        .map(|(n, db, used)| format!("{n} {} (in use {})", size(*db), size(*used)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Before → after per node: `node 21.0 MB -> 4.5 MB`; an error if some member did not shrink.
pub fn compare_sizes(
    before: &[(String, i64, i64)],
    after: &[(String, i64, i64)],
) -> anyhow::Result<String> {
    let mut parts = Vec::new();
    for (node, db_after, _) in after {
        let Some((_, db_before, _)) = before.iter().find(|(n, ..)| n == node) else {
            bail!("{node} had no size before defrag; run etcdStatus first");
        };
        if db_after >= db_before {
            bail!(
                "{node}: DB size {} after defrag is not below {} before",
                size(*db_after),
                size(*db_before)
            );
        }
        parts.push(format!(
            "{node} {} -> {}",
            size(*db_before),
            size(*db_after)
        ));
    }
    Ok(format!(
        "DB size before -> after defrag: {}",
        parts.join(", ")
    ))
}
