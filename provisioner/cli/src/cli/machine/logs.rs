//! Streams from nodes: `logs`, `dmesg`, `events`.

use std::io::Write as _;

use futures::StreamExt as _;
use kiln_os_api::pb;

use crate::cli::connect::{Api, node_name, status_error};

/// `logs ID`: a service's log from each node in turn.
pub(super) async fn logs(
    api: &mut Api,
    id: String,
    follow: bool,
    tail: Option<i32>,
) -> anyhow::Result<()> {
    for node in api.stream_targets() {
        let req = api.request_to(
            &node,
            pb::LogsRequest {
                id: id.clone(),
                follow,
                tail_lines: tail.unwrap_or(-1),
            },
        );
        let stream = api
            .client
            .logs(req)
            .await
            .map_err(status_error)?
            .into_inner();
        print_log_stream(stream, api.nodes.len() > 1).await?;
    }
    Ok(())
}

/// `dmesg`: the console log from each node in turn.
pub(super) async fn dmesg(api: &mut Api, follow: bool, tail: Option<i32>) -> anyhow::Result<()> {
    for node in api.stream_targets() {
        let req = api.request_to(
            &node,
            pb::DmesgRequest {
                follow,
                tail_lines: tail.unwrap_or(-1),
            },
        );
        let stream = api
            .client
            .dmesg(req)
            .await
            .map_err(status_error)?
            .into_inner();
        print_log_stream(stream, api.nodes.len() > 1).await?;
    }
    Ok(())
}

/// `events`: boot phases and service transitions from each node in turn.
pub(super) async fn events(api: &mut Api, follow: bool, tail: Option<i32>) -> anyhow::Result<()> {
    for node in api.stream_targets() {
        let req = api.request_to(
            &node,
            pb::EventsRequest {
                follow,
                tail_events: tail.unwrap_or(-1),
            },
        );
        let mut stream = api
            .client
            .events(req)
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(e) = stream.next().await {
            let e = e.map_err(status_error)?;
            println!(
                "{} {} {} {}: {}",
                node_name(e.metadata.as_ref()),
                e.unix_millis,
                e.kind(),
                e.id,
                e.message
            );
        }
    }
    Ok(())
}

async fn print_log_stream(
    mut stream: tonic::Streaming<pb::LogChunk>,
    prefix: bool,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        if prefix {
            out.write_all(format!("{}: ", node_name(chunk.metadata.as_ref())).as_bytes())?;
        }
        out.write_all(&chunk.bytes)?;
        out.flush()?;
    }
    Ok(())
}
