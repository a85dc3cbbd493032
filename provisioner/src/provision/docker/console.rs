//! The console of docker nodes: one helper per cluster (`kiln cluster docker-console`) follows
//! every node container's output (`docker logs -f`) into `<node>.log` in the state directory,
//! across restarts of the container, as the node launcher does for `process` nodes.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures::StreamExt as _;

use super::{engine, node_section};
use crate::state::StateDir;

/// The helper's name (`docker-console.pid`, `docker-console.log`).
pub const NAME: &str = "docker-console";

/// Follows every node of the cluster in `state_dir` until its containers are gone.
pub async fn run(state_dir: PathBuf) -> anyhow::Result<()> {
    let dir = StateDir { dir: state_dir };
    let state = dir.load()?;
    let mut tasks = Vec::new();
    for n in &state.nodes {
        let section = node_section(&state, &n.name);
        let log = dir.log(&n.name);
        tasks.push(tokio::spawn(async move {
            let docker = engine::connect(&section.host).await?;
            follow(&docker, &section.container, &log).await
        }));
    }
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            tracing::warn!("console: {e:#}");
        }
    }
    Ok(())
}

async fn follow(
    docker: &bollard::Docker,
    container: &str,
    log: &std::path::Path,
) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut since = 0i32;
    // Before the container exists (create makes nodes one by one) it is waited for; once it
    // existed, its removal ends the follow.
    let mut seen = false;
    loop {
        // Wait for the container to exist and run (it may be created after this starts, or
        // be powered off); stop once it is gone.
        match docker.inspect_container(container, None).await {
            Ok(info) if info.state.as_ref().and_then(|s| s.running) == Some(true) => seen = true,
            Ok(_) => {
                seen = true;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) if !seen => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let mut stream = docker.logs(
            container,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                since,
                tail: "all".into(),
                ..Default::default()
            }),
        );
        while let Some(item) = stream.next().await {
            match item {
                Ok(
                    LogOutput::StdOut { message }
                    | LogOutput::StdErr { message }
                    | LogOutput::Console { message },
                ) => {
                    file.write_all(&message)?;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // The container stopped: its next boot's output comes after this second.
        since = i32::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
        .unwrap_or(0);
    }
}
