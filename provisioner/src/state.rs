//! A cluster's state directory (`~/.kiln/clusters/<name>/`): `state.yaml` with everything
//! `destroy` needs to undo a create (written before each object is created, so a create killed
//! halfway leaves enough to clean up), per node `<node>.log` (its console), `<node>.pid`,
//! `<node>.sock` and `<node>/` (its volumes), per helper `<helper>.pid` and `<helper>.log`,
//! and `attached/<name>.yaml` for objects a tool outside the lab keeps beside the cluster
//! ([`Attachment`]).
//!
//! Everything the cluster owns is found by identity from here: processes by pid file (pid and
//! start time, [`crate::daemon`]), links and namespaces by the names in `state.yaml` and the
//! [`StateDir::owner_mark`] they carry; never by a substring of a path or a name prefix.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kiln_config::MachineType;
use serde::{Deserialize, Serialize};

/// How nodes are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// As root: a bridge, one network namespace and veth pair per node.
    Bridge,
    /// Without root: every node on its own 127.x address.
    Loopback,
}

/// The cluster network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkState {
    /// Bridge or loopback.
    pub mode: NetworkMode,
    /// The CIDR asked for.
    pub cidr: String,
    /// The gateway (load balancer) address.
    pub gateway: IpAddr,
    /// The Linux bridge the lab made for the cluster (bridge mode), marked as the cluster's
    /// with an interface alias ([`StateDir::owner_mark`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// MTU.
    pub mtu: u32,
    /// Rules the lab added to the host firewall so the bridge's traffic passes; `destroy`
    /// removes exactly these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firewall: Vec<crate::firewall::Rule>,
    /// Air-gapped (`cluster create --airgapped`): nodes get no default route, only the cluster
    /// network; names and egress go through the lab DNS and proxy on the gateway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub airgapped: bool,
    /// The network namespace (`/var/run/netns/<name>`) the lab's helpers run in, when the host
    /// is not on the cluster network: a Docker Swarm cluster's gateway container. Absent: the
    /// host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab_netns: Option<String>,
}

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    /// Node name (also its host name).
    pub name: String,
    /// Control plane or worker: the configuration's machine type.
    pub role: MachineType,
    /// Its address.
    pub address: IpAddr,
    /// Its machine configuration file.
    pub config: PathBuf,
    /// Whether the node boots with it (else it waits in maintenance mode).
    #[serde(default = "yes")]
    pub inject_config: bool,
    /// What the provisioner made for this node, under the provisioner's name (for `process`:
    /// the network namespace and the host side of the veth pair). Only the provisioner reads it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provider: BTreeMap<String, serde_yaml::Value>,
    /// CPUs and memory from the cluster file's group of this node, over the provisioner's
    /// defaults and under the command line's `--cpus`/`--memory` (qemu and docker size the
    /// machine with them; a process node shares the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<crate::cluster_file::Resources>,
}

impl NodeState {
    /// Whether the node is a control-plane node.
    pub fn is_control_plane(&self) -> bool {
        self.role == MachineType::Controlplane
    }

    /// The provisioner's section `name` of this node, if present and readable.
    pub fn provider_state<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        self.provider
            .get(name)
            .and_then(|v| serde_yaml::from_value(v.clone()).ok())
    }

    /// Sets the provisioner's section `name` of this node.
    pub fn set_provider_state<T: Serialize>(&mut self, name: &str, value: &T) {
        if let Ok(v) = serde_yaml::to_value(value) {
            self.provider.insert(name.to_owned(), v);
        }
    }
}

fn yes() -> bool {
    true
}

/// A background helper (load balancer, node launcher).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperState {
    /// Helper name (`lb`, `cp-1-launcher`): its pid file is `<name>.pid`.
    pub name: String,
    /// What it is.
    pub kind: String,
}

/// `state.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// Cluster name.
    pub name: String,
    /// Provisioner name.
    pub provisioner: String,
    /// Network.
    pub network: NetworkState,
    /// Nodes, control plane first.
    pub nodes: Vec<NodeState>,
    /// Helpers started so far.
    #[serde(default)]
    pub helpers: Vec<HelperState>,
    /// Control-plane endpoint.
    pub endpoint: String,
    /// Creation time (RFC 3339).
    pub created: String,
}

impl ClusterState {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Control-plane nodes, in order.
    pub fn control_plane(&self) -> impl Iterator<Item = &NodeState> {
        self.nodes.iter().filter(|n| n.is_control_plane())
    }
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Disk I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `state.yaml` is malformed.
    #[error("{path}: not a kiln cluster state file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: serde_yaml::Error,
    },
    /// No such cluster.
    #[error(
        "cluster {name:?} does not exist (no {path}); create it with `kiln cluster create --name {name}`"
    )]
    NotFound {
        /// Cluster name.
        name: String,
        /// Where its state would be.
        path: PathBuf,
    },
}

impl StateDir {
    /// The state directory of `name` under `base` (`~/.kiln/clusters` by default). A relative
    /// base is made absolute, so helpers and marks name the same directory from anywhere.
    pub fn new(base: &Path, name: &str) -> Self {
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        Self {
            dir: base.join(name),
        }
    }

    /// The cluster's name (the directory's last component).
    pub fn cluster(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// A short identity of this cluster instance (a hash of its state directory): two clusters
    /// with the same name under different `--state` directories differ in it. Link names use
    /// it, so they never collide.
    pub fn id(&self) -> String {
        format!(
            "{:08x}",
            fnv(self.dir.as_os_str().as_encoded_bytes()) as u32
        )
    }

    /// The mark on every link and firewall rule the cluster owns: `kiln:<id>:<name>`. An
    /// object is removed only when it carries this exact mark.
    pub fn owner_mark(&self) -> String {
        format!("kiln:{}:{}", self.id(), self.cluster())
    }

    /// `state.yaml`.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.yaml")
    }
    /// A helper's or node's pid file.
    pub fn pidfile(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }
    /// A helper's or node's log.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
    /// A node launcher's or helper's control socket: `<name>.sock` in the state directory,
    /// or, when that path is too long for a Unix socket (108 bytes), a name derived from it in
    /// the temporary directory.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.socket_file(&format!("{name}.sock"))
    }

    /// Any Unix socket of the cluster: `file` in the state directory, or, when that path is
    /// too long for a Unix socket, a name derived from it in the temporary directory (QEMU's
    /// QMP and monitor sockets of nodes with long names).
    pub fn socket_file(&self, file: &str) -> PathBuf {
        let path = self.dir.join(file);
        if path.as_os_str().len() < 100 {
            return path;
        }
        let hash = fnv(path.as_os_str().as_encoded_bytes());
        std::env::temp_dir().join(format!("kiln-{hash:016x}.sock"))
    }
    /// A node's root directory.
    pub fn node_root(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads `state.yaml`.
    pub fn load(&self) -> Result<ClusterState, StateError> {
        let path = self.state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound {
                    name: self.cluster(),
                    path,
                });
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_yaml::from_str(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// Writes `state.yaml` atomically.
    pub fn save(&self, state: &ClusterState) -> Result<(), StateError> {
        let path = self.state_file();
        let text = serde_yaml::to_string(state).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        kiln_config::client::write_private(&path, text.as_bytes())
            .map_err(|source| StateError::Io { path, source })
    }

    fn attachment_file(&self, name: &str) -> PathBuf {
        self.dir.join("attached").join(format!("{name}.yaml"))
    }

    /// Records (or replaces) attachment `name`: call it before making the objects it names.
    pub fn attach(&self, name: &str, attachment: &Attachment) -> Result<(), StateError> {
        let path = self.attachment_file(name);
        let text = serde_yaml::to_string(attachment).map_err(|source| StateError::Parse {
            path: path.clone(),
            source,
        })?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StateError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        kiln_config::client::write_private(&path, text.as_bytes())
            .map_err(|source| StateError::Io { path, source })
    }

    /// Forgets attachment `name` (its tool removed the objects itself).
    pub fn detach(&self, name: &str) {
        let _ = std::fs::remove_file(self.attachment_file(name));
    }

    /// Every attachment, by name; a file that cannot be read is an error naming it.
    pub fn attachments(&self) -> Result<Vec<(String, Attachment)>, StateError> {
        let dir = self.dir.join("attached");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Io { path: dir, source }),
        };
        let mut found = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".yaml"))
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
            let a = serde_yaml::from_str(&text).map_err(|source| StateError::Parse {
                path: path.clone(),
                source,
            })?;
            found.push((name.to_owned(), a));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }
}

/// Objects a tool other than the lab makes for a cluster and keeps beside it (the kubeadm
/// rehearsal's legacy nodes and their HAProxy), recorded in the state directory before they
/// are made ([`StateDir::attach`]), so that `kiln cluster destroy` removes them when the tool
/// could not (it was killed). Found by identity like the lab's own objects: processes by pid
/// file (pid and start time), links by name and the cluster's owner mark, namespaces by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Directories whose `*.pid` files, at any depth, name processes to stop.
    #[serde(default)]
    pub pid_dirs: Vec<PathBuf>,
    /// Host links, removed only when they carry the cluster's owner mark.
    #[serde(default)]
    pub links: Vec<String>,
    /// Network namespaces.
    #[serde(default)]
    pub netns: Vec<String>,
}

/// FNV-1a: short, stable names from paths.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The default base directory: `~/.kiln/clusters`.
pub fn default_base() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("HOME is not set; pass --state DIR"))?;
    Ok(PathBuf::from(home).join(".kiln").join("clusters"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_socket_paths_move_to_the_temporary_directory() {
        let short = StateDir::new(Path::new("/tmp/k"), "c");
        assert_eq!(short.socket("n"), Path::new("/tmp/k/c/n.sock"));
        let long = StateDir::new(
            Path::new("/tmp/a-rather-long-directory-name-for-state"),
            "etcd-disaster-recovery-raw-copy",
        );
        let sock = long.socket("etcd-disaster-recovery-raw-copy-controlplane-1");
        assert!(sock.as_os_str().len() < 100, "{}", sock.display());
        assert_eq!(
            sock,
            long.socket("etcd-disaster-recovery-raw-copy-controlplane-1"),
            "the same path every time"
        );
        assert_ne!(
            sock,
            long.socket("etcd-disaster-recovery-raw-copy-controlplane-2")
        );
        // QEMU's sockets of the same node get names of their own.
        let qmp = long.socket_file("etcd-disaster-recovery-raw-copy-controlplane-1.qmp");
        let events = long.socket_file("etcd-disaster-recovery-raw-copy-controlplane-1.qmp-events");
        assert!(qmp.as_os_str().len() < 100 && qmp != sock && qmp != events);
    }
}
