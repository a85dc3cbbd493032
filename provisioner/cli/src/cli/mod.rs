//! The `kiln` command line: global flags and one module per command group.

mod airgap;
mod cluster;
mod completion;
mod config;
mod connect;
mod debug;
mod dhcpd;
mod generate;
mod image;
mod image_cache;
mod lb;
mod machine;
mod registry;
mod scenario;
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
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Client config with the contexts (default: ~/.kiln/config).
    #[arg(long, global = true, env = "KILNCONFIG", value_name = "PATH")]
    pub kilnconfig: Option<PathBuf>,
    /// Context to use instead of the current one.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Nodes to run the command on (comma-separated or repeated); default: the context's.
    #[arg(short, long, global = true, value_name = "NODES")]
    pub nodes: Vec<String>,
    /// Endpoints to connect to (comma-separated or repeated); default: the context's.
    #[arg(short, long, global = true, value_name = "ENDPOINTS")]
    pub endpoints: Vec<String>,
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

/// Parses `90s`, `5m`, `1h` (or plain seconds).
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: write e.g. 90s or 5m"))?;
    Ok(std::time::Duration::from_secs(match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m or h")),
    }))
}

fn block_on(
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(fut).map(|()| ExitCode::SUCCESS)
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
    /// Create, destroy, show and power local clusters.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Check that a cluster is healthy.
    Health(cluster::HealthArgs),
    /// List and run scenarios (faults, operations and assertions on a real cluster).
    #[command(subcommand)]
    Scenario(scenario::ScenarioCommand),
    /// Commands that act on nodes through the OS API.
    #[command(flatten)]
    Machine(machine::MachineCommand),
    /// Run machined (the node launcher starts process nodes this way).
    #[command(hide = true)]
    Machined(kiln_machined::entry::Args),
    /// Run or query the lab's load balancer (`kiln cluster create` starts it on the gateway).
    #[command(subcommand, hide = true)]
    Lb(lb::LbCommand),
    /// Run the lab's DHCP server (`kiln cluster create` starts it on the bridge) or list its
    /// leases.
    #[command(subcommand, hide = true)]
    Dhcpd(dhcpd::DhcpdCommand),
    /// Run the OCI registry and pull-through mirror; move image archives in and out.
    #[command(subcommand)]
    Registry(registry::RegistryCommand),
    /// Build Kiln OS images (kernel, initramfs, disk, installer) and list them.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Print a cluster's egress audit; run the lab DNS and egress proxy helpers.
    #[command(subcommand)]
    Airgap(airgap::AirgapCommand),
    /// Tools for testing the lab (`air-gapped`: proxy, HTTPS server and config patch).
    #[command(subcommand, hide = true)]
    Debug(debug::DebugCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Gen(cmd) => generate::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Validate(args) => validate::run(&args),
        Command::Config(cmd) => config::run(cmd, &cli.global).map(|()| ExitCode::SUCCESS),
        Command::Completion(args) => completion::completion(&args).map(|()| ExitCode::SUCCESS),
        Command::Docs(cmd) => completion::docs(cmd).map(|()| ExitCode::SUCCESS),
        Command::Cluster(cmd) => block_on(cluster::run(cmd, &cli.global)),
        Command::Health(args) => block_on(cluster::health(args, &cli.global)),
        Command::Scenario(cmd) => block_on(scenario::run(cmd)),
        Command::Machined(args) => Ok(ExitCode::from(
            u8::try_from(kiln_machined::entry::run(args)).unwrap_or(1),
        )),
        Command::Lb(cmd) => lb::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Dhcpd(cmd) => dhcpd::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Machine(cmd) => block_on(machine::run(cmd, &cli.global)),
        Command::Registry(cmd) => registry::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Image(cmd) => image::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Airgap(cmd) => airgap::run(cmd),
        Command::Debug(cmd) => debug::run(cmd).map(|()| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn command_definitions_are_consistent() {
        super::Cli::command().debug_assert();
    }

    /// The guides write boolean flags as `--flag`, `--flag=true` and `--flag=false`: every
    /// boolean flag of every command accepts all three (clap's SetTrue/SetFalse take no value).
    #[test]
    fn every_boolean_flag_takes_an_optional_value() {
        fn walk(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if matches!(
                    arg.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
                ) {
                    bad.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), bad);
            }
        }
        let mut bad = Vec::new();
        walk(&super::Cli::command(), "kiln", &mut bad);
        assert!(bad.is_empty(), "flags that refuse --flag=false: {bad:?}");
    }

    #[test]
    fn the_guides_reset_spelling_parses() {
        use clap::Parser as _;
        for line in [
            "kiln -n 10.5.0.2 reset --graceful=false --reboot --system-labels-to-wipe=EPHEMERAL",
            "kiln reset --graceful --reboot=true",
            "kiln cluster create --wait=false --with-debug",
            "kiln cluster destroy --force=false",
        ] {
            if let Err(e) = super::Cli::try_parse_from(line.split(' ')) {
                panic!("{line}: {e}");
            }
        }
    }
}
