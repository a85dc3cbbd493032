//! Destroying a cluster, written once for every provisioner: the objects tools attached to it
//! ([`crate::state::Attachment`]), the provisioner's nodes and network (by the names in the
//! state and the cluster's owner mark), the helpers recorded in `state.yaml` (by pid file and
//! start time), the firewall rules the cluster recorded,
//! the state directory and the cluster's context in the client config. Idempotent, and it works
//! after a create that was killed halfway. It removes nothing it did not make.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_config::ClientConfig;

use crate::daemon;
use crate::progress::Progress;
use crate::provision::{self, ProvisionError};
use crate::state::{ClusterState, NetworkMode, StateDir, StateError};

/// Why a cluster could not be destroyed.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    /// The state file is unreadable; nothing was removed.
    #[error(
        "{0}; pass --force to stop the helpers whose pid files are there and remove the directory"
    )]
    Unreadable(#[source] StateError),
    /// The cluster's network was made by root and this user cannot remove it.
    #[error(
        "cluster {name} was created by root (bridge {bridge}, network namespaces, firewall rules): run destroy as root; nothing was removed, so its state still names every object"
    )]
    NeedsRoot {
        /// The cluster.
        name: String,
        /// Its bridge.
        bridge: String,
    },
    /// The provisioner failed to remove its part.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A firewall rule could not be removed.
    #[error("removing firewall rule `{rule}`: {source}")]
    Firewall {
        /// The rule.
        rule: String,
        /// Why.
        source: crate::firewall::FirewallError,
    },
    /// The state directory could not be removed.
    #[error("removing {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What `destroy` found.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// There was no such cluster.
    Absent,
    /// It was destroyed.
    Destroyed(Option<Box<ClusterState>>),
}

/// Destroys the cluster whose state is in `dir`. With `force`, a state file that cannot be
/// read does not stop it: the helpers found by pid file are stopped and the directory removed.
pub async fn destroy(
    dir: &StateDir,
    force: bool,
    progress: &Progress,
) -> Result<Outcome, DestroyError> {
    let state = match dir.load() {
        Ok(s) => Some(s),
        Err(StateError::NotFound { .. }) if !dir.dir.exists() => return Ok(Outcome::Absent),
        Err(StateError::NotFound { .. }) => None,
        Err(e) if !force => return Err(DestroyError::Unreadable(e)),
        Err(_) => None,
    };
    if let Some(s) = &state
        && s.network.mode == NetworkMode::Bridge
        && !nix::unistd::Uid::effective().is_root()
    {
        return Err(DestroyError::NeedsRoot {
            name: s.name.clone(),
            bridge: s.network.bridge.clone().unwrap_or_default(),
        });
    }
    match dir.attachments() {
        Ok(attached) => remove_attached(dir, &attached, progress).await,
        Err(e) if !force => return Err(DestroyError::Unreadable(e)),
        Err(_) => {}
    }
    if let Some(s) = &state {
        let provisioner = provision::by_name(&s.provisioner)?;
        provisioner.destroy(dir, s, progress).await?;
        progress.phase("stopping helpers");
        std::thread::scope(|scope| {
            for h in &s.helpers {
                scope
                    .spawn(|| daemon::stop_pidfile(&dir.pidfile(&h.name), Duration::from_secs(10)));
            }
        });
        if !s.network.firewall.is_empty() {
            progress.phase("removing host firewall rules");
            for rule in &s.network.firewall {
                crate::firewall::remove(&crate::firewall::HostRunner, rule).map_err(|source| {
                    DestroyError::Firewall {
                        rule: rule.to_string(),
                        source,
                    }
                })?;
            }
        }
    } else {
        // No readable state: only what pid files name, by identity.
        progress.phase("stopping helpers found by pid file");
        if let Ok(entries) = std::fs::read_dir(&dir.dir) {
            for p in entries.filter_map(Result::ok).map(|e| e.path()) {
                if p.extension().is_some_and(|e| e == "pid") {
                    daemon::stop_pidfile(&p, Duration::from_secs(10));
                }
            }
        }
    }
    let _ = std::fs::remove_file(dir.socket(crate::lb_helper::NAME));
    progress.phase(format!("removing state directory {}", dir.dir.display()));
    match std::fs::remove_dir_all(&dir.dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DestroyError::Io {
            path: dir.dir.clone(),
            source: e,
        }),
        _ => Ok(Outcome::Destroyed(state.map(Box::new))),
    }
}

/// Removes what tools attached to the cluster (see [`crate::state::Attachment`]): stops the
/// processes of their pid files, then deletes their links (those with the cluster's owner
/// mark) and namespaces. Best effort, like the rest of a destroy of what is already gone.
async fn remove_attached(
    dir: &StateDir,
    attached: &[(String, crate::state::Attachment)],
    progress: &Progress,
) {
    for (name, a) in attached {
        progress.phase(format!("removing what {name} attached to the cluster"));
        let pidfiles: Vec<PathBuf> = a.pid_dirs.iter().flat_map(|d| pidfiles_under(d)).collect();
        std::thread::scope(|scope| {
            for p in &pidfiles {
                scope.spawn(|| daemon::stop_pidfile(p, Duration::from_secs(10)));
            }
        });
        if !a.links.is_empty()
            && let Ok(handle) = crate::network::netlink::connect()
        {
            let mark = dir.owner_mark();
            for link in &a.links {
                let _ = crate::network::netlink::delete_marked_link(&handle, link, &mark).await;
            }
        }
        for ns in &a.netns {
            let _ = crate::network::netlink::delete_netns(ns).await;
        }
        dir.detach(name);
    }
}

/// The `*.pid` files under `dir`, at any depth (symbolic links are not followed).
fn pidfiles_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() && path.extension().is_some_and(|x| x == "pid") => {
                    found.push(path);
                }
                _ => {}
            }
        }
    }
    found
}

/// Removes the context of the destroyed cluster `state` from the client config at `path`: the
/// context with the cluster's name whose endpoints are the cluster's gateway (a context of the
/// same name for another cluster stays). Returns the removed context's name.
pub fn remove_context(
    path: &Path,
    state: &ClusterState,
) -> Result<Option<String>, kiln_config::client::ClientConfigError> {
    if !path.exists() {
        return Ok(None);
    }
    let mut cfg = ClientConfig::load(path)?;
    let gateway = state.network.gateway.to_string();
    let ours = cfg.contexts.get(&state.name).is_some_and(|c| {
        c.endpoints
            .iter()
            .any(|e| e == &gateway || e.starts_with(&format!("{gateway}:")))
    });
    if !ours {
        return Ok(None);
    }
    cfg.contexts.remove(&state.name);
    if cfg.context.as_deref() == Some(state.name.as_str()) {
        cfg.context = None;
    }
    cfg.save(path)?;
    Ok(Some(state.name.clone()))
}
