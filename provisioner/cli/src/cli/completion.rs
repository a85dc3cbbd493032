//! `kiln completion` and `kiln docs man`: shell completions and man pages, both generated from
//! the clap definitions so they never drift from the real flags.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Subcommand};

use super::Cli;

/// `kiln completion SHELL`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// Shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `kiln docs ...`.
#[derive(Debug, Subcommand)]
pub enum DocsCommand {
    /// Write a man page for kiln and every subcommand.
    Man {
        /// Directory to write `kiln.1`, `kiln-gen.1`, ... into.
        #[arg(short, long, default_value = "man")]
        output: PathBuf,
    },
}

pub(super) fn completion(args: &CompletionArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "kiln", &mut std::io::stdout());
    Ok(())
}

pub(super) fn docs(cmd: DocsCommand) -> anyhow::Result<()> {
    let DocsCommand::Man { output } = cmd;
    std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    let mut count = 0;
    write_man(&Cli::command(), "kiln", &output, &mut count)?;
    println!("wrote {count} man pages to {}", output.display());
    Ok(())
}

fn write_man(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    count: &mut usize,
) -> anyhow::Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let cmd = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    *count += 1;
    for sub in cmd.get_subcommands() {
        write_man(sub, &format!("{name}-{}", sub.get_name()), dir, count)?;
    }
    Ok(())
}
