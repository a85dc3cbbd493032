//! The node API servers: the authenticated API (mutual TLS, port 50000), the maintenance API
//! (TLS with a self-signed certificate, no client certificates, version and apply-config
//! only) and the trust service (port 50001) that gives workers their API certificate.
//!
//! Servers take an already-bound listener and a shutdown signal, and cap the number of
//! connections with a semaphore.

pub mod auth;
pub mod files;
pub mod forward;
pub mod machine;
pub mod resources;
pub mod status;
pub mod trust;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::StreamExt as _;
use kiln_os_api::pb::machine_service_server::MachineServiceServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::node::Node;

/// Connections served at once per server.
pub const MAX_CONNECTIONS: usize = 256;

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting, lets calls in flight finish, and waits.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Streams that follow logs never end by themselves; do not wait for them forever.
        if tokio::time::timeout(std::time::Duration::from_secs(3), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// A TCP connection holding a permit of the connection semaphore.
struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn incoming(listener: TcpListener) -> impl futures::Stream<Item = std::io::Result<Limited>> {
    let sem = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio_stream::wrappers::TcpListenerStream::new(listener).then(move |conn| {
        let sem = sem.clone();
        async move {
            let stream = conn?;
            let _ = stream.set_nodelay(true);
            let permit = sem.acquire_owned().await.map_err(std::io::Error::other)?;
            Ok(Limited {
                stream,
                _permit: permit,
            })
        }
    })
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[error("starting the {what} server: {source}")]
pub struct ServeError {
    what: &'static str,
    source: tonic::transport::Error,
}

/// Serves the authenticated API on `listener`.
pub fn serve_api(
    node: Arc<Node>,
    listener: TcpListener,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<ServerHandle, ServeError> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem));
    spawn(node, listener, tls, auth::Guard::Authenticated, "API")
}

/// Serves the maintenance API on `listener` with a self-signed certificate.
pub fn serve_maintenance(
    node: Arc<Node>,
    listener: TcpListener,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerHandle, ServeError> {
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    spawn(
        node,
        listener,
        tls,
        auth::Guard::Maintenance,
        "maintenance API",
    )
}

fn spawn(
    node: Arc<Node>,
    listener: TcpListener,
    tls: ServerTlsConfig,
    guard: auth::Guard,
    what: &'static str,
) -> Result<ServerHandle, ServeError> {
    let (tx, rx) = oneshot::channel::<()>();
    let service = MachineServiceServer::new(machine::MachineApi::new(node))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let router = Server::builder()
        .tls_config(tls)
        .map_err(|source| ServeError { what, source })?
        .concurrency_limit_per_connection(64)
        .layer(auth::AuthLayer(guard))
        .add_service(service);
    let task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = rx.await;
            })
            .await
        {
            tracing::error!("{what} server: {e}");
        }
    });
    Ok(ServerHandle {
        shutdown: Some(tx),
        task,
    })
}

/// Serves the trust service on `listener` (control-plane nodes).
pub fn serve_trust(
    node: Arc<Node>,
    listener: TcpListener,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerHandle, ServeError> {
    let what = "trust";
    let (tx, rx) = oneshot::channel::<()>();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    let router = Server::builder()
        .tls_config(tls)
        .map_err(|source| ServeError { what, source })?
        .add_service(
            kiln_os_api::pb::trust_service_server::TrustServiceServer::new(trust::TrustApi::new(
                node,
            )),
        );
    let task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = rx.await;
            })
            .await
        {
            tracing::error!("trust server: {e}");
        }
    });
    Ok(ServerHandle {
        shutdown: Some(tx),
        task,
    })
}
