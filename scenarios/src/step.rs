//! The steps a scenario is made of.

use std::time::Duration;

/// A node of the scenario's cluster, by role and 1-based index.
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

/// Where a recovery snapshot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// `etcd snapshot` through the API (with its integrity hash).
    Api,
    /// A raw copy of `/var/lib/etcd/member/snap/db` (no hash).
    RawDb,
}

/// One step.
#[derive(Debug, Clone)]
pub enum Step {
    /// Create the cluster.
    CreateCluster {
        /// Control-plane nodes.
        controlplanes: usize,
        /// Workers.
        workers: usize,
        /// Workers boot in maintenance mode.
        maintenance_workers: bool,
    },
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
        /// How.
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
        /// Deadline.
        timeout: Duration,
    },
    /// etcd has this many voting members, on every control-plane node that is up.
    AssertMembers(usize),
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
}

impl Step {
    /// A one-line description for listings and reports.
    pub fn describe(&self) -> String {
        match self {
            Self::CreateCluster {
                controlplanes,
                workers,
                maintenance_workers,
            } => format!(
                "create cluster ({controlplanes} control plane, {workers} workers{})",
                if *maintenance_workers {
                    " in maintenance mode"
                } else {
                    ""
                }
            ),
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
            Self::AssertWritable { count } => format!("assert writable ({count} writes)"),
            Self::AssertApiThroughLoadBalancer { count } => {
                format!("assert the OS API answers through the load balancer ({count} calls)")
            }
            Self::AssertCaughtUp(n) => format!("assert {n} caught up with the leader"),
            Self::AssertRunning(n) => format!("assert {n} is running with its configuration"),
            Self::AssertNoLostWrites => "assert no acknowledged write is lost".into(),
            Self::AssertKeyPresent(k) => format!("assert key {k:?} is present"),
        }
    }

    /// Whether the step needs the bridge network (root).
    pub fn needs_root(&self) -> bool {
        matches!(self, Self::LinkDown(_) | Self::LinkUp(_))
    }
}
