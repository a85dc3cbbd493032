//! `kiln gen secrets` and `kiln gen config`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use kiln_config::generate::{DEFAULT_INSTALL_DISK, DEFAULT_INSTALLER_IMAGE};
use kiln_config::{GenerateInput, Patch, client::write_private};
use kiln_pki::SecretsBundle;

/// The configuration patch flags of `gen config` and `cluster create`.
#[derive(Debug, clap::Args)]
pub struct PatchArgs {
    /// Patch for every configuration: inline YAML/JSON or @file; repeat to apply several in
    /// order.
    #[arg(long, value_name = "PATCH")]
    config_patch: Vec<String>,
    /// Patch for control-plane configurations only (applied after --config-patch).
    #[arg(long, value_name = "PATCH")]
    config_patch_control_plane: Vec<String>,
    /// Patch for worker configurations only (applied after --config-patch).
    #[arg(long, value_name = "PATCH")]
    config_patch_worker: Vec<String>,
}

impl PatchArgs {
    /// Reads every patch: (all, control plane, workers).
    pub fn load(&self) -> anyhow::Result<(Vec<Patch>, Vec<Patch>, Vec<Patch>)> {
        let load = |args: &[String]| -> anyhow::Result<Vec<Patch>> {
            args.iter().map(|a| Ok(Patch::load(a)?)).collect()
        };
        Ok((
            load(&self.config_patch)?,
            load(&self.config_patch_control_plane)?,
            load(&self.config_patch_worker)?,
        ))
    }
}

/// `kiln gen ...`.
#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// Create a secrets bundle: the OS API, Kubernetes, aggregator and etcd CAs, the
    /// service-account key, the bootstrap and machine tokens and the secretbox key.
    Secrets {
        /// Where to write the bundle.
        #[arg(short, long, default_value = "secrets.yaml")]
        output: PathBuf,
        /// Import the CAs and service-account key of a kubeadm PKI directory
        /// (/etc/kubernetes/pki) instead of generating them.
        #[arg(long, value_name = "DIR", requires = "kubernetes_bootstrap_token")]
        from_kubernetes_pki: Option<PathBuf>,
        /// Bootstrap token of the kubeadm cluster (`kubeadm token create --ttl 0`).
        #[arg(long, value_name = "TOKEN", requires = "from_kubernetes_pki")]
        kubernetes_bootstrap_token: Option<String>,
        /// Overwrite an existing file.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        force: bool,
    },
    /// Create controlplane.yaml, worker.yaml and a client config (kilnconfig) for a cluster.
    Config {
        /// Cluster name; also the name of the client context.
        name: String,
        /// Control-plane endpoint, https://HOST:PORT (a load balancer in front of the nodes).
        endpoint: String,
        /// Use this secrets bundle instead of generating a new one.
        #[arg(long, value_name = "FILE")]
        with_secrets: Option<PathBuf>,
        #[command(flatten)]
        patches: PatchArgs,
        /// Disk to install to.
        #[arg(long, default_value = DEFAULT_INSTALL_DISK)]
        install_disk: String,
        /// Installer image.
        #[arg(long, default_value = DEFAULT_INSTALLER_IMAGE)]
        install_image: String,
        /// Directory to write the files into.
        #[arg(short, long, default_value = ".")]
        output: PathBuf,
        /// Overwrite existing files.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        force: bool,
    },
}

pub(super) fn run(cmd: GenCommand) -> anyhow::Result<()> {
    match cmd {
        GenCommand::Secrets {
            output,
            from_kubernetes_pki,
            kubernetes_bootstrap_token,
            force,
        } => {
            refuse_overwrite(std::slice::from_ref(&output), force)?;
            let bundle = match (from_kubernetes_pki, kubernetes_bootstrap_token) {
                (Some(dir), Some(token)) => SecretsBundle::from_kubernetes_pki(&dir, &token)
                    .with_context(|| format!("importing {}", dir.display()))?,
                _ => SecretsBundle::generate()?,
            };
            write_private(&output, bundle.to_yaml()?.as_bytes())
                .with_context(|| format!("writing {}", output.display()))?;
            println!("created {}", output.display());
            Ok(())
        }
        GenCommand::Config {
            name,
            endpoint,
            with_secrets,
            patches,
            install_disk,
            install_image,
            output,
            force,
        } => {
            let files = ["controlplane.yaml", "worker.yaml", "kilnconfig"].map(|f| output.join(f));
            refuse_overwrite(&files, force)?;
            let (patches, cp_patches, worker_patches) = patches.load()?;
            let secrets = match &with_secrets {
                Some(path) => read_secrets(path)?,
                None => {
                    println!("generating PKI and tokens");
                    SecretsBundle::generate()?
                }
            };
            let generated = kiln_config::generate(&GenerateInput {
                cluster_name: &name,
                endpoint: &endpoint,
                secrets: &secrets,
                install_disk: &install_disk,
                install_image: &install_image,
                patches: &patches,
                control_plane_patches: &cp_patches,
                worker_patches: &worker_patches,
            })?;
            std::fs::create_dir_all(&output)
                .with_context(|| format!("creating {}", output.display()))?;
            let [cp, worker, client] = files;
            write_private(
                &cp,
                kiln_config::to_yaml(&generated.controlplane)?.as_bytes(),
            )?;
            println!("created {}", cp.display());
            write_private(&worker, kiln_config::to_yaml(&generated.worker)?.as_bytes())?;
            println!("created {}", worker.display());
            generated.client.save(&client)?;
            println!("created {}", client.display());
            Ok(())
        }
    }
}

fn refuse_overwrite(files: &[PathBuf], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        bail!(
            "{} already exists; pass --force to overwrite it or choose another output with -o",
            existing.display()
        );
    }
    Ok(())
}

fn read_secrets(path: &Path) -> anyhow::Result<SecretsBundle> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    SecretsBundle::from_yaml(&text).with_context(|| format!("{}", path.display()))
}
