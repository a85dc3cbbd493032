//! Forwarding: a call whose `nodes` metadata names other nodes is sent to each of them over
//! mutual TLS (as `os:impersonator`, passing the caller's role) and the per-node answers are
//! merged into one list; a node that fails is reported in its entry's `metadata.error`.

use std::future::Future;

use kiln_os_api::contract::NODES_METADATA;
use kiln_os_api::pb;
use tonic::{Request, Response, Status};

use super::auth::{Caller, set_forwarded_role};
use crate::node::Node;

/// A unary response: a list of per-node messages.
pub trait NodeMessages: Default + Send + 'static {
    /// The per-node message.
    type Item: Default + Send;
    /// The list.
    fn messages(&mut self) -> &mut Vec<Self::Item>;
    /// The metadata of a message.
    fn metadata(item: &mut Self::Item) -> &mut Option<pb::Metadata>;
}

macro_rules! node_messages {
    ($($resp:ty => $item:ty),* $(,)?) => {$(
        impl NodeMessages for $resp {
            type Item = $item;
            fn messages(&mut self) -> &mut Vec<$item> { &mut self.messages }
            fn metadata(item: &mut $item) -> &mut Option<pb::Metadata> { &mut item.metadata }
        }
    )*};
}

node_messages!(
    pb::ActionResponse => pb::ActionResult,
    pb::VersionResponse => pb::VersionInfo,
    pb::ServiceListResponse => pb::ServiceList,
    pb::ApplyConfigurationResponse => pb::ApplyConfigurationResult,
    pb::EtcdRecoverResponse => pb::EtcdRecoverResult,
    pb::EtcdMemberListResponse => pb::EtcdMembers,
    pb::EtcdStatusResponse => pb::EtcdStatus,
    pb::EtcdAlarmListResponse => pb::EtcdAlarms,
    pb::EtcdForfeitLeadershipResponse => pb::EtcdForfeitLeadership,
    pb::EtcdMemberAddResponse => pb::EtcdMemberAddResult,
    pb::ResourceResponse => pb::ResourceList,
    pb::KubeconfigResponse => pb::Kubeconfig,
);

/// The nodes a request targets, or `None` for this node alone.
pub fn targets<T>(req: &Request<T>) -> Option<Vec<String>> {
    let list: Vec<String> = req
        .metadata()
        .get(NODES_METADATA)?
        .to_str()
        .ok()?
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() { None } else { Some(list) }
}

/// The caller's role name (set by the auth layer).
pub fn caller_role<T>(req: &Request<T>) -> &'static str {
    req.extensions()
        .get::<Caller>()
        .map_or(kiln_pki::ROLE_READER, |c| c.role.as_str())
}

/// Runs a unary call here or on the target nodes and merges the answers.
pub async fn unary<Req, Resp, L, LF, R, RF>(
    node: &Node,
    req: Request<Req>,
    local: L,
    remote: R,
) -> Result<Response<Resp>, Status>
where
    Req: Clone + Send + 'static,
    Resp: NodeMessages,
    L: Fn(Request<Req>) -> LF,
    LF: Future<Output = Result<Resp, Status>>,
    R: Fn(
        kiln_os_api::pb::machine_service_client::MachineServiceClient<tonic::transport::Channel>,
        Request<Req>,
    ) -> RF,
    RF: Future<Output = Result<Response<Resp>, Status>>,
{
    let hostname = node.hostname();
    let Some(nodes) = targets(&req) else {
        let mut resp = local(req).await?;
        stamp(&mut resp, &hostname);
        return Ok(Response::new(resp));
    };
    let role = caller_role(&req);
    let extensions = req.extensions().clone();
    let message = req.into_inner();
    let mut merged = Resp::default();
    let calls = nodes.iter().map(|target| {
        let message = message.clone();
        let extensions = extensions.clone();
        let local = &local;
        let remote = &remote;
        async move {
            let result = if node.is_self(target) {
                let mut r = Request::new(message);
                *r.extensions_mut() = extensions;
                local(r).await
            } else {
                match node.channel_to(target).await {
                    Ok(ch) => {
                        let mut r = Request::new(message);
                        set_forwarded_role(&mut r, role);
                        let client = kiln_os_api::client::machine_client(ch);
                        let out = remote(client, r).await.map(Response::into_inner);
                        if out.as_ref().is_err_and(super::status::is_retryable) {
                            node.forget_channel(target);
                        }
                        out
                    }
                    Err(s) => Err(s),
                }
            };
            (target.clone(), result)
        }
    });
    for (target, result) in futures::future::join_all(calls).await {
        match result {
            Ok(mut resp) => {
                // Name every answer after the node as the caller named it.
                for item in resp.messages().iter_mut() {
                    Resp::metadata(item)
                        .get_or_insert_with(pb::Metadata::default)
                        .hostname
                        .clone_from(&target);
                }
                merged.messages().append(resp.messages());
            }
            Err(status) => {
                let mut item = Resp::Item::default();
                *Resp::metadata(&mut item) = Some(pb::Metadata {
                    hostname: target.clone(),
                    error: status.message().to_owned(),
                });
                merged.messages().push(item);
            }
        }
    }
    Ok(Response::new(merged))
}

/// Sets the hostname in every message that has none.
fn stamp<Resp: NodeMessages>(resp: &mut Resp, hostname: &str) {
    for item in resp.messages().iter_mut() {
        let md = Resp::metadata(item).get_or_insert_with(pb::Metadata::default);
        if md.hostname.is_empty() {
            md.hostname = hostname.to_owned();
        }
    }
}

/// For a streaming call: `None` to serve it here, or the one other node to proxy it to.
pub fn stream_target<T>(node: &Node, req: &Request<T>) -> Result<Option<String>, Status> {
    match targets(req) {
        None => Ok(None),
        Some(list) if list.len() == 1 => {
            if node.is_self(&list[0]) {
                Ok(None)
            } else {
                Ok(Some(list[0].clone()))
            }
        }
        Some(list) => Err(Status::invalid_argument(format!(
            "streaming calls reach one node at a time, got {}; the kiln client opens one stream per node",
            list.join(",")
        ))),
    }
}

/// Builds a forwarded request for `message`.
pub fn forwarded<T, U>(req: &Request<T>, message: U) -> Request<U> {
    let mut r = Request::new(message);
    set_forwarded_role(&mut r, caller_role(req));
    r
}
