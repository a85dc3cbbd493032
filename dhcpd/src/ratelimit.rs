//! A small rate limiter for per-packet log lines, so that a flood of failing clients cannot
//! flood the log: at most `burst` lines per window, then one line saying how many were dropped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `burst` events per `window`.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    used: u32,
    suppressed: u64,
}

impl RateLimiter {
    pub(crate) fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(Window {
                start: Instant::now(),
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when the caller may log, `n` being the events dropped since the last allowed
    /// one; `None` when it must stay quiet.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(w.start) >= self.window {
            w.start = now;
            w.used = 0;
        }
        if w.used < self.burst {
            w.used += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_beyond_burst_and_reports_the_count() {
        let r = RateLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(r.allow_at(t0), Some(0));
        assert_eq!(r.allow_at(t0), Some(0));
        assert_eq!(r.allow_at(t0), None);
        assert_eq!(r.allow_at(t0 + Duration::from_secs(59)), None);
        // A new window reports the two dropped events.
        assert_eq!(r.allow_at(t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(r.allow_at(t0 + Duration::from_secs(61)), Some(0));
    }
}
