//! The whole load balancer process minus argument parsing: load the config file, listen, serve
//! the control socket, re-read the file on SIGHUP, and drain on shutdown. `kiln lb run` and
//! the benchmark both call [`run`].

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::balancer::{Balancer, BindError, ServeError};
use crate::config::{Config, ConfigError};
use crate::control;

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The YAML configuration file, re-read on SIGHUP.
    pub config_path: PathBuf,
    /// Where to create the control socket, if anywhere.
    pub control_socket: Option<PathBuf>,
}

/// Why the load balancer could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listen address is taken or not local.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The control socket could not be created.
    #[error("cannot create the control socket {}: {source}", path.display())]
    ControlSocket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The SIGHUP handler could not be installed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// Serving failed to start.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Runs until `shutdown` completes, then drains and returns.
pub async fn run(opts: &RunOptions, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let config = Config::load(&opts.config_path)?;
    let balancer = Balancer::new(&config)?;
    let listeners = balancer.bind().await?;
    let mut hangup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;

    let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(path) = &opts.control_socket {
        let listener = bind_control(path)?;
        tokio::spawn(control::serve(listener, balancer.clone(), async {
            let _ = control_stopped.await;
        }));
    }

    let reload = {
        let balancer = balancer.clone();
        let path = opts.config_path.clone();
        async move {
            while hangup.recv().await.is_some() {
                match Config::load(&path)
                    .map_err(Into::into)
                    .and_then(|c| balancer.reload(&c))
                {
                    Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
                    Err(e) => tracing::error!("SIGHUP: keeping the running configuration: {e}"),
                }
            }
        }
    };
    let result = tokio::select! {
        r = balancer.serve(listeners, shutdown) => r,
        () = reload => Ok(()),
    };
    let _ = stop_control.send(());
    if let Some(path) = &opts.control_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(result?)
}

/// Binds the control socket, replacing a stale socket file left by a killed run.
fn bind_control(path: &Path) -> Result<UnixListener, RunError> {
    use std::os::unix::fs::FileTypeExt as _;
    let err = |source| RunError::ControlSocket {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another load balancer answers on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}
