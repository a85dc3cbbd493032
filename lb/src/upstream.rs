//! One upstream server: its health state machine (rise / fall) and its counters.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the balancer believes about an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not yet `rise` successes nor `fall` failures since it was added; chosen like a healthy
    /// one so that a freshly started balancer serves at once.
    Unknown,
    /// `rise` consecutive successful checks.
    Healthy,
    /// `fall` consecutive failures (checks or client connects); tried only as a last resort.
    Unhealthy,
}

impl Health {
    /// Whether the upstream takes new connections in the normal rotation.
    pub fn is_eligible(self) -> bool {
        !matches!(self, Health::Unhealthy)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// The rise / fall state machine, kept apart from I/O so that it is easy to reason about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// Current verdict.
    pub health: Health,
    /// Consecutive successes since the last failure.
    pub successes: u32,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Duration of the last successful check connect.
    pub last_latency: Option<Duration>,
    /// Why the last check or connect failed, if the last event was a failure.
    pub last_error: Option<String>,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            last_latency: None,
            last_error: None,
        }
    }
}

impl HealthState {
    /// A successful check that took `latency`; returns the new verdict when it changed.
    pub fn success(&mut self, latency: Duration, rise: u32) -> Option<Health> {
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        self.last_latency = Some(latency);
        self.last_error = None;
        (self.health != Health::Healthy && self.successes >= rise).then(|| {
            self.health = Health::Healthy;
            Health::Healthy
        })
    }

    /// A failed check or client connect; returns the new verdict when it changed.
    pub fn failure(&mut self, error: String, fall: u32) -> Option<Health> {
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(error);
        (self.health != Health::Unhealthy && self.failures >= fall).then(|| {
            self.health = Health::Unhealthy;
            Health::Unhealthy
        })
    }
}

/// An upstream with live counters, shared by the connections that use it and the checker.
///
/// Connections hold an `Arc<Upstream>`, so removing an upstream from a frontend never touches
/// the connections already established to it.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    state: Mutex<HealthState>,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) bytes_to_upstream: AtomicU64,
    pub(crate) bytes_from_upstream: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) check_failures: AtomicU64,
    pub(crate) early_failures: AtomicU64,
}

impl Upstream {
    /// A new upstream in the [`Health::Unknown`] state.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: Mutex::new(HealthState::default()),
            connections_total: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            bytes_to_upstream: AtomicU64::new(0),
            bytes_from_upstream: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            check_failures: AtomicU64::new(0),
            early_failures: AtomicU64::new(0),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // The state is plain data updated in one statement; a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current health state (a copy).
    pub fn health_state(&self) -> HealthState {
        self.lock().clone()
    }

    /// The current verdict and last check latency, for upstream selection.
    pub(crate) fn health_and_latency(&self) -> (Health, Option<Duration>) {
        let s = self.lock();
        (s.health, s.last_latency)
    }

    /// Records a successful active check.
    pub fn check_succeeded(&self, latency: Duration, rise: u32) {
        let changed = self.lock().success(latency, rise);
        if let Some(h) = changed {
            tracing::info!(upstream = %self.addr, ?latency, "upstream is now {h}");
        }
    }

    /// Records a failed active check.
    pub fn check_failed(&self, error: String, fall: u32) {
        self.check_failures.fetch_add(1, Ordering::Relaxed);
        let changed = self.lock().failure(format!("check: {error}"), fall);
        if let Some(h) = changed {
            tracing::warn!(upstream = %self.addr, %error, "upstream is now {h} (health check)");
        }
    }

    /// Records a failed connect on behalf of a client (passive marking).
    pub fn connect_failed(&self, error: String, fall: u32) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        let changed = self.lock().failure(format!("connect: {error}"), fall);
        if let Some(h) = changed {
            tracing::warn!(upstream = %self.addr, %error, "upstream is now {h} (client connect failed)");
        }
    }

    /// Records that a client connection to it was reset or closed before it sent a byte
    /// (passive marking): that is no lost SYN but a server going away, so it is marked down at
    /// once, whatever `fall` says. The active checks bring it back after `rise` successes.
    pub fn failed_before_answering(&self, error: String) {
        self.early_failures.fetch_add(1, Ordering::Relaxed);
        let changed = self
            .lock()
            .failure(format!("closed before answering: {error}"), 1);
        if let Some(h) = changed {
            tracing::warn!(upstream = %self.addr, %error, "upstream is now {h} (a client connection failed before it answered)");
        }
    }

    /// A point-in-time copy of the counters.
    pub fn snapshot(&self) -> UpstreamSnapshot {
        let s = self.health_state();
        UpstreamSnapshot {
            address: self.addr,
            health: s.health,
            last_check_latency_us: s
                .last_latency
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            last_error: s.last_error,
            connections_total: self.connections_total.load(Ordering::Relaxed),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            bytes_to_upstream: self.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_from_upstream: self.bytes_from_upstream.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            check_failures: self.check_failures.load(Ordering::Relaxed),
            early_failures: self.early_failures.load(Ordering::Relaxed),
        }
    }
}

/// Counters of one upstream, as served by the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSnapshot {
    /// The upstream's address.
    pub address: SocketAddr,
    /// Current verdict.
    pub health: Health,
    /// Duration of the last successful check connect, in microseconds.
    pub last_check_latency_us: Option<u64>,
    /// Why the last check or connect failed, while the last event is a failure.
    pub last_error: Option<String>,
    /// Client connections forwarded to it since it was added.
    pub connections_total: u64,
    /// Client connections forwarded to it and still open.
    pub connections_active: u64,
    /// Bytes copied from clients to it.
    pub bytes_to_upstream: u64,
    /// Bytes copied from it to clients.
    pub bytes_from_upstream: u64,
    /// Connects on behalf of clients that failed (each was retried on another upstream).
    pub connect_failures: u64,
    /// Failed active health checks.
    pub check_failures: u64,
    /// Client connections it reset or closed before answering (each was replayed on another
    /// upstream when the client had sent at most the replay limit).
    #[serde(default)]
    pub early_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut s = HealthState::default();
        assert_eq!(s.health, Health::Unknown);
        assert!(s.health.is_eligible());
        // fall = 3: two failures, a success, two failures: still not down.
        assert_eq!(s.failure("x".into(), 3), None);
        assert_eq!(s.failure("x".into(), 3), None);
        assert_eq!(s.success(MS, 2), None);
        assert_eq!(s.failure("x".into(), 3), None);
        assert_eq!(s.failure("x".into(), 3), None);
        assert_eq!(s.health, Health::Unknown);
        assert_eq!(s.failure("x".into(), 3), Some(Health::Unhealthy));
        assert!(!s.health.is_eligible());
        // Further failures report no change.
        assert_eq!(s.failure("x".into(), 3), None);
        // rise = 2: success, failure, success does not bring it back; two in a row do.
        assert_eq!(s.success(MS, 2), None);
        assert_eq!(s.failure("x".into(), 3), None);
        assert_eq!(s.success(MS, 2), None);
        assert_eq!(s.health, Health::Unhealthy);
        assert_eq!(s.success(MS, 2), Some(Health::Healthy));
        assert_eq!(s.last_latency, Some(MS));
        assert_eq!(s.last_error, None);
    }
}
