//! Upgrade benchmark: runs the `upgrade-rolling` scenario (a 3+2 cluster created on release
//! N−1, every node upgraded to N with `--preserve`, one after another) on each provisioner
//! that is available here and prints the time of each node's upgrade (command to Running on
//! the new release) and of the whole rolling upgrade.
//!
//! ```sh
//! cargo build -p kiln -p kiln-machined
//! KILN_BIN=target/debug/kiln cargo run -p scenarios --example upgrade_bench [-- PROVISIONER...]
//! ```

use std::path::PathBuf;

use kiln_scenarios::runner::{self, Outcome, RunOptions};

fn main() -> anyhow::Result<()> {
    let mut provisioners: Vec<String> = std::env::args().skip(1).collect();
    if provisioners.is_empty() {
        provisioners = vec!["process".into(), "qemu".into(), "docker".into()];
    }
    let scenario = kiln_scenarios::catalog::find("upgrade-rolling")
        .ok_or_else(|| anyhow::anyhow!("the upgrade-rolling scenario is missing"))?;
    let rt = tokio::runtime::Runtime::new()?;
    let state = tempfile::Builder::new()
        .prefix("kiln-upgrade-bench")
        .tempdir()?;
    println!(
        "{:<10} {:>12} {:>14}  per node",
        "PROVISIONER", "ROLLING (s)", "CREATE (s)"
    );
    for p in provisioners {
        if let Some(why) = runner::unavailable(&scenario, &p) {
            println!("{p:<10} skipped: {why}");
            continue;
        }
        let mut opts = RunOptions::new(
            &p,
            state.path().to_owned(),
            PathBuf::from("target/scenario-artifacts"),
        );
        opts.cidr_from = 150;
        opts.verbose = false;
        let report = rt.block_on(runner::run(&scenario, &opts));
        if let Outcome::Failed { .. } = report.outcome {
            println!(
                "{p:<10} failed: {}",
                report.failure_message().unwrap_or_default()
            );
            continue;
        }
        let create = report
            .steps
            .first()
            .map_or(0.0, |s| s.duration.as_secs_f64());
        let rolling = report
            .steps
            .iter()
            .find(|s| s.description.starts_with("upgrade every node"))
            .ok_or_else(|| anyhow::anyhow!("no rolling upgrade step in the report"))?;
        // The step's detail lists each node's time: "rolling upgrade in Xs (controlplane-1 Ys, ...)".
        let per_node = rolling
            .detail
            .split_once('(')
            .map_or("", |(_, rest)| rest.trim_end_matches(')'));
        println!(
            "{p:<10} {:>12.1} {:>14.1}  {per_node}",
            rolling.duration.as_secs_f64(),
            create
        );
    }
    Ok(())
}
