//! The `kiln` command line: global flags and one module per command group.

mod completion;
mod config;
mod generate;
mod registry;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// Kiln: a cluster lab and scenario harness with its own bundled OS.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Flags for every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Client config with the contexts (default: ~/.kiln/config).
    #[arg(long, global = true, env = "KILNCONFIG", value_name = "PATH")]
    pub kilnconfig: Option<PathBuf>,
    /// Context to use instead of the current one.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// More log output on stderr (-v info, -vv debug); KILN_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl GlobalArgs {
    /// The client config path: `--kilnconfig`, `$KILNCONFIG`, or `~/.kiln/config`.
    pub fn kilnconfig_path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.kilnconfig {
            return Ok(p.clone());
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .context("HOME is not set; pass --kilnconfig PATH to say where the client config is")?;
        Ok(PathBuf::from(home).join(".kiln").join("config"))
    }
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate secrets and machine configurations.
    #[command(subcommand)]
    Gen(generate::GenCommand),
    /// Check a machine configuration document.
    Validate(validate::ValidateArgs),
    /// Manage client contexts in the client config.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print a shell completion script.
    Completion(completion::CompletionArgs),
    /// Generate documentation (man pages) from the command definitions.
    #[command(subcommand)]
    Docs(completion::DocsCommand),
    /// Run the OCI registry and pull-through mirror; move image archives in and out.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Gen(cmd) => generate::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Validate(args) => validate::run(&args),
        Command::Config(cmd) => config::run(cmd, &cli.global).map(|()| ExitCode::SUCCESS),
        Command::Completion(args) => completion::completion(&args).map(|()| ExitCode::SUCCESS),
        Command::Docs(cmd) => completion::docs(cmd).map(|()| ExitCode::SUCCESS),
        Command::Registry(cmd) => registry::run(cmd).map(|()| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_definitions_are_consistent() {
        super::Cli::command().debug_assert();
    }
}
