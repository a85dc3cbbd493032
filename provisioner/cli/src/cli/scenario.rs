//! `kiln scenario list` and `kiln scenario run`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use kiln_scenarios::runner::{self, Outcome, RunOptions};
use serde::Serialize;

use kiln_provisioner::output::{self, OutputFormat};

/// `kiln scenario ...`.
#[derive(Debug, Subcommand)]
pub enum ScenarioCommand {
    /// List the built-in scenarios and their steps.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Run scenarios: create a cluster, run the steps, destroy it.
    Run {
        /// Scenario name (see `kiln scenario list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Run every scenario.
        #[arg(long)]
        all: bool,
        /// Provisioner.
        #[arg(long, default_value = "process")]
        provisioner: String,
        /// Write JUnit XML here.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Where crash dumps of failed scenarios go.
        #[arg(long, value_name = "DIR", default_value = "scenario-artifacts")]
        artifacts: PathBuf,
        /// Keep the cluster of a failed scenario for inspection.
        #[arg(long)]
        keep_on_failure: bool,
        /// Directory for the clusters' state (default ~/.kiln/clusters).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Network of the scenario clusters.
        #[arg(long, default_value = "10.120.0.0/24")]
        cidr: String,
    },
}

#[derive(Serialize)]
struct Listed {
    name: &'static str,
    description: &'static str,
    needs_root: bool,
    steps: Vec<String>,
}

/// Runs a scenario command.
pub async fn run(cmd: ScenarioCommand) -> anyhow::Result<()> {
    match cmd {
        ScenarioCommand::List { output } => {
            let list: Vec<Listed> = kiln_scenarios::catalog()
                .into_iter()
                .map(|s| Listed {
                    name: s.name,
                    description: s.description,
                    needs_root: s.needs_root(),
                    steps: s.steps.iter().map(kiln_scenarios::Step::describe).collect(),
                })
                .collect();
            output::print(output, &list, |l| {
                let rows: Vec<Vec<String>> = l
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.to_owned(),
                            s.steps.len().to_string(),
                            s.description.to_owned(),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "STEPS", "DESCRIPTION"], &rows)
            })
        }
        ScenarioCommand::Run {
            name,
            all,
            provisioner,
            junit,
            artifacts,
            keep_on_failure,
            state,
            cidr,
        } => {
            let scenarios = if all {
                kiln_scenarios::catalog()
            } else {
                let name = name.unwrap_or_default();
                match kiln_scenarios::find(&name) {
                    Some(s) => vec![s],
                    None => bail!(
                        "unknown scenario {name:?}; scenarios: {}",
                        kiln_scenarios::catalog()
                            .iter()
                            .map(|s| s.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            };
            let opts = RunOptions {
                provisioner,
                artifacts,
                keep_on_failure,
                state_base: kiln_provisioner::provision::state_base(state)?,
                cidr,
                verbose: true,
            };
            let mut reports = Vec::new();
            for s in &scenarios {
                let report = runner::run(s, &opts).await;
                match &report.outcome {
                    Outcome::Passed => {
                        eprintln!("PASS {} ({:.1}s)", s.name, report.duration.as_secs_f64())
                    }
                    Outcome::Skipped(why) => eprintln!("SKIP {}: {why}", s.name),
                    Outcome::Failed { .. } => {
                        eprintln!("FAIL {}", report.failure_message().unwrap_or_default())
                    }
                }
                reports.push(report);
            }
            if let Some(path) = &junit {
                kiln_scenarios::junit::write(&reports, path)?;
                eprintln!("JUnit XML written to {}", path.display());
            }
            let failed = reports
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Failed { .. }))
                .count();
            if failed > 0 {
                bail!("{failed} of {} scenarios failed", reports.len());
            }
            Ok(())
        }
    }
}
