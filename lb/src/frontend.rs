//! A frontend: its current upstream set, the round-robin cursor, and the rule that orders the
//! upstreams a client connection tries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::upstream::{Health, Upstream, UpstreamSnapshot};

/// An upstream is in the preferred group when its last check latency is at most
/// `LATENCY_FACTOR` times the best one plus [`LATENCY_SLACK`].
pub const LATENCY_FACTOR: u32 = 2;
/// Absolute slack added to the preferred-group bound, so that scheduling noise of a few
/// hundred microseconds on a local bridge does not split equal upstreams into two groups.
pub const LATENCY_SLACK: Duration = Duration::from_millis(5);

/// One listening socket's forwarding state.
#[derive(Debug)]
pub struct Frontend {
    name: String,
    configured_listen: SocketAddr,
    listen: RwLock<SocketAddr>,
    upstreams: RwLock<Arc<Vec<Arc<Upstream>>>>,
    cursor: AtomicUsize,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) connections_failed: AtomicU64,
}

impl Frontend {
    /// A frontend with fresh upstreams.
    pub fn new(name: &str, listen: SocketAddr, upstreams: &[SocketAddr]) -> Self {
        Self {
            name: name.to_owned(),
            configured_listen: listen,
            listen: RwLock::new(listen),
            upstreams: RwLock::new(Arc::new(
                upstreams
                    .iter()
                    .map(|a| Arc::new(Upstream::new(*a)))
                    .collect(),
            )),
            cursor: AtomicUsize::new(0),
            connections_total: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            connections_failed: AtomicU64::new(0),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The listen address from the configuration (port 0 stays 0).
    pub fn configured_listen(&self) -> SocketAddr {
        self.configured_listen
    }

    /// The address it actually listens on once served.
    pub fn listen(&self) -> SocketAddr {
        *self.listen.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_listen(&self, addr: SocketAddr) {
        *self.listen.write().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// The current upstream set (a cheap shared copy).
    pub fn upstreams(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the upstream set. Upstreams that stay keep their health and counters; removed
    /// ones are only forgotten: connections established to them go on until they close.
    pub fn set_upstreams(&self, addrs: &[SocketAddr]) -> UpstreamChange {
        let mut guard = self.upstreams.write().unwrap_or_else(|e| e.into_inner());
        let old = guard.clone();
        let mut change = UpstreamChange::default();
        let mut new = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if new.iter().any(|u: &Arc<Upstream>| u.addr() == *addr) {
                continue;
            }
            match old.iter().find(|u| u.addr() == *addr) {
                Some(u) => new.push(u.clone()),
                None => {
                    change.added.push(*addr);
                    new.push(Arc::new(Upstream::new(*addr)));
                }
            }
        }
        change.removed = old
            .iter()
            .filter(|u| !addrs.contains(&u.addr()))
            .map(|u| u.addr())
            .collect();
        *guard = Arc::new(new);
        change
    }

    /// The upstreams a new client connection tries, in order.
    ///
    /// 1. Eligible upstreams ([`Health::Healthy`] or [`Health::Unknown`]) whose last check
    ///    latency is within [`LATENCY_FACTOR`] × best + [`LATENCY_SLACK`] (or not yet measured),
    ///    in round-robin order starting at the cursor;
    /// 2. the other eligible upstreams, fastest first;
    /// 3. the unhealthy upstreams, as a last resort, since health can lag behind a recovery.
    pub fn plan(&self) -> Vec<Arc<Upstream>> {
        let all = self.upstreams();
        let mut eligible = Vec::with_capacity(all.len());
        let mut unhealthy = Vec::new();
        for u in all.iter() {
            let (health, latency) = u.health_and_latency();
            if health.is_eligible() {
                eligible.push((u.clone(), latency));
            } else {
                unhealthy.push(u.clone());
            }
        }
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        let best = eligible.iter().filter_map(|(_, l)| *l).min();
        let bound = best.map(|b| b * LATENCY_FACTOR + LATENCY_SLACK);
        let (mut preferred, mut slower): (Vec<_>, Vec<_>) =
            eligible.into_iter().partition(|(_, l)| match (l, bound) {
                (Some(l), Some(b)) => *l <= b,
                _ => true,
            });
        slower.sort_by_key(|(_, l)| *l);
        if !preferred.is_empty() {
            let n = preferred.len();
            preferred.rotate_left(turn % n);
        }
        if !unhealthy.is_empty() {
            let n = unhealthy.len();
            unhealthy.rotate_left(turn % n);
        }
        preferred
            .into_iter()
            .chain(slower)
            .map(|(u, _)| u)
            .chain(unhealthy)
            .collect()
    }

    /// A point-in-time copy of the counters.
    pub fn snapshot(&self) -> FrontendSnapshot {
        FrontendSnapshot {
            name: self.name.clone(),
            listen: self.listen(),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            connections_active: self.connections_active.load(Ordering::Relaxed),
            connections_failed: self.connections_failed.load(Ordering::Relaxed),
            upstreams: self.upstreams().iter().map(|u| u.snapshot()).collect(),
        }
    }
}

/// What [`Frontend::set_upstreams`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamChange {
    /// Upstreams that were not there before.
    pub added: Vec<SocketAddr>,
    /// Upstreams that are gone.
    pub removed: Vec<SocketAddr>,
}

/// Counters of one frontend, as served by the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendSnapshot {
    /// Frontend name.
    pub name: String,
    /// Address it listens on.
    pub listen: SocketAddr,
    /// Client connections accepted.
    pub connections_total: u64,
    /// Client connections open now.
    pub connections_active: u64,
    /// Client connections closed because every upstream failed.
    pub connections_failed: u64,
    /// Its current upstreams.
    pub upstreams: Vec<UpstreamSnapshot>,
}

impl FrontendSnapshot {
    /// How many upstreams take new connections in the normal rotation.
    pub fn eligible_upstreams(&self) -> usize {
        self.upstreams
            .iter()
            .filter(|u| u.health != Health::Unhealthy)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn firsts(f: &Frontend, n: usize) -> Vec<u16> {
        (0..n).map(|_| f.plan()[0].addr().port()).collect()
    }

    #[test]
    fn round_robin_over_unmeasured_upstreams() {
        let f = Frontend::new("k8s", addr(1), &[addr(10), addr(11), addr(12)]);
        assert_eq!(firsts(&f, 6), [10, 11, 12, 10, 11, 12]);
        // Every plan lists every upstream once, so a client fails only if all fail.
        let mut ports: Vec<u16> = f.plan().iter().map(|u| u.addr().port()).collect();
        ports.sort_unstable();
        assert_eq!(ports, [10, 11, 12]);
    }

    #[test]
    fn prefers_the_lowest_latency_group_and_keeps_unhealthy_last() {
        let f = Frontend::new("k8s", addr(1), &[addr(10), addr(11), addr(12)]);
        let ups = f.upstreams();
        ups[0].check_succeeded(Duration::from_millis(1), 1);
        ups[1].check_succeeded(Duration::from_micros(1500), 1);
        ups[2].check_succeeded(Duration::from_millis(50), 1);
        // 50 ms > 2 × 1 ms + 5 ms: 12 is never first while 10 and 11 are healthy.
        assert_eq!(firsts(&f, 4), [10, 11, 10, 11]);
        let plan: Vec<u16> = f.plan().iter().map(|u| u.addr().port()).collect();
        assert_eq!(plan[2], 12);
        // 11 goes down: it is tried after the slow but healthy 12.
        ups[1].connect_failed("refused".into(), 1);
        for _ in 0..3 {
            let plan: Vec<u16> = f.plan().iter().map(|u| u.addr().port()).collect();
            assert_eq!(plan, [10, 12, 11]);
        }
    }

    #[test]
    fn changing_upstreams_keeps_the_ones_that_stay() {
        let f = Frontend::new("k8s", addr(1), &[addr(10), addr(11)]);
        let kept = f.upstreams()[1].clone();
        kept.connections_total
            .fetch_add(7, std::sync::atomic::Ordering::Relaxed);
        let change = f.set_upstreams(&[addr(11), addr(12)]);
        assert_eq!(change.added, [addr(12)]);
        assert_eq!(change.removed, [addr(10)]);
        let now = f.upstreams();
        assert!(Arc::ptr_eq(&now[0], &kept));
        assert_eq!(f.snapshot().upstreams[0].connections_total, 7);
    }
}
