//! One client connection: connect to an upstream (trying the next on failure), then copy bytes
//! both ways while counting them. Until the upstream sends its first byte, the client's bytes
//! are kept (up to [`REPLAY_LIMIT`]) so that an upstream that resets or closes before answering
//! is replaced by another one without the client noticing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::watch;
use tokio::time::timeout;

use crate::balancer::Shared;
use crate::connector::Connector;
use crate::frontend::Frontend;
use crate::upstream::Upstream;

/// Buffer size for each direction of the copy; larger than tokio's 8 KiB default so that bulk
/// transfers need fewer system calls.
const COPY_BUFFER: usize = 64 * 1024;

/// Client bytes kept for a replay while the upstream has not answered yet. A client that sent
/// more before the upstream's first byte is not replayed: if that upstream then fails, the
/// client's connection is closed.
pub const REPLAY_LIMIT: usize = 64 * 1024;

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

/// Connects to the first upstream of the frontend's plan, leaving out `exclude` (upstreams
/// this client already tried), that answers within `connect_timeout`, counting every failure
/// against its upstream (passive marking): a refused connect marks it down at once, an
/// unreachable one or a timeout counts toward the same `fall` threshold as the active checks.
pub(crate) async fn connect_upstream<C: Connector>(
    frontend: &Frontend,
    connector: &C,
    connect_timeout: Duration,
    fall: u32,
    exclude: &[SocketAddr],
) -> Result<(Arc<Upstream>, C::Stream), ConnectError> {
    let mut plan = frontend.plan();
    plan.retain(|u| !exclude.contains(&u.addr()));
    if plan.is_empty() && exclude.is_empty() {
        return Err(ConnectError::NoUpstreams {
            frontend: frontend.name().to_owned(),
        });
    }
    let mut attempts: Vec<(SocketAddr, String)> = exclude
        .iter()
        .map(|a| (*a, "failed before answering".to_owned()))
        .collect();
    for upstream in plan {
        let error = match timeout(connect_timeout, connector.connect(upstream.addr())).await {
            Ok(Ok(stream)) => return Ok((upstream, stream)),
            // A refusal is the upstream's host saying that nothing listens: down at once.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let error = e.to_string();
                upstream.connect_failed(error.clone(), 1);
                attempts.push((upstream.addr(), error));
                continue;
            }
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
pub(crate) async fn handle<C, S>(
    shared: Arc<Shared>,
    frontend: Arc<Frontend>,
    connector: Arc<C>,
    mut client: S,
    peer: SocketAddr,
    mut close: watch::Receiver<bool>,
) where
    C: Connector,
    S: AsyncRead + AsyncWrite + Unpin,
{
    frontend.connections_total.fetch_add(1, Ordering::Relaxed);
    let _active = Active::enter(&frontend.connections_active);
    let work = async {
        let settings = shared.settings();
        let mut replay = Replay::new(REPLAY_LIMIT);
        let mut failed_early: Vec<SocketAddr> = Vec::new();
        loop {
            let (upstream, stream) = match connect_upstream(
                &frontend,
                &*connector,
                settings.connect_timeout,
                settings.health.fall,
                &failed_early,
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
            let stream = Counted {
                inner: stream,
                upstream: &upstream,
            };
            match relay(&mut client, stream, &mut replay).await {
                Relayed::Done(Ok(())) => return,
                Relayed::Done(Err(e)) => {
                    if let Some(suppressed) = shared.log_limit.allow() {
                        tracing::debug!(frontend = frontend.name(), %peer, upstream = %upstream.addr(), suppressed, "connection ended: {e}");
                    }
                    return;
                }
                Relayed::UpstreamFailedEarly(e) => {
                    upstream.failed_before_answering(e.to_string());
                    if !replay.is_complete() {
                        frontend.connections_failed.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = shared.log_limit.allow() {
                            tracing::warn!(frontend = frontend.name(), %peer, upstream = %upstream.addr(), suppressed,
                                "upstream failed before answering and the client sent more than {REPLAY_LIMIT} bytes: not replayed, closing: {e}");
                        }
                        return;
                    }
                    if let Some(suppressed) = shared.log_limit.allow() {
                        tracing::info!(frontend = frontend.name(), %peer, upstream = %upstream.addr(), suppressed,
                            replay = replay.len(), "upstream failed before answering; replaying on another: {e}");
                    }
                    failed_early.push(upstream.addr());
                }
            }
        }
    };
    tokio::select! {
        () = work => {}
        _ = close.wait_for(|closing| *closing) => {}
    }
}

/// How one upstream's turn at a client connection ended.
enum Relayed {
    /// The connection ended (both sides closed, an error after the upstream answered, or a
    /// client error).
    Done(io::Result<()>),
    /// The upstream reset or closed the connection, or a write to it failed, before it sent a
    /// byte and while the client still had something to say.
    UpstreamFailedEarly(io::Error),
}

/// The client's bytes since the connection opened, kept until the upstream answers.
#[derive(Debug)]
pub(crate) struct Replay {
    buf: Vec<u8>,
    limit: usize,
    /// The client sent more than `limit`: the buffer is no longer the whole story.
    overflowed: bool,
    /// The client closed its side (sent EOF).
    client_done: AtomicBool,
    /// The upstream sent its first byte: the connection is committed to it.
    committed: AtomicBool,
}

impl Replay {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            overflowed: false,
            client_done: AtomicBool::new(false),
            committed: AtomicBool::new(false),
        }
    }

    /// Whether everything the client sent is in the buffer (so it can be replayed).
    pub(crate) fn is_complete(&self) -> bool {
        !self.overflowed
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Replays what the client sent so far to `upstream`, then copies both ways until the end,
/// telling apart an upstream that failed before answering.
async fn relay<S, U>(client: &mut S, mut upstream: U, replay: &mut Replay) -> Relayed
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if !replay.buf.is_empty()
        && let Err(e) = upstream.write_all(&replay.buf).await
    {
        return Relayed::UpstreamFailedEarly(e);
    }
    // A client that already closed its side is read again by the copy: its EOF repeats and
    // shuts down the new upstream's side in turn.
    let mut early = None;
    let Replay {
        buf,
        limit,
        overflowed,
        client_done,
        committed,
    } = replay;
    let mut recording = Recording {
        inner: client,
        buf,
        limit: *limit,
        overflowed,
        client_done,
        committed,
    };
    let mut watched = Watched {
        inner: upstream,
        client_done,
        committed,
        early: &mut early,
    };
    let result = tokio::io::copy_bidirectional_with_sizes(
        &mut recording,
        &mut watched,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await;
    match (result, early) {
        (Err(e), Some(())) => Relayed::UpstreamFailedEarly(e),
        (result, _) => Relayed::Done(result.map(drop)),
    }
}

/// The client side during a relay: records what the client sends while the upstream has not
/// answered, and notes the client's EOF.
struct Recording<'a, S> {
    inner: &'a mut S,
    buf: &'a mut Vec<u8>,
    limit: usize,
    overflowed: &'a mut bool,
    client_done: &'a AtomicBool,
    committed: &'a AtomicBool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let new = &buf.filled()[before..];
            if new.is_empty() {
                self.client_done.store(true, Ordering::Relaxed);
            } else if !*self.overflowed && !self.committed.load(Ordering::Relaxed) {
                if self.buf.len() + new.len() > self.limit {
                    *self.overflowed = true;
                    *self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(new);
                }
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// The upstream side during a relay: commits the connection on the upstream's first byte and,
/// before that, turns an EOF (while the client is still sending) or an error into an early
/// failure that ends the copy without touching the client.
struct Watched<'a, U> {
    inner: U,
    client_done: &'a AtomicBool,
    committed: &'a AtomicBool,
    early: &'a mut Option<()>,
}

impl<U> Watched<'_, U> {
    fn check<T>(&mut self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &poll
            && !self.committed.load(Ordering::Relaxed)
        {
            *self.early = Some(());
        }
        poll
    }
}

impl<U: AsyncRead + Unpin> AsyncRead for Watched<'_, U> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll
            && !self.committed.load(Ordering::Relaxed)
        {
            if buf.filled().len() > before {
                self.committed.store(true, Ordering::Relaxed);
            } else if !self.client_done.load(Ordering::Relaxed) {
                *self.early = Some(());
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                )));
            }
        }
        self.check(poll)
    }
}

impl<U: AsyncWrite + Unpin> AsyncWrite for Watched<'_, U> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(poll)
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
