//! `kiln`: parse arguments, start logging, run, turn errors into an exit code.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = kiln::cli::Cli::parse();
    // machined sets up its own logging (console buffer and stderr).
    if !matches!(cli.command, kiln::cli::Command::Machined(_)) {
        kiln::logging::init(cli.global.verbose);
    }
    match kiln::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
