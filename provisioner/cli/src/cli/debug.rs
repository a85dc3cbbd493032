//! Hidden `kiln debug ...`: tools for testing the lab itself, starting with `air-gapped` (an
//! HTTP proxy, an HTTPS server with a self-signed certificate, and the config patch that makes
//! nodes use them).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_airgap::audit::AuditLog;
use kiln_airgap::debug::{self, AirGapped, Options};

/// Debug commands.
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Run an HTTP proxy and an HTTPS server with a self-signed certificate, and write a config
    /// patch that trusts the certificate and sends node traffic through the proxy.
    AirGapped(AirGappedArgs),
}

/// Flags of `kiln debug air-gapped`.
#[derive(Debug, Args)]
pub struct AirGappedArgs {
    /// The address nodes reach this machine at (the lab bridge address, e.g. 10.5.0.1).
    #[arg(long, value_name = "IP")]
    pub advertised_address: IpAddr,
    /// Port of the HTTP proxy (0: any free port, written into the patch).
    #[arg(long, default_value_t = debug::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// Port of the HTTPS server (0: any free port).
    #[arg(long, default_value_t = debug::DEFAULT_HTTPS_PORT)]
    pub https_port: u16,
    /// Address both servers listen on.
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    pub bind_address: IpAddr,
    /// Where to write the config patch.
    #[arg(long, default_value = debug::PATCH_FILE, value_name = "FILE")]
    pub patch: PathBuf,
    /// More entries for no_proxy (the advertised address's /24 and loopback are always there).
    #[arg(long, value_name = "HOST|CIDR")]
    pub no_proxy: Vec<String>,
    /// Also append every proxied attempt to this audit log (JSON lines).
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
}

/// Runs a debug command.
pub fn run(cmd: DebugCommand) -> anyhow::Result<()> {
    match cmd {
        DebugCommand::AirGapped(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(air_gapped(args))
        }
    }
}

async fn air_gapped(args: AirGappedArgs) -> anyhow::Result<()> {
    let audit = match &args.audit {
        Some(p) => AuditLog::open(p)?,
        None => AuditLog::discard(),
    }
    .with_echo();
    let opts = Options {
        advertised_address: args.advertised_address,
        bind_address: args.bind_address,
        proxy_port: args.proxy_port,
        https_port: args.https_port,
        no_proxy: args.no_proxy,
        patch_path: args.patch,
    };
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let servers = AirGapped::start(&opts, audit).await?;
    servers
        .run(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await;
    Ok(())
}
