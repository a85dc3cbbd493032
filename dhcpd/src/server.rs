//! The DHCP server loop: receive on an already-bound socket, hand each datagram to the
//! [`Handler`], send the reply, count everything, until the shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dhcproto::v4::MessageType;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::config::Config;

use crate::handler::{DropReason, Handler, MAX_DATAGRAM, Outcome};
use crate::ratelimit::RateLimiter;

/// What the server has seen since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received.
    pub received: AtomicU64,
    /// OFFERs sent.
    pub offers: AtomicU64,
    /// ACKs sent (to REQUEST and INFORM).
    pub acks: AtomicU64,
    /// NAKs sent.
    pub naks: AtomicU64,
    /// Well-formed requests that got no reply (unknown MAC, other server, RELEASE, ...).
    pub ignored: AtomicU64,
    /// Dropped: shorter than a header.
    pub truncated: AtomicU64,
    /// Dropped: longer than [`MAX_DATAGRAM`].
    pub oversized: AtomicU64,
    /// Dropped: undecodable, bad magic cookie, not a request, or non-Ethernet hardware.
    pub malformed: AtomicU64,
    /// Dropped: no or unknown DHCP message type.
    pub unknown_type: AtomicU64,
    /// Replies withheld because the lease journal could not be written.
    pub journal_errors: AtomicU64,
    /// Replies the socket refused.
    pub send_errors: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub struct CounterSnapshot {
    pub received: u64,
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    pub ignored: u64,
    pub truncated: u64,
    pub oversized: u64,
    pub malformed: u64,
    pub unknown_type: u64,
    pub journal_errors: u64,
    pub send_errors: u64,
}

impl Counters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            received: r(&self.received),
            offers: r(&self.offers),
            acks: r(&self.acks),
            naks: r(&self.naks),
            ignored: r(&self.ignored),
            truncated: r(&self.truncated),
            oversized: r(&self.oversized),
            malformed: r(&self.malformed),
            unknown_type: r(&self.unknown_type),
            journal_errors: r(&self.journal_errors),
            send_errors: r(&self.send_errors),
        }
    }

    /// Counts one outcome.
    pub fn count(&self, outcome: &Outcome) {
        let c = match outcome {
            Outcome::Reply(r) => match r.kind {
                MessageType::Offer => &self.offers,
                MessageType::Nak => &self.naks,
                _ => &self.acks,
            },
            Outcome::Ignored(_) => &self.ignored,
            Outcome::Dropped(DropReason::Truncated) => &self.truncated,
            Outcome::Dropped(DropReason::Oversized) => &self.oversized,
            Outcome::Dropped(DropReason::Malformed | DropReason::UnsupportedHardware) => {
                &self.malformed
            }
            Outcome::Dropped(DropReason::UnknownMessageType) => &self.unknown_type,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves DHCP on `socket` (bound to port 67 on the bridge, with `SO_BROADCAST`) until
/// `shutdown` completes; returns the handler so that a caller can look at its state.
pub async fn serve(
    socket: UdpSocket,
    handler: Handler,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()>,
) -> Handler {
    let (_keep, reloads) = mpsc::channel(1);
    serve_with_reload(socket, handler, counters, reloads, shutdown).await
}

/// [`serve`], also applying every configuration received on `reloads` between two datagrams
/// (see [`Handler::reconfigure`]).
pub async fn serve_with_reload(
    socket: UdpSocket,
    mut handler: Handler,
    counters: Arc<Counters>,
    mut reloads: mpsc::Receiver<Config>,
    shutdown: impl Future<Output = ()>,
) -> Handler {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let log_limit = RateLimiter::new(20, Duration::from_secs(10));
    let error_limit = RateLimiter::new(5, Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        let (len, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(config) = reloads.recv() => {
                tracing::info!(static_leases = config.static_leases.len(), "configuration reloaded");
                handler.reconfigure(config);
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some kernels; go on.
                    if let Some(skipped) = error_limit.allow() {
                        tracing::warn!(skipped, "receive failed: {e}");
                    }
                    continue;
                }
            },
        };
        counters.received.fetch_add(1, Ordering::Relaxed);
        let outcome = match handler.handle(&buf[..len], unix_now()) {
            Ok(o) => o,
            Err(e) => {
                counters.journal_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(skipped) = error_limit.allow() {
                    tracing::error!(skipped, %peer, "no reply sent: {e}");
                }
                continue;
            }
        };
        counters.count(&outcome);
        log_outcome(&log_limit, peer, &outcome);
        if let Outcome::Reply(reply) = outcome
            && let Err(e) = socket.send_to(&reply.bytes, reply.to).await
        {
            counters.send_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(skipped) = error_limit.allow() {
                tracing::warn!(skipped, to = %reply.to, mac = %reply.mac, "sending the reply failed: {e}");
            }
        }
    }
    handler
}

fn log_outcome(limit: &RateLimiter, peer: SocketAddr, outcome: &Outcome) {
    if !tracing::enabled!(tracing::Level::DEBUG) && !matches!(outcome, Outcome::Dropped(_)) {
        return;
    }
    let Some(skipped) = limit.allow() else {
        return;
    };
    match outcome {
        Outcome::Reply(r) => tracing::debug!(
            skipped, %peer, mac = %r.mac, kind = ?r.kind, address = %r.address, to = %r.to, "reply"
        ),
        Outcome::Ignored(why) => tracing::debug!(skipped, %peer, ?why, "no reply"),
        Outcome::Dropped(why) => tracing::info!(skipped, %peer, ?why, "dropped a datagram"),
    }
}
