//! `ls`, `read` and `cp` (the volume logic is in [`crate::api::files`]).

use futures::StreamExt as _;
use kiln_os_api::pb;
use tonic::Status;

use super::{BoxStream, MachineApi, here};
use crate::api::files;
use crate::api::status::{ApiError, ApiResult};

pub(super) async fn list(
    api: &MachineApi,
    r: pb::FileListRequest,
) -> ApiResult<BoxStream<pb::FileInfo>> {
    let entries = files::list(api.node.platform.volumes(), &r.root, r.recursion_depth)?;
    let metadata = here(&api.node);
    Ok(Box::pin(futures::stream::iter(entries.into_iter().map(
        move |mut e| {
            e.metadata.clone_from(&metadata);
            Ok::<_, Status>(e)
        },
    ))))
}

pub(super) async fn read(
    api: &MachineApi,
    r: pb::FileReadRequest,
) -> ApiResult<BoxStream<pb::DataChunk>> {
    let path = files::resolve(api.node.platform.volumes(), &r.path)?;
    if !path.is_file() {
        return Err(ApiError::NotFound(format!(
            "{} is not a file",
            path.display()
        )));
    }
    Ok(Box::pin(files::file_chunks(path, false).map(|r| {
        r.map(|bytes| pb::DataChunk {
            metadata: None,
            bytes,
        })
    })))
}

pub(super) async fn copy(
    api: &MachineApi,
    r: pb::FileCopyRequest,
) -> ApiResult<BoxStream<pb::DataChunk>> {
    let path = files::resolve(api.node.platform.volumes(), &r.root_path)?;
    Ok(files::tar_gz(path))
}
