//! The node's event stream: boot phases, waits and service transitions, each with a timestamp
//! and a message, kept in a bounded history and followable (the `events` / `dmesg` API). Once a
//! console is attached ([`EventBus::attach_console`]) every event is also printed there as one
//! [`ConsoleEvent`] line, which the lab reads when the API cannot be reached.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use kiln_os_api::contract::ConsoleEvent;
use tokio::sync::broadcast;

use crate::node::Stage;

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

impl From<EventKind> for kiln_os_api::pb::EventKind {
    fn from(k: EventKind) -> Self {
        match k {
            EventKind::Machine => Self::Machine,
            EventKind::Service => Self::Service,
            EventKind::Config => Self::Config,
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
    /// The machine's stage when it happened.
    pub stage: Stage,
}

/// Where console lines go (machined's stderr and the `dmesg` buffer).
type ConsoleSink = Box<dyn Fn(&str) + Send + Sync>;

/// Bounded event history with live followers.
pub struct EventBus {
    console: OnceLock<ConsoleSink>,
    history: Mutex<VecDeque<Event>>,
    stage: Mutex<Stage>,
    capacity: usize,
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    /// A bus keeping the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            console: OnceLock::new(),
            history: Mutex::new(VecDeque::new()),
            stage: Mutex::new(Stage::Booting),
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
            stage: *self.stage.lock().unwrap_or_else(|e| e.into_inner()),
        };
        tracing::info!(kind = kind.as_str(), id, state, "{}", event.message);
        if let Some(console) = self.console.get() {
            console(&event.console_line());
        }
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.push_back(event.clone());
        while h.len() > self.capacity {
            h.pop_front();
        }
        let _ = self.tx.send(event);
    }

    /// Prints every later event on `console` as a [`ConsoleEvent`] line. The first console
    /// attached stays.
    pub fn attach_console(&self, console: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.console.set(Box::new(console));
    }

    /// Sets the stage later events carry.
    pub fn set_stage(&self, stage: Stage) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage;
    }

    /// The last `n` events (all with `None`) and a receiver for later ones.
    pub fn tail(&self, n: Option<usize>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let skip = n.map_or(0, |n| h.len().saturating_sub(n));
        (h.iter().skip(skip).cloned().collect(), rx)
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("capacity", &self.capacity)
            .field("console", &self.console.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Event {
    /// The event as a console line.
    pub fn console_line(&self) -> String {
        ConsoleEvent {
            unix_millis: u64::try_from(unix_millis(self.at)).unwrap_or(0),
            stage: kiln_os_api::pb::Stage::from(self.stage).name().to_owned(),
            message: match self.kind {
                EventKind::Service => format!("service {} {}", self.id, self.message),
                EventKind::Machine | EventKind::Config => self.message.clone(),
            },
        }
        .line()
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
