//! The boot sequence: prepare volumes → bring the network up and learn the address →
//! acquire the configuration (or maintenance mode) → validate → configure the network →
//! credentials → start the API → start services → Running; then wait for a power request and
//! stop everything in order. Every phase and every wait is an event (and a console line), so a
//! node that hangs says where and why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_config::MachineType;
use kiln_os_api::contract::{API_PORT, TRUST_PORT};
use kiln_os_api::wait::{Poll, TimedOut, until};
use kiln_pki::{CertificateAuthority, KeyAlgorithm, LeafRequest, Usage};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::{self, ServerHandle};
use crate::config_source::{self, ConfigSources};
use crate::events::EventKind;
use crate::node::{Node, NodeCredentials, PowerRequest, Stage};
use crate::platform::{PlatformError, Power};

/// Why a boot step failed (each is retried, and each failure is an event).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The node has no configuration where one is needed.
    #[error("the node has no configuration")]
    NoConfig,
    /// The configuration lacks the OS CA.
    #[error("machine.ca is missing from the configuration")]
    MissingCa,
    /// A control-plane configuration lacks the OS CA key.
    #[error(
        "machine.ca.key is missing on a control-plane node; a control-plane configuration carries the OS CA key"
    )]
    MissingCaKey,
    /// The OS CA in the configuration does not decode.
    #[error("machine.ca does not decode: {0}")]
    CaPem(#[from] kiln_pki::PemDecodeError),
    /// The OS CA cannot issue.
    #[error("issuing the API certificate from the OS CA: {0}")]
    Ca(#[from] kiln_pki::CaError),
    /// Making a key, certificate or CSR failed.
    #[error("making a key or certificate request: {0}")]
    Key(#[from] rcgen::Error),
    /// No control-plane node gave this worker its API certificate.
    #[error("waiting for its API certificate from {endpoint}: {reason}")]
    Certificate {
        /// The control-plane node asked last.
        endpoint: String,
        /// What went wrong there.
        reason: String,
    },
    /// A port stayed busy.
    #[error("binding {address}: {source}")]
    Bind {
        /// The address and port.
        address: SocketAddr,
        /// The last error, with the time waited.
        source: TimedOut<std::io::Error>,
    },
    /// A server could not start.
    #[error(transparent)]
    Serve(#[from] api::ServeError),
    /// The platform failed (volumes, network).
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

fn phase(node: &Node, id: &str, message: impl Into<String>) {
    node.events
        .publish(EventKind::Machine, id, "phase", message);
}

/// Binds `port` on the node's address, waiting a bounded time for a previous server of the
/// port (maintenance mode) to close.
async fn bind(node: &Node, port: u16) -> Result<TcpListener, BootError> {
    let address = SocketAddr::new(node.address(), port);
    until(
        format!("{address} to be free"),
        Poll::every(Duration::from_millis(100), Duration::from_secs(5)),
        || TcpListener::bind(address),
    )
    .await
    .map_err(|source| BootError::Bind { address, source })
}

/// Retries `attempt` with a growing pause until it succeeds; every failure is an event
/// `<waiting>: <error>`, and every five minutes without success one more says so.
async fn retry<T, E, F, Fut>(node: &Node, id: &str, waiting: &str, attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    retry_with(node, id, waiting, |e| format!("{waiting}: {e}"), attempt).await
}

/// [`retry`] for errors that say themselves what the node waits for: each failure's event is
/// `describe(error)`.
async fn retry_with<T, E, F, Fut>(
    node: &Node,
    id: &str,
    waiting: &str,
    describe: impl Fn(&E) -> String,
    mut attempt: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        let result = until(
            waiting,
            Poll::backoff(
                Duration::from_millis(500),
                Duration::from_secs(5),
                Duration::from_secs(300),
            ),
            || {
                let fut = attempt();
                let describe = &describe;
                async move {
                    fut.await.map_err(|e| {
                        phase(node, id, describe(&e));
                    })
                }
            },
        )
        .await;
        match result {
            Ok(v) => return v,
            Err(t) => phase(
                node,
                id,
                format!("{waiting}: still failing after {:?}; retrying", t.timeout),
            ),
        }
    }
}

fn self_signed(node: &Node) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![node.hostname()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(node.address()));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues the node's own API certificate and forwarding certificate from the OS CA.
fn control_plane_credentials(node: &Node) -> Result<NodeCredentials, BootError> {
    let cfg = node.config().ok_or(BootError::NoConfig)?;
    let pair = cfg.machine.ca.as_ref().ok_or(BootError::MissingCa)?;
    let ca_cert = pair.cert_pem()?;
    let ca_key = pair.key_pem()?.ok_or(BootError::MissingCaKey)?;
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
    let mut ips = vec![node.address(), std::net::IpAddr::from([127, 0, 0, 1])];
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
async fn worker_credentials(node: &Node) -> Result<NodeCredentials, BootError> {
    let cfg = node.config().ok_or(BootError::NoConfig)?;
    let ca_pem = cfg
        .machine
        .ca
        .as_ref()
        .ok_or(BootError::MissingCa)?
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
    let mut last = BootError::Certificate {
        endpoint: "the control-plane endpoint".into(),
        reason: "no control-plane node is known (cluster.controlPlane.endpoint)".into(),
    };
    for candidate in node.control_plane_candidates() {
        let (host, _) = kiln_os_api::client::host_port(&candidate, TRUST_PORT);
        let failed = |reason: String| BootError::Certificate {
            endpoint: host.clone(),
            reason,
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{TRUST_PORT}")
        } else {
            format!("{host}:{TRUST_PORT}")
        };
        let endpoint = match tonic::transport::Endpoint::from_shared(format!("https://{authority}"))
            .and_then(|e| {
                e.connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(10))
                    .tls_config(
                        tonic::transport::ClientTlsConfig::new()
                            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
                            .domain_name(host.clone()),
                    )
            }) {
            Ok(e) => e,
            Err(e) => {
                last = failed(e.to_string());
                continue;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(ch) => ch,
            Err(e) => {
                last = failed(connect_reason(&e));
                continue;
            }
        };
        let mut client = kiln_os_api::pb::trust_service_client::TrustServiceClient::new(channel);
        let answer = client
            .certificate(kiln_os_api::pb::CertificateRequest {
                token: cfg.machine.token.clone(),
                csr: csr.clone().into_bytes(),
            })
            .await;
        match answer {
            Ok(resp) => match String::from_utf8(resp.into_inner().crt) {
                Ok(server_cert) => {
                    return Ok(NodeCredentials {
                        server_cert,
                        server_key: key.serialize_pem(),
                        forwarding: None,
                    });
                }
                Err(_) => last = failed("the certificate is not PEM text".into()),
            },
            Err(status) => last = failed(status.message().to_owned()),
        }
    }
    Err(last)
}

/// A connection error and its causes in one line (`connect timed out`, `connection refused`).
fn connect_reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
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

fn power_channel_closed() -> PowerRequest {
    PowerRequest {
        power: Power::Shutdown,
        wipe: vec![],
        reason: "power channel closed".into(),
    }
}

async fn wait_or_power<T>(
    power_rx: &mut mpsc::Receiver<PowerRequest>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Ended> {
    tokio::select! {
        v = fut => Ok(v),
        r = power_rx.recv() => Err(Ended(r.unwrap_or_else(power_channel_closed))),
    }
}

/// Prepares the volumes, brings the network up, learns the node's address and acquires the
/// configuration (in that order: a configuration URL needs the network). `None`: maintenance.
async fn early_boot(
    node: &Arc<Node>,
    sources: &ConfigSources,
    power_rx: &mut mpsc::Receiver<PowerRequest>,
) -> Result<Option<config_source::Acquired>, Ended> {
    let platform = node.platform.clone();
    phase(
        node,
        "prepareVolumes",
        format!("preparing STATE, EPHEMERAL and META on {}", platform.name()),
    );
    retry(node, "prepareVolumes", "preparing the volumes", || async {
        platform.prepare_volumes()
    })
    .await;

    phase(node, "network", "bringing the network up");
    wait_or_power(
        power_rx,
        retry(node, "network", "bringing the network up", || {
            platform.bring_up_network()
        }),
    )
    .await?;
    phase(node, "network", "waiting for an address");
    let address = wait_or_power(
        power_rx,
        retry(node, "network", "waiting for an address", || {
            platform.address()
        }),
    )
    .await?;
    node.set_address(address);
    phase(node, "network", format!("address {address}"));

    phase(node, "acquireConfig", "acquiring the machine configuration");
    let mut sources = sources.clone();
    sources.kernel_url = sources.kernel_url.or_else(|| platform.kernel_config_url());
    sources.kernel_cmdline = sources.kernel_cmdline.or_else(|| platform.kernel_cmdline());
    sources
        .variables
        .insert("hostname".into(), platform.default_hostname());
    sources.variables.insert("ip".into(), address.to_string());
    if let Ok(uuid) = std::fs::read_to_string("/sys/class/dmi/id/product_uuid") {
        sources
            .variables
            .insert("uuid".into(), uuid.trim().to_owned());
    }
    let say = {
        let node = node.clone();
        move |line: String| phase(&node, "acquireConfig", line)
    };
    let on_retry = {
        let node = node.clone();
        move |url: &str, e: &config_source::FetchError| {
            phase(
                &node,
                "acquireConfig",
                format!("waiting for the configuration from {url}: {e}"),
            );
        }
    };
    let acquired = wait_or_power(
        power_rx,
        config_source::acquire(platform.volumes(), &sources, &on_retry, &say),
    )
    .await?;
    Ok(match acquired {
        Ok(Some(a)) => {
            let report = kiln_config::validate(&a.config, platform.mode());
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
                        platform.mode()
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
    })
}

async fn boot(
    node: &Arc<Node>,
    sources: &ConfigSources,
    power_rx: &mut mpsc::Receiver<PowerRequest>,
) -> Result<(Vec<ServerHandle>, PowerRequest), Ended> {
    node.set_stage(Stage::Booting);
    match early_boot(node, sources, power_rx).await? {
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
    let applied = wait_or_power(
        power_rx,
        retry(node, "configureNetwork", "configuring the network", || {
            node.platform.configure_network(&cfg)
        }),
    )
    .await?;
    // One interface's error is an event; the rest of the network is up.
    for problem in &applied.problems {
        tracing::warn!(error = %problem, "machine.network");
        node.events.publish(
            EventKind::Machine,
            "configureNetwork",
            "failed",
            problem.to_string(),
        );
    }
    let addresses = applied.addresses;
    node.set_addresses(addresses.clone());
    phase(
        node,
        "configureNetwork",
        format!(
            "hostname {}, addresses {}",
            node.hostname(),
            addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    write_machine_files(node, &cfg);

    let is_cp = cfg.machine.machine_type == MachineType::Controlplane;
    let creds = if is_cp {
        phase(
            node,
            "credentials",
            "issuing the API certificate from the OS CA",
        );
        retry(
            node,
            "credentials",
            "issuing the API certificate",
            || async { control_plane_credentials(node) },
        )
        .await
    } else {
        phase(
            node,
            "credentials",
            "requesting the API certificate from a control-plane node",
        );
        wait_or_power(
            power_rx,
            // The error names the control-plane node and the cause:
            // `waiting for its API certificate from 10.5.0.2: ...`.
            retry_with(
                node,
                "credentials",
                "waiting for its API certificate",
                BootError::to_string,
                || worker_credentials(node),
            ),
        )
        .await?
    };
    node.set_credentials(creds.clone());

    phase(
        node,
        "startAPI",
        format!("serving the API on {}:{API_PORT}", node.address()),
    );
    let ca_pem = cfg
        .machine
        .ca
        .as_ref()
        .and_then(|c| c.cert_pem().ok())
        .unwrap_or_default();
    let mut servers = Vec::new();
    let api_server = retry(node, "startAPI", "starting the API server", || async {
        let listener = bind(node, API_PORT).await?;
        Ok::<_, BootError>(api::serve_api(
            node.clone(),
            listener,
            &creds.server_cert,
            &creds.server_key,
            &ca_pem,
        )?)
    });
    servers.push(wait_or_power(power_rx, api_server).await?);
    if is_cp {
        let trust = retry(node, "startAPI", "starting the trust service", || async {
            let listener = bind(node, TRUST_PORT).await?;
            Ok::<_, BootError>(api::serve_trust(
                node.clone(),
                listener,
                &creds.server_cert,
                &creds.server_key,
            )?)
        });
        servers.push(wait_or_power(power_rx, trust).await?);
    }

    phase(node, "startServices", "starting services");
    if is_cp {
        node.supervisor
            .add(Arc::new(crate::etcd::EtcdService::new(node)));
    }
    crate::extensions::start(node);
    if is_cp {
        crate::manifests::start(node);
    }
    node.set_stage(Stage::Running);
    let request = power_rx.recv().await.unwrap_or_else(power_channel_closed);
    Ok((servers, request))
}

/// Writes `machine.files`; a file that cannot be written is an event, not a failed boot.
fn write_machine_files(node: &Node, cfg: &kiln_config::MachineConfig) {
    if cfg.machine.files.is_empty() {
        return;
    }
    let results = crate::machine_files::apply(node.platform.volumes(), &cfg.machine.files);
    let mut written = Vec::new();
    for (path, result) in results {
        match result {
            Ok(crate::machine_files::Outcome::Written) => written.push(path),
            Ok(crate::machine_files::Outcome::Unchanged) => {}
            Err(e) => {
                node.events
                    .publish(EventKind::Machine, "writeFiles", "failed", e.to_string())
            }
        }
    }
    if !written.is_empty() {
        phase(node, "writeFiles", format!("wrote {}", written.join(", ")));
    }
}

async fn maintenance(
    node: &Arc<Node>,
    power_rx: &mut mpsc::Receiver<PowerRequest>,
) -> Result<(), Ended> {
    node.set_stage(Stage::Maintenance);
    let server = retry(
        node,
        "maintenance",
        "starting the maintenance API",
        || async {
            let (cert, key) = self_signed(node)?;
            let listener = bind(node, API_PORT).await?;
            Ok::<_, BootError>(api::serve_maintenance(node.clone(), listener, &cert, &key)?)
        },
    );
    let server = wait_or_power(power_rx, server).await?;
    phase(
        node,
        "maintenance",
        format!(
            "maintenance mode: waiting for `kiln apply-config --insecure -n {}`",
            node.address()
        ),
    );
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

async fn finish(node: &Node, servers: Vec<ServerHandle>, mut request: PowerRequest) -> Power {
    // A release staged without --preserve: leave etcd (still running) and wipe EPHEMERAL now.
    // A reset that wipes EPHEMERAL has left etcd already.
    if !request
        .wipe
        .iter()
        .any(|l| l == kiln_os_api::contract::LABEL_EPHEMERAL)
    {
        request
            .wipe
            .extend(crate::upgrade::before_reboot(node).await);
    }
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
        match node.platform.wipe(label) {
            Ok(()) => phase(node, "reset", format!("wiped {label}")),
            Err(e) => phase(node, "reset", format!("wiping {label} failed: {e}")),
        }
    }
    request.power
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;
    use crate::logbuf::LogBuffer;
    use crate::node::NodeOptions;
    use crate::platform::Platform as _;
    use crate::platform::fake::FakePlatform;

    fn node(platform: Arc<FakePlatform>) -> (Arc<Node>, mpsc::Receiver<PowerRequest>) {
        Node::new(
            platform,
            Arc::new(LogBuffer::new(1 << 16)),
            NodeOptions {
                join_peers: vec![],
                etcd_bin: "etcd".into(),
                etcdctl_bin: "etcdctl".into(),
            },
        )
    }

    fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
        let configs = config_source::generated_configs();
        let path = dir.join("cp.yaml");
        std::fs::write(&path, kiln_config::to_yaml(&configs.controlplane).unwrap()).unwrap();
        path
    }

    /// The configuration is looked for only once the network is up and the node has an
    /// address (a DHCP lease may come late); network failures are events, and retried.
    #[tokio::test(start_paused = true)]
    async fn configuration_sources_are_tried_after_the_network_is_up() {
        let platform = Arc::new(FakePlatform::new().failing_network(2));
        let (node, mut power_rx) = node(platform.clone());
        let dir = tempfile::tempdir().unwrap();
        let sources = ConfigSources {
            file: Some(config_file(dir.path())),
            ..ConfigSources::default()
        };
        let (_, mut events) = node.events.tail(Some(0));
        let boot = tokio::spawn({
            let node = node.clone();
            async move { early_boot(&node, &sources, &mut power_rx).await.ok() }
        });
        let mut seen = Vec::new();
        loop {
            let e = events.recv().await.unwrap();
            seen.push(e.message.clone());
            if e.message == "waiting for an address" {
                break;
            }
        }
        assert!(
            seen.iter()
                .any(|m| m.contains("bringing the network up: ") && m.contains("no carrier")),
            "{seen:?}"
        );
        assert!(
            !platform.calls().iter().any(|c| c == "kernel_config_url"),
            "{:?}",
            platform.calls()
        );
        assert!(!seen.iter().any(|m| m.contains("acquiring")), "{seen:?}");

        platform.grant_address(IpAddr::from([10, 5, 0, 7]));
        let acquired = boot.await.unwrap().flatten().expect("a configuration");
        assert!(acquired.source.ends_with("cp.yaml"), "{}", acquired.source);
        assert_eq!(node.address(), IpAddr::from([10, 5, 0, 7]));
        let calls = platform.calls();
        let net = calls.iter().filter(|c| *c == "bring_up_network").count();
        assert_eq!(net, 3, "{calls:?}");
        let at = |name: &str| calls.iter().position(|c| c == name).unwrap();
        assert!(at("prepare_volumes") < at("bring_up_network"));
        assert!(at("address") < at("kernel_config_url"), "{calls:?}");
    }

    /// A reset's wipes go through the platform once services are stopped, and the stage says
    /// the node is rebooting meanwhile.
    #[tokio::test]
    async fn finishing_a_reset_wipes_through_the_platform() {
        let platform = Arc::new(FakePlatform::new());
        let (node, _power_rx) = node(platform.clone());
        platform.prepare_volumes().unwrap();
        let marker = platform.volumes().etcd_data().join("member");
        std::fs::create_dir_all(&marker).unwrap();
        let power = finish(
            &node,
            vec![],
            PowerRequest {
                power: Power::Reboot,
                wipe: vec!["EPHEMERAL".into()],
                reason: "reset".into(),
            },
        )
        .await;
        assert_eq!(power, Power::Reboot);
        assert_eq!(node.stage(), Stage::Rebooting);
        assert!(!marker.exists());
        assert!(platform.calls().contains(&"wipe EPHEMERAL".to_owned()));
        assert_eq!(platform.power(power), kiln_os_api::contract::EXIT_REBOOT);
    }

    /// A worker that gets no certificate says from where and why, in one line.
    #[tokio::test]
    async fn a_worker_waiting_for_its_certificate_names_the_node_and_the_cause() {
        let platform = Arc::new(FakePlatform::new());
        let (node, _power_rx) = node(platform);
        node.set_address(IpAddr::from([127, 0, 0, 9]));
        // The endpoint is 127.0.0.1:6443; nothing serves the trust port there.
        node.set_config(config_source::generated_configs().worker);
        let err = worker_credentials(&node).await.unwrap_err();
        let BootError::Certificate { endpoint, reason } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(endpoint, "127.0.0.1");
        assert!(!reason.is_empty());
        assert!(
            err.to_string()
                .starts_with("waiting for its API certificate from 127.0.0.1: "),
            "{err}"
        );
    }

    /// Every event is one console line the lab parses with the contract's parser.
    #[tokio::test]
    async fn events_are_console_lines() {
        let platform = Arc::new(FakePlatform::new());
        let (node, _power_rx) = node(platform);
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        node.events.attach_console({
            let lines = lines.clone();
            move |l| lines.lock().unwrap().push(l.to_owned())
        });
        phase(
            &node,
            "credentials",
            "waiting for its API certificate from 10.5.0.2: connect timed out",
        );
        let lines = lines.lock().unwrap().clone();
        let last = kiln_os_api::contract::ConsoleEvent::parse(lines.last().unwrap()).unwrap();
        assert_eq!(last.stage(), Some(kiln_os_api::pb::Stage::Booting));
        assert_eq!(
            last.message,
            "waiting for its API certificate from 10.5.0.2: connect timed out"
        );
    }
}
