//! `kiln config`: the contexts of the client config (`~/.kiln/config`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use kiln_config::ClientConfig;
use serde::Serialize;

use super::GlobalArgs;
use kiln_provisioner::output::{self, OutputFormat};

/// `kiln config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// List the contexts.
    Contexts {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Make NAME the current context.
    #[command(alias = "context")]
    UseContext {
        /// Context name.
        name: String,
    },
    /// Set the endpoints of the current context (or --context).
    #[command(alias = "endpoints")]
    Endpoint {
        /// Host or host:port to connect to; several for failover.
        #[arg(required = true)]
        endpoints: Vec<String>,
    },
    /// Set the default target nodes of the current context (or --context).
    #[command(alias = "nodes")]
    Node {
        /// Node addresses or names; none to clear.
        nodes: Vec<String>,
    },
    /// Merge the contexts of FILE (e.g. a generated kilnconfig) into the client config.
    Merge {
        /// Client config to merge from.
        file: PathBuf,
    },
    /// Remove a context.
    Remove {
        /// Context name.
        name: String,
    },
    /// Show the current context (or --context).
    Info {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Serialize)]
struct ContextRow {
    current: bool,
    name: String,
    endpoints: Vec<String>,
    nodes: Vec<String>,
}

pub(super) fn run(cmd: ConfigCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let path = global.kilnconfig_path()?;
    let mut cfg = ClientConfig::load(&path)?;
    let ctx_name = global.context.as_deref();
    match cmd {
        ConfigCommand::Contexts { output } => {
            let rows: Vec<ContextRow> = cfg
                .contexts
                .iter()
                .map(|(name, c)| ContextRow {
                    current: cfg.context.as_deref() == Some(name.as_str()),
                    name: name.clone(),
                    endpoints: c.endpoints.clone(),
                    nodes: c.nodes.clone(),
                })
                .collect();
            output::print(output, &rows, |rows| {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            if r.current { "*".into() } else { String::new() },
                            r.name.clone(),
                            r.endpoints.join(","),
                            r.nodes.join(","),
                        ]
                    })
                    .collect();
                output::table(&["CURRENT", "NAME", "ENDPOINTS", "NODES"], &cells)
            })?;
            return Ok(());
        }
        ConfigCommand::Info { output } => {
            let (name, c) = cfg.context(ctx_name, &path)?;
            let row = ContextRow {
                current: true,
                name: name.to_owned(),
                endpoints: c.endpoints.clone(),
                nodes: c.nodes.clone(),
            };
            output::print(output, &row, |r| {
                format!(
                    "context:   {}\nendpoints: {}\nnodes:     {}\n",
                    r.name,
                    r.endpoints.join(", "),
                    r.nodes.join(", ")
                )
            })?;
            return Ok(());
        }
        ConfigCommand::UseContext { name } => cfg.use_context(&name, &path)?,
        ConfigCommand::Endpoint { endpoints } => {
            cfg.context_mut(ctx_name, &path)?.endpoints = endpoints
        }
        ConfigCommand::Node { nodes } => cfg.context_mut(ctx_name, &path)?.nodes = nodes,
        ConfigCommand::Merge { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if text.trim().is_empty() {
                anyhow::bail!(
                    "{} is empty; give a client config such as the kilnconfig `kiln gen config` writes",
                    file.display()
                );
            }
            let other = ClientConfig::load(&file)?;
            for (from, to) in cfg.merge(&other) {
                if from == to {
                    println!("merged context {from:?}");
                } else {
                    println!("renamed context {from:?} to {to:?}: the name was taken");
                }
            }
        }
        ConfigCommand::Remove { name } => cfg.remove_context(&name, &path)?,
    }
    cfg.save(&path)
        .with_context(|| format!("saving {}", path.display()))
}
