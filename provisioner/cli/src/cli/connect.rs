//! Reaching nodes: `-e` endpoints and `-n` nodes from the flags or the client config context,
//! mutual TLS with the context's client certificate, and per-node results.

use anyhow::{Context as _, bail};
use kiln_config::ClientConfig;
use kiln_os_api::client::{self, Credentials};
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
use tonic::transport::Channel;

use super::GlobalArgs;

/// A connected client and the nodes it targets.
pub struct Api {
    /// The client, connected to one endpoint.
    pub client: MachineServiceClient<Channel>,
    /// Target nodes (empty: the endpoint node).
    pub nodes: Vec<String>,
}

fn split(list: &[String]) -> Vec<String> {
    list.iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn decode(field: &str, b64: &str) -> anyhow::Result<String> {
    kiln_pki::decode_base64_pem(b64)
        .with_context(|| format!("client config: {field} is not base64 PEM"))
}

/// Loads credentials and target lists from flags and the client config.
pub fn target(global: &GlobalArgs) -> anyhow::Result<(Credentials, Vec<String>, Vec<String>)> {
    let path = global.kilnconfig_path()?;
    let cfg = ClientConfig::load(&path)?;
    if cfg.contexts.is_empty() {
        bail!(
            "no client config at {}: generate one with `kiln gen config` and merge it with `kiln config merge kilnconfig`, or pass --kilnconfig",
            path.display()
        );
    }
    let (_, ctx) = cfg.context(global.context.as_deref(), &path)?;
    let creds = Credentials {
        ca_pem: decode("ca", &ctx.ca)?,
        cert_pem: decode("crt", &ctx.crt)?,
        key_pem: decode("key", &ctx.key)?,
    };
    let endpoints = if global.endpoints.is_empty() {
        ctx.endpoints.clone()
    } else {
        split(&global.endpoints)
    };
    let nodes = if global.nodes.is_empty() {
        ctx.nodes.clone()
    } else {
        split(&global.nodes)
    };
    if endpoints.is_empty() {
        bail!("no endpoint: pass -e ENDPOINT or set one with `kiln config endpoint`");
    }
    Ok((creds, endpoints, nodes))
}

impl Api {
    /// Connects to the first endpoint that answers.
    pub async fn connect(global: &GlobalArgs) -> anyhow::Result<Self> {
        let (creds, endpoints, nodes) = target(global)?;
        let mut errors = Vec::new();
        for ep in &endpoints {
            match client::connect(ep, &creds).await {
                Ok(ch) => {
                    return Ok(Self {
                        client: client::machine_client(ch),
                        nodes,
                    });
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        bail!("no endpoint answered: {}", errors.join("; "))
    }

    /// A request aimed at the target nodes.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        client::request(message, &self.nodes)
    }

    /// A request aimed at one node.
    pub fn request_to<T>(&self, node: &str, message: T) -> tonic::Request<T> {
        if node.is_empty() {
            tonic::Request::new(message)
        } else {
            client::request(message, &[node.to_owned()])
        }
    }

    /// The targets for per-node streams: the nodes, or the endpoint node.
    pub fn stream_targets(&self) -> Vec<String> {
        if self.nodes.is_empty() {
            vec![String::new()]
        } else {
            self.nodes.clone()
        }
    }

    /// Requires exactly one target node.
    pub fn single_node(&self, what: &str) -> anyhow::Result<String> {
        match self.nodes.len() {
            0 => Ok(String::new()),
            1 => Ok(self.nodes[0].clone()),
            _ => bail!("{what} takes one node; got {}", self.nodes.join(",")),
        }
    }
}

/// Turns a gRPC status into an error that says what happened.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        _ => "error",
    };
    anyhow::anyhow!("{code}: {}", s.message())
}

/// Per-node errors collected while printing results.
#[derive(Debug, Default)]
pub struct NodeErrors(Vec<String>);

impl NodeErrors {
    /// Records the error of a message, returning whether it had none.
    pub fn check(&mut self, md: Option<&pb::Metadata>) -> bool {
        match md {
            Some(m) if !m.error.is_empty() => {
                self.0.push(format!("{}: {}", m.hostname, m.error));
                false
            }
            _ => true,
        }
    }

    /// Fails if any node failed.
    pub fn finish(self) -> anyhow::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        for e in &self.0 {
            eprintln!("error: {e}");
        }
        bail!("{} node(s) failed", self.0.len())
    }
}

/// The node name of a message.
pub fn node_name(md: Option<&pb::Metadata>) -> String {
    md.map(|m| m.hostname.clone()).unwrap_or_default()
}
