//! `kiln validate`: parse and check a machine configuration document for a platform mode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use kiln_config::{Mode, Problem};
use serde::Serialize;

use kiln_provisioner::output::{self, OutputFormat};

/// `kiln validate --config FILE`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The document to check.
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// Platform the document is for: metal, container or process.
    #[arg(short, long, default_value = "metal")]
    mode: Mode,
    /// Treat warnings as errors.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    strict: bool,
    /// Output format of the report.
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

#[derive(Serialize)]
struct ProblemOut {
    path: String,
    message: String,
    fix: String,
}

impl From<&Problem> for ProblemOut {
    fn from(p: &Problem) -> Self {
        Self {
            path: p.path.clone(),
            message: p.message.clone(),
            fix: p.fix.clone(),
        }
    }
}

#[derive(Serialize)]
struct ReportOut {
    file: String,
    mode: String,
    valid: bool,
    errors: Vec<ProblemOut>,
    warnings: Vec<ProblemOut>,
}

pub(super) fn run(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config =
        kiln_config::from_yaml(&text).with_context(|| format!("{}", args.config.display()))?;
    let report = kiln_config::validate(&config, args.mode);
    let valid = report.is_ok(args.strict);
    let out = ReportOut {
        file: args.config.display().to_string(),
        mode: args.mode.to_string(),
        valid,
        errors: report.errors.iter().map(ProblemOut::from).collect(),
        warnings: report.warnings.iter().map(ProblemOut::from).collect(),
    };
    if args.output == OutputFormat::Table {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        if valid {
            println!("{} is valid for {} mode", out.file, out.mode);
        } else {
            let warn = if args.strict && !report.warnings.is_empty() {
                " (warnings count as errors with --strict)"
            } else {
                ""
            };
            eprintln!("{} is not valid for {} mode{warn}", out.file, out.mode);
        }
    } else {
        output::print(args.output, &out, |_| String::new())?;
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
