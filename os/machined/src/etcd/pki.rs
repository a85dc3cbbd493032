//! etcd's certificates, issued on the node at every start from the etcd CA in the
//! configuration: one peer/server certificate for the node and one client certificate for
//! machined itself.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kiln_config::MachineConfig;
use kiln_pki::{CertificateAuthority, KeyAlgorithm, LeafRequest, Usage};

/// Paths of the issued files.
#[derive(Debug, Clone)]
pub struct EtcdPki {
    /// The etcd CA certificate.
    pub ca: PathBuf,
    /// Server and peer certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// machined's client certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// Why certificates could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum EtcdPkiError {
    /// The configuration lacks the etcd CA.
    #[error("cluster.etcd.ca is missing from the configuration; control-plane nodes need it")]
    NoCa,
    /// The CA is unusable.
    #[error("cluster.etcd.ca: {0}")]
    Ca(String),
    /// Writing failed.
    #[error("writing etcd certificates to {path}: {source}")]
    Write {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Issues the node's etcd certificates into `dir`.
pub fn issue(
    config: &MachineConfig,
    dir: &Path,
    hostname: &str,
    address: IpAddr,
) -> Result<EtcdPki, EtcdPkiError> {
    let pair = config
        .cluster
        .etcd
        .as_ref()
        .and_then(|e| e.ca.as_ref())
        .ok_or(EtcdPkiError::NoCa)?;
    let cert = pair
        .cert_pem()
        .map_err(|e| EtcdPkiError::Ca(e.to_string()))?;
    let key = pair
        .key_pem()
        .map_err(|e| EtcdPkiError::Ca(e.to_string()))?
        .ok_or(EtcdPkiError::NoCa)?;
    let ca =
        CertificateAuthority::from_pem(&cert, &key).map_err(|e| EtcdPkiError::Ca(e.to_string()))?;
    let mut ips = vec![address, IpAddr::from([127, 0, 0, 1])];
    // Clients that reach etcd through a load balancer at the control-plane endpoint (as
    // during a kubeadm migration) see this certificate under the endpoint's address.
    if let Some(ip) = kiln_config::generate::endpoint_host(&config.cluster.control_plane.endpoint)
        .and_then(|h| h.parse::<IpAddr>().ok())
    {
        ips.push(ip);
    }
    ips.dedup();
    let node = ca
        .issue(&LeafRequest {
            common_name: hostname.to_owned(),
            organizations: vec![],
            dns_names: vec![hostname.to_owned(), "localhost".to_owned()],
            ip_addresses: ips,
            usage: Usage::ServerAndClient,
            validity: time::Duration::days(365),
            algorithm: KeyAlgorithm::EcdsaP256,
        })
        .map_err(|e| EtcdPkiError::Ca(e.to_string()))?;
    let client = ca
        .issue(&LeafRequest {
            common_name: "machined".to_owned(),
            organizations: vec![],
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: time::Duration::days(365),
            algorithm: KeyAlgorithm::EcdsaP256,
        })
        .map_err(|e| EtcdPkiError::Ca(e.to_string()))?;
    let pki = EtcdPki {
        ca: dir.join("ca.crt"),
        cert: dir.join("etcd.crt"),
        key: dir.join("etcd.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    };
    let write = |p: &Path, text: &str| {
        kiln_config::client::write_private(p, text.as_bytes()).map_err(|source| {
            EtcdPkiError::Write {
                path: dir.to_owned(),
                source,
            }
        })
    };
    write(&pki.ca, &cert)?;
    write(&pki.cert, &node.cert_pem)?;
    write(&pki.key, &node.key_pem)?;
    write(&pki.client_cert, &client.cert_pem)?;
    write(&pki.client_key, &client.key_pem)?;
    Ok(pki)
}
