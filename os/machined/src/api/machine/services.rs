//! Services, their logs, the console (`dmesg`) and the event stream.

use futures::StreamExt as _;
use kiln_os_api::pb;
use tonic::{Request, Status};

use super::{BoxStream, MachineApi, action, here};
use crate::api::status::ApiResult;
use crate::events::unix_millis;

pub(super) async fn list(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::ServiceListResponse> {
    let services = api
        .node
        .supervisor
        .list()
        .into_iter()
        .map(|s| pb::ServiceInfo {
            id: s.id,
            state: pb::ServiceState::from(s.state).into(),
            health: Some(pb::ServiceHealth {
                unknown: s.health.unknown,
                healthy: s.health.healthy,
                last_message: s.health.last_message,
            }),
            events: s
                .events
                .into_iter()
                .map(|e| pb::ServiceEvent {
                    state: pb::ServiceState::from(e.state).into(),
                    message: e.message,
                    unix_millis: unix_millis(e.at),
                })
                .collect(),
            restarts: s.restarts,
        })
        .collect();
    Ok(pb::ServiceListResponse {
        messages: vec![pb::ServiceList {
            metadata: None,
            services,
        }],
    })
}

pub(super) async fn start(
    api: &MachineApi,
    req: Request<pb::ServiceRequest>,
) -> ApiResult<pb::ActionResponse> {
    let id = req.into_inner().id;
    api.node.supervisor.start(&id)?;
    Ok(action(format!("Service {id:?} started")))
}

pub(super) async fn stop(
    api: &MachineApi,
    req: Request<pb::ServiceRequest>,
) -> ApiResult<pb::ActionResponse> {
    let id = req.into_inner().id;
    api.node.supervisor.stop(&id).await?;
    Ok(action(format!("Service {id:?} stopped")))
}

pub(super) async fn restart(
    api: &MachineApi,
    req: Request<pb::ServiceRequest>,
) -> ApiResult<pb::ActionResponse> {
    let id = req.into_inner().id;
    api.node.supervisor.restart(&id).await?;
    Ok(action(format!("Service {id:?} restarted")))
}

fn tail(n: i32) -> Option<usize> {
    usize::try_from(n).ok()
}

/// A snapshot of lines, then (with `follow`) the lines that come later.
fn lines_stream(
    metadata: Option<pb::Metadata>,
    (history, rx): (
        Vec<bytes::Bytes>,
        tokio::sync::broadcast::Receiver<bytes::Bytes>,
    ),
    follow: bool,
) -> BoxStream<pb::LogChunk> {
    let chunk = move |b: bytes::Bytes| {
        Ok::<_, Status>(pb::LogChunk {
            metadata: metadata.clone(),
            bytes: b.to_vec(),
        })
    };
    let later = chunk.clone();
    let first = futures::stream::iter(history.into_iter().map(chunk));
    if !follow {
        return Box::pin(first);
    }
    let rest = tokio_stream::wrappers::BroadcastStream::new(rx)
        .filter_map(move |r| futures::future::ready(r.ok().map(&later)));
    Box::pin(first.chain(rest))
}

pub(super) async fn logs(
    api: &MachineApi,
    r: pb::LogsRequest,
) -> ApiResult<BoxStream<pb::LogChunk>> {
    let tail_n = tail(r.tail_lines);
    let snapshot = if r.id == "machined" {
        api.node.console.tail(tail_n)
    } else {
        api.node
            .supervisor
            .with_log(&r.id, |log| log.tail(tail_n))?
    };
    Ok(lines_stream(here(&api.node), snapshot, r.follow))
}

pub(super) async fn dmesg(
    api: &MachineApi,
    r: pb::DmesgRequest,
) -> ApiResult<BoxStream<pb::LogChunk>> {
    Ok(lines_stream(
        here(&api.node),
        api.node.console.tail(tail(r.tail_lines)),
        r.follow,
    ))
}

pub(super) async fn events(
    api: &MachineApi,
    r: pb::EventsRequest,
) -> ApiResult<BoxStream<pb::Event>> {
    let metadata = here(&api.node);
    let (history, rx) = api.node.events.tail(tail(r.tail_events));
    let to_pb = move |e: crate::events::Event| {
        Ok::<_, Status>(pb::Event {
            metadata: metadata.clone(),
            kind: pb::EventKind::from(e.kind).into(),
            id: e.id,
            state: e.state,
            message: e.message,
            unix_millis: unix_millis(e.at),
            stage: pb::Stage::from(e.stage).into(),
        })
    };
    let later = to_pb.clone();
    let first = futures::stream::iter(history.into_iter().map(to_pb));
    if !r.follow {
        return Ok(Box::pin(first));
    }
    let rest = tokio_stream::wrappers::BroadcastStream::new(rx)
        .filter_map(move |e| futures::future::ready(e.ok().map(&later)));
    Ok(Box::pin(first.chain(rest)))
}
