//! etcd: bootstrap and recovery, members, status, snapshots, alarms, leaving the cluster.

use std::time::Duration;

use futures::StreamExt as _;
use kiln_os_api::pb;
use tokio::io::AsyncWriteExt as _;
use tonic::{Request, Response, Status, Streaming};

use super::{BoxStream, MachineApi, action, here};
use crate::api::forward;
use crate::api::status::{ApiError, ApiResult};
use crate::etcd::{self, BootstrapRequest};
use crate::supervisor::ServiceState;

impl MachineApi {
    fn etcd_pki(&self) -> ApiResult<etcd::EtcdPki> {
        self.require_control_plane("etcd")?;
        self.node.etcd.pki().ok_or(ApiError::EtcdNotStarted)
    }

    /// A client to this node's etcd and its endpoint (for error context).
    async fn own_etcd_with_endpoints(&self) -> ApiResult<(etcd_client::Client, [String; 1])> {
        Ok((self.own_etcd().await?, [etcd::client_url(&self.node)]))
    }

    async fn own_etcd(&self) -> ApiResult<etcd_client::Client> {
        let pki = self.etcd_pki()?;
        let state = self.node.supervisor.status(etcd::SERVICE_ID)?.state;
        if state != ServiceState::Running {
            return Err(ApiError::EtcdNotRunning {
                state: state.as_str(),
            });
        }
        Ok(etcd::ops::connect(&pki, &[etcd::client_url(&self.node)]).await?)
    }

    /// Members, this node's member id, and a check that leaving keeps quorum.
    async fn check_leave(&self, client: &mut etcd_client::Client) -> ApiResult<u64> {
        let eps = [etcd::client_url(&self.node)];
        let members = client
            .member_list()
            .await
            .map_err(etcd::ops::op_err(&eps))?;
        let peer = etcd::peer_url(&self.node);
        let me = members
            .members()
            .iter()
            .find(|m| m.peer_urls().contains(&peer))
            .ok_or_else(|| {
                ApiError::FailedPrecondition("this node is not an etcd member".into())
            })?;
        if me.is_learner() {
            return Ok(me.id());
        }
        let others: Vec<_> = members
            .members()
            .iter()
            .filter(|m| m.id() != me.id() && !m.is_learner())
            .collect();
        if others.is_empty() {
            return Err(ApiError::FailedPrecondition(
                "this node is the only etcd member: leaving would destroy the cluster; reset without --graceful to wipe it anyway".into(),
            ));
        }
        let pki = self.etcd_pki()?;
        let mut healthy = 0;
        for m in &others {
            if let Ok(mut c) = etcd::ops::connect(&pki, m.client_urls()).await
                && tokio::time::timeout(Duration::from_secs(3), c.status())
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                healthy += 1;
            }
        }
        let needed = others.len() / 2 + 1;
        if healthy < needed {
            return Err(ApiError::FailedPrecondition(format!(
                "leaving would lose etcd quorum: {healthy} of the other {} members are healthy and {needed} are needed; bring members back or reset without --graceful",
                others.len()
            )));
        }
        Ok(me.id())
    }

    pub(super) async fn leave_etcd(&self) -> ApiResult<()> {
        let mut client = self.own_etcd().await?;
        let id = self.check_leave(&mut client).await?;
        let eps = [etcd::client_url(&self.node)];
        client
            .member_remove(id)
            .await
            .map_err(etcd::ops::op_err(&eps))?;
        self.node.supervisor.stop(etcd::SERVICE_ID).await?;
        let data = self.node.platform.volumes().etcd_data();
        let _ = std::fs::remove_dir_all(&data);
        Ok(())
    }

    /// Whether some other control-plane node already runs an etcd cluster.
    async fn existing_cluster(&self) -> Option<String> {
        for candidate in self.node.control_plane_candidates() {
            let Ok(ch) = self.node.channel_to(&candidate).await else {
                continue;
            };
            let mut client = kiln_os_api::client::machine_client(ch);
            let mut req = Request::new(pb::Empty {});
            crate::api::auth::set_forwarded_role(&mut req, kiln_pki::ROLE_READER);
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(3), client.etcd_member_list(req)).await
            {
                let names: Vec<String> = resp
                    .into_inner()
                    .messages
                    .into_iter()
                    .flat_map(|m| m.members)
                    .map(|m| m.hostname)
                    .collect();
                if !names.is_empty() {
                    return Some(format!("{candidate} reports members {}", names.join(", ")));
                }
            }
        }
        None
    }

    async fn alarms(&self, disarm: bool) -> ApiResult<pb::EtcdAlarmListResponse> {
        use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
        let mut c = self.own_etcd().await?;
        let eps = [etcd::client_url(&self.node)];
        let list = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .map_err(etcd::ops::op_err(&eps))?;
        let alarms: Vec<pb::EtcdAlarm> = list
            .alarms()
            .iter()
            .map(|a| pb::EtcdAlarm {
                member_id: a.member_id(),
                alarm: format!("{:?}", a.alarm()).to_uppercase(),
            })
            .collect();
        if disarm {
            for a in list.alarms() {
                let mut options = AlarmOptions::new();
                options.with_member(a.member_id());
                c.alarm(AlarmAction::Deactivate, a.alarm(), Some(options))
                    .await
                    .map_err(etcd::ops::op_err(&eps))?;
            }
        }
        Ok(pb::EtcdAlarmListResponse {
            messages: vec![pb::EtcdAlarms {
                metadata: None,
                alarms,
            }],
        })
    }
}

pub(super) async fn bootstrap(
    api: &MachineApi,
    req: Request<pb::BootstrapRequest>,
) -> ApiResult<pb::ActionResponse> {
    let r = req.into_inner();
    api.require_not_stopping()?;
    api.require_control_plane("bootstrap")?;
    if etcd::has_data(&api.node) {
        return Err(ApiError::FailedPrecondition(format!(
            "etcd is already bootstrapped on this node: its data directory {} is not empty; bootstrap runs once per cluster",
            api.node.platform.volumes().etcd_data().display()
        )));
    }
    let state = api.node.supervisor.status(etcd::SERVICE_ID)?.state;
    if state != ServiceState::Preparing {
        return Err(ApiError::FailedPrecondition(format!(
            "etcd is {} on this node, not waiting for bootstrap",
            state.as_str()
        )));
    }
    if let Some(existing) = api.existing_cluster().await {
        return Err(ApiError::FailedPrecondition(format!(
            "the cluster is already bootstrapped ({existing}); this node joins it by itself"
        )));
    }
    let request = if r.recover_etcd {
        if !api.node.platform.volumes().etcd_recover_snapshot().exists() {
            return Err(ApiError::FailedPrecondition(
                "no snapshot was uploaded for recovery; `kiln bootstrap --recover-from FILE` uploads it".into(),
            ));
        }
        etcd::restore(&api.node, r.recover_skip_hash_check)
            .await
            .map_err(|e| {
                let hint = if r.recover_skip_hash_check {
                    ""
                } else {
                    "; a raw copy of member/snap/db has no hash: add --recover-skip-hash-check"
                };
                ApiError::FailedPrecondition(format!("{e}{hint}"))
            })?;
        BootstrapRequest::Recover
    } else {
        BootstrapRequest::New
    };
    api.node.etcd.request_bootstrap(request);
    Ok(action(if r.recover_etcd {
        "bootstrapping etcd from the uploaded snapshot"
    } else {
        "bootstrapping a new etcd cluster"
    }))
}

/// Passes an upload through to the one node it targets.
pub(super) async fn forward_recover(
    api: &MachineApi,
    target: &str,
    req: Request<Streaming<pb::DataChunk>>,
) -> Result<Response<pb::EtcdRecoverResponse>, Status> {
    let ch = api.node.channel_to(target).await?;
    let role = forward::caller_role(&req);
    let inbound = req
        .into_inner()
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()));
    let mut fwd = Request::new(inbound);
    crate::api::auth::set_forwarded_role(&mut fwd, role);
    kiln_os_api::client::machine_client(ch)
        .etcd_recover(fwd)
        .await
}

/// Stores an uploaded snapshot for `bootstrap --recover-from`.
pub(super) async fn recover_upload(
    api: &MachineApi,
    mut stream: Streaming<pb::DataChunk>,
) -> ApiResult<pb::EtcdRecoverResponse> {
    api.require_not_stopping()?;
    api.require_control_plane("etcd recovery")?;
    if etcd::has_data(&api.node) {
        return Err(ApiError::FailedPrecondition(
            "etcd has data on this node; reset EPHEMERAL before recovering".into(),
        ));
    }
    let path = api.node.platform.volumes().etcd_recover_snapshot();
    std::fs::create_dir_all(path.parent().unwrap_or(&path))
        .map_err(ApiError::io("creating the snapshot directory"))?;
    let tmp = path.with_extension("uploading");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(ApiError::io("creating the snapshot file"))?;
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ApiError::Forwarded)?;
        size += chunk.bytes.len() as u64;
        file.write_all(&chunk.bytes)
            .await
            .map_err(ApiError::io("writing the snapshot"))?;
    }
    file.sync_all()
        .await
        .map_err(ApiError::io("writing the snapshot"))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(ApiError::io("storing the snapshot"))?;
    Ok(pb::EtcdRecoverResponse {
        messages: vec![pb::EtcdRecoverResult {
            metadata: here(&api.node),
            size,
        }],
    })
}

pub(super) async fn member_list(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::EtcdMemberListResponse> {
    let (mut c, eps) = api.own_etcd_with_endpoints().await?;
    let list = c.member_list().await.map_err(etcd::ops::op_err(&eps))?;
    Ok(pb::EtcdMemberListResponse {
        messages: vec![pb::EtcdMembers {
            metadata: None,
            members: list.members().iter().map(member_pb).collect(),
        }],
    })
}

pub(super) async fn status(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::EtcdStatusResponse> {
    let (mut c, eps) = api.own_etcd_with_endpoints().await?;
    let s = c.status().await.map_err(etcd::ops::op_err(&eps))?;
    let header = s.header();
    Ok(pb::EtcdStatusResponse {
        messages: vec![pb::EtcdStatus {
            metadata: None,
            member_status: Some(pb::EtcdMemberStatus {
                member_id: header.map_or(0, |h| h.member_id()),
                protocol_version: s.version().to_owned(),
                db_size: s.db_size(),
                db_size_in_use: s.raft_used_db_size(),
                leader: s.leader(),
                raft_index: s.raft_index(),
                raft_term: s.raft_term(),
                raft_applied_index: s.raft_applied_index(),
                errors: s.errors().to_vec(),
                is_learner: s.is_learner(),
            }),
        }],
    })
}

pub(super) async fn snapshot(
    api: &MachineApi,
    _req: pb::Empty,
) -> ApiResult<BoxStream<pb::SnapshotChunk>> {
    let (mut c, eps) = api.own_etcd_with_endpoints().await?;
    let dir = api.node.platform.volumes().run.join("snapshots");
    std::fs::create_dir_all(&dir).map_err(ApiError::io("creating the snapshot directory"))?;
    let path = dir.join(format!(
        "snapshot-{}.db",
        u128::from(std::process::id()) * 1_000_000 + u128::from(rand_suffix())
    ));
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(ApiError::io("creating the snapshot file"))?;
    let mut stream = c.snapshot().await.map_err(etcd::ops::op_err(&eps))?;
    while let Some(part) = stream.message().await.map_err(etcd::ops::op_err(&eps))? {
        file.write_all(part.blob())
            .await
            .map_err(ApiError::io("writing the snapshot"))?;
    }
    file.sync_all()
        .await
        .map_err(ApiError::io("writing the snapshot"))?;
    drop(file);
    let info = etcd::ops::snapshot_status(&api.node.etcdctl_bin, &path)
        .await
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            ApiError::Unavailable(format!("checking the snapshot with etcdctl: {e}"))
        })?;
    let metadata = here(&api.node);
    let first = pb::SnapshotChunk {
        metadata: metadata.clone(),
        bytes: Vec::new(),
        info: Some(pb::SnapshotInfo {
            hash: info.hash,
            revision: info.revision,
            total_keys: info.total_keys,
            total_size: info.total_size,
        }),
    };
    let body = crate::api::files::file_chunks(path.clone(), true).map(move |r| {
        r.map(|bytes| pb::SnapshotChunk {
            metadata: metadata.clone(),
            bytes,
            info: None,
        })
    });
    Ok(Box::pin(
        futures::stream::once(async move { Ok(first) }).chain(body),
    ))
}

pub(super) async fn defragment(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::ActionResponse> {
    let (mut c, eps) = api.own_etcd_with_endpoints().await?;
    c.defragment().await.map_err(etcd::ops::op_err(&eps))?;
    Ok(action("defragmented"))
}

pub(super) async fn alarm_list(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::EtcdAlarmListResponse> {
    api.alarms(false).await
}

pub(super) async fn alarm_disarm(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::EtcdAlarmListResponse> {
    api.alarms(true).await
}

pub(super) async fn leave_cluster(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::ActionResponse> {
    api.leave_etcd().await?;
    Ok(action(
        "left the etcd cluster; etcd is stopped and its data removed",
    ))
}

pub(super) async fn remove_member(
    api: &MachineApi,
    req: Request<pb::EtcdRemoveMemberRequest>,
) -> ApiResult<pb::ActionResponse> {
    let wanted = req.into_inner().member;
    let (mut c, eps) = api.own_etcd_with_endpoints().await?;
    let list = c.member_list().await.map_err(etcd::ops::op_err(&eps))?;
    let member = list
        .members()
        .iter()
        .find(|m| m.name() == wanted || format!("{:x}", m.id()) == wanted.trim_start_matches("0x"))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no etcd member {wanted:?}; members: {}",
                list.members()
                    .iter()
                    .map(|m| format!("{} ({:x})", m.name(), m.id()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if member
        .peer_urls()
        .iter()
        .any(|u| *u == etcd::peer_url(&api.node))
    {
        return Err(ApiError::FailedPrecondition(
            "that member is this node; use `kiln etcd leave` instead".into(),
        ));
    }
    let (id, name) = (member.id(), member.name().to_owned());
    c.member_remove(id).await.map_err(etcd::ops::op_err(&eps))?;
    Ok(action(format!("removed member {name} ({id:x})")))
}

pub(super) async fn forfeit_leadership(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::EtcdForfeitLeadershipResponse> {
    let (mut c, eps) = api.own_etcd_with_endpoints().await?;
    let status = c.status().await.map_err(etcd::ops::op_err(&eps))?;
    let my_id = status.header().map_or(0, |h| h.member_id());
    let reply = |member: String| pb::EtcdForfeitLeadershipResponse {
        messages: vec![pb::EtcdForfeitLeadership {
            metadata: None,
            member,
        }],
    };
    if status.leader() != my_id {
        return Ok(reply(String::new()));
    }
    let list = c.member_list().await.map_err(etcd::ops::op_err(&eps))?;
    let target = list
        .members()
        .iter()
        .find(|m| m.id() != my_id && !m.is_learner() && !m.name().is_empty())
        .ok_or_else(|| {
            ApiError::FailedPrecondition("no other voting member can take the leadership".into())
        })?;
    let (id, name) = (target.id(), target.name().to_owned());
    c.move_leader(id).await.map_err(etcd::ops::op_err(&eps))?;
    Ok(reply(name))
}

pub(super) async fn member_add(
    api: &MachineApi,
    req: Request<pb::EtcdMemberAddRequest>,
) -> ApiResult<pb::EtcdMemberAddResponse> {
    // Waits on this node for etcd and the one learner slot (see etcd::join).
    let result = etcd::join::add_member(&api.node, req.into_inner())
        .await
        .map_err(ApiError::from)?;
    Ok(pb::EtcdMemberAddResponse {
        messages: vec![result],
    })
}

fn rand_suffix() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(0)
}

fn member_pb(m: &etcd_client::Member) -> pb::EtcdMember {
    pb::EtcdMember {
        id: m.id(),
        hostname: m.name().to_owned(),
        peer_urls: m.peer_urls().to_vec(),
        client_urls: m.client_urls().to_vec(),
        is_learner: m.is_learner(),
    }
}
