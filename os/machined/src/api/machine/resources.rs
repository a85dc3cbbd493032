//! Version, resources (`get`, `list`), META records and the admin kubeconfig.

use kiln_os_api::pb;
use tonic::Request;

use super::{MachineApi, action};
use crate::api::forward;
use crate::api::resources;
use crate::api::status::{ApiError, ApiResult};
use crate::node::Stage;

pub(super) async fn version(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::VersionResponse> {
    let node = &api.node;
    Ok(pb::VersionResponse {
        messages: vec![pb::VersionInfo {
            metadata: None,
            tag: os_version(node.platform.kind()),
            platform: node.platform.name().to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            hostname: node.hostname(),
            machine_type: node
                .machine_type()
                .map_or(pb::MachineType::Unspecified, Into::into)
                .into(),
            maintenance: node.stage() == Stage::Maintenance,
            stage: pb::Stage::from(node.stage()).into(),
        }],
    })
}

/// The OS version: on `metal` the image's (`VERSION_ID` in `/etc/os-release`, which
/// `kiln image build` writes), elsewhere machined's own.
fn os_version(kind: crate::platform::PlatformKind) -> String {
    let image = (kind == crate::platform::PlatformKind::Metal)
        .then(|| std::fs::read_to_string("/etc/os-release").ok())
        .flatten()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VERSION_ID=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        });
    format!("v{}", image.unwrap_or_else(crate::upgrade::os_version))
}

fn resource_list(resources: Vec<pb::Resource>) -> pb::ResourceResponse {
    pb::ResourceResponse {
        messages: vec![pb::ResourceList {
            metadata: None,
            resources,
        }],
    }
}

pub(super) async fn get(
    api: &MachineApi,
    req: Request<pb::GetRequest>,
) -> ApiResult<pb::ResourceResponse> {
    let role = forward::caller_role(&req);
    let r = req.into_inner();
    let mut list = resources::list(&api.node, &r.r#type, role).await?;
    if !r.id.is_empty() {
        list.retain(|res| res.id == r.id);
        if list.is_empty() {
            return Err(ApiError::NotFound(format!(
                "{} {:?} not found",
                r.r#type, r.id
            )));
        }
    }
    Ok(resource_list(list))
}

pub(super) async fn list(
    api: &MachineApi,
    req: Request<pb::ListRequest>,
) -> ApiResult<pb::ResourceResponse> {
    let role = forward::caller_role(&req);
    let list = resources::list(&api.node, &req.into_inner().r#type, role).await?;
    Ok(resource_list(list))
}

pub(super) async fn meta_write(
    api: &MachineApi,
    req: Request<pb::MetaWriteRequest>,
) -> ApiResult<pb::ActionResponse> {
    let r = req.into_inner();
    api.node.meta.write(r.key, &r.value)?;
    Ok(action(format!(
        "META key {:#x} written ({} bytes)",
        r.key,
        r.value.len()
    )))
}

pub(super) async fn meta_delete(
    api: &MachineApi,
    req: Request<pb::MetaDeleteRequest>,
) -> ApiResult<pb::ActionResponse> {
    let key = req.into_inner().key;
    api.node.meta.delete(key)?;
    Ok(action(format!("META key {key:#x} deleted")))
}

pub(super) async fn kubeconfig(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::KubeconfigResponse> {
    let cfg = api.require_control_plane("kubeconfig")?;
    let data = resources::kubeconfig(&cfg)?;
    Ok(pb::KubeconfigResponse {
        messages: vec![pb::Kubeconfig {
            metadata: None,
            data,
        }],
    })
}
