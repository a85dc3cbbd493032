//! Benchmark (not a test): the wall time of the built-in scenario suite run with `--jobs 1`
//! and with `--jobs 4`, in one run, on the process provisioner.
//!
//! ```text
//! cargo build -p kiln && cargo run -p scenarios --example scenario-bench
//! KILN_BENCH_SCENARIOS=node-reboot,maintenance-mode-apply cargo run -p scenarios --example scenario-bench
//! ```
//!
//! Each trial is a real cluster on its own free network (as `kiln scenario run --jobs N`);
//! clusters are named `scen-bench-<scenario>`. The kiln binary is `$KILN_BIN`, else the one
//! beside this example's profile directory.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::path::PathBuf;
use std::time::Instant;

use kiln_scenarios::runner::{self, Outcome, RunOptions};

fn main() {
    if std::env::var_os("KILN_BIN").is_none() {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/examples/scenario-bench: the binary is target/<profile>/kiln.
        let bin = exe.parent().and_then(|p| p.parent()).unwrap().join("kiln");
        assert!(
            bin.exists(),
            "{} is missing: cargo build -p kiln first",
            bin.display()
        );
        #[allow(unsafe_code)]
        // SAFETY: at the start of main, before any thread is started.
        unsafe {
            std::env::set_var("KILN_BIN", bin);
        }
    }
    let mut scenarios = kiln_scenarios::catalog();
    if let Ok(only) = std::env::var("KILN_BENCH_SCENARIOS") {
        let only: Vec<&str> = only.split(',').collect();
        scenarios.retain(|s| only.contains(&s.name.as_str()));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();
    for jobs in [1usize, 4] {
        let state = tempfile::Builder::new()
            .prefix("kiln-scenario-bench")
            .tempdir()
            .unwrap();
        let artifacts: PathBuf = state.path().join("artifacts");
        let mut opts = RunOptions::new("process", state.path().to_owned(), artifacts);
        opts.name_prefix = "scen-bench-".into();
        opts.verbose = false;
        let started = Instant::now();
        let reports = rt.block_on(runner::run_many(
            &scenarios,
            &["process".to_owned()],
            &opts,
            jobs,
        ));
        let wall = started.elapsed();
        let sum: f64 = reports.iter().map(|r| r.duration.as_secs_f64()).sum();
        let passed = reports
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Passed))
            .count();
        let skipped = reports
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Skipped(_)))
            .count();
        for r in &reports {
            if let Some(m) = r.failure_message() {
                eprintln!("--jobs {jobs}: {m}");
            }
        }
        println!(
            "--jobs {jobs}: {} scenarios, {passed} passed, {skipped} skipped, wall {:.1}s (sum of scenario times {sum:.1}s)",
            reports.len(),
            wall.as_secs_f64()
        );
        rows.push((jobs, wall.as_secs_f64()));
    }
    if let [(_, one), (_, four)] = rows[..] {
        println!("speed-up of --jobs 4 over --jobs 1: {:.2}x", one / four);
    }
}
