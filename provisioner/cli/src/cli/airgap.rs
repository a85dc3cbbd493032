//! `kiln airgap`: print a cluster's egress audit, and the hidden `dns run` / `proxy run`
//! helpers the lab starts on the gateway (each writes `<helper>.pid` and `<helper>.log` into
//! the state directory).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_airgap::audit::{self, AUDIT_FILE, AuditEvent, AuditLog, Summary};
use kiln_airgap::{dns, lab, proxy, tls};
use serde::Serialize;

use kiln_provisioner::output::{self, OutputFormat};

/// Air-gap commands.
#[derive(Debug, Subcommand)]
pub enum AirgapCommand {
    /// Print the egress audit (proxy and DNS) of a cluster; exits 1 when anything was denied.
    Audit(AuditArgs),
    /// Run the lab DNS server in the foreground (started by the lab on the gateway).
    #[command(subcommand, hide = true)]
    Dns(HelperCommand),
    /// Run the egress-auditing proxy in the foreground (started by the lab on the gateway).
    #[command(subcommand, hide = true)]
    Proxy(HelperCommand),
}

/// What a helper does.
#[derive(Debug, Subcommand)]
pub enum HelperCommand {
    /// Serve until SIGTERM or SIGINT.
    Run(RunArgs),
}

/// Flags of `kiln airgap dns|proxy run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Cluster state directory: receives <helper>.pid, <helper>.log and the audit log.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// The helper's YAML config (default: <state>/<helper>.yaml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Audit log to append to (default: <state>/airgap-audit.jsonl).
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// Keep logging on stderr instead of <state>/<helper>.log.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub foreground_log: bool,
}

/// Flags of `kiln airgap audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Cluster state directory (reads its airgap-audit.jsonl).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub state: Option<PathBuf>,
    /// Audit log file.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    summary: Summary,
    events: Vec<AuditEvent>,
}

/// Runs an `airgap` command.
pub fn run(cmd: AirgapCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AirgapCommand::Audit(args) => print_audit(&args),
        AirgapCommand::Dns(HelperCommand::Run(args)) => {
            runtime()?.block_on(run_dns(args))?;
            Ok(ExitCode::SUCCESS)
        }
        AirgapCommand::Proxy(HelperCommand::Run(args)) => {
            runtime()?.block_on(run_proxy(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn print_audit(args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let path = match (&args.file, &args.state) {
        (Some(f), _) => f.clone(),
        (None, Some(dir)) => {
            anyhow::ensure!(
                dir.is_dir(),
                "state directory {} does not exist; pass the cluster's state directory \
                 (~/.kiln/clusters/NAME)",
                dir.display()
            );
            dir.join(AUDIT_FILE)
        }
        (None, None) => anyhow::bail!("pass --state DIR or --file FILE"),
    };
    let events = audit::read(&path)?;
    let summary = Summary::of(&events);
    let clean = summary.clean();
    let report = Report {
        file: path.display().to_string(),
        summary,
        events,
    };
    output::print(args.output, &report, table)?;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn table(r: &Report) -> String {
    let rows: Vec<Vec<String>> = r
        .events
        .iter()
        .map(|e| {
            vec![
                e.time.clone(),
                format!("{:?}", e.source).to_lowercase(),
                e.client.clone(),
                e.method.clone(),
                e.destination.clone(),
                format!("{:?}", e.decision).to_lowercase(),
                e.bytes_sent.to_string(),
                e.bytes_received.to_string(),
                e.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut out = output::table(
        &[
            "TIME",
            "SOURCE",
            "CLIENT",
            "METHOD",
            "DESTINATION",
            "DECISION",
            "SENT",
            "RECEIVED",
            "REASON",
        ],
        &rows,
    );
    let s = &r.summary;
    out.push_str(&format!(
        "\n{} attempts: {} allowed, {} denied, {} malformed ({})\n",
        s.attempts, s.allowed, s.denied, s.malformed, r.file
    ));
    if !s.denied_destinations.is_empty() {
        out.push_str(&format!(
            "denied destinations: {}\n",
            s.denied_destinations.join(", ")
        ));
    }
    out
}

/// A pidfile removed when dropped. It holds the pid and the start time, like every lab
/// helper's, so `cluster destroy` stops exactly this process.
#[derive(Debug)]
struct Pidfile(PathBuf);

impl Pidfile {
    fn write(path: &Path) -> anyhow::Result<Self> {
        kiln_provisioner::daemon::write_pidfile(path, std::process::id())
            .with_context(|| format!("writing pidfile {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the pidfile, sends stdout and stderr to `<state>/<helper>.log`, opens the audit log.
fn helper_setup(args: &RunArgs, helper: &str) -> anyhow::Result<(Pidfile, AuditLog, PathBuf)> {
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("creating state directory {}", args.state.display()))?;
    if !args.foreground_log {
        let log = args.state.join(format!("{helper}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        nix::unistd::dup2_stdout(&file).context("sending stdout to the helper log")?;
        nix::unistd::dup2_stderr(&file).context("sending stderr to the helper log")?;
    }
    let pid = Pidfile::write(&args.state.join(format!("{helper}.pid")))?;
    let audit_path = args
        .audit
        .clone()
        .unwrap_or_else(|| args.state.join(AUDIT_FILE));
    let audit = AuditLog::open(&audit_path)?;
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| lab::config_path(&args.state, helper));
    Ok((pid, audit, config))
}

fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

async fn run_dns(args: RunArgs) -> anyhow::Result<()> {
    let (_pid, audit, config_path) = helper_setup(&args, lab::DNS_HELPER)?;
    let config = dns::DnsConfig::load(&config_path)?;
    let handler = dns::LabDns::new(&config, audit, Path::new("/etc/resolv.conf"))?;
    let sockets = dns::DnsSockets::bind(&config.listen).await?;
    let outside = match handler.outside() {
        dns::Outside::Refuse => "refusing other names (air-gapped)".to_owned(),
        dns::Outside::Forward(ups) => format!(
            "forwarding other names to {}",
            ups.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    println!(
        "lab DNS listening on {:?} (UDP and TCP) for {} names in {}; {outside}",
        sockets.local_addrs(),
        config.records.len(),
        config.domain
    );
    dns::serve(sockets, handler, shutdown_signal()?).await?;
    println!("lab DNS stopped");
    Ok(())
}

async fn run_proxy(args: RunArgs) -> anyhow::Result<()> {
    let (_pid, audit, config_path) = helper_setup(&args, lab::PROXY_HELPER)?;
    let config = proxy::ProxyConfig::load(&config_path)?;
    anyhow::ensure!(
        config.listen.is_some() || config.tls_listen.is_some(),
        "{}: neither listen nor tlsListen is set; add e.g. listen: 10.5.0.1:3128",
        config_path.display()
    );
    let shared = Arc::new(
        proxy::Proxy::new(config.allow.clone(), audit, config.limits)
            .resolve_for_networks(config.resolve_for_networks)
            .hosts(config.hosts.clone()),
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = config.listen {
        let listener = proxy::bind(addr).await?;
        println!("HTTP proxy listening on {}", listener.local_addr()?);
        servers.spawn(proxy::serve(
            listener,
            None,
            shared.clone(),
            stop(rx.clone()),
        ));
    }
    if let Some(addr) = config.tls_listen {
        let acceptor = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => tls::acceptor_from_files(c, k)?,
            _ => {
                let pair = tls::self_signed(&[addr.ip().to_string()])?;
                let ca = args.state.join("proxy-ca.pem");
                std::fs::write(&ca, &pair.cert_pem)
                    .with_context(|| format!("writing {}", ca.display()))?;
                println!("HTTPS proxy certificate (self-signed): {}", ca.display());
                tls::acceptor_from_pem(&pair)?
            }
        };
        let listener = proxy::bind(addr).await?;
        println!("HTTPS proxy listening on {}", listener.local_addr()?);
        servers.spawn(proxy::serve(
            listener,
            Some(acceptor),
            shared.clone(),
            stop(rx.clone()),
        ));
    }
    println!("allowed destinations: {}", allow_text(&config.allow));
    shutdown_signal()?.await;
    let _ = tx.send(true);
    while servers.join_next().await.is_some() {}
    println!("proxy stopped");
    Ok(())
}

fn allow_text(allow: &kiln_airgap::allow::AllowList) -> String {
    if allow.0.is_empty() {
        return "none".to_owned();
    }
    allow
        .0
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn audit_needs_exactly_one_source() {
        assert!(Cli::try_parse_from(["kiln", "airgap", "audit"]).is_err());
        assert!(
            Cli::try_parse_from(["kiln", "airgap", "audit", "--state", "a", "--file", "b"])
                .is_err()
        );
        let cli =
            Cli::try_parse_from(["kiln", "airgap", "audit", "--file", "b", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Airgap(_)));
    }

    #[test]
    fn lab_helper_arguments_parse() {
        let dir = tempfile::tempdir().unwrap();
        let args =
            kiln_airgap::lab::helper_args(dir.path(), "proxy", "listen: 127.0.0.1:0\n").unwrap();
        let cli = Cli::try_parse_from(std::iter::once("kiln".to_owned()).chain(args)).unwrap();
        assert!(matches!(
            cli.command,
            Command::Airgap(super::AirgapCommand::Proxy(_))
        ));
    }
}
