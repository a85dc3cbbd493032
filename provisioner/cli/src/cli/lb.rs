//! Hidden `kiln lb ...`: the lab's load balancer helper (`run`, started by `kiln cluster
//! create` on the gateway) and its client commands (`status`, `set-upstreams`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_lb::{Snapshot, control, daemon};

use kiln_provisioner::output::{self, OutputFormat};

/// Load balancer helper commands.
#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Run the load balancer in the foreground: SIGHUP re-reads the config file, SIGTERM or
    /// SIGINT drains open connections and exits.
    Run(RunArgs),
    /// Print the counters and upstream health of a running load balancer.
    Status {
        /// Control socket of the load balancer.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Replace one frontend's upstreams on a running load balancer (memory only: also rewrite
    /// the config file, or the next SIGHUP undoes it).
    SetUpstreams {
        /// Control socket of the load balancer.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Frontend name (`k8s`, `os-api`).
        #[arg(long)]
        frontend: String,
        /// The new upstreams, `IP:PORT` (comma-separated or repeated; none empties the set).
        #[arg(long, value_delimiter = ',', value_name = "ADDR")]
        upstream: Vec<SocketAddr>,
    },
}

/// Arguments of `kiln lb run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The YAML config file (see docs/load-balancer.md); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Create a control socket here for `kiln lb status` and `set-upstreams`.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Write the process id here, removed on exit.
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
}

/// Runs an `lb` command.
pub fn run(cmd: LbCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        LbCommand::Run(args) => runtime.block_on(serve(args)),
        LbCommand::Status {
            control_socket,
            output,
        } => {
            let snapshot = runtime.block_on(control::status(&control_socket))?;
            output::print(output, &snapshot, table)
        }
        LbCommand::SetUpstreams {
            control_socket,
            frontend,
            upstream,
        } => {
            let snapshot = runtime.block_on(control::set_upstreams(
                &control_socket,
                &frontend,
                &upstream,
            ))?;
            print!("{}", table(&snapshot));
            Ok(())
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
        control_socket: args.control_socket,
    };
    daemon::run(&opts, async {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
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

/// One row per frontend (FAILURES: clients failed on every upstream), then one per upstream
/// (FAILURES: failed client connects / failed checks).
fn table(s: &Snapshot) -> String {
    kiln_provisioner::lb_helper::table(s)
}
