//! TEMPORARY: replaced by the real load balancer integration before commit.

use crate::progress::Progress;
use crate::state::{ClusterState, StateDir};

/// Starts the load balancer helper.
pub fn start(
    _dir: &StateDir,
    _state: &mut ClusterState,
    progress: &Progress,
) -> anyhow::Result<()> {
    progress.note("load balancer pending");
    Ok(())
}

/// Reads its counters.
pub async fn status(_dir: &StateDir) -> anyhow::Result<serde_json::Value> {
    anyhow::bail!("no load balancer")
}

/// Renders counters.
pub fn table(_v: &serde_json::Value) -> String {
    String::new()
}
