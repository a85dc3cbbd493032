//! The machined entry point, shared by the `machined` binary and `kiln machined` (the process
//! provisioner starts nodes through the `kiln` binary itself).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config_source::ConfigSources;
use crate::logbuf::LogBuffer;
use crate::node::{Node, NodeOptions};
use crate::platform::{
    ContainerPlatform, MetalPlatform, Platform, PlatformKind, Power, ProcessPlatform,
};
use kiln_os_api::contract::{CONFIG_DATA_ENV, CONFIG_ENV, EXIT_REBOOT};

/// The init of Kiln OS.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Platform: process, container (the entrypoint of a Kiln OS node image), or metal (PID 1
    /// of a machine; chosen by itself when run as PID 1).
    #[arg(long, value_enum, default_value_t = PlatformKind::Process)]
    pub platform: PlatformKind,
    /// Root directory of the node's volumes (process platform; on container, where the
    /// volumes are mounted).
    #[arg(long, required_if_eq_any([("platform", "process"), ("platform", "container")]))]
    pub root: Option<PathBuf>,
    /// Address the API and etcd listen on and advertise (process platform; a container uses
    /// the address Docker gave it, metal learns it by DHCP).
    #[arg(long, required_if_eq("platform", "process"))]
    pub address: Option<IpAddr>,
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
    /// Kernel command line of the node (`kiln.config=URL`, `kiln.config.oauth.*`), as the
    /// node launcher gives it.
    #[arg(long, value_name = "ARGS")]
    pub kernel_cmdline: Option<String>,
    /// The node image directory (extension services under `usr/local/etc/containers`);
    /// default: `image` under `--root`.
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
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
    if args.platform == PlatformKind::Container && crate::pid1::is_container_init() {
        return crate::pid1::supervise();
    }
    crate::pid1::unblock_inherited_signals();
    let console = Arc::new(LogBuffer::new(4 << 20));
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_writer(Tee(console.clone()))
        .init();
    let platform: Arc<dyn Platform> = match (args.platform, &args.root, args.address) {
        (PlatformKind::Process, Some(root), Some(address)) => {
            let mut p = ProcessPlatform::new(root.clone(), address, args.hostname.clone())
                .with_kernel_cmdline(args.kernel_cmdline.clone());
            if let Some(image) = &args.image_dir {
                p = p.with_image_root(image.clone());
            }
            Arc::new(p)
        }
        (PlatformKind::Process, _, _) => {
            eprintln!("machined: the process platform needs --root and --address");
            return 2;
        }
        (PlatformKind::Container, Some(root), _) => {
            Arc::new(ContainerPlatform::new(root.clone(), args.hostname.clone()))
        }
        (PlatformKind::Container, None, _) => {
            eprintln!("machined: the container platform needs --root");
            return 2;
        }
        (PlatformKind::Metal, _, _) => Arc::new(MetalPlatform::new()),
    };
    let sources = ConfigSources {
        file: args.config.clone(),
        data_env: std::env::var(CONFIG_DATA_ENV).ok(),
        location: args.config_url.clone(),
        kernel_url: None,
        ..ConfigSources::default()
    };
    let mut join_peers = args.join_peers.clone();
    if args.platform == PlatformKind::Metal {
        join_peers.extend(crate::platform::metal::kernel_join_peers());
    }
    let options = NodeOptions {
        join_peers,
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
        let (node, power_rx) = Node::new(platform.clone(), console.clone(), options);
        // Every event is also a console line the lab can read without the API.
        node.events.attach_console(move |line| {
            let line = format!("{line}\n");
            console.write(line.as_bytes());
            use std::io::Write as _;
            let _ = std::io::stderr().write_all(line.as_bytes());
        });
        if platform.kind() == PlatformKind::Metal {
            // The ACPI power button (QMP system_powerdown) powers off cleanly.
            let n = node.clone();
            let handle = tokio::runtime::Handle::current();
            let buttons = crate::platform::metal::button::watch(move || {
                let n = n.clone();
                handle.spawn(async move {
                    n.request_power(crate::node::PowerRequest {
                        power: Power::Shutdown,
                        wipe: vec![],
                        reason: "ACPI power button".into(),
                    })
                    .await;
                });
            });
            tracing::info!(buttons, "watching the power button");
        }
        let boot = tokio::spawn(crate::boot::run(node.clone(), sources, power_rx));
        tokio::spawn(crate::upgrade::after_boot(node.clone()));
        let signal = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
        };
        tokio::select! {
            result = boot => match result {
                Ok(power) => platform.power(power),
                Err(e) => {
                    // PID 1 never just dies: a panic reboots the node.
                    tracing::error!("machined panicked: {e}; rebooting");
                    platform.power(Power::Reboot)
                }
            },
            () = signal => {
                node.request_power(crate::node::PowerRequest { power: Power::Shutdown, wipe: vec![], reason: "SIGTERM".into() }).await;
                node.supervisor.stop_all().await;
                platform.power(Power::Shutdown)
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}
