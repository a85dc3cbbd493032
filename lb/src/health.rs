//! Active health checks: every interval, one TCP connect per upstream with a timeout; the
//! result feeds the upstream's rise / fall state machine and its last latency.

use std::sync::Arc;

use tokio::time::{Instant, sleep_until, timeout};

use crate::balancer::Shared;
use crate::config::HealthConfig;
use crate::connector::Connector;
use crate::frontend::Frontend;
use crate::upstream::Upstream;

/// Checks `frontend`'s upstreams forever, reading the settings afresh every round so that a
/// reload applies to the next one. Rounds start every `interval`; checks in a round run
/// concurrently, so one slow upstream does not delay the others.
pub(crate) async fn run<C: Connector>(
    shared: Arc<Shared>,
    frontend: Arc<Frontend>,
    connector: Arc<C>,
) {
    let mut next = Instant::now();
    loop {
        let health = shared.settings().health;
        let upstreams = frontend.upstreams();
        futures::future::join_all(upstreams.iter().map(|u| check(&*connector, u, health))).await;
        next += health.interval();
        let now = Instant::now();
        if next < now {
            // A round took longer than the interval: start the next one now, do not burst.
            next = now;
        }
        sleep_until(next).await;
    }
}

/// One check of one upstream.
pub(crate) async fn check<C: Connector>(connector: &C, upstream: &Upstream, health: HealthConfig) {
    let start = Instant::now();
    match timeout(health.timeout(), connector.connect(upstream.addr())).await {
        Ok(Ok(stream)) => {
            let latency = start.elapsed();
            drop(stream);
            upstream.check_succeeded(latency, health.rise);
        }
        Ok(Err(e)) => upstream.check_failed(e.to_string(), health.fall),
        Err(_) => upstream.check_failed(
            format!("no answer within {} ms", health.timeout_ms),
            health.fall,
        ),
    }
}
