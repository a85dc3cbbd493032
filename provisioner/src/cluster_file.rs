//! The declarative cluster file of `kiln cluster create -f FILE`, also the `cluster:` part of a
//! scenario file: provisioner, name, network, nodes with roles and resources, config patches
//! and registry mirrors. Command-line flags override what the file says.
//!
//! ```yaml
//! provisioner: process
//! name: lab
//! network: {cidr: 10.5.0.0/24, mtu: 1500}
//! nodes:
//!   - role: controlplane
//!     count: 3
//!   - role: worker
//!     count: 2
//!     resources: {cpus: 2, memory: 2048}
//! patches:
//!   - machine: {sysctls: {net.ipv4.ip_forward: "1"}}
//! mirrors:
//!   docker.io: [http://10.5.0.1:5000]
//! withRegistry: false   # the lab's registry mirror on the gateway
//! airgapped: false      # no route out; lab DNS, egress proxy and registry (implies withRegistry)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_config::{MachineType, Patch};
use serde::{Deserialize, Serialize};

use crate::create::CreateOptions;
use crate::spanned::{self, Node, Problem};

/// A cluster file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterFile {
    /// Provisioner (`process`, `qemu`, `docker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioner: Option<String>,
    /// Cluster name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// Node groups, in order: control-plane nodes are numbered in the order of their groups,
    /// and so are workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeGroup>,
    /// Config patches for every node: a YAML mapping (strategic merge), a list of RFC 6902
    /// operations, or a string (inline patch or `@file`, relative to the cluster file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<serde_yaml::Value>,
    /// Patches for control-plane nodes only (after `patches`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control_plane_patches: Vec<serde_yaml::Value>,
    /// Patches for workers only (after `patches`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_patches: Vec<serde_yaml::Value>,
    /// Registry mirrors: registry host (`docker.io`, `*`) → endpoints, tried in order
    /// (becomes `machine.registries.mirrors` on every node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Start the lab's registry mirror on the gateway (`--with-registry`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub with_registry: bool,
    /// An air-gapped cluster (`--airgapped`): no route out, lab DNS and egress proxy, every
    /// image through the lab registry.
    #[serde(default, skip_serializing_if = "is_false")]
    pub airgapped: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

/// `network:`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// The cluster's network (`10.5.0.0/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// MTU of the node links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// One entry of `nodes:`: `count` nodes of a role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeGroup {
    /// `controlplane` or `worker`.
    pub role: MachineType,
    /// How many (default 1).
    #[serde(default = "one")]
    pub count: usize,
    /// CPUs and memory of each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Workers only: boot without a configuration, in maintenance mode, and wait for
    /// `apply-config --insecure` (their configuration is `<node>.yaml` in the state directory).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
}

fn one() -> usize {
    1
}

/// The least memory a node may be given, in MiB.
pub const MIN_MEMORY_MIB: u64 = 128;

/// What a node gets from the provisioner that runs it as a machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
}

/// Resources per role, as `CreateOptions` carries them. The qemu and docker provisioners size
/// their machines with them; a process node shares the host and ignores them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleResources {
    /// Control-plane nodes.
    pub controlplane: Resources,
    /// Workers.
    pub worker: Resources,
}

impl RoleResources {
    /// What a node of `role` gets; `None` when the file gives it nothing.
    pub fn of(&self, role: MachineType) -> Option<Resources> {
        let r = match role {
            MachineType::Controlplane => self.controlplane,
            MachineType::Worker => self.worker,
        };
        (r != Resources::default()).then_some(r)
    }

    /// Drops what the command line sets itself (`--cpus`, `--memory`): flags override the file.
    pub fn overridden(mut self, cpus: bool, memory: bool) -> Self {
        for r in [&mut self.controlplane, &mut self.worker] {
            if cpus {
                r.cpus = None;
            }
            if memory {
                r.memory = None;
            }
        }
        self
    }
}

/// Why a cluster file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    /// The file could not be read.
    #[error("reading cluster file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file has problems, each at a line and column.
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {}:{}:{}: {}", path.display(), p.pos.line, p.pos.col, p.message)).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// A patch could not be read.
    #[error(transparent)]
    Patch(#[from] kiln_config::PatchError),
}

impl ClusterFile {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self, ClusterFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| ClusterFileError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses and checks cluster file text; every problem, with its position.
    pub fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        let root = match spanned::parse(text) {
            Ok(Some(root)) => root,
            Ok(None) => return Ok(Self::default()),
            Err(p) => return Err(vec![p]),
        };
        let mut problems = Vec::new();
        let file = Self::from_node(&root, &mut problems);
        match file {
            Some(f) if problems.is_empty() => Ok(f),
            _ => Err(problems),
        }
    }

    /// Checks a node holding a cluster file, adding every problem to `problems`; the file
    /// when it has none.
    pub fn from_node(node: &Node, problems: &mut Vec<Problem>) -> Option<Self> {
        if node.is_null() {
            return Some(Self::default());
        }
        if node.as_map().is_none() {
            problems.push(Problem::at(
                node.pos,
                "a cluster is a mapping (provisioner, name, network, nodes, patches, mirrors, withRegistry, airgapped)",
            ));
            return None;
        }
        let before = problems.len();
        node.unknown_keys::<ClusterFile>("the cluster", problems);
        if let Some(n) = node.get("network") {
            n.unknown_keys::<NetworkSpec>("network", problems);
        }
        if let Some(groups) = node.get("nodes").and_then(Node::as_seq) {
            for g in groups {
                g.unknown_keys::<NodeGroup>("a node group", problems);
                if let Some(r) = g.get("resources") {
                    r.unknown_keys::<Resources>("resources", problems);
                }
                if g.as_map().is_some() && g.get("role").is_none() {
                    problems.push(Problem::at(
                        g.pos,
                        "missing field \"role\" (controlplane or worker) in this node group",
                    ));
                }
            }
        }
        if problems.len() > before {
            return None;
        }
        let file: Self = match node.deserialize() {
            Ok(f) => f,
            Err(mut p) => {
                // Point at the value serde names, when it names one.
                if let Some(v) = quoted(&p.message).and_then(|v| node.find_scalar(v)) {
                    p.pos = v.pos;
                }
                problems.push(p);
                return None;
            }
        };
        let mut ok = true;
        if let Some(groups) = node.get("nodes").and_then(Node::as_seq) {
            for (g, n) in file.nodes.iter().zip(groups) {
                if g.maintenance && g.role == MachineType::Controlplane {
                    problems.push(Problem::at(
                        n.pos,
                        "maintenance: true is for workers; a control-plane node needs its \
                         configuration to run etcd",
                    ));
                    ok = false;
                }
                // What any machine needs to run machined and etcd, whichever provisioner
                // sizes it (qemu refuses less at boot, a container would be killed for it).
                let resources = g.resources.unwrap_or_default();
                let at = |key: &str| {
                    n.get("resources")
                        .and_then(|r| r.get(key))
                        .map_or(n.pos, |v| v.pos)
                };
                if let Some(m) = resources.memory.filter(|m| *m < MIN_MEMORY_MIB) {
                    problems.push(Problem::at(
                        at("memory"),
                        format!(
                            "memory: {m} MiB is too little for a Kiln node; give at least \
                             {MIN_MEMORY_MIB} (e.g. memory: 1024)"
                        ),
                    ));
                    ok = false;
                }
                if resources.cpus == Some(0) {
                    problems.push(Problem::at(
                        at("cpus"),
                        "cpus: 0; a node needs at least one CPU (e.g. cpus: 2)",
                    ));
                    ok = false;
                }
            }
        }
        if !file.nodes.is_empty() && file.count(MachineType::Controlplane) == 0 {
            problems.push(Problem::at(
                node.get("nodes").map_or(node.pos, |n| n.pos),
                "the cluster needs at least one controlplane node",
            ));
            ok = false;
        }
        for role in [MachineType::Controlplane, MachineType::Worker] {
            let sized: Vec<_> = file
                .nodes
                .iter()
                .filter(|g| g.role == role)
                .map(|g| g.resources.unwrap_or_default())
                .collect();
            if sized.windows(2).any(|w| w[0] != w[1]) {
                problems.push(Problem::at(
                    node.get("nodes").map_or(node.pos, |n| n.pos),
                    format!(
                        "every {role} group must have the same resources (nodes of a role are \
                         sized alike); merge them into one group"
                    ),
                ));
                ok = false;
            }
        }
        ok.then_some(file)
    }

    /// Nodes of a role the file asks for.
    pub fn count(&self, role: MachineType) -> usize {
        self.nodes
            .iter()
            .filter(|g| g.role == role)
            .map(|g| g.count)
            .sum()
    }

    /// Whether the file lists nodes (else the defaults or flags decide).
    pub fn has_nodes(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Resources per role.
    pub fn resources(&self) -> RoleResources {
        let of = |role| {
            self.nodes
                .iter()
                .find(|g| g.role == role)
                .and_then(|g| g.resources)
                .unwrap_or_default()
        };
        RoleResources {
            controlplane: of(MachineType::Controlplane),
            worker: of(MachineType::Worker),
        }
    }

    /// Sets what the file says on `opts` (flags applied afterwards override it). `base` is the
    /// directory `@file` patches are relative to.
    pub fn apply(&self, opts: &mut CreateOptions, base: &Path) -> Result<(), ClusterFileError> {
        if let Some(p) = &self.provisioner {
            opts.provisioner = p.clone();
        }
        if let Some(n) = &self.name {
            opts.name = n.clone();
        }
        opts.with_registry |= self.with_registry;
        opts.airgapped |= self.airgapped;
        if let Some(net) = &self.network {
            if let Some(c) = &net.cidr {
                opts.cidr = c.clone();
            }
            if let Some(m) = net.mtu {
                opts.mtu = m;
            }
        }
        if self.has_nodes() {
            opts.controlplanes = self.count(MachineType::Controlplane);
            opts.workers = self.count(MachineType::Worker);
            opts.maintenance_workers = self
                .nodes
                .iter()
                .any(|g| g.role == MachineType::Worker && g.maintenance);
            opts.resources = self.resources();
        }
        let load =
            |values: &[serde_yaml::Value], what: &str| -> Result<Vec<Patch>, ClusterFileError> {
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Ok(patch(v, base, &format!("{what}[{i}]"))?))
                    .collect()
            };
        opts.patches.extend(load(&self.patches, "patches")?);
        if !self.mirrors.is_empty() {
            let mut mirrors = serde_yaml::Mapping::new();
            for (host, endpoints) in &self.mirrors {
                let mut m = serde_yaml::Mapping::new();
                m.insert("endpoints".into(), endpoints.clone().into());
                mirrors.insert(host.clone().into(), m.into());
            }
            let mut registries = serde_yaml::Mapping::new();
            registries.insert("mirrors".into(), mirrors.into());
            let mut machine = serde_yaml::Mapping::new();
            machine.insert("registries".into(), registries.into());
            let mut doc = serde_yaml::Mapping::new();
            doc.insert("machine".into(), machine.into());
            opts.patches.push(Patch {
                source: "cluster file mirrors".into(),
                kind: kiln_config::patch::PatchKind::StrategicMerge(doc),
                extension_service_configs: Vec::new(),
            });
        }
        opts.control_plane_patches
            .extend(load(&self.control_plane_patches, "controlPlanePatches")?);
        opts.worker_patches
            .extend(load(&self.worker_patches, "workerPatches")?);
        Ok(())
    }
}

fn patch(v: &serde_yaml::Value, base: &Path, what: &str) -> Result<Patch, kiln_config::PatchError> {
    match v {
        serde_yaml::Value::String(s) => match s.strip_prefix('@') {
            Some(p) => {
                let path = base.join(p);
                Patch::load(&format!("@{}", path.display()))
            }
            None => Patch::parse(s, what),
        },
        other => {
            let text = serde_yaml::to_string(other).unwrap_or_default();
            Patch::parse(&text, what)
        }
    }
}

/// The first `...` or "..." quoted word of a serde message (the value it rejects).
fn quoted(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FILE: &str = "\
provisioner: process
name: lab
network:
  cidr: 10.77.0.0/24
nodes:
  - role: controlplane
    count: 3
  - role: worker
    count: 2
    resources: {cpus: 2, memory: 2048}
mirrors:
  docker.io: [http://10.77.0.1:5000]
patches:
  - machine: {env: {A: b}}
";

    #[test]
    fn too_little_memory_or_no_cpu_is_refused_at_its_line() {
        let text = "nodes:\n  - role: controlplane\n    resources: {memory: 64, cpus: 0}\n";
        let problems = ClusterFile::parse(text).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].message.contains("memory: 64 MiB is too little"));
        assert_eq!((problems[0].pos.line, problems[0].pos.col), (3, 25));
        assert!(problems[1].message.contains("cpus: 0"));
        assert!(
            ClusterFile::parse("nodes:\n  - role: controlplane\n    resources: {memory: 128}\n")
                .is_ok()
        );
    }

    #[test]
    fn air_gap_and_the_lab_registry_come_from_the_file() {
        let mut opts = CreateOptions::new("kiln-default", PathBuf::from("/tmp"));
        ClusterFile::parse("airgapped: true\n")
            .unwrap()
            .apply(&mut opts, Path::new("/"))
            .unwrap();
        assert!(opts.airgapped && !opts.with_registry);
        let mut opts = CreateOptions::new("kiln-default", PathBuf::from("/tmp"));
        ClusterFile::parse("withRegistry: true\n")
            .unwrap()
            .apply(&mut opts, Path::new("/"))
            .unwrap();
        assert!(opts.with_registry && !opts.airgapped);
        // Written back only when set.
        let text = serde_yaml::to_string(&ClusterFile::parse(FILE).unwrap()).unwrap();
        assert!(
            !text.contains("airgapped") && !text.contains("withRegistry"),
            "{text}"
        );
    }

    #[test]
    fn a_file_sets_the_options() {
        let f = ClusterFile::parse(FILE).unwrap();
        let mut opts = CreateOptions::new("kiln-default", PathBuf::from("/tmp"));
        f.apply(&mut opts, Path::new("/")).unwrap();
        assert_eq!(opts.name, "lab");
        assert_eq!((opts.controlplanes, opts.workers), (3, 2));
        assert_eq!(opts.cidr, "10.77.0.0/24");
        assert_eq!(opts.resources.worker.cpus, Some(2));
        assert_eq!(opts.patches.len(), 2, "the patch and the mirrors");
        // Per node: workers get the group's resources, control planes the defaults.
        let worker = opts.resources.of(MachineType::Worker).unwrap();
        assert_eq!((worker.cpus, worker.memory), (Some(2), Some(2048)));
        assert_eq!(opts.resources.of(MachineType::Controlplane), None);
        // --cpus on the command line wins over the file; the file's memory stays.
        let flags = opts.resources.overridden(true, false);
        let worker = flags.of(MachineType::Worker).unwrap();
        assert_eq!((worker.cpus, worker.memory), (None, Some(2048)));
        assert_eq!(
            opts.resources
                .overridden(true, true)
                .of(MachineType::Worker),
            None
        );
    }

    #[test]
    fn every_problem_is_reported_at_its_line() {
        let text = "\
name: lab
netwrk: {cidr: 10.5.0.0/24}
nodes:
  - role: controlplane
    cout: 3
  - count: 2
";
        let problems = ClusterFile::parse(text).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.pos.line).collect();
        assert_eq!(lines, vec![2, 5, 6], "{problems:?}");
        assert!(
            problems[0].message.contains("\"netwrk\""),
            "{}",
            problems[0]
        );
        assert!(problems[2].message.contains("role"), "{}", problems[2]);
    }

    #[test]
    fn a_bad_value_points_at_itself() {
        let problems = ClusterFile::parse("nodes:\n  - role: boss\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].pos.line, 2, "{}", problems[0]);
    }
}
