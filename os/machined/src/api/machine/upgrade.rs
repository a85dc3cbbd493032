//! Upgrade and rollback: the work is in [`crate::upgrade`]; these check the caller's request.

use kiln_os_api::pb;
use tonic::Request;

use super::{MachineApi, action};
use crate::api::status::ApiResult;
use crate::upgrade::{self, UpgradeRequest};

pub(super) async fn upgrade(
    api: &MachineApi,
    req: Request<pb::UpgradeRequest>,
) -> ApiResult<pb::ActionResponse> {
    api.require_not_stopping()?;
    api.require_config()?;
    let r = req.into_inner();
    let version = upgrade::start(
        api.node.clone(),
        UpgradeRequest {
            image: r.image,
            preserve: r.preserve,
            stage: r.stage,
            force: r.force,
        },
    )
    .await?;
    Ok(action(if r.stage {
        format!("staging release {version}")
    } else {
        format!("upgrading to release {version}")
    }))
}

pub(super) async fn rollback(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::ActionResponse> {
    api.require_not_stopping()?;
    let version = upgrade::rollback(api.node.clone()).await?;
    Ok(action(format!(
        "rolling back to release {version}; rebooting"
    )))
}
