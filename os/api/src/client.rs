//! Connecting to a node's API: mutual TLS with a client certificate, or, for a node in
//! maintenance mode, TLS without verification (`--insecure`).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::contract::{API_PORT, NODES_METADATA};
use crate::pb::machine_service_client::MachineServiceClient;

/// The credentials of a client: the OS CA that signs node certificates, and the client's own
/// certificate and key, all PEM.
#[derive(Clone)]
pub struct Credentials {
    /// OS CA certificate.
    pub ca_pem: String,
    /// Client certificate.
    pub cert_pem: String,
    /// Client key.
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint is not `host` or `host:port`.
    #[error("invalid endpoint {endpoint:?}: {reason}; write HOST or HOST:PORT")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// TCP or TLS failed.
    #[error("connecting to {endpoint}: {source}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
}

/// Splits `host[:port]` (or `[v6]:port`) and fills in the API port.
pub fn host_port(endpoint: &str, default_port: u16) -> (String, u16) {
    let e = endpoint
        .trim()
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if let Some(rest) = e.strip_prefix('[')
        && let Some((host, port)) = rest.split_once(']')
    {
        let port = port.trim_start_matches(':').parse().unwrap_or(default_port);
        return (host.to_owned(), port);
    }
    match e.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_owned(), p.parse().unwrap_or(default_port)),
        _ => (e.to_owned(), default_port),
    }
}

fn uri(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

fn endpoint(endpoint: &str, port: u16) -> Result<(Endpoint, String), ConnectError> {
    let (host, port) = host_port(endpoint, port);
    let ep = Endpoint::from_shared(uri(&host, port))
        .map_err(|e| ConnectError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok((ep, host))
}

/// Opens a mutually authenticated channel to `endpoint` (`host` or `host:port`, port 50000 by
/// default).
pub async fn connect(endpoint_str: &str, creds: &Credentials) -> Result<Channel, ConnectError> {
    connect_port(endpoint_str, API_PORT, creds).await
}

/// As [`connect`], with another default port.
pub async fn connect_port(
    endpoint_str: &str,
    port: u16,
    creds: &Credentials,
) -> Result<Channel, ConnectError> {
    let (ep, host) = endpoint(endpoint_str, port)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem))
        .domain_name(host);
    let ep = ep
        .tls_config(tls)
        .map_err(|source| ConnectError::Transport {
            endpoint: endpoint_str.to_owned(),
            source,
        })?;
    ep.connect()
        .await
        .map_err(|source| ConnectError::Transport {
            endpoint: endpoint_str.to_owned(),
            source,
        })
}

/// A client for the machine API on a channel.
pub fn machine_client(channel: Channel) -> MachineServiceClient<Channel> {
    MachineServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens a channel to a node in maintenance mode: TLS without a client certificate and without
/// verifying the node's self-signed certificate (what `--insecure` means).
pub async fn connect_insecure(endpoint_str: &str) -> Result<Channel, ConnectError> {
    let (host, port) = host_port(endpoint_str, API_PORT);
    let bad = |reason: String| ConnectError::Endpoint {
        endpoint: endpoint_str.to_owned(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(host.clone()).map_err(|e| bad(e.to_string()))?;
    // TLS happens in the connector below, so the channel itself speaks plain HTTP/2 over it.
    let ep = Endpoint::from_shared(uri(&host, port).replacen("https://", "http://", 1))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    ep.connect_with_connector(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }))
    .await
    .map_err(|source| ConnectError::Transport {
        endpoint: endpoint_str.to_owned(),
        source,
    })
}

/// Splits an upload (a recovery snapshot) into 1 MiB messages.
pub fn data_chunks(data: &[u8]) -> Vec<crate::pb::DataChunk> {
    data.chunks(1 << 20)
        .map(|c| crate::pb::DataChunk {
            metadata: None,
            bytes: c.to_vec(),
        })
        .collect()
}

/// Wraps `message` in a request aimed at `nodes` (forwarded by the endpoint node); no nodes
/// means the endpoint node itself.
pub fn request<T>(message: T, nodes: &[String]) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if !nodes.is_empty()
        && let Ok(v) = nodes.join(",").parse()
    {
        req.metadata_mut().insert(NODES_METADATA, v);
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(host_port("10.5.0.2", 50000), ("10.5.0.2".into(), 50000));
        assert_eq!(host_port("10.5.0.2:6000", 50000), ("10.5.0.2".into(), 6000));
        assert_eq!(
            host_port("https://cp.example.com:443/", 50000),
            ("cp.example.com".into(), 443)
        );
        assert_eq!(host_port("[fd00::1]:5", 50000), ("fd00::1".into(), 5));
        assert_eq!(host_port("fd00::1", 50000), ("fd00::1".into(), 50000));
    }
}
