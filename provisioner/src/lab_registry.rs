//! The lab's registry mirror as a helper on the gateway (`kiln registry serve`, pid file
//! `registry-mirror.pid`, log `registry-mirror.log`, storage `registry/` in the state
//! directory), and the `machine.registries.mirrors` patch that points every node at mirrors
//! (`cluster create --registry-mirror HOST=URL`, `--with-registry`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use kiln_config::Patch;
use kiln_config::types::{RegistriesConfig, RegistryMirror};

use crate::daemon;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, StateDir};

/// The helper's name (`registry-mirror.pid`, `registry-mirror.log`).
pub const NAME: &str = "registry-mirror";
/// The registry's port on the gateway.
pub const PORT: u16 = 5000;

/// One `--registry-mirror HOST=URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSpec {
    /// The registry host the nodes name (`docker.io`, `ghcr.io`, `*` for every host).
    pub host: String,
    /// Where they pull it from instead.
    pub endpoint: String,
}

/// A `--registry-mirror` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "--registry-mirror {spec:?}: {problem}; write it as HOST=URL, e.g. docker.io=http://10.5.0.1:5000"
)]
pub struct MirrorSpecError {
    /// The value.
    pub spec: String,
    /// What is wrong.
    pub problem: &'static str,
}

impl std::str::FromStr for MirrorSpec {
    type Err = MirrorSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |problem| MirrorSpecError {
            spec: spec.to_owned(),
            problem,
        };
        let (host, endpoint) = spec.split_once('=').ok_or_else(|| err("no '='"))?;
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(err("the host is empty or not a registry host name"));
        }
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            || endpoint.len() <= "https://".len()
        {
            return Err(err("the mirror is not an http:// or https:// URL"));
        }
        Ok(Self {
            host: host.to_owned(),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
        })
    }
}

/// The lab registry's URL for `state`'s nodes: `http://<gateway>:5000`.
pub fn url(state: &ClusterState) -> String {
    format!("http://{}", SocketAddr::new(state.network.gateway, PORT))
}

/// The patch that writes `mirrors` into `machine.registries.mirrors` (endpoints of a host
/// repeated in the order given), or `None` when there are none.
pub fn mirrors_patch(mirrors: &[MirrorSpec]) -> Option<Patch> {
    if mirrors.is_empty() {
        return None;
    }
    let mut by_host: BTreeMap<String, RegistryMirror> = BTreeMap::new();
    for m in mirrors {
        let e = by_host.entry(m.host.clone()).or_default();
        if !e.endpoints.contains(&m.endpoint) {
            e.endpoints.push(m.endpoint.clone());
        }
    }
    let registries = RegistriesConfig {
        mirrors: by_host,
        config: BTreeMap::new(),
    };
    // Only `machine.registries`: a strategic merge leaves the rest of the document alone.
    let mut machine = serde_yaml::Mapping::new();
    machine.insert(
        "registries".into(),
        serde_yaml::to_value(&registries).unwrap_or_default(),
    );
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("machine".into(), serde_yaml::Value::Mapping(machine));
    let text = serde_yaml::to_string(&doc).unwrap_or_default();
    // The text comes from the config types themselves, so it parses.
    Patch::parse(&text, "--registry-mirror").ok()
}

/// Starts the lab registry on the gateway (storage in `<state>/registry`), records it as a
/// helper and waits until it accepts connections.
pub fn start(dir: &StateDir, state: &mut ClusterState, progress: &Progress) -> anyhow::Result<()> {
    let addr = SocketAddr::new(state.network.gateway, PORT);
    state.helpers.push(HelperState {
        name: NAME.to_owned(),
        kind: "registry-mirror".to_owned(),
    });
    dir.save(state)?;
    let args: Vec<String> = vec![
        // Info level: the request log (pushed, hit or upstream for every request).
        "-v".into(),
        "registry".into(),
        "serve".into(),
        "--addr".into(),
        addr.to_string(),
        "--root".into(),
        dir.dir.join("registry").display().to_string(),
    ];
    let id = daemon::spawn_in(
        state.network.lab_netns.as_deref(),
        &args,
        &dir.log(NAME),
        &dir.pidfile(NAME),
    )?;
    daemon::wait_listening(id, &[addr], &dir.log(NAME), Duration::from_secs(30))?;
    progress.note(format!("registry mirror on {}", url(state)));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mirror_specs_parse_and_explain_mistakes() {
        let m: MirrorSpec = "docker.io=http://10.5.0.1:5000/".parse().unwrap();
        assert_eq!(m.host, "docker.io");
        assert_eq!(m.endpoint, "http://10.5.0.1:5000");
        for bad in [
            "docker.io",
            "=http://x",
            "docker.io=10.5.0.1:5000",
            "a/b=http://x",
        ] {
            let e = bad.parse::<MirrorSpec>().unwrap_err().to_string();
            assert!(e.contains("HOST=URL"), "{e}");
        }
    }

    #[test]
    fn mirrors_patch_groups_endpoints_by_host_and_validates() {
        let specs: Vec<MirrorSpec> = [
            "docker.io=http://10.5.0.1:5000",
            "ghcr.io=http://10.5.0.1:5000",
            "docker.io=https://mirror.example:443",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let patch = mirrors_patch(&specs).unwrap();
        let secrets = kiln_pki::SecretsBundle::generate().unwrap();
        let generated = kiln_config::generate(&kiln_config::GenerateInput {
            cluster_name: "gap",
            endpoint: "https://10.5.0.1:6443",
            secrets: &secrets,
            install_disk: kiln_config::generate::DEFAULT_INSTALL_DISK,
            install_image: kiln_config::generate::DEFAULT_INSTALLER_IMAGE,
            patches: &[patch],
            control_plane_patches: &[],
            worker_patches: &[],
        })
        .unwrap();
        for cfg in [&generated.controlplane, &generated.worker] {
            let reg = cfg.machine.registries.as_ref().unwrap();
            assert_eq!(
                reg.mirrors["docker.io"].endpoints,
                ["http://10.5.0.1:5000", "https://mirror.example:443"]
            );
            assert_eq!(reg.mirrors["ghcr.io"].endpoints, ["http://10.5.0.1:5000"]);
        }
        assert!(mirrors_patch(&[]).is_none());
    }
}
