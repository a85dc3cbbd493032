//! The steps a scenario is made of, as they appear in scenario files: a step is a one-key
//! mapping `{stepName: arguments}` or, without arguments, the bare name (`- startWriter`).
//!
//! Adding a step: add a variant here (serde names it in camelCase), describe it in
//! [`Step::describe`], name its nodes in [`Step::nodes`], and run it in `runner::execute`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A node of the scenario's cluster, by role and 1-based index; in files `controlplane-1`,
/// `worker-2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRef {
    /// `<cluster>-controlplane-N`.
    ControlPlane(usize),
    /// `<cluster>-worker-N`.
    Worker(usize),
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ControlPlane(i) => write!(f, "controlplane-{i}"),
            Self::Worker(i) => write!(f, "worker-{i}"),
        }
    }
}

impl std::str::FromStr for NodeRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not a node; name one as controlplane-N or worker-N (N from 1)");
        let (role, index) = s.rsplit_once('-').ok_or_else(bad)?;
        let index: usize = index.parse().map_err(|_| bad())?;
        if index == 0 {
            return Err(bad());
        }
        match role {
            "controlplane" => Ok(Self::ControlPlane(index)),
            "worker" => Ok(Self::Worker(index)),
            _ => Err(bad()),
        }
    }
}

impl Serialize for NodeRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Durations in files: `90s`, `3m`, `500ms`, `1h`.
pub mod duration {
    use super::*;

    /// Parses `90s`, `3m`, `500ms`, `1h`.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{s:?} is not a duration; write it as 90s, 3m, 500ms or 1h"))?;
        Ok(match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(format!("{s:?} has an unknown unit; use ms, s, m or h")),
        })
    }

    /// Serde: as a string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}s", d.as_secs()))
    }

    /// Serde: from a string (or a number of seconds).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Where a recovery snapshot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotKind {
    /// `etcd snapshot` through the API (with its integrity hash).
    #[default]
    Api,
    /// A raw copy of `/var/lib/etcd/member/snap/db` (no hash).
    RawDb,
}

/// A release of the upgrade scenarios (see [`crate::upgrade`]); in files `previous`,
/// `current`, `bootFailure`, `missing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Release {
    /// N−1: what the cluster is created on (`release: previous`).
    Previous,
    /// N.
    Current,
    /// An installer whose machined cannot start.
    BootFailure,
    /// A reference that is not in the registry.
    Missing,
}

/// What an upgrade step expects.
pub use crate::upgrade::Expect;

fn health_timeout() -> Duration {
    Duration::from_secs(180)
}

fn kubeadm_nodes() -> usize {
    3
}

fn fill_value_bytes() -> usize {
    256 * 1024
}

fn fill_limit_bytes() -> u64 {
    512 * 1024 * 1024
}

/// One step. (The cluster is created before the first step, from the scenario's `cluster:`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum Step {
    /// Write keys through etcd and record which were acknowledged.
    WriteKeys {
        /// How many.
        count: usize,
    },
    /// Start writing keys continuously in the background.
    StartWriter,
    /// Stop the background writer.
    StopWriter,
    /// Take a snapshot from a node and mark the recovery point.
    Snapshot {
        /// Which node.
        node: NodeRef,
        /// How (`api`, the default, or `rawDb`).
        #[serde(default)]
        kind: SnapshotKind,
    },
    /// Hard power-off.
    PowerOff(NodeRef),
    /// Power on and wait for the API.
    PowerOn(NodeRef),
    /// Freeze the node's processes.
    Pause(NodeRef),
    /// Thaw them.
    Resume(NodeRef),
    /// Cut the node's network link.
    LinkDown(NodeRef),
    /// Restore it.
    LinkUp(NodeRef),
    /// Reset through the API, wiping EPHEMERAL, and wait for the node to come back.
    ResetEphemeral(NodeRef),
    /// Reboot through the API and wait for the node to come back.
    Reboot(NodeRef),
    /// `bootstrap --recover-from` the snapshot taken earlier.
    RecoverFromSnapshot(NodeRef),
    /// `apply-config --insecure` the node's configuration (a node in maintenance mode).
    ApplyConfigInsecure(NodeRef),
    /// Wait until the node's etcd reports itself unhealthy.
    ExpectEtcdUnhealthy(NodeRef),
    /// Wait until every node (maintenance ones once configured) is healthy.
    WaitHealthy {
        /// Deadline (default 3m).
        #[serde(default = "health_timeout", with = "duration")]
        timeout: Duration,
    },
    /// etcd has this many voting members, on every control-plane node that is up.
    AssertMembers(usize),
    /// Remember the etcd member id of every node, for `assertRejoined`.
    RememberMembers,
    /// The node is an etcd member again under a new member id (it left and rejoined), and every
    /// other remembered member kept its id.
    AssertRejoined(NodeRef),
    /// Writes are acknowledged: `count` new writes all succeed.
    AssertWritable {
        /// How many.
        count: usize,
    },
    /// The OS API answers `count` times in a row through the load balancer.
    AssertApiThroughLoadBalancer {
        /// How many calls.
        count: usize,
    },
    /// The node's etcd has applied everything the leader had when the step started.
    AssertCaughtUp(NodeRef),
    /// The node runs (launcher on, API answering, stage running) with its configuration.
    AssertRunning(NodeRef),
    /// Every write acknowledged before the recovery point is present (Jepsen set rule).
    AssertNoLostWrites,
    /// A key is present (used to show what a failing scenario reports).
    AssertKeyPresent(String),
    /// Overwrite a few keys with large values until etcd refuses a write for lack of space
    /// (gRPC `ResourceExhausted`, etcd's `NOSPACE`); fails if `limitBytes` are written first.
    FillUntilNoSpace {
        /// Size of each value (default 256 KiB).
        #[serde(default = "fill_value_bytes")]
        value_bytes: usize,
        /// Give up after writing this much (default 512 MiB).
        #[serde(default = "fill_limit_bytes")]
        limit_bytes: u64,
    },
    /// `etcd alarm list` on every control-plane node shows this alarm (`NOSPACE`); waits up to
    /// 10 s for every member to raise it and reports how many did.
    AssertAlarm(String),
    /// `etcd alarm list` on every control-plane node shows no alarm.
    AssertNoAlarm,
    /// A write is refused.
    AssertNotWritable,
    /// `etcd status` on every control-plane node: DB size and in-use size, remembered for
    /// `defrag`.
    EtcdStatus,
    /// Compact etcd's history up to the current revision (what the Kubernetes API server does
    /// periodically), so old revisions become free space.
    Compact,
    /// `etcd defrag` on each control-plane node, one at a time; every member's DB size must
    /// shrink below what the last `etcdStatus` saw; reports the sizes before and after.
    Defrag,
    /// `etcd alarm disarm`.
    DisarmAlarms,
    /// `upgrade` one node and check how it ends (needs the scenario's `release:`).
    Upgrade {
        /// The node.
        node: NodeRef,
        /// To which release.
        to: Release,
        /// `--preserve` (default false).
        #[serde(default)]
        preserve: bool,
        /// `--stage` (default false).
        #[serde(default)]
        stage: bool,
        /// `--force` (default false).
        #[serde(default)]
        force: bool,
        /// The expected end (`confirmed`, the default; `staged`, `rolledBack`, `refused`).
        #[serde(default)]
        expect: Expect,
    },
    /// Upgrade every node with `--preserve`: one by one, or (`concurrent: true`) all
    /// control-plane nodes at once (the lease must serialize them).
    UpgradeAll {
        /// To which release.
        to: Release,
        /// All control-plane nodes at once (default false).
        #[serde(default)]
        concurrent: bool,
    },
    /// `rollback` a node and wait for it.
    Rollback(NodeRef),
    /// Build a kubeadm-style control plane ([`crate::kubeadm`]): `nodes` legacy nodes running
    /// etcd with kubeadm's PKI, each in its own namespace on the cluster network, behind
    /// HAProxy as the existing load balancer. From here on the scenario's etcd clients (the
    /// writer too) go through HAProxy.
    CreateKubeadmControlPlane {
        /// How many legacy control-plane nodes (default 3).
        #[serde(default = "kubeadm_nodes")]
        nodes: usize,
    },
    /// `kiln gen secrets --from-kubernetes-pki DIR --kubernetes-bootstrap-token TOKEN` with a
    /// legacy node's `/etc/kubernetes/pki`.
    GenSecretsFromKubernetesPki,
    /// `kiln gen config --with-secrets` with HAProxy as the control-plane endpoint.
    GenConfigWithKubeadmSecrets,
    /// The CA certificates (and keys) in the generated configurations are byte-identical to
    /// the kubeadm files.
    AssertKubeadmCasKept,
    /// HAProxy's backends rewritten without legacy node N and HAProxy reloaded (`-sf`), its
    /// etcd member removed (leadership moved off it first) and the node destroyed.
    RemoveKubeadmNode(usize),
    /// The etcd member list (read through HAProxy) is exactly these names.
    AssertEtcdMemberNames(Vec<String>),
    /// `apply-config --insecure` the generated `controlplane.yaml` (`controlPlane: true`) or
    /// `worker.yaml` to a node booted in maintenance mode (a maintenance worker of the cluster
    /// file: the configuration decides its role). A control-plane node must join the kubeadm
    /// etcd cluster (learner, then promoted); it is then added to HAProxy's backends.
    ApplyKubeadmConfig {
        /// The node.
        node: NodeRef,
        /// Apply `controlplane.yaml` (else `worker.yaml`).
        #[serde(default)]
        control_plane: bool,
    },
    /// The etcd members (read through HAProxy) are exactly this many, all Kiln nodes.
    AssertOnlyKilnMembers(usize),
    /// Every image of `kiln image list` into the lab registry with `kiln image cache`: this
    /// release's installer (built with `kiln image installer`) and the node image (packed from
    /// the node root filesystem). Needs the lab registry (`withRegistry` or `airgapped`).
    CacheImages,
    /// `upgrade --preserve` the node to this release's installer by its plain name
    /// (`kiln/installer:v<version>`): its mirrors send the pull to the lab registry, whose
    /// request log must show it, and the upgrade must be confirmed.
    UpgradeFromLabRegistry(NodeRef),
    /// `kiln airgap audit` is clean: nothing was denied.
    AssertAuditClean,
    /// From the node's network namespace (process nodes): the lab DNS refuses an outside name
    /// (`example.com`) and the egress proxy denies a fetch of it (403).
    RequestOutside(NodeRef),
    /// `kiln airgap audit` exits 1 and lists this destination (host, or `host:port`) among the
    /// denied ones; every denied attempt came from a node of the cluster.
    AssertAuditDenied(String),
    /// No request of the background writer failed (through the load balancer, for the kubeadm
    /// control plane) and it made at least one.
    AssertNoFailedWrites,
    /// The node (every node without `node`) runs this release.
    AssertRelease {
        /// The node; every node when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<NodeRef>,
        /// The release.
        release: Release,
    },
}

impl Step {
    /// A one-line description for listings and reports.
    pub fn describe(&self) -> String {
        match self {
            Self::WriteKeys { count } => format!("write {count} keys"),
            Self::StartWriter => "start the background writer".into(),
            Self::StopWriter => "stop the background writer".into(),
            Self::Snapshot {
                node,
                kind: SnapshotKind::Api,
            } => format!("etcd snapshot from {node} (recovery point)"),
            Self::Snapshot {
                node,
                kind: SnapshotKind::RawDb,
            } => format!("copy /var/lib/etcd/member/snap/db from {node} (recovery point)"),
            Self::PowerOff(n) => format!("power off {n}"),
            Self::PowerOn(n) => format!("power on {n}"),
            Self::Pause(n) => format!("pause {n}"),
            Self::Resume(n) => format!("resume {n}"),
            Self::LinkDown(n) => format!("cut the link of {n}"),
            Self::LinkUp(n) => format!("restore the link of {n}"),
            Self::ResetEphemeral(n) => format!("reset EPHEMERAL on {n}"),
            Self::Reboot(n) => format!("reboot {n} through the API"),
            Self::RecoverFromSnapshot(n) => format!("bootstrap --recover-from the snapshot on {n}"),
            Self::ApplyConfigInsecure(n) => format!("apply-config --insecure to {n}"),
            Self::ExpectEtcdUnhealthy(n) => format!("expect etcd on {n} to report unhealthy"),
            Self::WaitHealthy { timeout } => {
                format!("wait for health (up to {}s)", timeout.as_secs())
            }
            Self::AssertMembers(n) => format!("assert {n} voting etcd members"),
            Self::RememberMembers => "remember the etcd member ids".into(),
            Self::AssertRejoined(n) => {
                format!("assert {n} rejoined etcd as a new member, the others unchanged")
            }
            Self::AssertWritable { count } => format!("assert writable ({count} writes)"),
            Self::AssertApiThroughLoadBalancer { count } => {
                format!("assert the OS API answers through the load balancer ({count} calls)")
            }
            Self::AssertCaughtUp(n) => format!("assert {n} caught up with the leader"),
            Self::AssertRunning(n) => format!("assert {n} is running with its configuration"),
            Self::AssertNoLostWrites => "assert no acknowledged write is lost".into(),
            Self::AssertKeyPresent(k) => format!("assert key {k:?} is present"),
            Self::FillUntilNoSpace { value_bytes, .. } => {
                format!("fill etcd with {value_bytes}-byte values until NOSPACE")
            }
            Self::AssertAlarm(a) => format!("assert every member reports alarm {a}"),
            Self::AssertNoAlarm => "assert no etcd alarm".into(),
            Self::AssertNotWritable => "assert writes are refused".into(),
            Self::EtcdStatus => "etcd status (DB size, in use)".into(),
            Self::Compact => "compact etcd history to the current revision".into(),
            Self::Defrag => "etcd defrag on each control-plane node".into(),
            Self::DisarmAlarms => "etcd alarm disarm".into(),
            Self::Upgrade {
                node,
                to,
                preserve,
                stage,
                force,
                expect,
            } => format!(
                "upgrade {node} to {to:?}{}{}{}, expect {expect:?}",
                if *preserve { " --preserve" } else { "" },
                if *stage { " --stage" } else { "" },
                if *force { " --force" } else { "" }
            ),
            Self::UpgradeAll { to, concurrent } => format!(
                "upgrade every {} to {to:?}",
                if *concurrent {
                    "control-plane node at once"
                } else {
                    "node one by one"
                }
            ),
            Self::Rollback(n) => format!("roll back {n}"),
            Self::CreateKubeadmControlPlane { nodes } => {
                format!("build a kubeadm control plane: {nodes} etcd nodes behind HAProxy")
            }
            Self::GenSecretsFromKubernetesPki => {
                "gen secrets --from-kubernetes-pki --kubernetes-bootstrap-token".into()
            }
            Self::GenConfigWithKubeadmSecrets => {
                "gen config --with-secrets, HAProxy as the endpoint".into()
            }
            Self::AssertKubeadmCasKept => {
                "assert the configs' CAs are byte-identical to kubeadm's".into()
            }
            Self::RemoveKubeadmNode(i) => format!(
                "remove kubeadm-cp-{i}: HAProxy backends, etcd member remove, destroy the node"
            ),
            Self::AssertEtcdMemberNames(names) => {
                format!("assert the etcd members are {}", names.join(", "))
            }
            Self::AssertNoFailedWrites => "assert no write of the writer failed".into(),
            Self::ApplyKubeadmConfig {
                node,
                control_plane,
            } => format!(
                "apply-config --insecure {} to {node}{}",
                if *control_plane {
                    "controlplane.yaml"
                } else {
                    "worker.yaml"
                },
                if *control_plane {
                    ", wait for its etcd member, add it to HAProxy"
                } else {
                    ""
                }
            ),
            Self::AssertOnlyKilnMembers(n) => {
                format!("assert the etcd members are {n} Kiln nodes only")
            }
            Self::CacheImages => {
                "kiln image cache: every listed image into the lab registry".into()
            }
            Self::UpgradeFromLabRegistry(n) => {
                format!("upgrade --preserve {n} to this release's installer from the lab registry")
            }
            Self::AssertAuditClean => "assert the egress audit is clean".into(),
            Self::RequestOutside(n) => {
                format!("from {n}: look up and fetch example.com (expect refused and denied)")
            }
            Self::AssertAuditDenied(d) => format!("assert the egress audit denied {d}"),
            Self::AssertRelease { node, release } => match node {
                Some(n) => format!("assert {n} runs {release:?}"),
                None => format!("assert every node runs {release:?}"),
            },
        }
    }

    /// The nodes the step names (checked against the cluster's shape).
    pub fn nodes(&self) -> Vec<NodeRef> {
        match self {
            Self::Snapshot { node, .. }
            | Self::Upgrade { node, .. }
            | Self::ApplyKubeadmConfig { node, .. } => vec![*node],
            Self::AssertRelease { node, .. } => node.iter().copied().collect(),
            Self::PowerOff(n)
            | Self::PowerOn(n)
            | Self::Pause(n)
            | Self::Resume(n)
            | Self::LinkDown(n)
            | Self::LinkUp(n)
            | Self::ResetEphemeral(n)
            | Self::Reboot(n)
            | Self::RecoverFromSnapshot(n)
            | Self::ApplyConfigInsecure(n)
            | Self::ExpectEtcdUnhealthy(n)
            | Self::AssertCaughtUp(n)
            | Self::AssertRejoined(n)
            | Self::AssertRunning(n)
            | Self::UpgradeFromLabRegistry(n)
            | Self::RequestOutside(n)
            | Self::Rollback(n) => vec![*n],
            Self::WriteKeys { .. }
            | Self::StartWriter
            | Self::StopWriter
            | Self::WaitHealthy { .. }
            | Self::AssertMembers(_)
            | Self::RememberMembers
            | Self::AssertWritable { .. }
            | Self::AssertApiThroughLoadBalancer { .. }
            | Self::AssertNoLostWrites
            | Self::AssertKeyPresent(_)
            | Self::FillUntilNoSpace { .. }
            | Self::AssertAlarm(_)
            | Self::AssertNoAlarm
            | Self::AssertNotWritable
            | Self::EtcdStatus
            | Self::Compact
            | Self::Defrag
            | Self::DisarmAlarms
            | Self::UpgradeAll { .. }
            | Self::CreateKubeadmControlPlane { .. }
            | Self::GenSecretsFromKubernetesPki
            | Self::GenConfigWithKubeadmSecrets
            | Self::AssertKubeadmCasKept
            | Self::RemoveKubeadmNode(_)
            | Self::AssertEtcdMemberNames(_)
            | Self::AssertOnlyKilnMembers(_)
            | Self::CacheImages
            | Self::AssertAuditClean
            | Self::AssertAuditDenied(_)
            | Self::AssertNoFailedWrites => vec![],
        }
    }

    /// Whether the step cuts or restores a node's link (a provisioner capability).
    pub fn needs_link_faults(&self) -> bool {
        matches!(self, Self::LinkDown(_) | Self::LinkUp(_))
    }

    /// Whether the step needs the releases of the scenario's `release:` (installers in a
    /// registry the nodes mirror, A/B slots on the nodes).
    pub fn needs_releases(&self) -> bool {
        matches!(
            self,
            Self::Upgrade { .. }
                | Self::UpgradeAll { .. }
                | Self::Rollback(_)
                | Self::AssertRelease { .. }
        )
    }

    /// Whether the step needs the kubeadm control plane's peers: the cluster bridge (root),
    /// `haproxy` and `openssl`.
    pub fn needs_kubeadm(&self) -> bool {
        matches!(self, Self::CreateKubeadmControlPlane { .. })
    }

    /// Whether the step needs the air-gap lab (its registry, DNS, proxy and audit, and process
    /// nodes in network namespaces).
    pub fn needs_airgap(&self) -> bool {
        matches!(
            self,
            Self::CacheImages
                | Self::UpgradeFromLabRegistry(_)
                | Self::AssertAuditClean
                | Self::RequestOutside(_)
                | Self::AssertAuditDenied(_)
        )
    }

    /// Whether the step pauses or resumes a node (a provisioner capability).
    pub fn needs_pause(&self) -> bool {
        matches!(self, Self::Pause(_) | Self::Resume(_))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn steps_read_from_yaml() {
        let steps: Vec<Step> = serde_yaml::from_str(
            "- !powerOff controlplane-2\n- startWriter\n- !waitHealthy {timeout: 2m}\n- !snapshot {node: worker-1}",
        )
        .unwrap();
        assert_eq!(steps[0], Step::PowerOff(NodeRef::ControlPlane(2)));
        assert_eq!(steps[1], Step::StartWriter);
        assert_eq!(
            steps[2],
            Step::WaitHealthy {
                timeout: Duration::from_secs(120)
            }
        );
        assert_eq!(
            steps[3],
            Step::Snapshot {
                node: NodeRef::Worker(1),
                kind: SnapshotKind::Api
            }
        );
        let upgrades: Vec<Step> = serde_yaml::from_str(
            "- !upgrade {node: worker-1, to: bootFailure, preserve: true, expect: rolledBack}\n- !upgradeAll {to: current}\n- !rollback controlplane-1\n- !assertRelease {release: previous}",
        )
        .unwrap();
        assert_eq!(
            upgrades[0],
            Step::Upgrade {
                node: NodeRef::Worker(1),
                to: Release::BootFailure,
                preserve: true,
                stage: false,
                force: false,
                expect: Expect::RolledBack
            }
        );
        assert_eq!(
            upgrades[1],
            Step::UpgradeAll {
                to: Release::Current,
                concurrent: false
            }
        );
        assert_eq!(upgrades[2].nodes(), vec![NodeRef::ControlPlane(1)]);
        assert_eq!(
            upgrades[3],
            Step::AssertRelease {
                node: None,
                release: Release::Previous
            }
        );
        assert!(upgrades.iter().all(Step::needs_releases));
        assert!("controlplane-0".parse::<NodeRef>().is_err());
        assert!("master-1".parse::<NodeRef>().is_err());
        assert_eq!(
            duration::parse("500ms").unwrap(),
            Duration::from_millis(500)
        );
    }
}
