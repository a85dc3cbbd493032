//! The docker provisioner end to end, against a `dockerd` this test starts on its own socket,
//! data root, exec root and bridge (no iptables of its own, so it neither needs nor disturbs a
//! user's engine or the engine of `tests/firewall.rs`): a 3+2 cluster ends healthy,
//! answers through the load balancer, survives a node powered off and on, and `destroy` leaves
//! no container, network, volume or image of it; also after a create killed halfway.

#![allow(clippy::unwrap_used)] // tests fail loudly

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_e2e::{Env, free_cidr, link_exists, machined_bin};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_test_tiers::dockerd::{Firewall, TestEngine};
use kiln_test_tiers::{Tier, skip_unless};

/// A dockerd of the test's own (its own bridge, no iptables chains), stopped on drop.
struct TestDockerd {
    engine: TestEngine,
    _dir: tempfile::TempDir,
}

impl TestDockerd {
    fn start() -> Self {
        // Short path: the engine's and containerd's sockets live under it.
        let dir = tempfile::Builder::new()
            .prefix("kdock")
            .tempdir_in("/tmp")
            .unwrap();
        let engine = TestEngine::start(dir.path(), Firewall::Untouched, &[]).unwrap();
        Self { engine, _dir: dir }
    }

    fn host(&self) -> String {
        self.engine.host()
    }

    /// Runs the Docker CLI (an implementation independent of the provisioner's bollard).
    fn docker(&self, args: &[&str]) -> std::process::Output {
        self.engine.docker(args).unwrap()
    }

    fn lines(&self, args: &[&str]) -> Vec<String> {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Everything on the engine: containers, user-defined networks, volumes, images.
    fn objects(&self) -> Vec<String> {
        let mut all = Vec::new();
        all.extend(
            self.lines(&["ps", "-aq"])
                .into_iter()
                .map(|c| format!("container {c}")),
        );
        all.extend(
            self.lines(&["network", "ls", "-q", "--filter", "type=custom"])
                .into_iter()
                .map(|n| format!("network {n}")),
        );
        all.extend(
            self.lines(&["volume", "ls", "-q"])
                .into_iter()
                .map(|v| format!("volume {v}")),
        );
        all.extend(
            self.lines(&["images", "-aq"])
                .into_iter()
                .map(|i| format!("image {i}")),
        );
        all
    }
}

fn env_with_machined() -> Env {
    // The node image carries the machined binary built next to kiln.
    let _ = machined_bin();
    Env::new(None)
}

fn state_yaml(dir: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(dir.join("state.yaml")).unwrap()).unwrap()
}

#[test]
fn docker_cluster_of_3_and_2_is_healthy_and_destroy_leaves_nothing_on_the_engine() {
    skip_unless!(Tier::Root, Tier::Docker, Tier::Etcd);
    let engine = TestDockerd::start();
    let env = env_with_machined();
    let host = engine.host();
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 91);
    let name = "dock-e2e";
    let out = env.ok(&[
        "cluster",
        "create",
        "--provisioner",
        "docker",
        "--docker-host",
        &host,
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "3",
        "--workers",
        "2",
        "--memory",
        "512",
        "--wait-timeout",
        "4m",
    ]);
    assert!(out.contains("bootstrapping cluster"), "{out}");
    let dir = base.join(name);
    let st = state_yaml(&dir);
    let bridge = st["network"]["bridge"].as_str().unwrap().to_owned();
    let addr = |i: usize| st["nodes"][i]["address"].as_str().unwrap().to_owned();
    let worker = st["nodes"][4]["name"].as_str().unwrap().to_owned();

    // Containers on the engine, with the static addresses of the plan, never privileged.
    let containers = engine.lines(&["ps", "-q", "--filter", "label=dev.kiln.node"]);
    assert_eq!(containers.len(), 5, "{containers:?}");
    let ips = engine.lines(&[
        "inspect",
        "-f",
        "{{.HostConfig.Privileged}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &containers[0],
    ]);
    assert!(ips[0].starts_with("false "), "{ips:?}");
    assert!(
        link_exists(&bridge),
        "bridge {bridge} of the cluster network"
    );

    // Through the load balancer.
    let health = env.ok(&["health"]);
    assert!(
        health.contains(&format!("cluster {name} is healthy")),
        "{health}"
    );
    let members = env.ok(&["-n", &addr(0), "etcd", "members"]);
    assert_eq!(
        members.lines().filter(|l| l.contains("https://")).count(),
        3,
        "{members}"
    );
    // The console of every node is in <node>.log.
    let log = dir.join(format!("{}.log", st["nodes"][0]["name"].as_str().unwrap()));
    until_blocking(
        "the console log of the first node",
        Poll::every(Duration::from_millis(200), Duration::from_secs(20)),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("etcd") {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .unwrap();

    // Power: a worker off and on again.
    let stop = env.ok(&["cluster", "node", "stop", &worker, "--name", name]);
    assert!(stop.contains("off"), "{stop}");
    let start = env.ok(&["cluster", "node", "start", &worker, "--name", name]);
    assert!(start.contains("running"), "{start}");
    // Link down and up on the host side of its veth.
    let down = env.ok(&["cluster", "node", "link-down", &worker, "--name", name]);
    assert!(down.contains("running"), "{down}");
    env.ok(&["cluster", "node", "link-up", &worker, "--name", name]);

    env.ok(&["cluster", "destroy", "--name", name]);
    assert!(!dir.exists());
    assert!(!link_exists(&bridge), "bridge {bridge} left");
    let left = engine.objects();
    assert!(left.is_empty(), "left on the engine: {left:?}");
    // Idempotent.
    env.ok(&["cluster", "destroy", "--name", name]);
}

#[test]
fn docker_destroy_cleans_up_after_a_create_killed_halfway() {
    skip_unless!(Tier::Root, Tier::Docker, Tier::Etcd);
    let engine = TestDockerd::start();
    let env = env_with_machined();
    let host = engine.host();
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 93);
    let name = "dock-half";
    let mut create = Command::new(&env.bin)
        .args([
            "cluster",
            "create",
            "--provisioner",
            "docker",
            "--docker-host",
            &host,
            "--name",
            name,
            "--cidr",
            &cidr,
            "--controlplanes",
            "3",
            "--workers",
            "2",
        ])
        .env("HOME", &env.home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the first container exists: the rest was never made or saved.
    let made = until_blocking(
        "the first container of the cluster",
        Poll::every(Duration::from_millis(100), Duration::from_secs(120)),
        || {
            if engine
                .lines(&["ps", "-aq", "--filter", "label=dev.kiln.node"])
                .is_empty()
            {
                Err(())
            } else {
                Ok(())
            }
        },
    );
    create.kill().unwrap();
    create.wait().unwrap();
    made.unwrap();
    assert!(!engine.objects().is_empty());
    env.ok(&["cluster", "destroy", "--name", name]);
    let left = engine.objects();
    assert!(left.is_empty(), "left on the engine: {left:?}");
    assert!(!base.join(name).exists());
}
