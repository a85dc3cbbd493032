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
    /// Print a built-in scenario's file.
    Show {
        /// Scenario name.
        name: String,
    },
    /// Check scenario files and report every problem with its line and column; runs nothing.
    Validate {
        /// Scenario files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run scenarios: for each, create its cluster, run the steps, destroy it.
    Run {
        /// Scenario files, or names of built-in scenarios (see `kiln scenario list`).
        #[arg(required_unless_present_any = ["all", "dir"], conflicts_with = "all")]
        scenarios: Vec<String>,
        /// Also run every scenario file (*.yaml, *.yml) of this directory; repeatable.
        #[arg(long, value_name = "DIR")]
        dir: Vec<PathBuf>,
        /// Run every built-in scenario.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        all: bool,
        /// Provisioners, comma-separated: every scenario runs on each (a matrix).
        #[arg(long, value_delimiter = ',', default_value = "process")]
        provisioner: Vec<String>,
        /// Run this many scenarios at once, each on its own network.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Write JUnit XML here (trials named <provisioner>::<scenario>).
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Where crash dumps of failed scenarios go.
        #[arg(long, value_name = "DIR", default_value = "scenario-artifacts")]
        artifacts: PathBuf,
        /// Keep the cluster of a failed scenario for inspection.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
        keep_on_failure: bool,
        /// Directory for the clusters' state (default ~/.kiln/clusters).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Network of the scenario cluster (one scenario at a time); default: a free /24 from
        /// 10.120.0.0 on for each scenario.
        #[arg(long)]
        cidr: Option<String>,
        /// Put this before each scenario's name to name its cluster.
        #[arg(long, default_value = "")]
        name_prefix: String,
    },
}

#[derive(Serialize)]
struct Listed {
    name: String,
    description: String,
    cluster: String,
    needs_link_faults: bool,
    needs_pause: bool,
    needs_slots: bool,
    steps: Vec<String>,
}

/// Runs a scenario command.
pub async fn run(cmd: ScenarioCommand) -> anyhow::Result<()> {
    match cmd {
        ScenarioCommand::List { output } => {
            let list: Vec<Listed> = kiln_scenarios::catalog()
                .into_iter()
                .map(|s| Listed {
                    cluster: s.describe_cluster(),
                    name: s.name.clone(),
                    description: s.description.clone(),
                    needs_link_faults: s.needs_link_faults(),
                    needs_pause: s.needs_pause(),
                    needs_slots: s.needs_slots(),
                    steps: s.steps.iter().map(kiln_scenarios::Step::describe).collect(),
                })
                .collect();
            output::print(output, &list, |l| {
                let rows: Vec<Vec<String>> = l
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.steps.len().to_string(),
                            s.description.clone(),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "STEPS", "DESCRIPTION"], &rows)
            })
        }
        ScenarioCommand::Show { name } => {
            match kiln_scenarios::catalog::BUILTIN
                .iter()
                .find(|(file, _)| file.strip_suffix(".yaml") == Some(name.as_str()))
            {
                Some((_, text)) => {
                    print!("{text}");
                    Ok(())
                }
                None => bail!("unknown scenario {name:?}; scenarios: {}", builtin_names()),
            }
        }
        ScenarioCommand::Validate { files } => {
            let mut bad = 0;
            for f in &files {
                match kiln_scenarios::Scenario::load(f) {
                    Ok(s) => println!(
                        "{}: ok: {} ({}, {} steps)",
                        f.display(),
                        s.name,
                        s.describe_cluster(),
                        s.steps.len()
                    ),
                    Err(e) => {
                        bad += 1;
                        eprintln!("{e}");
                    }
                }
            }
            if bad > 0 {
                bail!(
                    "{bad} of {} scenario files are invalid; nothing was run",
                    files.len()
                );
            }
            Ok(())
        }
        ScenarioCommand::Run {
            scenarios: names,
            dir,
            all,
            provisioner,
            jobs,
            junit,
            artifacts,
            keep_on_failure,
            state,
            cidr,
            name_prefix,
        } => {
            let mut scenarios = if all {
                kiln_scenarios::catalog()
            } else {
                Vec::new()
            };
            let mut files = Vec::new();
            for n in names {
                let path = PathBuf::from(&n);
                if path.exists() || n.ends_with(".yaml") || n.ends_with(".yml") {
                    files.push(path);
                } else {
                    match kiln_scenarios::find(&n) {
                        Some(s) => scenarios.push(s),
                        None => bail!(
                            "{n:?} is neither a scenario file nor a built-in scenario; built-in: {}",
                            builtin_names()
                        ),
                    }
                }
            }
            match kiln_scenarios::file::load_all(&files, &dir) {
                Ok(found) => scenarios.extend(found),
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    bail!(
                        "{} scenario file(s) cannot be used; nothing was run",
                        errors.len()
                    );
                }
            }
            if cidr.is_some() && jobs > 1 && scenarios.len() * provisioner.len() > 1 {
                bail!(
                    "--cidr gives one network, but --jobs {jobs} runs scenarios side by side; drop --cidr to give each a free network"
                );
            }
            let mut opts = RunOptions::new(
                "process",
                kiln_provisioner::provision::state_base(state)?,
                artifacts,
            );
            opts.keep_on_failure = keep_on_failure;
            opts.cidr = cidr;
            opts.name_prefix = name_prefix;
            let started = std::time::Instant::now();
            let reports =
                runner::run_many(&scenarios, &provisioner, &opts, usize::from(jobs)).await;
            for report in &reports {
                let trial = format!("{}::{}", report.provisioner, report.scenario);
                match &report.outcome {
                    Outcome::Passed => {
                        eprintln!("PASS {trial} ({:.1}s)", report.duration.as_secs_f64())
                    }
                    Outcome::Skipped(why) => eprintln!("SKIP {trial}: {why}"),
                    Outcome::Failed { .. } => eprintln!(
                        "FAIL {trial}: {}",
                        report.failure_message().unwrap_or_default()
                    ),
                }
            }
            eprintln!(
                "{} trials in {:.1}s with --jobs {jobs}",
                reports.len(),
                started.elapsed().as_secs_f64()
            );
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

fn builtin_names() -> String {
    kiln_scenarios::catalog()
        .iter()
        .map(|s| s.name.clone())
        .collect::<Vec<_>>()
        .join(", ")
}
