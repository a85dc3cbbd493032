//! Hidden `kiln dhcpd ...`: the lab's DHCP (and TFTP) server helper (`run`, started by
//! `kiln cluster create` on the cluster bridge for provisioners whose nodes use DHCP) and
//! `leases`, which prints what a server has recorded.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_dhcpd::daemon;
use kiln_provisioner::output::{self, OutputFormat};

/// DHCP server helper commands.
#[derive(Debug, Subcommand)]
pub enum DhcpdCommand {
    /// Run the DHCP server in the foreground until SIGTERM or SIGINT.
    Run(RunArgs),
    /// Print the live leases a server has recorded in its state directory.
    Leases {
        /// The server's state directory (`dhcpd/` in the cluster's state directory).
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// Arguments of `kiln dhcpd run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The YAML configuration: network options, static leases, pool, network boot.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Where the lease journal lives (created if missing).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Serve only on this interface (the cluster bridge).
    #[arg(long, value_name = "NAME")]
    interface: Option<String>,
    /// DHCP listen address.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:67")]
    listen: SocketAddrV4,
    /// TFTP listen address (used when the configuration has boot.tftpRoot).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:69")]
    tftp_listen: SocketAddrV4,
    /// Write the process id here, removed on exit.
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
}

/// Runs a `dhcpd` command.
pub fn run(cmd: DhcpdCommand) -> anyhow::Result<()> {
    match cmd {
        DhcpdCommand::Run(args) => {
            // One thread: the handler is sequential, and the benchmark compares it so.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(args))
        }
        DhcpdCommand::Leases { state_dir, output } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let leases = kiln_dhcpd::lease::current_leases(&state_dir, now)?;
            output::print(output, &leases, |l| {
                kiln_provisioner::dhcpd_helper::table(l)
            })
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let _pidfile = match &args.pidfile {
        Some(path) => Some(Pidfile::write(path)?),
        None => None,
    };
    let opts = daemon::RunOptions {
        config_path: args.config,
        state_dir: args.state_dir,
        interface: args.interface,
        listen: args.listen,
        tftp_listen: args.tftp_listen,
    };
    daemon::run(&opts, async {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
    .await?;
    Ok(())
}

/// A pidfile removed when dropped.
#[derive(Debug)]
struct Pidfile(PathBuf);

impl Pidfile {
    fn write(path: &Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing pidfile {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
