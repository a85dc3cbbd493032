//! One client connection: connect to an upstream (trying the next on failure), then copy bytes
//! both ways while counting them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::balancer::Shared;
use crate::connector::Connector;
use crate::frontend::Frontend;
use crate::upstream::Upstream;

/// Buffer size for each direction of the copy; larger than tokio's 8 KiB default so that bulk
/// transfers need fewer system calls.
const COPY_BUFFER: usize = 64 * 1024;

/// Why no upstream could take a client connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The frontend has no upstreams at all.
    #[error("frontend {frontend} has no upstreams; set some with set-upstreams or in the config")]
    NoUpstreams {
        /// The frontend.
        frontend: String,
    },
    /// Every upstream was tried and failed.
    #[error("frontend {frontend}: every upstream failed: {}", list(.attempts))]
    AllFailed {
        /// The frontend.
        frontend: String,
        /// Each upstream tried, with its error, in order.
        attempts: Vec<(SocketAddr, String)>,
    },
}

fn list(attempts: &[(SocketAddr, String)]) -> String {
    attempts
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Connects to the first upstream of the frontend's plan that answers within
/// `connect_timeout`, counting every failure against its upstream (passive marking, with the
/// same `fall` threshold as the active checks).
pub(crate) async fn connect_upstream<C: Connector>(
    frontend: &Frontend,
    connector: &C,
    connect_timeout: Duration,
    fall: u32,
) -> Result<(Arc<Upstream>, C::Stream), ConnectError> {
    let plan = frontend.plan();
    if plan.is_empty() {
        return Err(ConnectError::NoUpstreams {
            frontend: frontend.name().to_owned(),
        });
    }
    let mut attempts = Vec::new();
    for upstream in plan {
        let error = match timeout(connect_timeout, connector.connect(upstream.addr())).await {
            Ok(Ok(stream)) => return Ok((upstream, stream)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", connect_timeout.as_millis()),
        };
        upstream.connect_failed(error.clone(), fall);
        attempts.push((upstream.addr(), error));
    }
    Err(ConnectError::AllFailed {
        frontend: frontend.name().to_owned(),
        attempts,
    })
}

/// Decrements a gauge when dropped, so that every exit path (error, close, abort) counts.
struct Active<'a>(&'a AtomicU64);

impl<'a> Active<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted client until it or its upstream closes, or until `close` turns true
/// (the drain deadline passed).
pub(crate) async fn handle<C: Connector>(
    shared: Arc<Shared>,
    frontend: Arc<Frontend>,
    connector: Arc<C>,
    mut client: TcpStream,
    peer: SocketAddr,
    mut close: watch::Receiver<bool>,
) {
    frontend.connections_total.fetch_add(1, Ordering::Relaxed);
    let _active = Active::enter(&frontend.connections_active);
    let work = async {
        let settings = shared.settings();
        let (upstream, stream) = match connect_upstream(
            &frontend,
            &*connector,
            settings.connect_timeout,
            settings.health.fall,
        )
        .await
        {
            Ok(found) => found,
            Err(e) => {
                frontend.connections_failed.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = shared.log_limit.allow() {
                    tracing::warn!(frontend = frontend.name(), %peer, suppressed, "client refused: {e}");
                }
                return;
            }
        };
        upstream.connections_total.fetch_add(1, Ordering::Relaxed);
        let _upstream_active = Active::enter(&upstream.connections_active);
        let mut stream = Counted {
            inner: stream,
            upstream: &upstream,
        };
        let _ = client.set_nodelay(true);
        let result = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut stream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await;
        if let Err(e) = result
            && let Some(suppressed) = shared.log_limit.allow()
        {
            tracing::debug!(frontend = frontend.name(), %peer, upstream = %upstream.addr(), suppressed, "connection ended: {e}");
        }
    };
    tokio::select! {
        () = work => {}
        _ = close.wait_for(|closing| *closing) => {}
    }
}

/// An upstream stream that adds what passes through it to the upstream's byte counters as it
/// goes, so that long connections show up in the counters while they are open.
struct Counted<'a, S> {
    inner: S,
    upstream: &'a Upstream,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let n = (buf.filled().len() - before) as u64;
            self.upstream
                .bytes_from_upstream
                .fetch_add(n, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.upstream
                .bytes_to_upstream
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
