//! The built-in scenarios.

use std::time::Duration;

use crate::step::{NodeRef::ControlPlane as Cp, NodeRef::Worker as W, SnapshotKind, Step, Step::*};

/// A named list of steps.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name (`etcd-disaster-recovery`).
    pub name: &'static str,
    /// What it shows.
    pub description: &'static str,
    /// The steps.
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Whether some step needs root.
    pub fn needs_root(&self) -> bool {
        self.steps.iter().any(Step::needs_root)
    }
}

const HEALTH: Duration = Duration::from_secs(180);

fn three_cp() -> Step {
    CreateCluster {
        controlplanes: 3,
        workers: 0,
        maintenance_workers: false,
    }
}

fn disaster_recovery(kind: SnapshotKind) -> Vec<Step> {
    let mut steps = vec![three_cp(), WriteKeys { count: 200 }];
    if kind == SnapshotKind::Api {
        // Snapshot on a healthy node; writes after it may be lost, by definition.
        steps.push(Snapshot { node: Cp(1), kind });
        steps.push(WriteKeys { count: 20 });
    }
    steps.extend([PowerOff(Cp(2)), PowerOff(Cp(3)), ExpectEtcdUnhealthy(Cp(1))]);
    if kind == SnapshotKind::RawDb {
        // Quorum is lost: nothing more can be acknowledged; copy the database file off.
        steps.push(Snapshot { node: Cp(1), kind });
    }
    steps.extend([
        ResetEphemeral(Cp(1)),
        PowerOn(Cp(2)),
        ResetEphemeral(Cp(2)),
        PowerOn(Cp(3)),
        ResetEphemeral(Cp(3)),
        RecoverFromSnapshot(Cp(1)),
        WaitHealthy { timeout: HEALTH },
        AssertMembers(3),
        AssertNoLostWrites,
    ]);
    steps
}

/// Every built-in scenario.
pub fn catalog() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "etcd-disaster-recovery",
            description: "lose etcd quorum, wipe EPHEMERAL everywhere, recover from an etcd snapshot",
            steps: disaster_recovery(SnapshotKind::Api),
        },
        Scenario {
            name: "etcd-disaster-recovery-raw-copy",
            description: "as etcd-disaster-recovery, from a raw copy of the database file (--recover-skip-hash-check)",
            steps: disaster_recovery(SnapshotKind::RawDb),
        },
        Scenario {
            name: "control-plane-node-loss",
            description: "power off a control-plane node: the cluster stays writable and reachable; it rejoins",
            steps: vec![
                three_cp(),
                StartWriter,
                PowerOff(Cp(3)),
                AssertWritable { count: 50 },
                AssertApiThroughLoadBalancer { count: 20 },
                PowerOn(Cp(3)),
                WaitHealthy { timeout: HEALTH },
                StopWriter,
                AssertMembers(3),
                AssertCaughtUp(Cp(3)),
                AssertNoLostWrites,
            ],
        },
        Scenario {
            name: "network-partition",
            description: "cut a control-plane node's link: the others keep quorum; it catches up after",
            steps: vec![
                three_cp(),
                StartWriter,
                LinkDown(Cp(3)),
                AssertWritable { count: 50 },
                LinkUp(Cp(3)),
                WaitHealthy { timeout: HEALTH },
                StopWriter,
                AssertCaughtUp(Cp(3)),
                AssertMembers(3),
                AssertNoLostWrites,
            ],
        },
        Scenario {
            name: "node-reboot",
            description: "reboot a worker and a control-plane node through the API; config and data survive",
            steps: vec![
                CreateCluster {
                    controlplanes: 1,
                    workers: 1,
                    maintenance_workers: false,
                },
                WriteKeys { count: 100 },
                Reboot(W(1)),
                Reboot(Cp(1)),
                WaitHealthy { timeout: HEALTH },
                AssertRunning(W(1)),
                AssertRunning(Cp(1)),
                AssertNoLostWrites,
            ],
        },
        Scenario {
            name: "maintenance-mode-apply",
            description: "a node boots without config, waits in maintenance mode, apply-config --insecure joins it",
            steps: vec![
                CreateCluster {
                    controlplanes: 1,
                    workers: 1,
                    maintenance_workers: true,
                },
                ApplyConfigInsecure(W(1)),
                WaitHealthy { timeout: HEALTH },
                AssertRunning(W(1)),
            ],
        },
    ]
}

/// The scenario called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    catalog().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_scenario_creates_first() {
        let all = catalog();
        let mut names: Vec<_> = all.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for s in &all {
            assert!(
                matches!(s.steps.first(), Some(Step::CreateCluster { .. })),
                "{}",
                s.name
            );
        }
        assert!(find("network-partition").unwrap().needs_root());
        assert!(!find("node-reboot").unwrap().needs_root());
    }
}
