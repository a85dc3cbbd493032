//! Machine configuration and credentials from nodes: `apply-config` (also `--insecure` for
//! nodes in maintenance mode) and `kubeconfig`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use kiln_os_api::pb::{self, ApplyMode};

use crate::cli::GlobalArgs;
use crate::cli::connect::{Api, NodeErrors, node_name, status_error};

/// How `apply-config` applies.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Mode {
    /// Without reboot when possible, else with.
    #[default]
    Auto,
    /// Only if no reboot is needed.
    NoReboot,
    /// Apply and reboot.
    Reboot,
    /// Store for the next boot.
    Staged,
    /// Apply without persisting; revert after --timeout.
    Try,
}

/// `apply-config`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The configuration file.
    #[arg(short, long)]
    file: PathBuf,
    /// For nodes in maintenance mode: TLS without client certificate, node not verified.
    #[arg(short, long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub(super) insecure: bool,
    /// How to apply.
    #[arg(short, long, value_enum, default_value_t)]
    mode: Mode,
    /// Report what would happen without applying.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    dry_run: bool,
    /// For --mode try: how long before the previous configuration returns (e.g. 30s, 2m).
    #[arg(long, default_value = "1m", value_parser = crate::cli::parse_duration)]
    timeout: std::time::Duration,
}

/// `apply-config` through the endpoint (not `--insecure`, which [`apply_insecure`] handles).
pub(super) async fn apply(
    api: &mut Api,
    errors: &mut NodeErrors,
    a: ApplyArgs,
) -> anyhow::Result<()> {
    let data = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let req = api.request(apply_request(&a, data));
    let resp = api
        .client
        .apply_configuration(req)
        .await
        .map_err(status_error)?
        .into_inner();
    print_apply(resp, errors);
    Ok(())
}

fn apply_request(a: &ApplyArgs, data: Vec<u8>) -> pb::ApplyConfigurationRequest {
    let mode = match a.mode {
        Mode::Auto => ApplyMode::Auto,
        Mode::NoReboot => ApplyMode::NoReboot,
        Mode::Reboot => ApplyMode::Reboot,
        Mode::Staged => ApplyMode::Staged,
        Mode::Try => ApplyMode::Try,
    };
    pb::ApplyConfigurationRequest {
        data,
        mode: mode as i32,
        dry_run: a.dry_run,
        try_timeout_millis: a.timeout.as_millis() as i64,
    }
}

fn print_apply(resp: pb::ApplyConfigurationResponse, errors: &mut NodeErrors) {
    for m in resp.messages {
        if !errors.check(m.metadata.as_ref()) {
            continue;
        }
        for w in &m.warnings {
            eprintln!("warning: {}: {w}", node_name(m.metadata.as_ref()));
        }
        println!(
            "{}: applied configuration ({}): {}",
            node_name(m.metadata.as_ref()),
            m.mode(),
            m.summary
        );
    }
}

/// `apply-config --insecure`: straight to each node in maintenance mode.
pub(super) async fn apply_insecure(a: &ApplyArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let nodes: Vec<String> = global
        .nodes
        .iter()
        .flat_map(|n| n.split(','))
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    if nodes.is_empty() {
        bail!(
            "apply-config --insecure needs the nodes to configure: pass -n NODE (the node's address)"
        );
    }
    let data = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut errors = NodeErrors::default();
    for node in nodes {
        let ch = kiln_os_api::client::connect_insecure(&node).await?;
        let mut client = kiln_os_api::client::machine_client(ch);
        match client
            .apply_configuration(tonic::Request::new(apply_request(a, data.clone())))
            .await
        {
            Ok(resp) => {
                let mut resp = resp.into_inner();
                for m in &mut resp.messages {
                    if let Some(md) = m.metadata.as_mut() {
                        md.hostname = node.clone();
                    }
                }
                print_apply(resp, &mut errors);
            }
            Err(s) => {
                errors.check(Some(&pb::Metadata {
                    hostname: node.clone(),
                    error: status_error(s).to_string(),
                }));
            }
        }
    }
    errors.finish()
}

/// `kubeconfig PATH`: an admin kubeconfig from one node, written private.
pub(super) async fn kubeconfig(
    api: &mut Api,
    errors: &mut NodeErrors,
    path: PathBuf,
    force: bool,
) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    let node = api.single_node("kubeconfig")?;
    let resp = api
        .client
        .generate_kubeconfig(api.request_to(&node, pb::Empty {}))
        .await
        .map_err(status_error)?
        .into_inner();
    let k = resp.messages.into_iter().next().context("empty answer")?;
    if !errors.check(k.metadata.as_ref()) {
        // `run` reports the node's error.
        return Ok(());
    }
    kiln_config::client::write_private(&path, &k.data)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("kubeconfig written to {}", path.display());
    Ok(())
}
