//! Tracing set-up for the `kiln` binary: human-readable lines on stderr, filtered by
//! `KILN_LOG` (an `EnvFilter` directive) or by `-v` / `-vv`.

use tracing_subscriber::EnvFilter;

/// Starts logging; `verbose` counts `-v` flags.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
