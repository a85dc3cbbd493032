//! `kiln registry`: run the OCI registry and pull-through mirror (in the foreground, or in the
//! background beside a lab cluster), and move OCI image archives in and out of a registry.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use kiln_registry_mirror::client::{ClientConfig, RegistryClient};
use kiln_registry_mirror::reference::ImageRef;
use kiln_registry_mirror::{ApiConfig, Mirror, Registry, Storage, UpstreamConfig};

/// File names the background registry writes into the state directory.
const PID_FILE: &str = "registry-mirror.pid";
const LOG_FILE: &str = "registry-mirror.log";
const ADDR_FILE: &str = "registry-mirror.addr";

/// Registry commands.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Run the registry (and mirror) in the foreground until interrupted.
    Serve(ServeArgs),
    /// Start the registry in the background for a lab cluster, with a pidfile and log in the
    /// state directory.
    #[command(hide = true)]
    Launch(LaunchArgs),
    /// Push an image from an OCI image layout archive (or directory) to a registry.
    PushArchive(PushArchiveArgs),
    /// Export an image from a registry into an OCI image layout archive.
    Export(ExportArgs),
}

/// Flags of `kiln registry serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub addr: SocketAddr,
    /// Storage directory (default: ~/.kiln/registry).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Mirror an upstream registry: HOST is what clients name (docker.io, ghcr.io, or the ns=
    /// parameter of containerd), URL where to fetch from. Repeat for several upstreams.
    #[arg(long = "mirror", value_name = "HOST=URL")]
    pub mirrors: Vec<String>,
    /// Upstream for requests without ns= (default: docker.io if mirrored, else the first).
    #[arg(long, value_name = "HOST")]
    pub default_mirror: Option<String>,
    /// Credentials for an upstream (basic auth or token flow). Repeatable.
    #[arg(long = "mirror-auth", value_name = "HOST=USER:PASSWORD")]
    pub mirror_auth: Vec<String>,
    /// Extra CA certificate (PEM) to trust for an upstream. Repeatable.
    #[arg(long = "mirror-ca-cert", value_name = "HOST=FILE")]
    pub mirror_ca: Vec<String>,
    /// Seconds a mirrored tag is served from the cache before it is checked upstream again.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub tag_ttl: u64,
    /// TLS certificate chain (PEM); serves HTTPS with --tls-key.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Refuse pushes and deletes.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub read_only: bool,
    /// Require HTTP basic auth with this user and password.
    #[arg(
        long,
        env = "KILN_REGISTRY_AUTH",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    pub basic_auth: Option<String>,
    /// Connections served at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Write the bound address to this file once listening (used by the launcher).
    #[arg(long, hide = true, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The same flags as a command line, for the background launcher.
    fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "registry".into(),
            "serve".into(),
            "--addr".into(),
            self.addr.to_string().into(),
        ];
        let mut push = |flag: &str, v: OsString| {
            a.push(flag.into());
            a.push(v);
        };
        if let Some(r) = &self.root {
            push("--root", r.clone().into());
        }
        for m in &self.mirrors {
            push("--mirror", m.into());
        }
        if let Some(d) = &self.default_mirror {
            push("--default-mirror", d.into());
        }
        for m in &self.mirror_auth {
            push("--mirror-auth", m.into());
        }
        for m in &self.mirror_ca {
            push("--mirror-ca-cert", m.into());
        }
        push("--tag-ttl", self.tag_ttl.to_string().into());
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            push("--tls-cert", c.clone().into());
            push("--tls-key", k.clone().into());
        }
        push("--max-connections", self.max_connections.to_string().into());
        if let Some(f) = &self.ready_file {
            push("--ready-file", f.clone().into());
        }
        if self.read_only {
            a.push("--read-only".into());
        }
        // --basic-auth travels in the environment, not on the command line (ps shows that).
        a
    }
}

/// Flags of the hidden background launcher.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Cluster state directory: receives registry-mirror.pid and registry-mirror.log.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Registry flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// How to reach a registry from the archive commands.
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// Talk plain HTTP instead of HTTPS.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub plain_http: bool,
    /// Extra CA certificate (PEM) to trust.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Do not verify the registry's certificate.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_skip_tls_verify: bool,
    /// Credentials for the registry.
    #[arg(
        long,
        env = "KILN_REGISTRY_CREDENTIALS",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    pub user: Option<String>,
}

/// Flags of `kiln registry push-archive`.
#[derive(Debug, Args)]
pub struct PushArchiveArgs {
    /// OCI image layout archive (tar) or directory.
    pub file: PathBuf,
    /// Where to push: HOST[:PORT]/NAME[:TAG].
    pub reference: String,
    /// Registry connection.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Flags of `kiln registry export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// What to export: HOST[:PORT]/NAME[:TAG|@DIGEST].
    pub reference: String,
    /// The OCI image layout archive (tar) to write.
    pub file: PathBuf,
    /// Registry connection.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Runs a registry command.
pub fn run(cmd: RegistryCommand) -> anyhow::Result<()> {
    match cmd {
        RegistryCommand::Serve(args) => runtime()?.block_on(serve(args)),
        RegistryCommand::Launch(args) => launch(args),
        RegistryCommand::PushArchive(args) => runtime()?.block_on(push_archive(args)),
        RegistryCommand::Export(args) => runtime()?.block_on(export(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn split_pair<'a>(spec: &'a str, flag: &str, sep: char) -> anyhow::Result<(&'a str, &'a str)> {
    spec.split_once(sep)
        .with_context(|| format!("{flag} {spec:?}: expected two parts separated by {sep:?}"))
}

fn upstreams(args: &ServeArgs) -> anyhow::Result<Vec<UpstreamConfig>> {
    let mut ups = args
        .mirrors
        .iter()
        .map(|m| UpstreamConfig::parse(m).with_context(|| format!("--mirror {m}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for spec in &args.mirror_auth {
        let (host, cred) = split_pair(spec, "--mirror-auth", '=')?;
        let (user, pass) = split_pair(cred, "--mirror-auth", ':')?;
        let up = ups
            .iter_mut()
            .find(|u| u.host == host)
            .with_context(|| format!("--mirror-auth names {host}, which no --mirror gives"))?;
        up.credentials = Some((user.to_owned(), pass.to_owned()));
    }
    for spec in &args.mirror_ca {
        let (host, file) = split_pair(spec, "--mirror-ca-cert", '=')?;
        let up = ups
            .iter_mut()
            .find(|u| u.host == host)
            .with_context(|| format!("--mirror-ca-cert names {host}, which no --mirror gives"))?;
        up.ca_cert = Some(PathBuf::from(file));
    }
    Ok(ups)
}

fn default_root() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set; pass --root DIR to say where the registry stores images")?;
    Ok(PathBuf::from(home).join(".kiln").join("registry"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let root = match &args.root {
        Some(r) => r.clone(),
        None => default_root()?,
    };
    let storage = Arc::new(
        Storage::open(&root).with_context(|| format!("opening storage {}", root.display()))?,
    );
    let ups = upstreams(&args)?;
    let mirror = if ups.is_empty() {
        None
    } else {
        Some(Arc::new(Mirror::new(
            ups,
            args.default_mirror.clone(),
            Duration::from_secs(args.tag_ttl),
        )?))
    };
    let basic_auth = match &args.basic_auth {
        Some(spec) => {
            let (u, p) = split_pair(spec, "--basic-auth", ':')?;
            Some((u.to_owned(), p.to_owned()))
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(kiln_registry_mirror::server::tls_acceptor(c, k)?),
        _ => None,
    };
    let registry = Arc::new(Registry {
        storage: storage.clone(),
        mirror: mirror.clone(),
        config: ApiConfig {
            read_only: args.read_only,
            basic_auth,
        },
    });
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}; is another registry running there?", args.addr))?;
    let bound = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %bound, root = %root.display(), "registry listening");
    println!(
        "registry listening on {scheme}://{bound} (storage {})",
        root.display()
    );
    if let Some(up) = &mirror {
        for host in args
            .mirrors
            .iter()
            .filter_map(|m| m.split_once('=').map(|p| p.0))
        {
            let default = up.select(None).is_some_and(|d| d.host() == host);
            println!(
                "  mirroring {host}{}",
                if default { " (default)" } else { "" }
            );
        }
    }
    if let Some(f) = &args.ready_file {
        std::fs::write(f, format!("{scheme}://{bound}\n"))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    // Upload sessions nobody finished are removed after a day.
    let purge_storage = storage.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            match purge_storage
                .purge_stale_uploads(Duration::from_secs(24 * 3600))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "purged stale upload sessions"),
                Err(e) => tracing::warn!(error = %e, "purging upload sessions failed"),
            }
        }
    });
    let app = kiln_registry_mirror::router(registry);
    kiln_registry_mirror::server::serve(
        listener,
        tls,
        app,
        args.max_connections,
        shutdown_signal(),
    )
    .await;
    println!("registry stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn launch(mut args: LaunchArgs) -> anyhow::Result<()> {
    let dir = &args.state_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))?;
    let ready = dir.join(ADDR_FILE);
    let _ = std::fs::remove_file(&ready);
    args.serve.ready_file = Some(ready.clone());
    if args.serve.root.is_none() {
        args.serve.root = Some(dir.join("registry"));
    }
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the kiln binary to re-launch")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args.serve.to_args())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if std::env::var_os("KILN_LOG").is_none() {
        // The request log (hit or upstream for every pull) is at info level.
        cmd.env("KILN_LOG", "info");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        // Its own process group: the registry outlives the launching terminal's Ctrl-C.
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().context("starting the registry")?;
    let pid_path = dir.join(PID_FILE);
    std::fs::write(&pid_path, format!("{}\n", child.id()))
        .with_context(|| format!("writing {}", pid_path.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(addr) = std::fs::read_to_string(&ready) {
            println!(
                "registry mirror started (pid {}) on {}",
                child.id(),
                addr.trim()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the registry exited ({status}) before it was ready; see {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the registry did not start within 30s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn client_for(image: &ImageRef, remote: &RemoteArgs) -> anyhow::Result<RegistryClient> {
    let scheme = if remote.plain_http { "http" } else { "https" };
    let url = url::Url::parse(&format!("{scheme}://{}", image.host))
        .with_context(|| format!("registry host {:?}", image.host))?;
    let credentials = match &remote.user {
        Some(spec) => {
            let (u, p) = split_pair(spec, "--user", ':')?;
            Some((u.to_owned(), p.to_owned()))
        }
        None => None,
    };
    Ok(RegistryClient::new(ClientConfig {
        credentials,
        ca_cert: remote.ca_cert.clone(),
        insecure_skip_verify: remote.insecure_skip_tls_verify,
        ..ClientConfig::new(url)
    })?)
}

async fn push_archive(args: PushArchiveArgs) -> anyhow::Result<()> {
    let image: ImageRef = args.reference.parse()?;
    let client = client_for(&image, &args.remote)?;
    let digest = kiln_registry_mirror::archive::push_archive(
        &client,
        &args.file,
        &image.name,
        &image.reference,
    )
    .await
    .with_context(|| format!("pushing {} to {}", args.file.display(), args.reference))?;
    println!("{}/{}@{digest}", image.host, image.name);
    Ok(())
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let image: ImageRef = args.reference.parse()?;
    let client = client_for(&image, &args.remote)?;
    let digest =
        kiln_registry_mirror::archive::export(&client, &image.name, &image.reference, &args.file)
            .await
            .with_context(|| format!("exporting {} to {}", args.reference, args.file.display()))?;
    println!("{} {digest}", display(&args.file));
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn launcher_forwards_serve_flags() {
        let cli = Cli::try_parse_from([
            "kiln",
            "registry",
            "launch",
            "--state-dir",
            "/tmp/s",
            "--addr",
            "10.5.0.1:5000",
            "--mirror",
            "docker.io=http://10.5.0.1:6000",
            "--mirror",
            "ghcr.io=https://ghcr.io",
            "--read-only",
        ])
        .unwrap();
        let Command::Registry(super::RegistryCommand::Launch(args)) = cli.command else {
            panic!("not a launch command");
        };
        let forwarded: Vec<String> = args
            .serve
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let again =
            Cli::try_parse_from(std::iter::once("kiln".to_owned()).chain(forwarded)).unwrap();
        let Command::Registry(super::RegistryCommand::Serve(serve)) = again.command else {
            panic!("not a serve command");
        };
        assert_eq!(serve.addr.to_string(), "10.5.0.1:5000");
        assert_eq!(serve.mirrors.len(), 2);
        assert!(serve.read_only);
        assert_eq!(super::upstreams(&serve).unwrap()[1].host, "ghcr.io");
    }
}
