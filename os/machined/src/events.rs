//! The node's event stream: boot phases and service transitions, each with a timestamp and a
//! message, kept in a bounded history and followable (the `events` / `dmesg` API).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::broadcast;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A boot phase or machine stage change.
    Machine,
    /// A service state change.
    Service,
    /// A configuration change.
    Config,
}

impl EventKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Machine => "machine",
            Self::Service => "service",
            Self::Config => "config",
        }
    }
}

/// One event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Category.
    pub kind: EventKind,
    /// Phase or service id.
    pub id: String,
    /// New state.
    pub state: String,
    /// Human-readable message.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// Bounded event history with live followers.
#[derive(Debug)]
pub struct EventBus {
    history: Mutex<VecDeque<Event>>,
    capacity: usize,
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    /// A bus keeping the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            history: Mutex::new(VecDeque::new()),
            capacity,
            tx,
        }
    }

    /// Records and broadcasts an event, and logs it.
    pub fn publish(&self, kind: EventKind, id: &str, state: &str, message: impl Into<String>) {
        let event = Event {
            kind,
            id: id.to_owned(),
            state: state.to_owned(),
            message: message.into(),
            at: SystemTime::now(),
        };
        tracing::info!(kind = kind.as_str(), id, state, "{}", event.message);
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.push_back(event.clone());
        while h.len() > self.capacity {
            h.pop_front();
        }
        let _ = self.tx.send(event);
    }

    /// The last `n` events (all with `None`) and a receiver for later ones.
    pub fn tail(&self, n: Option<usize>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let skip = n.map_or(0, |n| h.len().saturating_sub(n));
        (h.iter().skip(skip).cloned().collect(), rx)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
