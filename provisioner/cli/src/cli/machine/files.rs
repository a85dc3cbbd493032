//! Files on a node's volumes: `ls`, `read`, `cp`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use futures::StreamExt as _;
use kiln_os_api::pb;

use crate::cli::connect::{Api, node_name, status_error};
use kiln_provisioner::output;

/// `ls PATH`: one table across the target nodes.
pub(super) async fn ls(api: &mut Api, path: String, depth: i32) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for node in api.stream_targets() {
        let mut stream = api
            .client
            .file_list(api.request_to(
                &node,
                pb::FileListRequest {
                    root: path.clone(),
                    recursion_depth: depth,
                },
            ))
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(f) = stream.next().await {
            let f = f.map_err(status_error)?;
            rows.push(vec![
                node_name(f.metadata.as_ref()),
                format!("{:o}", f.mode & 0o7777).to_string() + if f.is_dir { " d" } else { "" },
                f.size.to_string(),
                f.name,
            ]);
        }
    }
    print!(
        "{}",
        output::table(&["NODE", "MODE", "SIZE(B)", "NAME"], &rows)
    );
    Ok(())
}

/// `read PATH`: the file's bytes to stdout, from one node.
pub(super) async fn read(api: &mut Api, path: String) -> anyhow::Result<()> {
    let node = api.single_node("read")?;
    let mut stream = api
        .client
        .file_read(api.request_to(&node, pb::FileReadRequest { path }))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk.map_err(status_error)?.bytes)?;
    }
    Ok(())
}

/// `cp PATH DESTINATION`: a gzipped tar from one node, unpacked into a local directory.
pub(super) async fn cp(api: &mut Api, path: String, destination: PathBuf) -> anyhow::Result<()> {
    let node = api.single_node("cp")?;
    let mut stream = api
        .client
        .file_copy(api.request_to(
            &node,
            pb::FileCopyRequest {
                root_path: path.clone(),
            },
        ))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.map_err(status_error)?.bytes);
    }
    std::fs::create_dir_all(&destination)
        .with_context(|| format!("creating {}", destination.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(data.as_slice()));
    archive
        .unpack(&destination)
        .with_context(|| format!("unpacking into {}", destination.display()))?;
    println!("copied {path} into {}", destination.display());
    Ok(())
}
