//! Scenario files: a YAML document with a name, a description, the cluster (the same document
//! `kiln cluster create -f` takes) and the steps.
//!
//! ```yaml
//! name: control-plane-node-loss
//! description: power off a control-plane node; the cluster stays writable
//! cluster:
//!   nodes:
//!     - role: controlplane
//!       count: 3
//! steps:
//!   - startWriter
//!   - powerOff: controlplane-3
//!   - assertWritable: {count: 50}
//! ```
//!
//! An upgrade scenario adds `release: previous`: before the cluster is created, the runner
//! publishes releases N−1, N and a broken one to a registry the nodes mirror, and the cluster
//! starts on N−1 (see [`crate::upgrade`]). Only with it can steps upgrade, roll back or check
//! releases.
//!
//! Checking a file reports every problem at once, each with its line and column: an unknown
//! field or step, a node the cluster does not have, a missing field, a value of the wrong type.

use std::path::{Path, PathBuf};

use kiln_config::MachineType;
use kiln_provisioner::cluster_file::ClusterFile;
use kiln_provisioner::spanned::{self, Node, Problem};
use serde::Deserialize;

use crate::step::{NodeRef, Release, Step};

/// A scenario: a cluster and the steps run on it.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name (`etcd-disaster-recovery`); also the cluster's name.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The cluster it runs on.
    pub cluster: ClusterFile,
    /// The release the cluster is created on, after publishing the upgrade scenarios'
    /// releases (`release: previous`); `None`: the release built into `kiln`.
    pub release: Option<Release>,
    /// The steps, after the cluster is created.
    pub steps: Vec<Step>,
    /// The file it came from (`builtin:NAME.yaml` for shipped ones).
    pub source: String,
}

/// The fields of a scenario file (for checking keys; the steps are read one by one).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read through serde for its field names
struct Fields {
    name: String,
    description: String,
    cluster: Option<serde_yaml::Value>,
    release: Option<Release>,
    steps: Vec<serde_yaml::Value>,
}

/// Why scenario files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioFileError {
    /// A file could not be read.
    #[error("reading scenario file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file has problems.
    #[error("{source_name}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {source_name}:{}:{}: {}", p.pos.line, p.pos.col, p.message)).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        source_name: String,
        /// Every problem, in document order.
        problems: Vec<Problem>,
    },
    /// A directory holds no scenario file.
    #[error("{0} holds no scenario file (*.yaml or *.yml)")]
    EmptyDir(PathBuf),
    /// Two scenarios have the same name (their clusters would too).
    #[error("two scenarios are named {name:?} ({first} and {second}); rename one")]
    Duplicate {
        /// The name.
        name: String,
        /// The first file.
        first: String,
        /// The second file.
        second: String,
    },
}

impl Scenario {
    /// Control-plane nodes and workers of the scenario's cluster.
    pub fn shape(&self) -> (usize, usize) {
        shape(&self.cluster)
    }

    /// Whether some step cuts a node's link.
    pub fn needs_link_faults(&self) -> bool {
        self.steps.iter().any(Step::needs_link_faults)
    }

    /// Whether the scenario builds a kubeadm control plane (root, HAProxy).
    pub fn needs_kubeadm(&self) -> bool {
        self.steps.iter().any(Step::needs_kubeadm)
    }

    /// Whether the scenario is air-gapped (its cluster or one of its steps).
    pub fn needs_airgap(&self) -> bool {
        self.cluster.airgapped || self.steps.iter().any(Step::needs_airgap)
    }

    /// Whether some step pauses a node.
    pub fn needs_pause(&self) -> bool {
        self.steps.iter().any(Step::needs_pause)
    }

    /// Whether the nodes need A/B slots (the cluster is created on a published release).
    pub fn needs_slots(&self) -> bool {
        self.release.is_some()
    }

    /// A description of the cluster, for listings and the first step of a report.
    pub fn describe_cluster(&self) -> String {
        let (cps, workers) = self.shape();
        let maintenance = self
            .cluster
            .nodes
            .iter()
            .any(|g| g.role == MachineType::Worker && g.maintenance);
        let release = match self.release {
            Some(Release::Previous) => "publish releases and create cluster on N-1".to_owned(),
            Some(r) => format!("publish releases and create cluster on {r:?}"),
            None => "create cluster".to_owned(),
        };
        format!(
            "{release} ({cps} control plane, {workers} workers{})",
            if maintenance {
                " in maintenance mode"
            } else {
                ""
            }
        )
    }

    /// Parses and checks scenario text; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Self, ScenarioFileError> {
        parse(text, source).map_err(|problems| ScenarioFileError::Invalid {
            source_name: source.to_owned(),
            problems,
        })
    }

    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// The cluster's shape: from its node groups, else `kiln cluster create`'s defaults (1 + 1).
pub fn shape(cluster: &ClusterFile) -> (usize, usize) {
    if cluster.has_nodes() {
        (
            cluster.count(MachineType::Controlplane),
            cluster.count(MachineType::Worker),
        )
    } else {
        (1, 1)
    }
}

/// Reads the scenario files `paths` and every `*.yaml`/`*.yml` of `dirs` (sorted by name);
/// all problems of all files in one error list.
pub fn load_all(
    paths: &[PathBuf],
    dirs: &[PathBuf],
) -> Result<Vec<Scenario>, Vec<ScenarioFileError>> {
    let mut files = paths.to_vec();
    let mut errors = Vec::new();
    for dir in dirs {
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("yaml" | "yml")
                            )
                    })
                    .collect();
                found.sort();
                if found.is_empty() {
                    errors.push(ScenarioFileError::EmptyDir(dir.clone()));
                }
                files.extend(found);
            }
            Err(source) => errors.push(ScenarioFileError::Read {
                path: dir.clone(),
                source,
            }),
        }
    }
    let mut scenarios: Vec<Scenario> = Vec::new();
    for f in &files {
        match Scenario::load(f) {
            Ok(s) => {
                if let Some(first) = scenarios.iter().find(|o| o.name == s.name) {
                    errors.push(ScenarioFileError::Duplicate {
                        name: s.name.clone(),
                        first: first.source.clone(),
                        second: s.source.clone(),
                    });
                } else {
                    scenarios.push(s);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(scenarios)
    } else {
        Err(errors)
    }
}

fn parse(text: &str, source: &str) -> Result<Scenario, Vec<Problem>> {
    let root = match spanned::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Err(vec![Problem::at(
                spanned::Pos { line: 1, col: 1 },
                "the file is empty; a scenario has name, description, cluster and steps",
            )]);
        }
        Err(p) => return Err(vec![p]),
    };
    let mut problems = Vec::new();
    if root.as_map().is_none() {
        return Err(vec![Problem::at(
            root.pos,
            "a scenario is a mapping with name, description, cluster and steps",
        )]);
    }
    root.unknown_keys::<Fields>("a scenario", &mut problems);
    for field in ["name", "description", "steps"] {
        if root.get(field).is_none() {
            problems.push(Problem::at(
                root.pos,
                format!(
                    "missing field {field:?}: a scenario has name, description, cluster and steps"
                ),
            ));
        }
    }
    let name = match root.get("name") {
        Some(n) => match n.as_str() {
            Some(s) if valid_name(s) => s.to_owned(),
            _ => {
                problems.push(Problem::at(
                    n.pos,
                    "the name must be lowercase letters, digits and '-' (it names the cluster)",
                ));
                String::new()
            }
        },
        None => String::new(),
    };
    let description = match root.get("description") {
        Some(d) => d.as_str().map(str::to_owned).unwrap_or_else(|| {
            problems.push(Problem::at(d.pos, "the description is a string"));
            String::new()
        }),
        None => String::new(),
    };
    let cluster = match root.get("cluster") {
        Some(c) => ClusterFile::from_node(c, &mut problems),
        None => Some(ClusterFile::default()),
    };
    if let Some(net) = cluster.as_ref().and_then(|c| c.name.as_ref()) {
        let at = root
            .get("cluster")
            .and_then(|c| c.get("name"))
            .map_or(root.pos, |n| n.pos);
        problems.push(Problem::at(
            at,
            format!("a scenario's cluster is named after the scenario; remove name: {net}"),
        ));
    }
    let release = match root.get("release") {
        Some(r) => match r.deserialize::<Release>() {
            Ok(rel @ (Release::Previous | Release::Current)) => Some(rel),
            Ok(_) | Err(_) => {
                problems.push(Problem::at(
                    r.pos,
                    "release is previous (N-1) or current (N): what the cluster starts on",
                ));
                None
            }
        },
        None => None,
    };
    let shape = cluster.as_ref().map(shape);
    let mut steps = Vec::new();
    if let Some(s) = root.get("steps") {
        match s.as_seq() {
            Some(items) => {
                for item in items {
                    if let Some(step) = step(item, shape, &mut problems) {
                        if step.needs_releases() && root.get("release").is_none() {
                            problems.push(Problem::at(
                                item.pos,
                                "this step needs the upgrade releases: add `release: previous` \
                                 (the cluster starts on N-1) to the scenario",
                            ));
                        }
                        steps.push(step);
                    }
                }
                if items.is_empty() {
                    problems.push(Problem::at(s.pos, "a scenario needs at least one step"));
                }
            }
            None => problems.push(Problem::at(s.pos, "steps is a list")),
        }
    }
    problems.sort_by_key(|p| (p.pos.line, p.pos.col));
    match cluster {
        Some(cluster) if problems.is_empty() => Ok(Scenario {
            name,
            description,
            cluster,
            release,
            steps,
            source: source.to_owned(),
        }),
        _ => Err(problems),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
}

/// One step: `- name` or `- name: arguments`.
fn step(item: &Node, shape: Option<(usize, usize)>, problems: &mut Vec<Problem>) -> Option<Step> {
    let known = spanned::names_of::<Step>();
    let (name_node, args) = match (item.as_str(), item.as_map()) {
        (Some(_), _) => (item, None),
        (None, Some([(k, v)])) => (k, Some(v)),
        _ => {
            problems.push(Problem::at(
                item.pos,
                "a step is a name (`- startWriter`) or a mapping with one key \
                 (`- powerOff: controlplane-2`)",
            ));
            return None;
        }
    };
    let name = name_node.as_str().unwrap_or_default();
    if !known.contains(&name) {
        problems.push(Problem::at(
            name_node.pos,
            format!("unknown step {name:?}; steps: {}", known.join(", ")),
        ));
        return None;
    }
    let tagged = |value| {
        serde_yaml::Value::Tagged(Box::new(serde_yaml::value::TaggedValue {
            tag: serde_yaml::value::Tag::new(name),
            value,
        }))
    };
    let parsed = match args {
        // A bare name is a step without arguments, or one whose arguments all have defaults.
        None => serde_yaml::from_value(serde_yaml::Value::String(name.to_owned())).or_else(|e| {
            serde_yaml::from_value(tagged(serde_yaml::Value::Mapping(Default::default())))
                .map_err(|_| e)
        }),
        Some(v) => serde_yaml::from_value(tagged(v.to_value())),
    };
    let step: Step = match parsed {
        Ok(s) => s,
        Err(e) => {
            let at = args.unwrap_or(name_node);
            problems.push(Problem::at(at.pos, format!("step {name}: {e}")));
            return None;
        }
    };
    if let Some((cps, workers)) = shape {
        for n in step.nodes() {
            let (have, index) = match n {
                NodeRef::ControlPlane(i) => (cps, i),
                NodeRef::Worker(i) => (workers, i),
            };
            if index > have {
                let at = args
                    .and_then(|a| a.find_scalar(&n.to_string()))
                    .unwrap_or(item);
                problems.push(Problem::at(
                    at.pos,
                    format!(
                        "step {name}: the cluster has no {n} (it has {cps} control-plane \
                         node(s) and {workers} worker(s))"
                    ),
                ));
            }
        }
    }
    Some(step)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_file_reads() {
        let s = Scenario::parse(
            "name: t\ndescription: d\ncluster:\n  nodes: [{role: controlplane, count: 3}]\nsteps:\n  - startWriter\n  - powerOff: controlplane-3\n  - assertWritable: {count: 5}\n  - waitHealthy\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(s.shape(), (3, 0));
        assert_eq!(s.steps.len(), 4);
    }

    #[test]
    fn upgrade_steps_need_a_release() {
        let s = Scenario::parse(
            "name: t\ndescription: d\nrelease: previous\nsteps:\n  - upgrade: {node: worker-1, to: current}\n  - assertRelease: {release: current}\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(s.release, Some(Release::Previous));
        assert!(s.needs_slots());
        assert!(s.describe_cluster().contains("on N-1"));
        let Err(ScenarioFileError::Invalid { problems, .. }) = Scenario::parse(
            "name: t\ndescription: d\nsteps:\n  - rollback: controlplane-1\n",
            "t.yaml",
        ) else {
            panic!("should fail")
        };
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].pos.line, 4);
        assert!(problems[0].message.contains("release: previous"));
        let Err(ScenarioFileError::Invalid { problems, .. }) = Scenario::parse(
            "name: t\ndescription: d\nrelease: missing\nsteps:\n  - startWriter\n",
            "t.yaml",
        ) else {
            panic!("should fail")
        };
        assert_eq!(problems[0].pos.line, 3, "{problems:?}");
    }

    #[test]
    fn three_mistakes_three_problems_with_lines() {
        let text = "\
name: t
cluster:
  nodes:
    - role: controlplane
steps:
  - powerOf: controlplane-1
  - powerOff: controlplane-2
  - writeKeys: {}
";
        let Err(ScenarioFileError::Invalid { problems, .. }) = Scenario::parse(text, "t.yaml")
        else {
            panic!("should fail")
        };
        let at: Vec<(usize, usize)> = problems.iter().map(|p| (p.pos.line, p.pos.col)).collect();
        assert_eq!(at, vec![(1, 1), (6, 5), (7, 15), (8, 16)], "{problems:#?}");
        assert!(
            problems[0]
                .message
                .contains("missing field \"description\"")
        );
        assert!(problems[1].message.contains("unknown step \"powerOf\""));
        assert!(problems[2].message.contains("no controlplane-2"));
        assert!(
            problems[3].message.contains("missing field `count`"),
            "{}",
            problems[3]
        );
    }
}
