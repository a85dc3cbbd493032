//! One way to wait: poll a condition until it holds or a deadline passes, keeping the last
//! reason it did not hold, so a timeout says what was still wrong. Used by machined, the lab and
//! the scenarios instead of hand-written loops with their own sleeps.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How to poll: the total time allowed and the pause between attempts (doubling from
/// `interval` up to `max_interval`).
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    /// Total time allowed.
    pub timeout: Duration,
    /// Pause after the first failed attempt.
    pub interval: Duration,
    /// Longest pause between attempts.
    pub max_interval: Duration,
}

impl Poll {
    /// Polls every `interval` (no backoff) for at most `timeout`.
    pub fn every(interval: Duration, timeout: Duration) -> Self {
        Poll {
            timeout,
            interval,
            max_interval: interval,
        }
    }

    /// Starts at `interval` and doubles up to `max_interval`.
    pub fn backoff(interval: Duration, max_interval: Duration, timeout: Duration) -> Self {
        Poll {
            timeout,
            interval,
            max_interval,
        }
    }
}

/// A wait that ran out of time: what was awaited, for how long, how many attempts were made,
/// and the last reason the condition did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut<E> {
    /// What was awaited.
    pub what: String,
    /// The time allowed.
    pub timeout: Duration,
    /// Attempts made.
    pub attempts: u32,
    /// The last reason the condition did not hold (`None` if no attempt finished in time).
    pub last: Option<E>,
}

impl<E: fmt::Display> fmt::Display for TimedOut<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: not reached within {:?}", self.what, self.timeout)?;
        match &self.last {
            Some(e) => write!(f, " (last: {e})"),
            None => write!(f, " (no attempt finished)"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for TimedOut<E> {}

/// Calls `attempt` until it returns `Ok`, pausing as `poll` says; each attempt is itself cut
/// off at the deadline. Returns the value, or [`TimedOut`] with the last error.
pub async fn until<T, E, F, Fut>(
    what: impl Into<String>,
    poll: Poll,
    mut attempt: F,
) -> Result<T, TimedOut<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + poll.timeout;
    let mut pause = poll.interval;
    let mut attempts = 0;
    let mut last = None;
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = Some(e),
            Err(_) => break,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep_until((now + pause).min(deadline)).await;
        pause = (pause * 2).min(poll.max_interval.max(poll.interval));
    }
    Err(TimedOut {
        what: what.into(),
        timeout: poll.timeout,
        attempts,
        last,
    })
}

/// The blocking twin of [`until`] for synchronous code (CLI helpers, test harnesses): calls
/// `attempt` until it returns `Ok` or `poll.timeout` passes.
pub fn until_blocking<T, E, F>(
    what: impl Into<String>,
    poll: Poll,
    mut attempt: F,
) -> Result<T, TimedOut<E>>
where
    F: FnMut() -> Result<T, E>,
{
    let start = std::time::Instant::now();
    let mut pause = poll.interval;
    let mut attempts = 0;
    let last = loop {
        attempts += 1;
        let e = match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        if elapsed >= poll.timeout {
            break Some(e);
        }
        std::thread::sleep(pause.min(poll.timeout - elapsed));
        pause = (pause * 2).min(poll.max_interval.max(poll.interval));
    };
    Err(TimedOut {
        what: what.into(),
        timeout: poll.timeout,
        attempts,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn returns_the_value_once_the_condition_holds() {
        let n = Cell::new(0);
        let v = until(
            "three",
            Poll::every(Duration::from_millis(100), Duration::from_secs(5)),
            || {
                n.set(n.get() + 1);
                let k = n.get();
                async move {
                    if k >= 3 {
                        Ok(k)
                    } else {
                        Err(format!("only {k}"))
                    }
                }
            },
        )
        .await;
        assert_eq!(v, Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_keeps_the_last_reason_and_counts_attempts() {
        let start = Instant::now();
        let n = Cell::new(0);
        let err = until(
            "the API",
            Poll::backoff(
                Duration::from_millis(100),
                Duration::from_millis(400),
                Duration::from_secs(2),
            ),
            || {
                n.set(n.get() + 1);
                let k = n.get();
                async move { Err::<(), _>(format!("attempt {k} refused")) }
            },
        )
        .await
        .unwrap_err();
        // Attempts at 0, 100, 300, 700, 1100, 1500, 1900 ms and a last one at the deadline.
        assert_eq!(err.attempts, 8);
        assert_eq!(err.last.as_deref(), Some("attempt 8 refused"));
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        assert_eq!(
            err.to_string(),
            "the API: not reached within 2s (last: attempt 8 refused)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_hangs_is_cut_off_at_the_deadline() {
        let err = until(
            "hang",
            Poll::every(Duration::from_millis(10), Duration::from_secs(1)),
            || async { std::future::pending::<Result<(), String>>().await },
        )
        .await
        .unwrap_err();
        assert_eq!(err.attempts, 1);
        assert!(err.last.is_none());
    }

    #[test]
    fn blocking_twin_times_out_with_the_last_error() {
        let err = until_blocking(
            "never",
            Poll::every(Duration::from_millis(1), Duration::from_millis(20)),
            || Err::<(), _>("no"),
        )
        .unwrap_err();
        assert!(err.attempts >= 2);
        assert_eq!(err.last, Some("no"));
    }
}
