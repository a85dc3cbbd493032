//! etcd on the nodes: `bootstrap` (optionally recovering from a snapshot) and `etcd ...`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use futures::StreamExt as _;
use kiln_os_api::pb;

use super::print_actions;
use crate::cli::connect::{Api, NodeErrors, node_name, status_error};
use kiln_provisioner::output;

/// `etcd ...`.
#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// List the members.
    Members,
    /// Show each node's member status.
    Status,
    /// Stream a snapshot of the database into FILE.
    Snapshot {
        /// Where to write it.
        file: PathBuf,
    },
    /// Defragment the member's database.
    Defrag,
    /// Alarms.
    #[command(subcommand)]
    Alarm(AlarmCommand),
    /// Make the node leave the cluster (refused if that would lose quorum).
    Leave,
    /// Remove another member by host name or hex ID.
    RemoveMember {
        /// Member host name or ID.
        member: String,
    },
    /// Hand leadership to another member if this node leads.
    ForfeitLeadership,
}

/// `etcd alarm ...`.
#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// List alarms.
    List,
    /// Clear alarms.
    Disarm,
}

/// `bootstrap`: start etcd on one control-plane node, first uploading the snapshot to recover
/// from if there is one.
pub(super) async fn bootstrap(
    api: &mut Api,
    errors: &mut NodeErrors,
    recover_from: Option<PathBuf>,
    recover_skip_hash_check: bool,
) -> anyhow::Result<()> {
    let node = api.single_node("bootstrap")?;
    if let Some(file) = &recover_from {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let chunks = kiln_os_api::client::data_chunks(&data);
        let req = api.request_to(&node, futures::stream::iter(chunks));
        let resp = api
            .client
            .etcd_recover(req)
            .await
            .map_err(status_error)?
            .into_inner();
        let size = resp.messages.first().map_or(0, |m| m.size);
        println!(
            "recovering from snapshot {:?}: uploaded {size} bytes",
            file.display().to_string()
        );
    }
    let req = api.request_to(
        &node,
        pb::BootstrapRequest {
            recover_etcd: recover_from.is_some(),
            recover_skip_hash_check,
        },
    );
    print_actions(
        api.client
            .bootstrap(req)
            .await
            .map_err(status_error)?
            .into_inner(),
        errors,
    );
    Ok(())
}

/// `etcd ...`.
pub(super) async fn etcd(
    api: &mut Api,
    errors: &mut NodeErrors,
    cmd: EtcdCommand,
) -> anyhow::Result<()> {
    match cmd {
        EtcdCommand::Members => {
            let resp = api
                .client
                .etcd_member_list(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut rows = Vec::new();
            for list in resp.messages {
                if !errors.check(list.metadata.as_ref()) {
                    continue;
                }
                let node = node_name(list.metadata.as_ref());
                for m in list.members {
                    rows.push(vec![
                        node.clone(),
                        format!("{:x}", m.id),
                        m.hostname,
                        m.peer_urls.join(","),
                        m.client_urls.join(","),
                        m.is_learner.to_string(),
                    ]);
                }
            }
            print!(
                "{}",
                output::table(
                    &[
                        "NODE",
                        "ID",
                        "HOSTNAME",
                        "PEER URLS",
                        "CLIENT URLS",
                        "LEARNER"
                    ],
                    &rows
                )
            );
        }
        EtcdCommand::Status => {
            let resp = api
                .client
                .etcd_status(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut rows = Vec::new();
            for s in resp.messages {
                if !errors.check(s.metadata.as_ref()) {
                    continue;
                }
                let m = s.member_status.unwrap_or_default();
                let pct = if m.db_size > 0 {
                    m.db_size_in_use as f64 * 100.0 / m.db_size as f64
                } else {
                    0.0
                };
                rows.push(vec![
                    node_name(s.metadata.as_ref()),
                    format!("{:x}", m.member_id),
                    bytes_human(m.db_size),
                    format!("{} ({pct:.2}%)", bytes_human(m.db_size_in_use)),
                    format!("{:x}", m.leader),
                    m.raft_index.to_string(),
                    m.raft_term.to_string(),
                    m.raft_applied_index.to_string(),
                    m.is_learner.to_string(),
                    m.errors.join("; "),
                ]);
            }
            print!(
                "{}",
                output::table(
                    &[
                        "NODE",
                        "MEMBER",
                        "DB SIZE",
                        "IN USE",
                        "LEADER",
                        "RAFT INDEX",
                        "RAFT TERM",
                        "RAFT APPLIED INDEX",
                        "LEARNER",
                        "ERRORS"
                    ],
                    &rows
                )
            );
        }
        EtcdCommand::Snapshot { file } => {
            let node = api.single_node("etcd snapshot")?;
            let mut stream = api
                .client
                .etcd_snapshot(api.request_to(&node, pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let tmp = file.with_extension("part");
            let mut out = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut info = None;
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(s) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(status_error(s));
                    }
                };
                if chunk.info.is_some() {
                    info = chunk.info;
                }
                size += chunk.bytes.len() as u64;
                out.write_all(&chunk.bytes)?;
            }
            out.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            println!(
                "etcd snapshot saved to {:?} ({size} bytes)",
                file.display().to_string()
            );
            if let Some(i) = info {
                println!(
                    "snapshot info: hash {:08x}, revision {}, total keys {}, total size {}",
                    i.hash, i.revision, i.total_keys, i.total_size
                );
            }
        }
        EtcdCommand::Defrag => print_actions(
            api.client
                .etcd_defragment(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner(),
            errors,
        ),
        EtcdCommand::Alarm(a) => {
            let resp = match a {
                AlarmCommand::List => api.client.etcd_alarm_list(api.request(pb::Empty {})).await,
                AlarmCommand::Disarm => {
                    api.client
                        .etcd_alarm_disarm(api.request(pb::Empty {}))
                        .await
                }
            }
            .map_err(status_error)?
            .into_inner();
            let mut rows = Vec::new();
            for l in resp.messages {
                if !errors.check(l.metadata.as_ref()) {
                    continue;
                }
                for alarm in l.alarms {
                    rows.push(vec![
                        node_name(l.metadata.as_ref()),
                        format!("{:x}", alarm.member_id),
                        alarm.alarm,
                    ]);
                }
            }
            print!("{}", output::table(&["NODE", "MEMBER", "ALARM"], &rows));
        }
        EtcdCommand::Leave => print_actions(
            api.client
                .etcd_leave_cluster(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner(),
            errors,
        ),
        EtcdCommand::RemoveMember { member } => print_actions(
            api.client
                .etcd_remove_member(api.request(pb::EtcdRemoveMemberRequest { member }))
                .await
                .map_err(status_error)?
                .into_inner(),
            errors,
        ),
        EtcdCommand::ForfeitLeadership => {
            let resp = api
                .client
                .etcd_forfeit_leadership(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            for m in resp.messages {
                if errors.check(m.metadata.as_ref()) {
                    let node = node_name(m.metadata.as_ref());
                    if m.member.is_empty() {
                        println!("{node}: not the leader; nothing to do");
                    } else {
                        println!("{node}: leadership moved to {}", m.member);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A byte count in decimal units: `512 B`, `1.5 kB`, `20.3 MB`, `1.2 GB`.
fn bytes_human(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}
