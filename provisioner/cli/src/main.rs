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
            eprintln!("error: {}", message(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message already
/// carries (many errors print their source in their own text, and anyhow's `{:#}` would repeat
/// it).
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    /// An error that prints its source in its own text, as thiserror's `{source}` does.
    #[derive(Debug)]
    struct Outer {
        source: std::io::Error,
    }

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "--token: {}", self.source)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let err = anyhow::Error::new(Outer {
            source: std::io::Error::other("invalid token \"bad\""),
        })
        .context("importing /pki");
        assert_eq!(
            super::message(&err),
            "importing /pki: --token: invalid token \"bad\""
        );
        let plain = anyhow::anyhow!("root cause").context("outer");
        assert_eq!(super::message(&plain), "outer: root cause");
    }
}
