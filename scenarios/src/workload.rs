//! The data workload and the Jepsen set rule: every write etcd acknowledged before the
//! recovery point must be present after recovery. Keys are attempted once each; a write
//! counts only when etcd answered it successfully.

use std::collections::BTreeSet;
use std::time::Duration;

/// Writes keys and remembers which etcd acknowledged.
#[derive(Debug, Default)]
pub struct Workload {
    prefix: String,
    next: u64,
    /// Keys whose put etcd acknowledged.
    pub acked: BTreeSet<String>,
    /// Keys whose put was sent (acknowledged or not).
    pub attempted: BTreeSet<String>,
    /// Acknowledged keys at the recovery point (a snapshot), if one was marked.
    pub recovery_point: Option<BTreeSet<String>>,
    /// Puts that failed.
    pub failures: u64,
    /// Why the first puts failed (at most [`KEPT_REASONS`]), for the report.
    pub failure_reasons: Vec<String>,
}

/// How many failure reasons a workload keeps.
pub const KEPT_REASONS: usize = 5;

/// What the set check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCheck {
    /// Acknowledged keys that must be present.
    pub expected: usize,
    /// Present keys.
    pub present: usize,
    /// Expected keys that are missing.
    pub lost: Vec<String>,
    /// Present keys that were never written.
    pub unexpected: Vec<String>,
}

impl Workload {
    /// A workload writing under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            ..Self::default()
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next key to write.
    pub fn next_key(&mut self) -> String {
        let k = format!("{}/{:08}", self.prefix, self.next);
        self.next += 1;
        self.attempted.insert(k.clone());
        k
    }

    /// Records the result of a put.
    pub fn record(&mut self, key: String, acked: bool) {
        if acked {
            self.acked.insert(key);
        } else {
            self.failures += 1;
        }
    }

    /// Records a put that failed, and why.
    pub fn record_failure(&mut self, key: &str, reason: impl std::fmt::Display) {
        self.failures += 1;
        if self.failure_reasons.len() < KEPT_REASONS {
            self.failure_reasons.push(format!("{key}: {reason}"));
        }
    }

    /// Marks the recovery point: what is acknowledged now must survive.
    pub fn mark_recovery_point(&mut self) {
        self.recovery_point = Some(self.acked.clone());
    }

    /// Compares what must be there with what is.
    pub fn check(&self, present: &BTreeSet<String>) -> SetCheck {
        let expected = self.recovery_point.as_ref().unwrap_or(&self.acked);
        SetCheck {
            expected: expected.len(),
            present: present.len(),
            lost: expected.difference(present).cloned().collect(),
            unexpected: present.difference(&self.attempted).cloned().collect(),
        }
    }
}

/// Puts `key` through the first of `clients` that acknowledges it within `timeout`.
pub async fn put(clients: &mut [etcd_client::Client], key: &str, timeout: Duration) -> bool {
    for c in clients.iter_mut() {
        if let Ok(Ok(_)) = tokio::time::timeout(timeout, c.put(key, "kiln-scenario", None)).await {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_rule_counts_lost_and_unexpected() {
        let mut w = Workload::new("/t");
        let a = w.next_key();
        let b = w.next_key();
        w.record(a.clone(), true);
        w.record(b.clone(), false);
        w.mark_recovery_point();
        let c = w.next_key();
        w.record(c.clone(), true);
        // After recovery: a must be there; b (never acknowledged) and c (after the point) may
        // or may not be; a key nobody wrote must not.
        let present: BTreeSet<String> = [b, "/t/bogus".to_owned()].into();
        let check = w.check(&present);
        assert_eq!(check.lost, vec![a.clone()]);
        assert_eq!(check.unexpected, vec!["/t/bogus".to_owned()]);
        let present: BTreeSet<String> = [a, c].into();
        let ok = w.check(&present);
        assert!(ok.lost.is_empty() && ok.unexpected.is_empty() && ok.expected == 1);
    }
}
