//! The handlers of `kiln.machine.MachineService`, one module per area. Every call has the same
//! shape (serve it here, or forward it to the target nodes and merge their answers); the
//! [`machine_service!`] table below writes that shape once, and each handler is a plain async
//! function of this node.

mod config;
mod etcd;
mod files;
mod power;
mod resources;
mod services;
mod upgrade;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kiln_config::{MachineConfig, MachineType};
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_server::MachineService;
use tonic::{Request, Response, Status, Streaming};

use super::forward::{self, forwarded, stream_target};
use super::status::{ApiError, ApiResult};
use crate::node::{Node, Stage};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The API implementation.
#[derive(Debug, Clone)]
pub struct MachineApi {
    node: Arc<Node>,
}

impl MachineApi {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn require_config(&self) -> ApiResult<Arc<MachineConfig>> {
        self.node.config().ok_or(ApiError::NoConfig)
    }

    /// Refuses a call while this boot is ending (a reset wipes volumes after its answer): the
    /// caller retries once the node is back.
    fn require_not_stopping(&self) -> ApiResult<()> {
        match self.node.stage() {
            stage @ (Stage::Resetting | Stage::Rebooting | Stage::ShuttingDown) => {
                Err(ApiError::Stopping {
                    stage: stage.as_str(),
                })
            }
            Stage::Booting | Stage::Maintenance | Stage::Running => Ok(()),
        }
    }

    fn require_control_plane(&self, what: &'static str) -> ApiResult<Arc<MachineConfig>> {
        let cfg = self.require_config()?;
        if cfg.machine.machine_type != MachineType::Controlplane {
            return Err(ApiError::NotControlPlane { what });
        }
        Ok(cfg)
    }
}

/// A response with one message for this node (forwarding names it).
fn action(message: impl Into<String>) -> pb::ActionResponse {
    pb::ActionResponse {
        messages: vec![pb::ActionResult {
            metadata: None,
            message: message.into(),
        }],
    }
}

/// Metadata naming this node, for streamed messages.
fn here(node: &Node) -> Option<pb::Metadata> {
    Some(pb::Metadata {
        hostname: node.hostname(),
        error: String::new(),
    })
}

/// Proxies a server-streaming call to the one other node it targets.
async fn proxy_stream<Req, Item, F, Fut>(
    node: &Node,
    target: &str,
    req: Request<Req>,
    call: F,
) -> Result<Response<BoxStream<Item>>, Status>
where
    Req: Clone,
    Item: Send + 'static,
    F: FnOnce(
        pb::machine_service_client::MachineServiceClient<tonic::transport::Channel>,
        Request<Req>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Streaming<Item>>, Status>>,
{
    let ch = node.channel_to(target).await?;
    let fwd = forwarded(&req, req.get_ref().clone());
    let resp = call(kiln_os_api::client::machine_client(ch), fwd).await?;
    Ok(Response::new(Box::pin(resp.into_inner())))
}

/// Writes the `MachineService` implementation from a table of handlers.
///
/// - `unary`: `method(Request) -> Response = handler;` where
///   `handler(&MachineApi, Request<Request>) -> ApiResult<Response>` serves this node; the
///   call is forwarded to the nodes named in the `nodes` metadata and the answers merged
///   ([`forward::unary`]).
/// - `server_stream`: `method / StreamType (Request) -> Item = handler;` where
///   `handler(&MachineApi, Request) -> ApiResult<BoxStream<Item>>`; the call is proxied to the
///   one other node it targets ([`stream_target`]).
/// - `other`: methods with their own shape, written as they are.
macro_rules! machine_service {
    (
        unary { $($method:ident($req:ty) -> $resp:ty = $local:path;)* }
        server_stream { $($smethod:ident / $stype:ident ($sreq:ty) -> $item:ty = $slocal:path;)* }
        other { $($other:tt)* }
    ) => {
        #[tonic::async_trait]
        impl MachineService for MachineApi {
            $(
                async fn $method(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    let me = self.clone();
                    forward::unary(
                        &self.node,
                        req,
                        move |r| {
                            let me = me.clone();
                            async move { $local(&me, r).await.map_err(Status::from) }
                        },
                        |mut c, r| async move { c.$method(r).await },
                    )
                    .await
                }
            )*
            $(
                type $stype = BoxStream<$item>;
                async fn $smethod(
                    &self,
                    req: Request<$sreq>,
                ) -> Result<Response<Self::$stype>, Status> {
                    if let Some(t) = stream_target(&self.node, &req)? {
                        return proxy_stream(&self.node, &t, req, |mut c, r| async move {
                            c.$smethod(r).await
                        })
                        .await;
                    }
                    Ok(Response::new($slocal(self, req.into_inner()).await?))
                }
            )*
            $($other)*
        }
    };
}

machine_service! {
    unary {
        version(pb::Empty) -> pb::VersionResponse = resources::version;
        service_list(pb::Empty) -> pb::ServiceListResponse = services::list;
        service_start(pb::ServiceRequest) -> pb::ActionResponse = services::start;
        service_stop(pb::ServiceRequest) -> pb::ActionResponse = services::stop;
        service_restart(pb::ServiceRequest) -> pb::ActionResponse = services::restart;
        reboot(pb::Empty) -> pb::ActionResponse = power::reboot;
        shutdown(pb::Empty) -> pb::ActionResponse = power::shutdown;
        reset(pb::ResetRequest) -> pb::ActionResponse = power::reset;
        apply_configuration(pb::ApplyConfigurationRequest)
            -> pb::ApplyConfigurationResponse = config::apply;
        bootstrap(pb::BootstrapRequest) -> pb::ActionResponse = etcd::bootstrap;
        etcd_member_list(pb::Empty) -> pb::EtcdMemberListResponse = etcd::member_list;
        etcd_status(pb::Empty) -> pb::EtcdStatusResponse = etcd::status;
        etcd_defragment(pb::Empty) -> pb::ActionResponse = etcd::defragment;
        etcd_alarm_list(pb::Empty) -> pb::EtcdAlarmListResponse = etcd::alarm_list;
        etcd_alarm_disarm(pb::Empty) -> pb::EtcdAlarmListResponse = etcd::alarm_disarm;
        etcd_leave_cluster(pb::Empty) -> pb::ActionResponse = etcd::leave_cluster;
        etcd_remove_member(pb::EtcdRemoveMemberRequest) -> pb::ActionResponse = etcd::remove_member;
        etcd_forfeit_leadership(pb::Empty)
            -> pb::EtcdForfeitLeadershipResponse = etcd::forfeit_leadership;
        etcd_member_add(pb::EtcdMemberAddRequest) -> pb::EtcdMemberAddResponse = etcd::member_add;
        get(pb::GetRequest) -> pb::ResourceResponse = resources::get;
        list(pb::ListRequest) -> pb::ResourceResponse = resources::list;
        meta_write(pb::MetaWriteRequest) -> pb::ActionResponse = resources::meta_write;
        meta_delete(pb::MetaDeleteRequest) -> pb::ActionResponse = resources::meta_delete;
        generate_kubeconfig(pb::Empty) -> pb::KubeconfigResponse = resources::kubeconfig;
        upgrade(pb::UpgradeRequest) -> pb::ActionResponse = upgrade::upgrade;
        rollback(pb::Empty) -> pb::ActionResponse = upgrade::rollback;
    }
    server_stream {
        logs / LogsStream (pb::LogsRequest) -> pb::LogChunk = services::logs;
        dmesg / DmesgStream (pb::DmesgRequest) -> pb::LogChunk = services::dmesg;
        events / EventsStream (pb::EventsRequest) -> pb::Event = services::events;
        etcd_snapshot / EtcdSnapshotStream (pb::Empty) -> pb::SnapshotChunk = etcd::snapshot;
        file_list / FileListStream (pb::FileListRequest) -> pb::FileInfo = files::list;
        file_read / FileReadStream (pb::FileReadRequest) -> pb::DataChunk = files::read;
        file_copy / FileCopyStream (pb::FileCopyRequest) -> pb::DataChunk = files::copy;
    }
    other {
        // Client streaming: the upload is passed through to the one target node as it comes.
        async fn etcd_recover(
            &self,
            req: Request<Streaming<pb::DataChunk>>,
        ) -> Result<Response<pb::EtcdRecoverResponse>, Status> {
            if let Some(t) = stream_target(&self.node, &req)? {
                return etcd::forward_recover(self, &t, req).await;
            }
            Ok(Response::new(etcd::recover_upload(self, req.into_inner()).await?))
        }
    }
}
