//! Talking to etcd: clients with machined's etcd client certificate, and the operations the
//! API exposes (members, status, snapshot, defragment, alarms, leave, remove, move leader).

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::pki::EtcdPki;

/// An etcd error with the endpoint it came from.
#[derive(Debug, thiserror::Error)]
pub enum EtcdOpError {
    /// Reading the certificates failed.
    #[error("etcd client certificates: {0}")]
    Certificates(std::io::Error),
    /// etcd answered with an error or could not be reached.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints used.
        endpoints: String,
        /// The client error.
        source: etcd_client::Error,
    },
    /// etcd is not running on this node.
    #[error("etcd is not running on this node ({0})")]
    NotRunning(String),
}

/// A client to `endpoints` (client URLs).
pub async fn connect(pki: &EtcdPki, endpoints: &[String]) -> Result<Client, EtcdOpError> {
    let ca = std::fs::read_to_string(&pki.ca).map_err(EtcdOpError::Certificates)?;
    let cert = std::fs::read_to_string(&pki.client_cert).map_err(EtcdOpError::Certificates)?;
    let key = std::fs::read_to_string(&pki.client_key).map_err(EtcdOpError::Certificates)?;
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let opts = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10));
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(|source| EtcdOpError::Etcd {
            endpoints: endpoints.join(","),
            source,
        })
}

/// Wraps a client error with the endpoints.
pub fn op_err(endpoints: &[String]) -> impl Fn(etcd_client::Error) -> EtcdOpError + '_ {
    move |source| EtcdOpError::Etcd {
        endpoints: endpoints.join(","),
        source,
    }
}

/// Information `etcdctl snapshot status` prints.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct SnapshotStatus {
    /// CRC of the key space.
    pub hash: u32,
    /// Revision.
    pub revision: i64,
    /// Number of keys.
    #[serde(rename = "totalKey")]
    pub total_keys: i64,
    /// Size in bytes.
    #[serde(rename = "totalSize")]
    pub total_size: i64,
}

/// Runs `etcdctl snapshot status -w json FILE`.
pub async fn snapshot_status(
    etcdctl: &str,
    file: &std::path::Path,
) -> Result<SnapshotStatus, String> {
    let out = tokio::process::Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(file)
        .output()
        .await
        .map_err(|e| format!("running {etcdctl}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("parsing etcdctl output: {e}"))
}
