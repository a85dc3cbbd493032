//! Waits that explain themselves: when a wait of `cluster create` (or `kiln health`) runs out,
//! name each node that is not ready, the boot stage it is in and its last event (read from its
//! console, which every provisioner keeps), whether it is powered, and a hint when the cause is
//! recognisable (bridge traffic dropped by the host firewall, etcd missing).

use std::path::Path;

use kiln_os_api::contract::ConsoleEvent;

use crate::firewall;
use crate::provision::{PowerState, Provisioner};
use crate::state::{ClusterState, NetworkMode, StateDir};

/// The last event machined printed on a console, if any.
pub fn last_event(console: &Path) -> Option<ConsoleEvent> {
    let text = std::fs::read_to_string(console).ok()?;
    text.lines().rev().find_map(ConsoleEvent::parse)
}

/// One line per node in `not_ready` (names), e.g. `worker-1: boot stage "network": waiting for
/// its API certificate from 10.5.0.2: connect timed out (12:00:03)`.
pub async fn nodes(
    dir: &StateDir,
    state: &ClusterState,
    provisioner: &dyn Provisioner,
    not_ready: &[String],
) -> Vec<String> {
    let mut out = Vec::new();
    for name in not_ready {
        let Some(node) = state.node(name) else {
            continue;
        };
        let power = match provisioner.status(dir, state, name).await {
            Ok(s) if s.power == PowerState::Running => String::new(),
            Ok(s) => format!(" (powered {})", s.power),
            Err(e) => format!(" (its power switch does not answer: {e})"),
        };
        let console = provisioner.console(dir, name);
        let what = match last_event(&console) {
            Some(e) => format!("{}: {}", e.stage, e.message),
            None => format!(
                "no boot event on its console yet (see {})",
                console.display()
            ),
        };
        out.push(format!("{} ({}): {what}{power}", node.name, node.address));
    }
    out
}

/// Hints for causes this machine shows.
pub fn hints(state: &ClusterState) -> Vec<String> {
    let mut out = Vec::new();
    if state.network.mode == NetworkMode::Bridge
        && state.network.firewall.is_empty()
        && firewall::drops_forwarded(&firewall::HostRunner)
    {
        out.push(format!(
            "hint: the host firewall drops forwarded traffic (FORWARD policy DROP, e.g. after Docker started) and the cluster has no rule for its bridge {}: recreate the cluster, or allow it with `iptables -I FORWARD -i {0} -o {0} -j ACCEPT`",
            state.network.bridge.clone().unwrap_or_default()
        ));
    }
    let etcd_present = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
    if !etcd_present {
        out.push(
            "hint: etcd is not installed on this machine, so control-plane nodes cannot start it: run scripts/install-deps (Debian etcd-server)"
                .to_owned(),
        );
    }
    out
}

/// The full explanation: nodes, then hints, one per line, indented.
pub async fn explain(
    dir: &StateDir,
    state: &ClusterState,
    provisioner: &dyn Provisioner,
    not_ready: &[String],
) -> String {
    let mut lines = nodes(dir, state, provisioner, not_ready).await;
    lines.extend(hints(state));
    lines.iter().map(|l| format!("\n  {l}")).collect::<String>()
}
