//! The whole DHCP (and TFTP) server process minus argument parsing: load the configuration,
//! open the lease journal, bind the sockets to the bridge, serve until shutdown, and re-read
//! the configuration on SIGHUP.
//! `kiln dhcpd run` and the benchmark call [`run`].

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigError};
use crate::handler::Handler;
use crate::lease::{LeaseError, LeaseTable};
use crate::server::{self, Counters};
use crate::tftp::{self, TftpError};

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The configuration file (network options, static leases, pool, boot).
    pub config_path: PathBuf,
    /// Where the lease journal lives.
    pub state_dir: PathBuf,
    /// The interface (the cluster bridge) to serve on; none: every interface.
    pub interface: Option<String>,
    /// The DHCP listen address (`0.0.0.0:67` in the lab).
    pub listen: SocketAddrV4,
    /// The TFTP listen address (`0.0.0.0:69` in the lab), used when the config has a TFTP
    /// root.
    pub tftp_listen: SocketAddrV4,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The lease journal is unusable.
    #[error(transparent)]
    Leases(#[from] LeaseError),
    /// A socket could not be opened or bound.
    #[error("cannot listen on {address}{}: {source}; is another DHCP/TFTP server running there, and are we root?", interface.as_ref().map(|i| format!(" on {i}")).unwrap_or_default())]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The interface it was bound to.
        interface: Option<String>,
        /// The cause.
        source: std::io::Error,
    },
    /// The SIGHUP handler could not be installed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    /// The TFTP root is not a directory.
    #[error("boot.tftpRoot {} is not a directory: create it with the boot files, or remove tftpRoot", .0.display())]
    TftpRoot(PathBuf),
    /// The TFTP server failed.
    #[error(transparent)]
    Tftp(#[from] TftpError),
}

/// Opens a UDP socket on `address`, bound to `interface` when given (`SO_BINDTODEVICE`), with
/// `SO_BROADCAST` and `SO_REUSEADDR`, non-blocking.
pub fn bind_udp(
    address: SocketAddrV4,
    interface: Option<&str>,
) -> Result<std::net::UdpSocket, RunError> {
    let err = |source| RunError::Bind {
        address: address.into(),
        interface: interface.map(str::to_owned),
        source,
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_broadcast(true).map_err(err)?;
    if let Some(name) = interface {
        socket.bind_device(Some(name.as_bytes())).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket
        .bind(&SocketAddr::from(address).into())
        .map_err(err)?;
    Ok(socket.into())
}

/// Runs until `shutdown` completes.
pub async fn run(opts: &RunOptions, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let config = Config::load(&opts.config_path)?;
    if let Some(root) = config.boot.as_ref().and_then(|b| b.tftp_root.as_ref())
        && !root.is_dir()
    {
        return Err(RunError::TftpRoot(root.clone()));
    }
    std::fs::create_dir_all(&opts.state_dir).map_err(|source| LeaseError::Io {
        path: opts.state_dir.clone(),
        source,
    })?;
    let table = LeaseTable::open(&opts.state_dir, server::unix_now())?;
    let dhcp = bind_udp(opts.listen, opts.interface.as_deref())?;
    let dhcp = tokio::net::UdpSocket::from_std(dhcp).map_err(|source| RunError::Bind {
        address: opts.listen.into(),
        interface: opts.interface.clone(),
        source,
    })?;
    let tftp_root = config.boot.as_ref().and_then(|b| b.tftp_root.clone());
    let handler = Handler::new(config, table, opts.listen.port());
    let counters = Arc::new(Counters::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tftp = match tftp_root {
        Some(root) => {
            let socket = bind_udp(opts.tftp_listen, opts.interface.as_deref())?;
            let mut stopped = stopped.clone();
            Some(tokio::spawn(async move {
                tftp::serve(socket, &root, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
            }))
        }
        None => None,
    };
    // SIGHUP re-reads the file (the lab rewrites it when nodes change); a bad file keeps the
    // running configuration.
    let mut hangup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let path = opts.config_path.clone();
    let reloader = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match Config::load(&path) {
                Ok(config) => {
                    if reload.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("SIGHUP: keeping the running configuration: {e}"),
            }
        }
    });
    tracing::info!(listen = %opts.listen, interface = ?opts.interface, "DHCP server running");
    server::serve_with_reload(dhcp, handler, counters.clone(), reloads, shutdown).await;
    reloader.abort();
    let _ = stop.send(true);
    tracing::info!(counters = ?counters.snapshot(), "DHCP server stopped");
    if let Some(t) = tftp
        && let Ok(r) = t.await
    {
        r?;
    }
    Ok(())
}

/// The lab's defaults: DHCP on `0.0.0.0:67`, TFTP on `0.0.0.0:69`.
pub fn default_listen() -> (SocketAddrV4, SocketAddrV4) {
    (
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 69),
    )
}
