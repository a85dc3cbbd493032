//! The machined entry point, shared by the `machined` binary and `kiln machined` (the process
//! provisioner starts nodes through the `kiln` binary itself).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config_source::ConfigSources;
use crate::logbuf::LogBuffer;
use crate::node::{Node, NodeOptions};
use crate::platform::{Platform, Power, ProcessPlatform};
use kiln_os_api::contract::{CONFIG_DATA_ENV, CONFIG_ENV, EXIT_REBOOT};

/// The init of Kiln OS.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Platform: process (metal and container come with their provisioners).
    #[arg(long, default_value = "process")]
    pub platform: String,
    /// Root directory of the node's volumes (process platform).
    #[arg(long)]
    pub root: PathBuf,
    /// Address the API and etcd listen on and advertise.
    #[arg(long)]
    pub address: IpAddr,
    /// Host name when the configuration gives none.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Machine configuration file (used when STATE holds none).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Machine configuration path or http:// URL.
    #[arg(long, env = CONFIG_ENV)]
    pub config_url: Option<String>,
    /// Control-plane node to join etcd through, besides the control-plane endpoint.
    #[arg(long = "join-peer")]
    pub join_peers: Vec<String>,
    /// etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: String,
    /// etcdctl binary.
    #[arg(long, default_value = "etcdctl")]
    pub etcdctl_bin: String,
}

#[derive(Clone)]
struct Tee(Arc<LogBuffer>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        TeeWriter(&self.0)
    }
}

struct TeeWriter<'a>(&'a LogBuffer);

impl std::io::Write for TeeWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Runs machined until it powers off or reboots; returns the exit code for the launcher.
pub fn run(args: Args) -> i32 {
    let console = Arc::new(LogBuffer::new(4 << 20));
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_writer(Tee(console.clone()))
        .init();
    if args.platform != "process" {
        eprintln!(
            "machined: platform {:?} is not available in this build; use --platform process",
            args.platform
        );
        return 2;
    }
    let platform: Arc<dyn Platform> = Arc::new(ProcessPlatform::new(
        args.root.clone(),
        args.address,
        args.hostname.clone(),
    ));
    let sources = ConfigSources {
        file: args.config.clone(),
        data_env: std::env::var(CONFIG_DATA_ENV).ok(),
        location: args.config_url.clone(),
    };
    let options = NodeOptions {
        join_peers: args.join_peers.clone(),
        etcd_bin: args.etcd_bin.clone(),
        etcdctl_bin: args.etcdctl_bin.clone(),
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("machined: starting the runtime: {e}");
            return EXIT_REBOOT;
        }
    };
    let code = runtime.block_on(async move {
        let (node, power_rx) = Node::new(platform.clone(), console, options);
        let boot = tokio::spawn(crate::boot::run(node.clone(), sources, power_rx));
        let signal = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
        };
        tokio::select! {
            result = boot => match result {
                Ok(power) => platform.exit_code(power),
                Err(e) => {
                    // PID 1 never just dies: a panic reboots the node.
                    tracing::error!("machined panicked: {e}; rebooting");
                    platform.exit_code(Power::Reboot)
                }
            },
            () = signal => {
                node.request_power(crate::node::PowerRequest { power: Power::Shutdown, wipe: vec![], reason: "SIGTERM".into() }).await;
                node.supervisor.stop_all().await;
                platform.exit_code(Power::Shutdown)
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}
