//! `kiln image`: build Kiln OS images (kernel, vmlinux, initramfs, disk, installer) into the
//! image store and list them. The work is in `kiln-image`; this module parses flags and draws
//! progress.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use kiln_image::{BuildOptions, KernelSource};
use kiln_provisioner::output::{self, OutputFormat};
use kiln_provisioner::progress::Progress;

/// Image commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image from Debian packages and this workspace (skipped when its inputs did not
    /// change).
    Build(BuildArgs),
    /// Build only an installer image (machined, etcd, etcdctl, os-release: what `process` and
    /// `container` nodes install), without kernel or disk.
    Installer(InstallerArgs),
    /// List built images.
    Ls(LsArgs),
    /// Print every image a cluster of this Kiln version needs: the installer, the node image
    /// and those named in the given machine configurations.
    List(super::image_cache::ListArgs),
    /// Copy the images of `kiln image list` into a registry (the lab's) or a directory of OCI
    /// archives, from archives, the image store or another registry.
    Cache(super::image_cache::CacheArgs),
}

/// Where to push an installer.
#[derive(Debug, Args, Clone)]
pub struct PushArgs {
    /// Push the installer to this registry (HOST[:PORT]) as NAME:VERSION.
    #[arg(long, value_name = "REGISTRY")]
    pub push: Option<String>,
    /// Repository name of the pushed installer.
    #[arg(long, default_value = "kiln/installer", value_name = "NAME")]
    pub push_name: String,
    /// Talk plain HTTP to the registry (a lab registry).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub plain_http: bool,
}

/// Flags of `kiln image installer`.
#[derive(Debug, Args)]
pub struct InstallerArgs {
    /// The release's version (reported by its nodes).
    #[arg(long, value_name = "VERSION")]
    pub image_version: String,
    /// Directory to write the OCI image layout into (default:
    /// ~/.kiln/images/<version>/installer).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// machined (default: the `machined` binary next to this `kiln`).
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// etcd.
    #[arg(long, default_value = "/usr/bin/etcd", value_name = "FILE")]
    pub etcd: PathBuf,
    /// etcdctl.
    #[arg(long, default_value = "/usr/bin/etcdctl", value_name = "FILE")]
    pub etcdctl: PathBuf,
    /// Where to push it.
    #[command(flatten)]
    pub push: PushArgs,
}

/// Flags of `kiln image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Image store (default: ~/.kiln/images); the image goes into DIR/<version>/.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Image version (default: kiln's version and the first 12 hex digits of the inputs
    /// digest). `--version` is kiln's own.
    #[arg(long, value_name = "VERSION")]
    pub image_version: Option<String>,
    /// Custom kernel (bzImage); needs --modules.
    #[arg(long, requires = "modules", value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Module tree of the custom kernel (/usr/lib/modules/<release>, with modules.dep).
    #[arg(long, requires = "kernel", value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// The program at /init (default: the `machined` binary next to this `kiln`).
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// Keep the init's debug information.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub no_strip: bool,
    /// Extra kernel modules to pack (with their dependencies). Repeatable.
    #[arg(long = "module", value_name = "NAME")]
    pub extra_modules: Vec<String>,
    /// Disk image size in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub disk_size: u64,
    /// Do not build the disk image.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub no_disk: bool,
    /// Do not build the installer image.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub no_installer: bool,
    /// Extra kernel arguments for the disk's loader entries.
    #[arg(long, value_name = "ARGS")]
    pub extra_kernel_args: Option<String>,
    /// Rebuild even when an image with the same inputs exists.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub force: bool,
    /// Where to push the installer.
    #[command(flatten)]
    pub push: PushArgs,
}

/// Flags of `kiln image ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Image store (default: ~/.kiln/images).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Runs an image command.
pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(args) => build(args),
        ImageCommand::Installer(args) => installer(args),
        ImageCommand::Ls(args) => ls(args),
        ImageCommand::List(args) => super::image_cache::list(args),
        ImageCommand::Cache(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(super::image_cache::cache(args)),
    }
}

fn store_root(out: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match out {
        Some(dir) => Ok(dir),
        None => kiln_image::store::default_root()
            .context("HOME is not set; pass --out DIR to say where images go"),
    }
}

/// Reports the builder's steps through the lab's phase printer (spinner on a terminal).
struct Steps(Progress);

impl kiln_image::Progress for Steps {
    fn step(&self, what: &str) {
        self.0.phase(what);
    }
    fn note(&self, line: &str) {
        self.0.note(line);
    }
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let root = store_root(args.out)?;
    let kernel = match (args.kernel, args.modules) {
        (Some(k), Some(m)) => KernelSource::custom(k, m)?,
        _ => KernelSource::debian_cloud("/boot".as_ref(), "/usr/lib/modules".as_ref())?,
    };
    let init = machined_binary(args.init)?;
    let mut opts = BuildOptions::new(root, kernel, init);
    opts.version = args.image_version;
    opts.strip_init = !args.no_strip;
    opts.modules.extend(args.extra_modules);
    opts.disk = !args.no_disk;
    opts.disk_size_mib = args.disk_size;
    opts.installer = !args.no_installer;
    opts.force = args.force;
    if let Some(extra) = args.extra_kernel_args {
        opts.cmdline = format!("{} {extra}", opts.cmdline);
    }
    let steps = Steps(Progress::new());
    let built = kiln_image::build(&opts, &steps);
    match &built {
        Ok(_) => steps.0.done(),
        Err(_) => steps.0.failed(),
    }
    let built = built?;
    println!("{}", built.dir.display());
    if args.push.push.is_some() {
        if args.no_installer {
            bail!("--push pushes the installer image, which --no-installer leaves out");
        }
        let reference = push(
            &args.push,
            &built.path(kiln_image::builder::names::INSTALLER),
            &built.manifest.version,
        )?;
        println!("{reference}");
    }
    Ok(())
}

fn machined_binary(init: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = init {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let machined = exe.with_file_name("machined");
    if !machined.is_file() {
        bail!(
            "no machined binary next to {}: build it (cargo build -p kiln-machined) or pass --init FILE",
            exe.display()
        );
    }
    Ok(machined)
}

fn installer(args: InstallerArgs) -> anyhow::Result<()> {
    let init = machined_binary(args.init)?;
    let dir = match args.out {
        Some(d) => d,
        None => store_root(None)?
            .join(&args.image_version)
            .join(kiln_image::builder::names::INSTALLER),
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the old installer at {}", dir.display()))?;
    }
    let digest = kiln_image::oci::write_installer(
        &dir,
        &kiln_image::oci::InstallerInputs {
            version: &args.image_version,
            machined: &init,
            etcd: &args.etcd,
            etcdctl: &args.etcdctl,
            boot: None,
        },
    )?;
    println!("{} {digest}", dir.display());
    if args.push.push.is_some() {
        println!("{}", push(&args.push, &dir, &args.image_version)?);
    }
    Ok(())
}

/// Pushes the installer layout `dir` as `<registry>/<name>:<version>`; returns the reference
/// with its digest.
fn push(args: &PushArgs, dir: &std::path::Path, version: &str) -> anyhow::Result<String> {
    use kiln_registry_mirror::client::{ClientConfig, RegistryClient};
    use kiln_registry_mirror::reference::ImageRef;
    let Some(registry) = &args.push else {
        bail!("no registry to push to: pass --push HOST[:PORT]");
    };
    let text = format!("{registry}/{}:{version}", args.push_name);
    let image: ImageRef = text
        .parse()
        .with_context(|| format!("--push {registry} with version {version} gives {text:?}"))?;
    let scheme = if args.plain_http { "http" } else { "https" };
    let url = url::Url::parse(&format!("{scheme}://{}", image.host))
        .with_context(|| format!("registry host {:?}", image.host))?;
    let client = RegistryClient::new(ClientConfig::new(url))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let digest = rt
        .block_on(kiln_registry_mirror::archive::push_archive(
            &client,
            dir,
            &image.name,
            &image.reference,
        ))
        .with_context(|| format!("pushing {} to {text}", dir.display()))?;
    Ok(format!("{text}@{digest}"))
}

fn ls(args: LsArgs) -> anyhow::Result<()> {
    let root = store_root(args.out)?;
    let images = kiln_image::list(&root)?;
    output::print(args.output, &images, |images| {
        let rows: Vec<Vec<String>> = images
            .iter()
            .map(|m| {
                let size: u64 = m.outputs.iter().map(|o| o.size).sum();
                vec![
                    m.version.clone(),
                    m.kernel_release.clone(),
                    format!("{} MiB", size.div_ceil(1 << 20)),
                    m.outputs
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    root.join(&m.version).display().to_string(),
                ]
            })
            .collect();
        output::table(&["VERSION", "KERNEL", "SIZE", "OUTPUTS", "PATH"], &rows)
    })
}
