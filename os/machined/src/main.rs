//! `machined`: the init of Kiln OS as its own binary (images run it as PID 1 or entrypoint).

use clap::Parser;

/// The init of Kiln OS.
#[derive(Debug, Parser)]
#[command(name = "machined", version)]
struct Cli {
    #[command(flatten)]
    args: kiln_machined::entry::Args,
}

fn main() {
    let cli = Cli::parse();
    std::process::exit(kiln_machined::entry::run(cli.args));
}
