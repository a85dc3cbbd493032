//! The service supervisor: every service goes Waiting (for its dependencies) → Preparing →
//! Running (→ Finished | Failed | Skipped), with an event per transition, optional health
//! checks, restart policies and a bounded log each.

mod runner;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{Notify, watch};

pub use runner::{CommandSpec, RunOutcome, run_process};

use crate::events::{EventBus, EventKind};
use crate::logbuf::LogBuffer;

/// How often a service's health is checked until its first good check, for at most
/// [`STARTING_HEALTH_WINDOW`] after it started (then [`Service::health_interval`]).
const STARTING_HEALTH_INTERVAL: Duration = Duration::from_millis(200);
/// See [`STARTING_HEALTH_INTERVAL`].
const STARTING_HEALTH_WINDOW: Duration = Duration::from_secs(30);
/// Service states, as the guides show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Waiting for dependencies or a start.
    Waiting,
    /// Running its pre-start step (issuing certificates, joining a cluster).
    Preparing,
    /// Its process runs.
    Running,
    /// Stopped, or exited successfully.
    Finished,
    /// Exited with an error or failed to prepare.
    Failed,
    /// Not applicable on this node.
    Skipped,
}

impl ServiceState {
    /// Name as shown in events and listings.
    pub fn as_str(self) -> &'static str {
        kiln_os_api::pb::ServiceState::from(self).name()
    }
}

impl From<ServiceState> for kiln_os_api::pb::ServiceState {
    fn from(s: ServiceState) -> Self {
        match s {
            ServiceState::Waiting => Self::Waiting,
            ServiceState::Preparing => Self::Preparing,
            ServiceState::Running => Self::Running,
            ServiceState::Finished => Self::Finished,
            ServiceState::Failed => Self::Failed,
            ServiceState::Skipped => Self::Skipped,
        }
    }
}

/// When a service's process is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// After every exit.
    Always,
    /// Never.
    Never,
    /// After a failed exit, until one succeeds.
    UntilSuccess,
}

/// Result of the Preparing step.
#[derive(Debug)]
pub enum Prepared {
    /// Start the process.
    Run,
    /// Do not run on this node.
    Skip(String),
}

/// A failure of a service step.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServiceError(pub String);

impl ServiceError {
    /// From anything printable.
    pub fn new(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// Lets a service report progress while it prepares.
#[derive(Debug, Clone)]
pub struct ServiceContext {
    handle: Arc<Handle>,
}

impl ServiceContext {
    /// Updates the Preparing message (an event when it changes).
    pub fn progress(&self, message: impl Into<String>) {
        self.handle
            .set_state(ServiceState::Preparing, message.into());
    }

    /// The service's log.
    pub fn log(&self) -> &LogBuffer {
        &self.handle.log
    }
}

/// A supervised service.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Unique id (`etcd`, `trustd`).
    fn id(&self) -> &'static str;
    /// Services that must be up first.
    fn dependencies(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Restart policy.
    fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy::Always
    }
    /// The Preparing step; may wait as long as it needs.
    async fn pre_start(&self, ctx: &ServiceContext) -> Result<Prepared, ServiceError>;
    /// The process to run.
    fn command(&self) -> Result<CommandSpec, ServiceError>;
    /// Runs once the process started (e.g. promote an etcd learner); errors are logged.
    async fn post_start(&self, _ctx: &ServiceContext) -> Result<(), ServiceError> {
        Ok(())
    }
    /// Runs after the process stopped.
    async fn post_stop(&self) -> Result<(), ServiceError> {
        Ok(())
    }
    /// Health check; `None` means the service has none.
    async fn health_check(&self) -> Option<Result<(), String>> {
        None
    }
    /// Interval between health checks.
    fn health_interval(&self) -> Duration {
        Duration::from_secs(2)
    }
    /// Grace period between SIGTERM and SIGKILL.
    fn stop_grace(&self) -> Duration {
        Duration::from_secs(10)
    }
    /// Conditions other than services to wait for before Preparing (a path, the network):
    /// `None` once all hold, else what is still missing (shown as `Waiting for <it>`).
    async fn unmet_condition(&self) -> Option<String> {
        None
    }
    /// Runs the process in its own namespaces and root filesystem (extension services).
    fn container(&self) -> Option<Arc<crate::extensions::container::ContainerSetup>> {
        None
    }
    /// The Running event once the process started with `pid`.
    fn started_message(&self, _pid: u32) -> String {
        "Service started as a process".to_owned()
    }
}

/// Health of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// No check has run yet, or the service has none.
    pub unknown: bool,
    /// The last check passed.
    pub healthy: bool,
    /// The last check's message.
    pub last_message: String,
}

/// One transition of a service.
#[derive(Debug, Clone)]
pub struct ServiceEvent {
    /// New state.
    pub state: ServiceState,
    /// What happened.
    pub message: String,
    /// When.
    pub at: SystemTime,
}

/// What the supervisor knows about a service.
#[derive(Debug, Clone)]
pub struct ServiceStatus {
    /// Id.
    pub id: String,
    /// Current state.
    pub state: ServiceState,
    /// Health.
    pub health: Health,
    /// Recent transitions, oldest first.
    pub events: Vec<ServiceEvent>,
    /// Times the process was started again.
    pub restarts: u32,
}

impl ServiceStatus {
    /// Running and (if it has a health check) healthy: what dependents wait for.
    pub fn is_up(&self) -> bool {
        self.state == ServiceState::Running && (self.health.unknown || self.health.healthy)
    }
}

#[derive(Debug)]
struct Shared {
    state: ServiceState,
    health: Health,
    events: VecDeque<ServiceEvent>,
    restarts: u32,
}

struct Handle {
    id: &'static str,
    service: Arc<dyn Service>,
    shared: Mutex<Shared>,
    changed: watch::Sender<u64>,
    log: LogBuffer,
    events: Arc<EventBus>,
    /// Raised to stop the current run.
    stop: watch::Sender<bool>,
    /// Wakes the loop of a stopped service to start again.
    start: Notify,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

const EVENT_HISTORY: usize = 30;

impl Handle {
    fn set_state(&self, state: ServiceState, message: String) {
        {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if s.state == state && s.events.back().is_some_and(|e| e.message == message) {
                return;
            }
            s.state = state;
            if state != ServiceState::Running {
                s.health = Health {
                    unknown: true,
                    ..Health::default()
                };
            }
            s.events.push_back(ServiceEvent {
                state,
                message: message.clone(),
                at: SystemTime::now(),
            });
            while s.events.len() > EVENT_HISTORY {
                s.events.pop_front();
            }
        }
        self.events.publish(
            EventKind::Service,
            self.id,
            state.as_str(),
            format!("[{}]: {message}", state.as_str()),
        );
        self.changed.send_modify(|v| *v += 1);
    }

    fn set_health(&self, result: Result<(), String>) {
        let health = match &result {
            Ok(()) => Health {
                unknown: false,
                healthy: true,
                last_message: String::new(),
            },
            Err(m) => Health {
                unknown: false,
                healthy: false,
                last_message: m.clone(),
            },
        };
        let message = match &result {
            Ok(()) => "Health check successful".to_owned(),
            Err(m) => format!("Health check failed: {m}"),
        };
        {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let changed = s.health.healthy != health.healthy || s.health.unknown;
            s.health = health;
            if !changed {
                return;
            }
            s.events.push_back(ServiceEvent {
                state: ServiceState::Running,
                message: message.clone(),
                at: SystemTime::now(),
            });
            while s.events.len() > EVENT_HISTORY {
                s.events.pop_front();
            }
        }
        self.events.publish(
            EventKind::Service,
            self.id,
            "Running",
            format!("[Running]: {message}"),
        );
        self.changed.send_modify(|v| *v += 1);
    }

    fn status(&self) -> ServiceStatus {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        ServiceStatus {
            id: self.id.to_owned(),
            state: s.state,
            health: s.health.clone(),
            events: s.events.iter().cloned().collect(),
            restarts: s.restarts,
        }
    }
}

/// Why a supervisor request failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No such service.
    #[error("service {id:?} does not exist; running services: {known}")]
    UnknownService {
        /// The id asked for.
        id: String,
        /// Known ids.
        known: String,
    },
    /// Waiting for a condition timed out.
    #[error("timed out after {after:?} waiting for service {id:?} to be {what} (it is {state})")]
    Timeout {
        /// The service.
        id: String,
        /// The condition.
        what: &'static str,
        /// Its state at the deadline.
        state: &'static str,
        /// How long we waited.
        after: Duration,
    },
}

/// Supervises the node's services.
#[derive(Debug)]
pub struct Supervisor {
    handles: Mutex<BTreeMap<&'static str, Arc<Handle>>>,
    events: Arc<EventBus>,
    log_capacity: usize,
}

impl Supervisor {
    /// A supervisor publishing to `events`; each service log keeps `log_capacity` bytes.
    pub fn new(events: Arc<EventBus>, log_capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            handles: Mutex::new(BTreeMap::new()),
            events,
            log_capacity,
        })
    }

    fn handle(&self, id: &str) -> Result<Arc<Handle>, SupervisorError> {
        let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        handles
            .get(id)
            .cloned()
            .ok_or_else(|| SupervisorError::UnknownService {
                id: id.to_owned(),
                known: handles.keys().copied().collect::<Vec<_>>().join(", "),
            })
    }

    fn handle_list(&self) -> Vec<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Registers `service` and starts its loop.
    pub fn add(self: &Arc<Self>, service: Arc<dyn Service>) {
        let (changed, _) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let handle = Arc::new(Handle {
            id: service.id(),
            service,
            shared: Mutex::new(Shared {
                state: ServiceState::Waiting,
                health: Health {
                    unknown: true,
                    ..Health::default()
                },
                events: VecDeque::new(),
                restarts: 0,
            }),
            changed,
            log: LogBuffer::new(self.log_capacity),
            events: self.events.clone(),
            stop,
            start: Notify::new(),
        });
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle.id, handle.clone());
        let me = self.clone();
        tokio::spawn(async move { me.service_loop(handle).await });
    }

    /// Status of every service.
    pub fn list(&self) -> Vec<ServiceStatus> {
        self.handle_list().iter().map(|h| h.status()).collect()
    }

    /// Status of one service.
    pub fn status(&self, id: &str) -> Result<ServiceStatus, SupervisorError> {
        Ok(self.handle(id)?.status())
    }

    /// Whether a service exists.
    pub fn has(&self, id: &str) -> bool {
        self.handle(id).is_ok()
    }

    /// The log of a service.
    pub fn with_log<R>(
        &self,
        id: &str,
        f: impl FnOnce(&LogBuffer) -> R,
    ) -> Result<R, SupervisorError> {
        Ok(f(&self.handle(id)?.log))
    }

    /// Stops a service and waits until it is no longer running.
    pub async fn stop(&self, id: &str) -> Result<(), SupervisorError> {
        let h = self.handle(id)?;
        h.stop.send_replace(true);
        let mut rx = h.changed.subscribe();
        loop {
            let state = h.status().state;
            if matches!(
                state,
                ServiceState::Finished | ServiceState::Failed | ServiceState::Skipped
            ) {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// Starts a stopped service (no effect on a running one).
    pub fn start(&self, id: &str) -> Result<(), SupervisorError> {
        let h = self.handle(id)?;
        h.stop.send_replace(false);
        h.start.notify_one();
        Ok(())
    }

    /// Stops and starts a service.
    pub async fn restart(&self, id: &str) -> Result<(), SupervisorError> {
        self.stop(id).await?;
        self.start(id)
    }

    /// Stops every service, dependents first.
    pub async fn stop_all(&self) {
        let mut handles = self.handle_list();
        // Services others depend on stop last.
        handles.sort_by_key(|h| {
            let id = h.id;
            std::cmp::Reverse(
                self.handle_list()
                    .iter()
                    .filter(|o| o.service.dependencies().contains(&id))
                    .count(),
            )
        });
        handles.reverse();
        for h in handles {
            let _ = self.stop(h.id).await;
        }
    }

    /// Waits until `cond` holds for service `id`.
    pub async fn wait_for(
        &self,
        id: &str,
        what: &'static str,
        timeout: Duration,
        cond: impl Fn(&ServiceStatus) -> bool,
    ) -> Result<ServiceStatus, SupervisorError> {
        let h = self.handle(id)?;
        let mut rx = h.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = h.status();
            if cond(&status) {
                return Ok(status);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(SupervisorError::Timeout {
                    id: id.to_owned(),
                    what,
                    state: status.state.as_str(),
                    after: timeout,
                });
            }
        }
    }

    async fn wait_dependencies(&self, h: &Arc<Handle>, stop: &mut watch::Receiver<bool>) -> bool {
        for dep in h.service.dependencies() {
            let Ok(dh) = self.handle(dep) else {
                h.set_state(
                    ServiceState::Waiting,
                    format!("Waiting for service {dep:?} to be registered"),
                );
                continue;
            };
            let mut rx = dh.changed.subscribe();
            while !dh.status().is_up() {
                h.set_state(
                    ServiceState::Waiting,
                    format!("Waiting for service {dep:?} to be \"up\""),
                );
                tokio::select! {
                    _ = rx.changed() => {}
                    () = runner::stopped(stop) => return false,
                }
            }
        }
        while let Some(what) = h.service.unmet_condition().await {
            h.set_state(ServiceState::Waiting, format!("Waiting for {what}"));
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = runner::stopped(stop) => return false,
            }
        }
        true
    }

    async fn service_loop(self: Arc<Self>, h: Arc<Handle>) {
        let mut stop = h.stop.subscribe();
        let mut backoff = Duration::from_millis(500);
        loop {
            if *stop.borrow() {
                h.set_state(ServiceState::Finished, "Service stopped".to_owned());
                h.start.notified().await;
                continue;
            }
            if !self.wait_dependencies(&h, &mut stop).await {
                continue;
            }
            let ctx = ServiceContext { handle: h.clone() };
            h.set_state(ServiceState::Preparing, "Running pre state".to_owned());
            let prepared = tokio::select! {
                p = h.service.pre_start(&ctx) => p,
                () = runner::stopped(&mut stop) => continue,
            };
            match prepared {
                Ok(Prepared::Run) => {}
                Ok(Prepared::Skip(why)) => {
                    h.set_state(ServiceState::Skipped, why);
                    h.start.notified().await;
                    continue;
                }
                Err(e) => {
                    h.set_state(
                        ServiceState::Failed,
                        format!("Failed to run pre stage: {e}"),
                    );
                    if !self.wait_restart(&h, &mut stop, &mut backoff, true).await {
                        continue;
                    }
                    continue;
                }
            }
            let spec = match h.service.command() {
                Ok(spec) => spec,
                Err(e) => {
                    h.set_state(
                        ServiceState::Failed,
                        format!("Failed to build the command: {e}"),
                    );
                    self.wait_restart(&h, &mut stop, &mut backoff, true).await;
                    continue;
                }
            };
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let container = h.service.container();
            let run = run_process(
                &spec,
                container,
                &h.log,
                stop.clone(),
                h.service.stop_grace(),
                started_tx,
            );
            tokio::pin!(run);
            // Health checks and post-start run while the process does.
            let side = async {
                let Ok(pid) = started_rx.await else {
                    return;
                };
                h.set_state(ServiceState::Running, h.service.started_message(pid));
                if let Err(e) = h.service.post_start(&ctx).await {
                    tracing::warn!(service = h.id, "post-start: {e}");
                    h.log.write(format!("post-start failed: {e}\n").as_bytes());
                }
                let mut starting = true;
                let started = tokio::time::Instant::now();
                loop {
                    if let Some(result) = h.service.health_check().await {
                        starting &= result.is_err();
                        h.set_health(result);
                    }
                    // Until its first good check (for a while) a service is looked at again
                    // soon: it is usually healthy a moment after it starts, and dependents
                    // wait for that.
                    starting &= started.elapsed() < STARTING_HEALTH_WINDOW;
                    let interval = h.service.health_interval();
                    tokio::time::sleep(if starting {
                        interval.min(STARTING_HEALTH_INTERVAL)
                    } else {
                        interval
                    })
                    .await;
                }
            };
            let outcome = tokio::select! {
                o = &mut run => o,
                () = side => unreachable_side(),
            };
            if let Err(e) = h.service.post_stop().await {
                tracing::warn!(service = h.id, "post-stop: {e}");
            }
            match outcome {
                RunOutcome::Stopped => {
                    h.set_state(ServiceState::Finished, "Service stopped".to_owned());
                    h.start.notified().await;
                    stop.borrow_and_update();
                }
                RunOutcome::SpawnFailed(e) => {
                    h.set_state(
                        ServiceState::Failed,
                        format!("Failed to start the process: {e}"),
                    );
                    self.wait_restart(&h, &mut stop, &mut backoff, true).await;
                }
                RunOutcome::Exited(Some(0)) => {
                    h.set_state(
                        ServiceState::Finished,
                        "Service finished successfully".to_owned(),
                    );
                    if h.service.restart_policy() == RestartPolicy::Always {
                        self.wait_restart(&h, &mut stop, &mut backoff, false).await;
                    } else {
                        h.start.notified().await;
                    }
                }
                RunOutcome::Exited(code) => {
                    let how = code.map_or_else(
                        || "was killed by a signal".to_owned(),
                        |c| format!("exited with code {c}"),
                    );
                    h.set_state(ServiceState::Failed, format!("Service {how}"));
                    self.wait_restart(&h, &mut stop, &mut backoff, true).await;
                }
            }
        }
    }

    /// Applies the restart policy after an exit; returns after the backoff (or a manual start).
    async fn wait_restart(
        &self,
        h: &Arc<Handle>,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
        failed: bool,
    ) -> bool {
        let policy = h.service.restart_policy();
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::UntilSuccess => failed,
            RestartPolicy::Never => false,
        };
        if !restart {
            h.start.notified().await;
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            () = runner::stopped(stop) => return false,
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        h.shared.lock().unwrap_or_else(|e| e.into_inner()).restarts += 1;
        h.set_state(ServiceState::Waiting, "Restarting service".to_owned());
        true
    }
}

fn unreachable_side() -> RunOutcome {
    // The side task loops forever; select! only returns through the process branch.
    RunOutcome::Stopped
}

#[cfg(test)]
mod tests;
