//! The handlers of `kiln.machine.MachineService`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use kiln_config::{MachineConfig, MachineType};
use kiln_os_api::pb::machine_service_server::MachineService;
use kiln_os_api::pb::{self, ApplyMode};
use tokio::io::AsyncWriteExt as _;
use tonic::{Request, Response, Status, Streaming};

use super::forward::{self, forwarded, stream_target};
use super::status::{ApiError, ApiResult};
use super::{files, resources};
use crate::etcd::{self, BootstrapRequest};
use crate::events::unix_millis;
use crate::node::{Node, PowerRequest, Stage};
use crate::platform::Power;
use crate::supervisor::ServiceState;

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
}

fn action(message: impl Into<String>) -> pb::ActionResponse {
    pb::ActionResponse {
        messages: vec![pb::ActionResult {
            metadata: None,
            message: message.into(),
        }],
    }
}

fn lines_stream(
    hostname: String,
    (history, rx): (
        Vec<bytes::Bytes>,
        tokio::sync::broadcast::Receiver<bytes::Bytes>,
    ),
    follow: bool,
) -> BoxStream<pb::LogChunk> {
    let md = move || {
        Some(pb::Metadata {
            hostname: hostname.clone(),
            error: String::new(),
        })
    };
    let md2 = md.clone();
    let first = futures::stream::iter(history.into_iter().map(move |b| {
        Ok(pb::LogChunk {
            metadata: md(),
            bytes: b.to_vec(),
        })
    }));
    if !follow {
        return Box::pin(first);
    }
    let rest = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| {
        let md = md2.clone();
        async move {
            r.ok().map(|b| {
                Ok(pb::LogChunk {
                    metadata: md(),
                    bytes: b.to_vec(),
                })
            })
        }
    });
    Box::pin(first.chain(rest))
}

fn tail(n: i32) -> Option<usize> {
    usize::try_from(n).ok()
}

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

impl MachineApi {
    fn require_config(&self) -> ApiResult<Arc<MachineConfig>> {
        self.node
            .config()
            .ok_or_else(|| ApiError::FailedPrecondition("the node has no configuration yet".into()))
    }

    fn require_control_plane(&self, what: &str) -> ApiResult<Arc<MachineConfig>> {
        let cfg = self.require_config()?;
        if cfg.machine.machine_type != MachineType::Controlplane {
            return Err(ApiError::FailedPrecondition(format!(
                "{what} runs on control-plane nodes only; this node is a worker"
            )));
        }
        Ok(cfg)
    }

    fn etcd_pki(&self) -> ApiResult<etcd::EtcdPki> {
        self.require_control_plane("etcd")?;
        self.node.etcd.pki().ok_or_else(|| {
            ApiError::FailedPrecondition("etcd has not started on this node yet".into())
        })
    }

    async fn own_etcd(&self) -> ApiResult<etcd_client::Client> {
        let pki = self.etcd_pki()?;
        let state = self.node.supervisor.status(etcd::SERVICE_ID)?.state;
        if state != ServiceState::Running {
            return Err(ApiError::FailedPrecondition(format!(
                "etcd is not running on this node (it is {})",
                state.as_str()
            )));
        }
        Ok(etcd::ops::connect(&pki, &[etcd::client_url(&self.node)]).await?)
    }

    fn power_later(&self, power: Power, wipe: Vec<String>, reason: &str) {
        let node = self.node.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move {
            // Let the response reach the caller first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            node.request_power(PowerRequest {
                power,
                wipe,
                reason,
            })
            .await;
        });
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

    async fn leave_etcd(&self) -> ApiResult<()> {
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
            super::auth::set_forwarded_role(&mut req, kiln_pki::ROLE_READER);
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

    async fn local_apply(
        &self,
        req: pb::ApplyConfigurationRequest,
    ) -> ApiResult<pb::ApplyConfigurationResponse> {
        let text = String::from_utf8(req.data)
            .map_err(|_| ApiError::InvalidArgument("the configuration is not UTF-8 text".into()))?;
        let config =
            kiln_config::from_yaml(&text).map_err(|e| ApiError::InvalidConfig(e.to_string()))?;
        let report = kiln_config::validate(&config, self.node.platform.mode());
        if !report.errors.is_empty() {
            let list: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            return Err(ApiError::InvalidConfig(list.join("; ")));
        }
        let warnings: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
        let volumes = self.node.platform.volumes();
        let mode = ApplyMode::try_from(req.mode).unwrap_or(ApplyMode::Auto);
        let reply = |mode: &str, summary: String| pb::ApplyConfigurationResponse {
            messages: vec![pb::ApplyConfigurationResult {
                metadata: None,
                mode: mode.to_owned(),
                summary,
                warnings: warnings.clone(),
            }],
        };

        if self.node.stage() == Stage::Maintenance {
            if req.dry_run {
                return Ok(reply(
                    "maintenance",
                    "the configuration is valid; applying it would boot the node".into(),
                ));
            }
            crate::config_source::persist(volumes, &text)
                .map_err(ApiError::io("persisting the configuration"))?;
            self.node.set_config(config);
            self.node.config_applied.notify_one();
            return Ok(reply(
                "maintenance",
                "configuration applied; the node leaves maintenance mode and boots".into(),
            ));
        }

        let current = self.require_config()?;
        if current.machine.machine_type != config.machine.machine_type {
            return Err(ApiError::FailedPrecondition(format!(
                "the machine type cannot change ({} to {}); reset the node and apply the new configuration in maintenance mode",
                current.machine.machine_type, config.machine.machine_type
            )));
        }
        let reboot_fields = fields_needing_reboot(&current, &config);
        let needs_reboot = !reboot_fields.is_empty();
        let fields = reboot_fields.join(", ");
        let mode_name = match mode {
            ApplyMode::Auto => {
                if needs_reboot {
                    "reboot"
                } else {
                    "no-reboot"
                }
            }
            ApplyMode::NoReboot => "no-reboot",
            ApplyMode::Reboot => "reboot",
            ApplyMode::Staged => "staged",
            ApplyMode::Try => "try",
        };
        if needs_reboot && matches!(mode, ApplyMode::NoReboot | ApplyMode::Try) {
            return Err(ApiError::FailedPrecondition(format!(
                "the change of {fields} needs a reboot; apply with --mode reboot, auto or staged"
            )));
        }
        if req.dry_run {
            let what = if needs_reboot {
                format!("would apply and reboot (changed: {fields})")
            } else {
                "would apply without reboot".into()
            };
            return Ok(reply(mode_name, format!("dry run: {what}")));
        }
        // A new apply ends a pending `try`.
        if let Some(h) = self
            .node
            .try_revert
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
        match mode_name {
            "staged" => {
                crate::config_source::stage(volumes, &text)
                    .map_err(ApiError::io("staging the configuration"))?;
                Ok(reply(
                    mode_name,
                    "configuration staged; it applies at the next reboot".into(),
                ))
            }
            "try" => {
                let timeout = Duration::from_millis(
                    u64::try_from(req.try_timeout_millis)
                        .ok()
                        .filter(|t| *t > 0)
                        .unwrap_or(60_000),
                );
                self.node.set_config(config);
                let node = self.node.clone();
                let previous = (*current).clone();
                let handle = tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    node.set_config(previous);
                    node.events.publish(
                        crate::events::EventKind::Config,
                        "machineconfig",
                        "reverted",
                        "try timeout expired: previous configuration restored",
                    );
                });
                *self
                    .node
                    .try_revert
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(handle);
                Ok(reply(
                    mode_name,
                    format!(
                        "configuration applied for {timeout:?}; it reverts unless applied again with another mode"
                    ),
                ))
            }
            "no-reboot" => {
                crate::config_source::persist(volumes, &text)
                    .map_err(ApiError::io("persisting the configuration"))?;
                self.node.set_config(config);
                Ok(reply(
                    mode_name,
                    "configuration applied without reboot".into(),
                ))
            }
            _ => {
                crate::config_source::persist(volumes, &text)
                    .map_err(ApiError::io("persisting the configuration"))?;
                self.power_later(Power::Reboot, vec![], "apply-config");
                Ok(reply(
                    mode_name,
                    if fields.is_empty() {
                        "configuration applied; rebooting".into()
                    } else {
                        format!("configuration applied; rebooting (changed: {fields})")
                    },
                ))
            }
        }
    }
}

/// Sections whose change needs a reboot; the others apply live.
fn fields_needing_reboot(old: &MachineConfig, new: &MachineConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (o, n) = (&old.machine, &new.machine);
    if o.network != n.network {
        out.push("machine.network");
    }
    if o.install != n.install {
        out.push("machine.install");
    }
    if o.token != n.token || o.ca != n.ca {
        out.push("machine secrets");
    }
    if o.cert_sans != n.cert_sans {
        out.push("machine.certSANs");
    }
    if old.cluster != new.cluster {
        out.push("cluster");
    }
    out
}

#[tonic::async_trait]
impl MachineService for MachineApi {
    async fn version(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let node = node.clone();
                async move {
                    Ok(pb::VersionResponse {
                        messages: vec![pb::VersionInfo {
                            metadata: None,
                            tag: format!("v{}", env!("CARGO_PKG_VERSION")),
                            platform: node.platform.name().to_owned(),
                            arch: std::env::consts::ARCH.to_owned(),
                            hostname: node.hostname(),
                            machine_type: node
                                .machine_type()
                                .map(|t| t.to_string())
                                .unwrap_or_default(),
                            maintenance: node.stage() == Stage::Maintenance,
                            stage: node.stage().as_str().to_owned(),
                        }],
                    })
                }
            },
            |mut c, r| async move { c.version(r).await },
        )
        .await
    }

    async fn service_list(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ServiceListResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let node = node.clone();
                async move {
                    let services = node
                        .supervisor
                        .list()
                        .into_iter()
                        .map(|s| pb::ServiceInfo {
                            id: s.id,
                            state: s.state.as_str().to_owned(),
                            health: Some(pb::ServiceHealth {
                                unknown: s.health.unknown,
                                healthy: s.health.healthy,
                                last_message: s.health.last_message,
                            }),
                            events: s
                                .events
                                .into_iter()
                                .map(|e| pb::ServiceEvent {
                                    state: e.state.as_str().to_owned(),
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
            },
            |mut c, r| async move { c.service_list(r).await },
        )
        .await
    }

    async fn service_start(
        &self,
        req: Request<pb::ServiceRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let node = node.clone();
                async move {
                    let id = r.into_inner().id;
                    node.supervisor.start(&id).map_err(ApiError::from)?;
                    Ok(action(format!("Service {id:?} started")))
                }
            },
            |mut c, r| async move { c.service_start(r).await },
        )
        .await
    }

    async fn service_stop(
        &self,
        req: Request<pb::ServiceRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let node = node.clone();
                async move {
                    let id = r.into_inner().id;
                    node.supervisor.stop(&id).await.map_err(ApiError::from)?;
                    Ok(action(format!("Service {id:?} stopped")))
                }
            },
            |mut c, r| async move { c.service_stop(r).await },
        )
        .await
    }

    async fn service_restart(
        &self,
        req: Request<pb::ServiceRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let node = node.clone();
                async move {
                    let id = r.into_inner().id;
                    node.supervisor.restart(&id).await.map_err(ApiError::from)?;
                    Ok(action(format!("Service {id:?} restarted")))
                }
            },
            |mut c, r| async move { c.service_restart(r).await },
        )
        .await
    }

    type LogsStream = BoxStream<pb::LogChunk>;
    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(
                &self.node,
                &t,
                req,
                |mut c, r| async move { c.logs(r).await },
            )
            .await;
        }
        let r = req.into_inner();
        let hostname = self.node.hostname();
        let tail_n = tail(r.tail_lines);
        let snapshot = if r.id == "machined" {
            self.node.console.tail(tail_n)
        } else {
            self.node
                .supervisor
                .with_log(&r.id, |log| log.tail(tail_n))
                .map_err(ApiError::from)?
        };
        Ok(Response::new(lines_stream(hostname, snapshot, r.follow)))
    }

    type DmesgStream = BoxStream<pb::LogChunk>;
    async fn dmesg(
        &self,
        req: Request<pb::DmesgRequest>,
    ) -> Result<Response<Self::DmesgStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(
                &self.node,
                &t,
                req,
                |mut c, r| async move { c.dmesg(r).await },
            )
            .await;
        }
        let r = req.into_inner();
        Ok(Response::new(lines_stream(
            self.node.hostname(),
            self.node.console.tail(tail(r.tail_lines)),
            r.follow,
        )))
    }

    type EventsStream = BoxStream<pb::Event>;
    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(
                &self.node,
                &t,
                req,
                |mut c, r| async move { c.events(r).await },
            )
            .await;
        }
        let r = req.into_inner();
        let hostname = self.node.hostname();
        let (history, rx) = self.node.events.tail(tail(r.tail_events));
        let to_pb = move |e: crate::events::Event| pb::Event {
            metadata: Some(pb::Metadata {
                hostname: hostname.clone(),
                error: String::new(),
            }),
            kind: e.kind.as_str().to_owned(),
            id: e.id,
            state: e.state,
            message: e.message,
            unix_millis: unix_millis(e.at),
        };
        let to_pb2 = to_pb.clone();
        let first = futures::stream::iter(history.into_iter().map(move |e| Ok(to_pb(e))));
        if !r.follow {
            return Ok(Response::new(Box::pin(first)));
        }
        let rest = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| {
            let to_pb = to_pb2.clone();
            async move { e.ok().map(|e| Ok(to_pb(e))) }
        });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }

    async fn reboot(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    me.power_later(Power::Reboot, vec![], "reboot requested");
                    Ok(action("rebooting"))
                }
            },
            |mut c, r| async move { c.reboot(r).await },
        )
        .await
    }

    async fn shutdown(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    me.power_later(Power::Shutdown, vec![], "shutdown requested");
                    Ok(action("shutting down"))
                }
            },
            |mut c, r| async move { c.shutdown(r).await },
        )
        .await
    }

    async fn reset(
        &self,
        req: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let me = me.clone();
                async move {
                    let r = r.into_inner();
                    let mut labels = r.system_labels_to_wipe.clone();
                    if labels.is_empty() {
                        labels = crate::volumes::Volumes::WIPEABLE
                            .iter()
                            .map(|s| (*s).to_owned())
                            .collect();
                    }
                    for l in &labels {
                        me.node
                            .platform
                            .volumes()
                            .by_label(l)
                            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
                    }
                    let is_cp = me.node.machine_type() == Some(MachineType::Controlplane);
                    if r.graceful && is_cp && etcd::has_data(&me.node) {
                        me.leave_etcd().await?;
                    }
                    me.node.set_stage(Stage::Resetting);
                    let power = if r.reboot {
                        Power::Reboot
                    } else {
                        Power::Shutdown
                    };
                    me.power_later(power, labels.clone(), "reset");
                    Ok(action(format!(
                        "resetting: wiping {}, then {}",
                        labels.join(", "),
                        if r.reboot {
                            "rebooting"
                        } else {
                            "powering off"
                        }
                    )))
                }
            },
            |mut c, r| async move { c.reset(r).await },
        )
        .await
    }

    async fn apply_configuration(
        &self,
        req: Request<pb::ApplyConfigurationRequest>,
    ) -> Result<Response<pb::ApplyConfigurationResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let me = me.clone();
                async move { Ok(me.local_apply(r.into_inner()).await?) }
            },
            |mut c, r| async move { c.apply_configuration(r).await },
        )
        .await
    }

    async fn bootstrap(
        &self,
        req: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(&self.node, req, move |r| {
            let me = me.clone();
            async move {
                let r = r.into_inner();
                me.require_control_plane("bootstrap")?;
                if etcd::has_data(&me.node) {
                    return Err(ApiError::FailedPrecondition(format!(
                        "etcd is already bootstrapped on this node: its data directory {} is not empty; bootstrap runs once per cluster",
                        me.node.platform.volumes().etcd_data().display()
                    ))
                    .into());
                }
                let state = me.node.supervisor.status(etcd::SERVICE_ID).map_err(ApiError::from)?.state;
                if state != ServiceState::Preparing {
                    return Err(ApiError::FailedPrecondition(format!("etcd is {} on this node, not waiting for bootstrap", state.as_str())).into());
                }
                if let Some(existing) = me.existing_cluster().await {
                    return Err(ApiError::FailedPrecondition(format!(
                        "the cluster is already bootstrapped ({existing}); this node joins it by itself"
                    ))
                    .into());
                }
                let request = if r.recover_etcd {
                    if !me.node.platform.volumes().etcd_recover_snapshot().exists() {
                        return Err(ApiError::FailedPrecondition("no snapshot was uploaded for recovery; `kiln bootstrap --recover-from FILE` uploads it".into()).into());
                    }
                    etcd::restore(&me.node, r.recover_skip_hash_check).await.map_err(|e| {
                        let hint = if r.recover_skip_hash_check { "" } else { "; a raw copy of member/snap/db has no hash: add --recover-skip-hash-check" };
                        ApiError::FailedPrecondition(format!("{e}{hint}"))
                    })?;
                    BootstrapRequest::Recover
                } else {
                    BootstrapRequest::New
                };
                me.node.etcd.request_bootstrap(request);
                Ok(action(if r.recover_etcd { "bootstrapping etcd from the uploaded snapshot" } else { "bootstrapping a new etcd cluster" }))
            }
        }, |mut c, r| async move { c.bootstrap(r).await })
        .await
    }

    async fn etcd_recover(
        &self,
        req: Request<Streaming<pb::DataChunk>>,
    ) -> Result<Response<pb::EtcdRecoverResponse>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            let ch = self.node.channel_to(&t).await?;
            let role = forward::caller_role(&req);
            let inbound = req
                .into_inner()
                .take_while(|r| futures::future::ready(r.is_ok()))
                .filter_map(|r| futures::future::ready(r.ok()));
            let mut fwd = Request::new(inbound);
            super::auth::set_forwarded_role(&mut fwd, role);
            return kiln_os_api::client::machine_client(ch)
                .etcd_recover(fwd)
                .await;
        }
        self.require_control_plane("etcd recovery")?;
        if etcd::has_data(&self.node) {
            return Err(ApiError::FailedPrecondition(
                "etcd has data on this node; reset EPHEMERAL before recovering".into(),
            )
            .into());
        }
        let path = self.node.platform.volumes().etcd_recover_snapshot();
        std::fs::create_dir_all(path.parent().unwrap_or(&path))
            .map_err(ApiError::io("creating the snapshot directory"))?;
        let tmp = path.with_extension("uploading");
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(ApiError::io("creating the snapshot file"))?;
        let mut stream = req.into_inner();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
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
        Ok(Response::new(pb::EtcdRecoverResponse {
            messages: vec![pb::EtcdRecoverResult {
                metadata: Some(pb::Metadata {
                    hostname: self.node.hostname(),
                    error: String::new(),
                }),
                size,
            }],
        }))
    }

    async fn etcd_member_list(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EtcdMemberListResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    let mut c = me.own_etcd().await?;
                    let eps = [etcd::client_url(&me.node)];
                    let list = c
                        .member_list()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    let members = list.members().iter().map(member_pb).collect();
                    Ok(pb::EtcdMemberListResponse {
                        messages: vec![pb::EtcdMembers {
                            metadata: None,
                            members,
                        }],
                    })
                }
            },
            |mut c, r| async move { c.etcd_member_list(r).await },
        )
        .await
    }

    async fn etcd_status(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EtcdStatusResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    let mut c = me.own_etcd().await?;
                    let eps = [etcd::client_url(&me.node)];
                    let s = c
                        .status()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
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
            },
            |mut c, r| async move { c.etcd_status(r).await },
        )
        .await
    }

    type EtcdSnapshotStream = BoxStream<pb::SnapshotChunk>;
    async fn etcd_snapshot(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<Self::EtcdSnapshotStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(&self.node, &t, req, |mut c, r| async move {
                c.etcd_snapshot(r).await
            })
            .await;
        }
        let mut c = self.own_etcd().await?;
        let eps = [etcd::client_url(&self.node)];
        let dir = self.node.platform.volumes().run.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(ApiError::io("creating the snapshot directory"))?;
        let path = dir.join(format!(
            "snapshot-{}.db",
            std::process::id() as u128 * 1_000_000 + u128::from(rand_suffix())
        ));
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(ApiError::io("creating the snapshot file"))?;
        let mut stream = c
            .snapshot()
            .await
            .map_err(etcd::ops::op_err(&eps))
            .map_err(ApiError::from)?;
        while let Some(part) = stream
            .message()
            .await
            .map_err(etcd::ops::op_err(&eps))
            .map_err(ApiError::from)?
        {
            file.write_all(part.blob())
                .await
                .map_err(ApiError::io("writing the snapshot"))?;
        }
        file.sync_all()
            .await
            .map_err(ApiError::io("writing the snapshot"))?;
        drop(file);
        let info = etcd::ops::snapshot_status(&self.node.etcdctl_bin, &path)
            .await
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                ApiError::Unavailable(format!("checking the snapshot with etcdctl: {e}"))
            })?;
        let hostname = self.node.hostname();
        let md = move || {
            Some(pb::Metadata {
                hostname: hostname.clone(),
                error: String::new(),
            })
        };
        let first = pb::SnapshotChunk {
            metadata: md(),
            bytes: Vec::new(),
            info: Some(pb::SnapshotInfo {
                hash: info.hash,
                revision: info.revision,
                total_keys: info.total_keys,
                total_size: info.total_size,
            }),
        };
        let body = files::file_chunks(path.clone(), true).map(move |r| {
            r.map(|bytes| pb::SnapshotChunk {
                metadata: md(),
                bytes,
                info: None,
            })
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async move { Ok(first) }).chain(body),
        )))
    }

    async fn etcd_defragment(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    let mut c = me.own_etcd().await?;
                    let eps = [etcd::client_url(&me.node)];
                    c.defragment()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    Ok(action("defragmented"))
                }
            },
            |mut c, r| async move { c.etcd_defragment(r).await },
        )
        .await
    }

    async fn etcd_alarm_list(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EtcdAlarmListResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move { Ok(me.alarms(false).await?) }
            },
            |mut c, r| async move { c.etcd_alarm_list(r).await },
        )
        .await
    }

    async fn etcd_alarm_disarm(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EtcdAlarmListResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move { Ok(me.alarms(true).await?) }
            },
            |mut c, r| async move { c.etcd_alarm_disarm(r).await },
        )
        .await
    }

    async fn etcd_leave_cluster(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    me.leave_etcd().await?;
                    Ok(action(
                        "left the etcd cluster; etcd is stopped and its data removed",
                    ))
                }
            },
            |mut c, r| async move { c.etcd_leave_cluster(r).await },
        )
        .await
    }

    async fn etcd_remove_member(
        &self,
        req: Request<pb::EtcdRemoveMemberRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let me = me.clone();
                async move {
                    let wanted = r.into_inner().member;
                    let mut c = me.own_etcd().await?;
                    let eps = [etcd::client_url(&me.node)];
                    let list = c
                        .member_list()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    let member = list
                        .members()
                        .iter()
                        .find(|m| {
                            m.name() == wanted
                                || format!("{:x}", m.id()) == wanted.trim_start_matches("0x")
                        })
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
                        .any(|u| *u == etcd::peer_url(&me.node))
                    {
                        return Err(ApiError::FailedPrecondition(
                            "that member is this node; use `kiln etcd leave` instead".into(),
                        )
                        .into());
                    }
                    let (id, name) = (member.id(), member.name().to_owned());
                    c.member_remove(id)
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    Ok(action(format!("removed member {name} ({id:x})")))
                }
            },
            |mut c, r| async move { c.etcd_remove_member(r).await },
        )
        .await
    }

    async fn etcd_forfeit_leadership(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::EtcdForfeitLeadershipResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    let mut c = me.own_etcd().await?;
                    let eps = [etcd::client_url(&me.node)];
                    let status = c
                        .status()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    let my_id = status.header().map_or(0, |h| h.member_id());
                    if status.leader() != my_id {
                        return Ok(pb::EtcdForfeitLeadershipResponse {
                            messages: vec![pb::EtcdForfeitLeadership {
                                metadata: None,
                                member: String::new(),
                            }],
                        });
                    }
                    let list = c
                        .member_list()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    let target = list
                        .members()
                        .iter()
                        .find(|m| m.id() != my_id && !m.is_learner() && !m.name().is_empty())
                        .ok_or_else(|| {
                            ApiError::FailedPrecondition(
                                "no other voting member can take the leadership".into(),
                            )
                        })?;
                    let (id, name) = (target.id(), target.name().to_owned());
                    c.move_leader(id)
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    Ok(pb::EtcdForfeitLeadershipResponse {
                        messages: vec![pb::EtcdForfeitLeadership {
                            metadata: None,
                            member: name,
                        }],
                    })
                }
            },
            |mut c, r| async move { c.etcd_forfeit_leadership(r).await },
        )
        .await
    }

    async fn etcd_member_add(
        &self,
        req: Request<pb::EtcdMemberAddRequest>,
    ) -> Result<Response<pb::EtcdMemberAddResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let me = me.clone();
                async move {
                    let r = r.into_inner();
                    let mut c = me.own_etcd().await?;
                    let eps = [etcd::client_url(&me.node)];
                    let list = c
                        .member_list()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    let existing = list
                        .members()
                        .iter()
                        .find(|m| m.peer_urls().iter().any(|u| r.peer_urls.contains(u)))
                        .map(|m| m.id());
                    let id = match existing {
                        Some(id) => id,
                        None => {
                            let opts = if r.learner {
                                Some(etcd_client::MemberAddOptions::new().with_is_learner())
                            } else {
                                None
                            };
                            let added = c
                                .member_add(r.peer_urls.clone(), opts)
                                .await
                                .map_err(etcd::ops::op_err(&eps))
                                .map_err(ApiError::from)?;
                            added.member().map(|m| m.id()).ok_or_else(|| {
                                ApiError::Unavailable("etcd did not return the new member".into())
                            })?
                        }
                    };
                    let list = c
                        .member_list()
                        .await
                        .map_err(etcd::ops::op_err(&eps))
                        .map_err(ApiError::from)?;
                    let client_urls = list
                        .members()
                        .iter()
                        .filter(|m| !m.is_learner())
                        .flat_map(|m| m.client_urls().iter().cloned())
                        .collect();
                    Ok(pb::EtcdMemberAddResponse {
                        messages: vec![pb::EtcdMemberAddResult {
                            metadata: None,
                            member_id: id,
                            members: list.members().iter().map(member_pb).collect(),
                            client_urls,
                        }],
                    })
                }
            },
            |mut c, r| async move { c.etcd_member_add(r).await },
        )
        .await
    }

    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let me = self.clone();
        let role = forward::caller_role(&req);
        forward::unary(
            &self.node,
            req,
            move |r| {
                let me = me.clone();
                async move {
                    let r = r.into_inner();
                    let mut list = resources::list(&me.node, &r.r#type, role).await?;
                    if !r.id.is_empty() {
                        list.retain(|res| res.id == r.id);
                        if list.is_empty() {
                            return Err(ApiError::NotFound(format!(
                                "{} {:?} not found",
                                r.r#type, r.id
                            ))
                            .into());
                        }
                    }
                    Ok(pb::ResourceResponse {
                        messages: vec![pb::ResourceList {
                            metadata: None,
                            resources: list,
                        }],
                    })
                }
            },
            |mut c, r| async move { c.get(r).await },
        )
        .await
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let me = self.clone();
        let role = forward::caller_role(&req);
        forward::unary(
            &self.node,
            req,
            move |r| {
                let me = me.clone();
                async move {
                    let list = resources::list(&me.node, &r.into_inner().r#type, role).await?;
                    Ok(pb::ResourceResponse {
                        messages: vec![pb::ResourceList {
                            metadata: None,
                            resources: list,
                        }],
                    })
                }
            },
            |mut c, r| async move { c.list(r).await },
        )
        .await
    }

    async fn meta_write(
        &self,
        req: Request<pb::MetaWriteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let node = node.clone();
                async move {
                    let r = r.into_inner();
                    node.meta.write(r.key, &r.value).map_err(ApiError::from)?;
                    Ok(action(format!(
                        "META key {:#x} written ({} bytes)",
                        r.key,
                        r.value.len()
                    )))
                }
            },
            |mut c, r| async move { c.meta_write(r).await },
        )
        .await
    }

    async fn meta_delete(
        &self,
        req: Request<pb::MetaDeleteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let node = self.node.clone();
        forward::unary(
            &self.node,
            req,
            move |r| {
                let node = node.clone();
                async move {
                    let key = r.into_inner().key;
                    node.meta.delete(key).map_err(ApiError::from)?;
                    Ok(action(format!("META key {key:#x} deleted")))
                }
            },
            |mut c, r| async move { c.meta_delete(r).await },
        )
        .await
    }

    async fn generate_kubeconfig(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::KubeconfigResponse>, Status> {
        let me = self.clone();
        forward::unary(
            &self.node,
            req,
            move |_| {
                let me = me.clone();
                async move {
                    let cfg = me.require_control_plane("kubeconfig")?;
                    let data = resources::kubeconfig(&cfg)?;
                    Ok(pb::KubeconfigResponse {
                        messages: vec![pb::Kubeconfig {
                            metadata: None,
                            data,
                        }],
                    })
                }
            },
            |mut c, r| async move { c.generate_kubeconfig(r).await },
        )
        .await
    }

    type FileListStream = BoxStream<pb::FileInfo>;
    async fn file_list(
        &self,
        req: Request<pb::FileListRequest>,
    ) -> Result<Response<Self::FileListStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(&self.node, &t, req, |mut c, r| async move {
                c.file_list(r).await
            })
            .await;
        }
        let r = req.into_inner();
        let entries = files::list(self.node.platform.volumes(), &r.root, r.recursion_depth)?;
        let hostname = self.node.hostname();
        Ok(Response::new(Box::pin(futures::stream::iter(
            entries.into_iter().map(move |mut e| {
                e.metadata = Some(pb::Metadata {
                    hostname: hostname.clone(),
                    error: String::new(),
                });
                Ok(e)
            }),
        ))))
    }

    type FileReadStream = BoxStream<pb::DataChunk>;
    async fn file_read(
        &self,
        req: Request<pb::FileReadRequest>,
    ) -> Result<Response<Self::FileReadStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(&self.node, &t, req, |mut c, r| async move {
                c.file_read(r).await
            })
            .await;
        }
        let path = files::resolve(self.node.platform.volumes(), &req.into_inner().path)?;
        if !path.is_file() {
            return Err(ApiError::NotFound(format!("{} is not a file", path.display())).into());
        }
        Ok(Response::new(Box::pin(
            files::file_chunks(path, false).map(|r| {
                r.map(|bytes| pb::DataChunk {
                    metadata: None,
                    bytes,
                })
            }),
        )))
    }

    type FileCopyStream = BoxStream<pb::DataChunk>;
    async fn file_copy(
        &self,
        req: Request<pb::FileCopyRequest>,
    ) -> Result<Response<Self::FileCopyStream>, Status> {
        if let Some(t) = stream_target(&self.node, &req)? {
            return proxy_stream(&self.node, &t, req, |mut c, r| async move {
                c.file_copy(r).await
            })
            .await;
        }
        let path = files::resolve(self.node.platform.volumes(), &req.into_inner().root_path)?;
        Ok(Response::new(files::tar_gz(path)))
    }
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

impl MachineApi {
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
