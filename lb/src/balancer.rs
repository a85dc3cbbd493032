//! The balancer: frontends, shared settings, the accept loops with their connection cap, the
//! health checkers, live reconfiguration and the graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError, HealthConfig};
use crate::connector::{Connector, TcpConnector};
use crate::frontend::{Frontend, FrontendSnapshot, UpstreamChange};
use crate::health;
use crate::proxy;
use crate::ratelimit::RateLimiter;

/// Settings that a reload may change while the balancer runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) health: HealthConfig,
    pub(crate) connect_timeout: Duration,
    pub(crate) drain_timeout: Duration,
}

impl Settings {
    fn from_config(c: &Config) -> Self {
        Self {
            health: c.health,
            connect_timeout: c.connect_timeout(),
            drain_timeout: c.drain_timeout(),
        }
    }
}

/// State shared by the accept loops, connections, checkers and control requests.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) frontends: Vec<Arc<Frontend>>,
    settings: RwLock<Settings>,
    max_connections: u32,
    pub(crate) log_limit: RateLimiter,
}

impl Shared {
    pub(crate) fn settings(&self) -> Settings {
        *self.settings.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle on a load balancer; clones share the same state.
#[derive(Debug, Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// A point-in-time copy of every counter, as served by the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// One entry per frontend, in configuration order.
    pub frontends: Vec<FrontendSnapshot>,
}

impl Snapshot {
    /// The frontend called `name`.
    pub fn frontend(&self, name: &str) -> Option<&FrontendSnapshot> {
        self.frontends.iter().find(|f| f.name == name)
    }
}

/// Why the listening sockets could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for frontend {frontend}: {source}")]
pub struct BindError {
    /// The frontend.
    pub frontend: String,
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    pub source: std::io::Error,
}

/// Why [`Balancer::serve`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener was given for a frontend the configuration does not have.
    #[error("a listener was given for unknown frontend {0:?}")]
    UnknownFrontend(String),
    /// A frontend got no listener (or two).
    #[error("frontend {0:?} needs exactly one listener")]
    Listener(String),
}

/// Why a live change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// No frontend has that name.
    #[error("no frontend is called {name:?} (frontends: {known})")]
    UnknownFrontend {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The upstream list names one address twice.
    #[error("upstream {0} is listed twice")]
    Duplicate(SocketAddr),
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new configuration adds, removes or moves frontends, which needs a restart.
    #[error(
        "the frontends changed ({0}); a reload only changes upstreams and settings: restart the load balancer"
    )]
    FrontendsChanged(String),
}

impl Balancer {
    /// A balancer for a validated `config`; nothing runs until [`Balancer::serve`].
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let frontends = config
            .frontends
            .iter()
            .map(|f| Arc::new(Frontend::new(&f.name, f.listen, &f.upstreams)))
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                frontends,
                settings: RwLock::new(Settings::from_config(config)),
                max_connections: config.max_connections,
                log_limit: RateLimiter::new(20, Duration::from_secs(10)),
            }),
        })
    }

    #[cfg(test)]
    pub(crate) fn shared_for_tests(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Binds every frontend's `listen` address, for [`Balancer::serve`].
    pub async fn bind(&self) -> Result<Vec<(String, TcpListener)>, BindError> {
        let mut out = Vec::new();
        for f in &self.shared.frontends {
            let addr = f.configured_listen();
            let l = TcpListener::bind(addr).await.map_err(|source| BindError {
                frontend: f.name().to_owned(),
                addr,
                source,
            })?;
            out.push((f.name().to_owned(), l));
        }
        Ok(out)
    }

    /// The frontend called `name`.
    pub fn frontend(&self, name: &str) -> Option<&Arc<Frontend>> {
        self.shared.frontends.iter().find(|f| f.name() == name)
    }

    fn frontend_or_error(&self, name: &str) -> Result<&Arc<Frontend>, UpdateError> {
        self.frontend(name)
            .ok_or_else(|| UpdateError::UnknownFrontend {
                name: name.to_owned(),
                known: self
                    .shared
                    .frontends
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every counter now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            frontends: self.shared.frontends.iter().map(|f| f.snapshot()).collect(),
        }
    }

    /// Replaces one frontend's upstreams without touching established connections.
    pub fn set_upstreams(
        &self,
        frontend: &str,
        upstreams: &[SocketAddr],
    ) -> Result<UpstreamChange, UpdateError> {
        let f = self.frontend_or_error(frontend)?;
        for (i, u) in upstreams.iter().enumerate() {
            if upstreams[..i].contains(u) {
                return Err(UpdateError::Duplicate(*u));
            }
        }
        let change = f.set_upstreams(upstreams);
        tracing::info!(frontend, added = ?change.added, removed = ?change.removed, "upstreams changed");
        Ok(change)
    }

    /// Applies a re-read configuration: every frontend's upstreams and the settings. The
    /// frontends themselves (names and listen addresses) must be unchanged; nothing is applied
    /// when they are not.
    pub fn reload(&self, config: &Config) -> Result<(), UpdateError> {
        config.validate()?;
        let old: Vec<(&str, SocketAddr)> = self
            .shared
            .frontends
            .iter()
            .map(|f| (f.name(), f.configured_listen()))
            .collect();
        let new: Vec<(&str, SocketAddr)> = config
            .frontends
            .iter()
            .map(|f| (f.name.as_str(), f.listen))
            .collect();
        if old != new {
            let show = |v: &[(&str, SocketAddr)]| {
                v.iter()
                    .map(|(n, a)| format!("{n}@{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(UpdateError::FrontendsChanged(format!(
                "running: {}; file: {}",
                show(&old),
                show(&new)
            )));
        }
        *self
            .shared
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Settings::from_config(config);
        for f in &config.frontends {
            self.set_upstreams(&f.name, &f.upstreams)?;
        }
        Ok(())
    }

    /// Serves every frontend on its listener until `shutdown` completes, then drains: stops
    /// accepting, waits for open connections to finish up to the drain timeout, and closes the
    /// rest.
    pub async fn serve(
        &self,
        listeners: Vec<(String, TcpListener)>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        self.serve_with(Arc::new(TcpConnector), listeners, shutdown)
            .await
    }

    pub(crate) async fn serve_with<C: Connector>(
        &self,
        connector: Arc<C>,
        listeners: Vec<(String, TcpListener)>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let mut pairs = Vec::new();
        for (name, listener) in listeners {
            let f = self
                .frontend(&name)
                .ok_or_else(|| ServeError::UnknownFrontend(name.clone()))?;
            if pairs
                .iter()
                .any(|(g, _): &(Arc<Frontend>, _)| g.name() == name)
            {
                return Err(ServeError::Listener(name));
            }
            pairs.push((f.clone(), listener));
        }
        if let Some(f) = self
            .shared
            .frontends
            .iter()
            .find(|f| !pairs.iter().any(|(g, _)| g.name() == f.name()))
        {
            return Err(ServeError::Listener(f.name().to_owned()));
        }

        let max = self.shared.max_connections;
        let limit = Arc::new(Semaphore::new(max as usize));
        let (close_tx, close_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (frontend, listener) in pairs {
            if let Ok(addr) = listener.local_addr() {
                frontend.set_listen(addr);
            }
            tracing::info!(frontend = frontend.name(), listen = %frontend.listen(), "accepting connections");
            tasks.spawn(accept_loop(
                self.shared.clone(),
                frontend.clone(),
                connector.clone(),
                listener,
                limit.clone(),
                close_rx.clone(),
            ));
            tasks.spawn(health::run(
                self.shared.clone(),
                frontend,
                connector.clone(),
            ));
        }

        shutdown.await;
        // Stop accepting (the listeners close with their tasks) and stop checking.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let open = max as usize - limit.available_permits();
        let drain = self.shared.settings().drain_timeout;
        tracing::info!(open, ?drain, "draining connections");
        // Every open connection holds a permit: holding them all means none is left.
        if tokio::time::timeout(drain, limit.acquire_many(max))
            .await
            .is_err()
        {
            let open = max as usize - limit.available_permits();
            tracing::warn!(
                open,
                "drain deadline passed; closing the remaining connections"
            );
            let _ = close_tx.send(true);
            let _ = limit.acquire_many(max).await;
        }
        tracing::info!("load balancer stopped");
        Ok(())
    }
}

/// Accepts clients while a connection permit is free; an accept error (out of file
/// descriptors, say) is logged and retried after a short back-off.
async fn accept_loop<C: Connector>(
    shared: Arc<Shared>,
    frontend: Arc<Frontend>,
    connector: Arc<C>,
    listener: TcpListener,
    limit: Arc<Semaphore>,
    close: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((client, peer)) => {
                backoff = Duration::from_millis(10);
                let _ = client.set_nodelay(true);
                tokio::spawn({
                    let shared = shared.clone();
                    let frontend = frontend.clone();
                    let connector = connector.clone();
                    let close = close.clone();
                    async move {
                        proxy::handle(shared, frontend, connector, client, peer, close).await;
                        drop(permit);
                    }
                });
            }
            Err(e) => {
                if let Some(suppressed) = shared.log_limit.allow() {
                    tracing::warn!(frontend = frontend.name(), suppressed, "accept failed: {e}");
                }
                drop(permit);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
