//! `kiln-lb`: the lab's TCP load balancer. It runs on the cluster gateway (as `kiln lb run`)
//! and fronts the Kubernetes API port 6443 and the OS API port 50000 of the control-plane
//! nodes.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kiln_lb::{Balancer, Config, FrontendConfig};
//! let config = Config::new(vec![FrontendConfig {
//!     name: "k8s".into(),
//!     listen: "127.0.0.1:6443".parse()?,
//!     upstreams: vec!["127.0.0.2:6443".parse()?, "127.0.0.3:6443".parse()?],
//! }]);
//! let balancer = Balancer::new(&config)?;
//! let listeners = balancer.bind().await?;
//! balancer.serve(listeners, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! - **Frontends and upstreams.** A [`Balancer`] owns one [`Frontend`] per listening socket;
//!   a frontend holds its upstream set behind a lock as an `Arc<Vec<Arc<Upstream>>>`. A
//!   connection holds the `Arc<Upstream>` it uses, so replacing the set (control request or
//!   SIGHUP) never touches established connections, and upstreams that stay keep their health
//!   and counters.
//! - **Health.** Every `health.intervalMs` each upstream gets a TCP connect with
//!   `health.timeoutMs`; `rise` consecutive successes make it healthy, `fall` consecutive
//!   failures unhealthy. Passive marking: a connect for a real client that times out or finds
//!   no route counts as one failure toward the same `fall` threshold (one lost SYN does not
//!   evict a node); a refused connect, or a client connection that the upstream resets or
//!   closes before sending its first byte, marks it down at once (nothing listens there any
//!   more). New upstreams start [`Health::Unknown`], which is chosen like healthy.
//! - **Choosing an upstream.** [`Frontend::plan`] orders every upstream for each client:
//!   eligible upstreams within 2 × the best check latency + 5 ms in round robin, then slower
//!   eligible ones by latency, then unhealthy ones as a last resort. The client connection
//!   walks the plan, giving each connect `connectTimeoutMs`, until one answers; it fails only
//!   when every upstream failed.
//! - **Replay.** Until the upstream sends its first byte, the client's bytes are kept (at most
//!   [`proxy::REPLAY_LIMIT`]). If the upstream resets or closes the connection before that
//!   while the client is still sending, the client connection moves to the next upstream of
//!   the plan and what it sent so far is written there again; the client notices nothing. The
//!   upstream's first byte commits the connection: later failures reach the client. A client
//!   that sent more than the limit is not replayed (its connection is closed).
//! - **Serving.** [`Balancer::serve`] takes already-bound listeners and a shutdown future (the
//!   mini-redis shape). A semaphore caps open client connections; each holds a permit. On
//!   shutdown the accept loops stop, then the drain waits until it can take every permit (no
//!   connection left) or `drainTimeoutMs` passes, and then closes what is left.
//! - **Copying** uses `tokio::io::copy_bidirectional_with_sizes` with 64 KiB buffers; the
//!   upstream side is wrapped to add bytes to the counters as they pass.
//! - **Control.** [`control`] serves line-delimited JSON on a Unix socket (`status`,
//!   `set-upstreams`) and has the client functions `kiln lb status` and `kiln cluster show`
//!   use. [`daemon::run`] puts it all together with SIGHUP reloads.
//! - **The network seam** is [`Connector`]: [`TcpConnector`] in production, a scripted fake in
//!   the unit tests so that timeouts and thresholds run on tokio's paused clock.
//!
//! # Limitations
//!
//! - TCP only (no UDP, no TLS termination, no PROXY protocol); clients reach upstreams with the
//!   balancer's source address.
//! - A replayed client's first bytes reach two upstreams: the first may have acted on them
//!   before it died. For TLS and HTTP request starts this is harmless; a protocol whose first
//!   message is not idempotent should not sit behind it.
//! - An upstream that closes a connection before answering while the client is still sending
//!   (an idle timeout on a client that never spoke, say) is taken as failed and marked down
//!   until its next `rise` checks.
//! - Health checks are TCP connects only: an upstream that accepts but does not serve (a hung
//!   API server) stays healthy.
//! - A reload changes upstreams and settings, not the frontends: adding, removing or moving a
//!   listener needs a restart. `set-upstreams` changes memory only; a later SIGHUP re-reads the
//!   file and wins, so the provisioner should rewrite the file too.
//! - Removed upstreams vanish from the counters at once, even while connections to them are
//!   still open (those connections go on and still count in the frontend's totals).
//! - Counters start at zero with the process; nothing is persisted.
//! - The last check latency is one sample, not an average; on a quiet local bridge that is
//!   enough to tell a distant upstream from a near one, not to rank near ones finely.

pub mod balancer;
pub mod config;
pub mod connector;
pub mod control;
pub mod daemon;
pub mod frontend;
mod health;
pub mod proxy;
mod ratelimit;
pub mod upstream;

#[cfg(test)]
mod tests;

pub use balancer::{Balancer, BindError, ServeError, Snapshot, UpdateError};
pub use config::{Config, ConfigError, FrontendConfig, HealthConfig};
pub use connector::{Connector, TcpConnector};
pub use frontend::{Frontend, FrontendSnapshot, UpstreamChange};
pub use proxy::ConnectError;
pub use upstream::{Health, Upstream, UpstreamSnapshot};
