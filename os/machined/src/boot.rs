//! The boot sequence: acquire config (or maintenance mode) → validate → prepare volumes →
//! network → credentials → start the API → start services → Running; then wait for a power
//! request and stop everything in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_config::MachineType;
use kiln_os_api::contract::{API_PORT, TRUST_PORT};
use kiln_pki::{CertificateAuthority, KeyAlgorithm, LeafRequest, Usage};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::{self, ServerHandle};
use crate::config_source::{self, ConfigSources};
use crate::events::EventKind;
use crate::node::{Node, NodeCredentials, PowerRequest, Stage};
use crate::platform::Power;

fn phase(node: &Node, id: &str, message: impl Into<String>) {
    node.events
        .publish(EventKind::Machine, id, "phase", message);
}

async fn bind(node: &Node, port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(node.platform.address(), port);
    // The previous server of this port (maintenance mode) may still be closing.
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

fn self_signed(node: &Node) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![node.hostname()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(node.platform.address()));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues the node's own API certificate and forwarding certificate from the OS CA.
fn control_plane_credentials(node: &Node) -> anyhow::Result<NodeCredentials> {
    let cfg = node
        .config()
        .ok_or_else(|| anyhow::anyhow!("no configuration"))?;
    let pair = cfg
        .machine
        .ca
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("machine.ca is missing"))?;
    let ca_cert = pair.cert_pem()?;
    let ca_key = pair
        .key_pem()?
        .ok_or_else(|| anyhow::anyhow!("machine.ca.key is missing on a control-plane node"))?;
    let ca = CertificateAuthority::from_pem(&ca_cert, &ca_key)?;
    let mut request = server_request(node);
    request.usage = Usage::Server;
    let server = ca.issue(&request)?;
    let forwarding = ca.issue(&LeafRequest::client(
        &node.hostname(),
        kiln_os_api::contract::ROLE_IMPERSONATOR,
    ))?;
    Ok(NodeCredentials {
        server_cert: server.cert_pem,
        server_key: server.key_pem,
        forwarding: Some(kiln_os_api::client::Credentials {
            ca_pem: ca_cert,
            cert_pem: forwarding.cert_pem,
            key_pem: forwarding.key_pem,
        }),
    })
}

/// Names and addresses the node's API certificate covers.
fn server_request(node: &Node) -> LeafRequest {
    let cfg = node.config();
    let mut dns = vec![node.hostname(), "localhost".to_owned()];
    let mut ips = vec![
        node.platform.address(),
        std::net::IpAddr::from([127, 0, 0, 1]),
    ];
    let mut extra: Vec<String> = cfg
        .as_ref()
        .map(|c| c.machine.cert_sans.clone())
        .unwrap_or_default();
    if let Some(host) = cfg
        .as_ref()
        .and_then(|c| kiln_config::generate::endpoint_host(&c.cluster.control_plane.endpoint))
    {
        extra.push(host);
    }
    for san in extra {
        match san.parse() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(san),
        }
    }
    ips.sort();
    ips.dedup();
    dns.sort();
    dns.dedup();
    LeafRequest {
        common_name: node.hostname(),
        organizations: vec![],
        dns_names: dns,
        ip_addresses: ips,
        usage: Usage::Server,
        validity: time::Duration::days(365),
        algorithm: KeyAlgorithm::EcdsaP256,
    }
}

/// A worker asks a control-plane node's trust service for its API certificate.
async fn worker_credentials(node: &Node) -> anyhow::Result<NodeCredentials> {
    let cfg = node
        .config()
        .ok_or_else(|| anyhow::anyhow!("no configuration"))?;
    let ca_pem = cfg
        .machine
        .ca
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("machine.ca is missing"))?
        .cert_pem()?;
    let req = server_request(node);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(req.dns_names.clone())?;
    for ip in &req.ip_addresses {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    let csr = params.serialize_request(&key)?.pem()?;
    let mut last = String::from("no control-plane node is known");
    for candidate in node.control_plane_candidates() {
        let (host, _) = kiln_os_api::client::host_port(&candidate, TRUST_PORT);
        let endpoint = tonic::transport::Endpoint::from_shared(format!(
            "https://{}",
            if host.contains(':') {
                format!("[{host}]:{TRUST_PORT}")
            } else {
                format!("{host}:{TRUST_PORT}")
            }
        ))?
        .connect_timeout(Duration::from_secs(3))
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
                .domain_name(host.clone()),
        )?;
        let result = async {
            let ch = endpoint.connect().await?;
            let mut client = kiln_os_api::pb::trust_service_client::TrustServiceClient::new(ch);
            let resp = client
                .certificate(kiln_os_api::pb::CertificateRequest {
                    token: cfg.machine.token.clone(),
                    csr: csr.clone().into_bytes(),
                })
                .await?;
            anyhow::Ok(resp.into_inner())
        }
        .await;
        match result {
            Ok(resp) => {
                return Ok(NodeCredentials {
                    server_cert: String::from_utf8(resp.crt)?,
                    server_key: key.serialize_pem(),
                    forwarding: None,
                });
            }
            Err(e) => last = format!("{candidate}: {e:#}"),
        }
    }
    anyhow::bail!("{last}")
}

/// Runs the boot sequence and then the node until a power request; returns what to do.
pub async fn run(
    node: Arc<Node>,
    sources: ConfigSources,
    mut power_rx: mpsc::Receiver<PowerRequest>,
) -> Power {
    match boot(&node, &sources, &mut power_rx).await {
        Ok((servers, request)) => finish(&node, servers, request).await,
        Err(Ended(request)) => finish(&node, Vec::new(), request).await,
    }
}

/// The boot ended early because of a power request.
struct Ended(PowerRequest);

async fn wait_or_power<T>(
    power_rx: &mut mpsc::Receiver<PowerRequest>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Ended> {
    tokio::select! {
        v = fut => Ok(v),
        r = power_rx.recv() => Err(Ended(r.unwrap_or(PowerRequest { power: Power::Shutdown, wipe: vec![], reason: "power channel closed".into() }))),
    }
}

/// Retries `body` (an expression of type `anyhow::Result<T>` that may `.await`) with a
/// growing delay until it succeeds, publishing each failure as an event.
macro_rules! retry_forever {
    ($node:expr, $what:expr, $body:expr) => {{
        let mut delay = Duration::from_millis(500);
        loop {
            let result: anyhow::Result<_> = async { $body }.await;
            match result {
                Ok(v) => break v,
                Err(e) => {
                    phase($node, $what, format!("{} failed, retrying: {e:#}", $what));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }};
}

async fn boot(
    node: &Arc<Node>,
    sources: &ConfigSources,
    power_rx: &mut mpsc::Receiver<PowerRequest>,
) -> Result<(Vec<ServerHandle>, PowerRequest), Ended> {
    node.set_stage(Stage::Booting);
    phase(
        node,
        "prepareVolumes",
        format!(
            "preparing STATE, EPHEMERAL and META under {}",
            node.platform
                .volumes()
                .state
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    );
    retry_forever!(node, "prepareVolumes", {
        Ok(node.platform.prepare_volumes()?)
    });

    phase(node, "acquireConfig", "acquiring the machine configuration");
    let acquired = match config_source::acquire(node.platform.volumes(), sources) {
        Ok(Some(a)) => {
            let report = kiln_config::validate(&a.config, node.platform.mode());
            if report.errors.is_empty() {
                for w in &report.warnings {
                    phase(node, "validateConfig", format!("warning: {w}"));
                }
                phase(
                    node,
                    "validateConfig",
                    format!(
                        "configuration from {} is valid for {} mode",
                        a.source,
                        node.platform.mode()
                    ),
                );
                Some(a)
            } else {
                for e in &report.errors {
                    phase(node, "validateConfig", format!("error: {e}"));
                }
                phase(
                    node,
                    "validateConfig",
                    format!(
                        "the configuration from {} is not valid; entering maintenance mode",
                        a.source
                    ),
                );
                None
            }
        }
        Ok(None) => None,
        Err(e) => {
            phase(
                node,
                "acquireConfig",
                format!("{e}; entering maintenance mode"),
            );
            None
        }
    };
    match acquired {
        Some(a) => {
            if a.source != "STATE"
                && a.config.persist
                && let Err(e) = config_source::persist(node.platform.volumes(), &a.text)
            {
                phase(
                    node,
                    "acquireConfig",
                    format!("could not persist the configuration: {e}"),
                );
            }
            node.set_config(a.config);
        }
        None => maintenance(node, power_rx).await?,
    }

    let cfg = node.config().ok_or_else(|| {
        Ended(PowerRequest {
            power: Power::Shutdown,
            wipe: vec![],
            reason: "no configuration".into(),
        })
    })?;
    let addresses = node.platform.configure_network(&cfg);
    phase(
        node,
        "configureNetwork",
        format!(
            "hostname {}, addresses {}",
            node.hostname(),
            addresses.join(", ")
        ),
    );

    let is_cp = cfg.machine.machine_type == MachineType::Controlplane;
    phase(
        node,
        "credentials",
        if is_cp {
            "issuing the API certificate from the OS CA"
        } else {
            "requesting the API certificate from a control-plane node"
        },
    );
    let creds = if is_cp {
        retry_forever!(node, "credentials", control_plane_credentials(node))
    } else {
        wait_or_power(power_rx, async {
            retry_forever!(node, "credentials", worker_credentials(node).await)
        })
        .await?
    };
    node.set_credentials(creds.clone());

    phase(
        node,
        "startAPI",
        format!("serving the API on {}:{API_PORT}", node.platform.address()),
    );
    let ca_pem = cfg
        .machine
        .ca
        .as_ref()
        .and_then(|c| c.cert_pem().ok())
        .unwrap_or_default();
    let mut servers = Vec::new();
    let listener = retry_forever!(node, "startAPI", Ok(bind(node, API_PORT).await?));
    match api::serve_api(
        node.clone(),
        listener,
        &creds.server_cert,
        &creds.server_key,
        &ca_pem,
    ) {
        Ok(h) => servers.push(h),
        Err(e) => phase(node, "startAPI", format!("{e}")),
    }
    if is_cp {
        let listener = retry_forever!(node, "startAPI", Ok(bind(node, TRUST_PORT).await?));
        match api::serve_trust(
            node.clone(),
            listener,
            &creds.server_cert,
            &creds.server_key,
        ) {
            Ok(h) => servers.push(h),
            Err(e) => phase(node, "startAPI", format!("{e}")),
        }
    }

    phase(node, "startServices", "starting services");
    if is_cp {
        node.supervisor
            .add(Arc::new(crate::etcd::EtcdService::new(node)));
    }
    node.set_stage(Stage::Running);
    let request = power_rx.recv().await.unwrap_or(PowerRequest {
        power: Power::Shutdown,
        wipe: vec![],
        reason: "power channel closed".into(),
    });
    Ok((servers, request))
}

async fn maintenance(
    node: &Arc<Node>,
    power_rx: &mut mpsc::Receiver<PowerRequest>,
) -> Result<(), Ended> {
    node.set_stage(Stage::Maintenance);
    let (cert, key) = retry_forever!(node, "maintenance", Ok(self_signed(node)?));
    let listener = retry_forever!(node, "maintenance", Ok(bind(node, API_PORT).await?));
    phase(
        node,
        "maintenance",
        format!(
            "maintenance mode: waiting for `kiln apply-config --insecure -n {}`",
            node.platform.address()
        ),
    );
    let server = api::serve_maintenance(node.clone(), listener, &cert, &key).map_err(|e| {
        Ended(PowerRequest {
            power: Power::Reboot,
            wipe: vec![],
            reason: e.to_string(),
        })
    })?;
    let applied = wait_or_power(power_rx, node.config_applied.notified()).await;
    server.stop().await;
    applied?;
    phase(
        node,
        "maintenance",
        "configuration received; continuing the boot",
    );
    node.set_stage(Stage::Booting);
    Ok(())
}

async fn finish(node: &Node, servers: Vec<ServerHandle>, request: PowerRequest) -> Power {
    node.set_stage(match request.power {
        Power::Reboot => Stage::Rebooting,
        Power::Shutdown => Stage::ShuttingDown,
    });
    phase(
        node,
        "stop",
        format!("{}: stopping services", request.reason),
    );
    node.supervisor.stop_all().await;
    for s in servers {
        s.stop().await;
    }
    for label in &request.wipe {
        match node.platform.volumes().wipe(label) {
            Ok(()) => phase(node, "reset", format!("wiped {label}")),
            Err(e) => phase(node, "reset", format!("wiping {label} failed: {e}")),
        }
    }
    request.power
}
