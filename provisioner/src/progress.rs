//! Phase-by-phase progress: a spinner per phase on a terminal, plain lines otherwise (CI logs).

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Prints the phases of a long operation.
#[derive(Debug)]
pub struct Progress {
    tty: bool,
    current: Mutex<Option<(ProgressBar, String)>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A spinner on a terminal, plain lines otherwise.
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            current: Mutex::new(None),
        }
    }

    /// Plain lines only (tests, nested use).
    pub fn plain() -> Self {
        Self {
            tty: false,
            current: Mutex::new(None),
        }
    }

    /// Starts a phase (ending the previous one as done).
    pub fn phase(&self, message: impl Into<String>) {
        let message = message.into();
        self.finish_current(true);
        if self.tty {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message(message.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((bar, message));
        } else {
            eprintln!("{message}");
        }
    }

    /// A line under the current phase.
    pub fn note(&self, message: impl AsRef<str>) {
        match self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some((bar, _)) => bar.println(format!("  {}", message.as_ref())),
            None => eprintln!("  {}", message.as_ref()),
        }
    }

    fn finish_current(&self, ok: bool) {
        if let Some((bar, msg)) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            bar.finish_and_clear();
            eprintln!("{} {msg}", if ok { "✓" } else { "✗" });
        }
    }

    /// Ends the last phase as done.
    pub fn done(&self) {
        self.finish_current(true);
    }

    /// Ends the last phase as failed.
    pub fn failed(&self) {
        self.finish_current(false);
    }
}
