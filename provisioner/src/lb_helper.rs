//! The cluster's load balancer as a helper process: `kiln lb run` on the gateway address,
//! fronting 6443 and the OS API port 50000 for the control-plane nodes, with its
//! configuration (`lb.yaml`), pid file, log and control socket in the state directory.

use std::net::SocketAddr;

use anyhow::Context as _;
use kiln_lb::{Config, FrontendConfig, Snapshot};
use kiln_os_api::contract::API_PORT;

use crate::daemon;
use crate::output;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, StateDir};

/// The helper's name (`lb.pid`, `lb.log`, `lb.sock`).
pub const NAME: &str = "lb";
/// The Kubernetes API port fronted for the control plane.
pub const K8S_PORT: u16 = 6443;

/// The load balancer configuration of a cluster.
pub fn config(state: &ClusterState) -> Config {
    let cps: Vec<std::net::IpAddr> = state.control_plane().map(|n| n.address).collect();
    let frontend = |name: &str, port: u16| FrontendConfig {
        name: name.to_owned(),
        listen: SocketAddr::new(state.network.gateway, port),
        upstreams: cps.iter().map(|a| SocketAddr::new(*a, port)).collect(),
    };
    let mut config = Config::new(vec![
        frontend("k8s", K8S_PORT),
        frontend("os-api", API_PORT),
    ]);
    // Quick to notice a node that went away; the passive check catches the rest.
    config.health.interval_ms = 1000;
    config.health.timeout_ms = 500;
    config.health.rise = 2;
    config.health.fall = 2;
    config
}

/// Starts the load balancer for `state` and records it as a helper.
pub fn start(dir: &StateDir, state: &mut ClusterState, progress: &Progress) -> anyhow::Result<()> {
    let path = dir.dir.join("lb.yaml");
    let config = config(state);
    kiln_config::client::write_private(&path, config.to_yaml().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    state.helpers.push(HelperState {
        name: NAME.to_owned(),
        kind: "load-balancer".to_owned(),
    });
    dir.save(state)?;
    let args: Vec<String> = vec![
        "lb".into(),
        "run".into(),
        "--config".into(),
        path.display().to_string(),
        "--control-socket".into(),
        dir.socket(NAME).display().to_string(),
    ];
    daemon::spawn_in(
        state.network.lab_netns.as_deref(),
        &args,
        &dir.log(NAME),
        &dir.pidfile(NAME),
    )?;
    let listens: Vec<String> = config
        .frontends
        .iter()
        .map(|f| f.listen.to_string())
        .collect();
    progress.note(format!(
        "listening on {} for {} control-plane nodes",
        listens.join(" and "),
        config.frontends[0].upstreams.len()
    ));
    Ok(())
}

/// The load balancer's counters.
pub async fn status(dir: &StateDir) -> anyhow::Result<Snapshot> {
    Ok(kiln_lb::control::status(&dir.socket(NAME)).await?)
}

/// Renders load balancer counters (`kiln cluster show`, `kiln lb status`).
pub fn table(s: &Snapshot) -> String {
    let rows: Vec<Vec<String>> = s
        .frontends
        .iter()
        .flat_map(|f| {
            let head = vec![
                f.name.clone(),
                f.listen.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("{}/{}", f.connections_active, f.connections_total),
                "-".into(),
                "-".into(),
                f.connections_failed.to_string(),
            ];
            std::iter::once(head).chain(f.upstreams.iter().map(|u| {
                vec![
                    String::new(),
                    String::new(),
                    u.address.to_string(),
                    u.health.to_string(),
                    u.last_check_latency_us
                        .map_or_else(|| "-".into(), |us| format!("{:.2}ms", us as f64 / 1000.0)),
                    format!("{}/{}", u.connections_active, u.connections_total),
                    u.bytes_to_upstream.to_string(),
                    u.bytes_from_upstream.to_string(),
                    format!("{}/{}", u.connect_failures, u.check_failures),
                ]
            }))
        })
        .collect();
    output::table(
        &[
            "FRONTEND",
            "LISTEN",
            "UPSTREAM",
            "HEALTH",
            "LATENCY",
            "CONNS",
            "BYTES-TO",
            "BYTES-FROM",
            "FAILURES",
        ],
        &rows,
    )
}
