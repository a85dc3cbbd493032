//! The docker provisioner end to end, against a `dockerd` this test starts on its own socket,
//! data root, exec root and bridge (no iptables of its own, so it neither needs nor disturbs a
//! user's engine or the engine of `tests/firewall.rs`): a 3+2 cluster ends healthy,
//! answers through the load balancer, survives a node powered off and on, and `destroy` leaves
//! no container, network, volume or image of it; also after a create killed halfway.

#![allow(clippy::unwrap_used)] // tests fail loudly

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_e2e::{Env, etcd_client, free_cidr, link_exists, machined_bin};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_test_tiers::dockerd::{Firewall, SwarmPair, TestEngine};
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

    fn lines(&self, args: &[&str]) -> Vec<String> {
        lines(&self.engine, args)
    }

    fn objects(&self) -> Vec<String> {
        objects(&self.engine)
    }
}

/// The lines `docker ARGS` prints on `engine`; fails the test when it fails.
fn lines(engine: &TestEngine, args: &[&str]) -> Vec<String> {
    let out = engine.docker(args).unwrap();
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
fn objects(engine: &TestEngine) -> Vec<String> {
    let mut all = Vec::new();
    all.extend(
        lines(engine, &["ps", "-aq"])
            .into_iter()
            .map(|c| format!("container {c}")),
    );
    all.extend(
        lines(
            engine,
            &[
                "network",
                "ls",
                "--filter",
                "type=custom",
                "--format",
                "{{.Name}}",
            ],
        )
        .into_iter()
        .map(|n| format!("network {n}")),
    );
    all.extend(
        lines(engine, &["volume", "ls", "-q"])
            .into_iter()
            .map(|v| format!("volume {v}")),
    );
    all.extend(
        lines(engine, &["images", "-aq"])
            .into_iter()
            .map(|i| format!("image {i}")),
    );
    all
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

/// [`objects`] but the networks a swarm engine makes itself (`ingress` when it joins,
/// `docker_gwbridge` when a container first attaches to an overlay network).
fn swarm_objects(engine: &TestEngine) -> Vec<String> {
    objects(engine)
        .into_iter()
        .filter(|o| o != "network ingress" && o != "network docker_gwbridge")
        .collect()
}

/// The two-engine test: a 3-control-plane cluster over a swarm of two engines (each in
/// a network namespace of its own), one node on the second engine, reaches quorum over the
/// overlay; cutting the second engine's link loses that node and keeps the cluster writable;
/// restoring it brings the node back with every acknowledged write.
#[test]
fn docker_cluster_over_two_swarm_engines_keeps_quorum_and_every_write_when_one_engine_is_cut() {
    skip_unless!(Tier::Root, Tier::Docker, Tier::Etcd);
    let dir = tempfile::Builder::new()
        .prefix("ksw")
        .tempdir_in("/tmp")
        .unwrap();
    let swarm = SwarmPair::start(dir.path()).unwrap();
    let (a, b) = (swarm.a.as_ref().unwrap(), swarm.b.as_ref().unwrap());
    let before = (swarm_objects(a), swarm_objects(b));
    let env = env_with_machined();
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 95);
    let name = "dock-swarm";
    let hosts = format!("{},{}", a.host(), b.host());

    // Bad input first: the same engine twice, and an engine outside the swarm.
    let twice = env.fails(&[
        "cluster",
        "create",
        "--provisioner",
        "docker",
        "--docker-host",
        &format!("{0},{0}", a.host()),
        "--name",
        "dock-twice",
        "--cidr",
        &cidr,
    ]);
    assert!(twice.contains("twice"), "{twice}");
    let outsider = TestDockerd::start();
    let foreign = env.fails(&[
        "cluster",
        "create",
        "--provisioner",
        "docker",
        "--docker-host",
        &format!("{},{}", a.host(), outsider.host()),
        "--name",
        "dock-foreign",
        "--cidr",
        &cidr,
    ]);
    assert!(foreign.contains("swarm"), "{foreign}");
    env.ok(&["cluster", "destroy", "--name", "dock-foreign"]);
    assert!(objects(&outsider.engine).is_empty());
    drop(outsider);

    let out = env.ok(&[
        "cluster",
        "create",
        "--provisioner",
        "docker",
        "--docker-host",
        &hosts,
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "3",
        "--workers",
        "0",
        "--memory",
        "512",
        "--wait-timeout",
        "4m",
    ]);
    assert!(out.contains("overlay network"), "{out}");
    let state = env.state_dir(name);
    let st = state_yaml(&state);
    let addr = |i: usize| st["nodes"][i]["address"].as_str().unwrap().to_owned();
    // Round robin: the second control-plane node is the one on engine b.
    let on_b = lines(b, &["ps", "-q", "--filter", "label=dev.kiln.node"]);
    let on_a = lines(a, &["ps", "-q", "--filter", "label=dev.kiln.node"]);
    assert_eq!((on_a.len(), on_b.len()), (2, 1), "{on_a:?} {on_b:?}");
    let (node_b, nodes_a) = (addr(1), vec![addr(0), addr(2)]);
    // `cluster show` says which engine runs which node (table and JSON).
    let show = env.ok(&["cluster", "show", "--name", name]);
    let row = |node: &str| {
        show.lines()
            .find(|l| l.starts_with(&format!("{name}-{node} ")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(show.contains("ENGINE"), "{show}");
    assert!(row("controlplane-2").ends_with(&b.host()), "{show}");
    assert!(row("controlplane-3").ends_with(&a.host()), "{show}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["cluster", "show", "--name", name, "-o", "json"])).unwrap();
    assert_eq!(json["nodes"][1]["engine"].as_str(), Some(b.host().as_str()));

    let health = env.ok(&["health"]);
    assert!(health.contains("is healthy"), "{health}");
    let members = env.ok(&["-n", &addr(0), "etcd", "members"]);
    assert_eq!(
        members.lines().filter(|l| l.contains("https://")).count(),
        3,
        "{members}"
    );
    // Link faults of a single container are refused on an overlay, saying why.
    let refused = env.fails(&[
        "cluster",
        "node",
        "link-down",
        &format!("{name}-controlplane-2"),
        "--name",
        name,
    ]);
    assert!(refused.contains("overlay"), "{refused}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect = |endpoints: &[String]| etcd_client(&rt, &state, endpoints);
    let mut acked = 0;
    let mut etcd = connect(&nodes_a).unwrap();
    for i in 0..50 {
        rt.block_on(etcd.put(format!("/swarm/{i:03}"), "before", None))
            .unwrap();
        acked += 1;
    }

    // Engine b's link cut: its node is lost, the two on engine a keep quorum and take writes.
    swarm.link_b(false).unwrap();
    until_blocking(
        "the node on engine b unreachable",
        Poll::every(Duration::from_millis(500), Duration::from_secs(30)),
        || {
            let o = env.kiln(&["-e", &node_b, "-n", &node_b, "version"]);
            if o.status.success() {
                Err(String::from_utf8_lossy(&o.stdout).into_owned())
            } else {
                Ok(())
            }
        },
    )
    .unwrap();
    for i in 50..100 {
        let put = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                etcd.put(format!("/swarm/{i:03}"), "cut", None),
            )
            .await
        });
        assert!(
            matches!(put, Ok(Ok(_))),
            "write {i} with engine b cut: {put:?}"
        );
        acked += 1;
    }

    // Restored: the node on engine b comes back and has every acknowledged write.
    swarm.link_b(true).unwrap();
    until_blocking(
        "every acknowledged write on the node of engine b",
        Poll::every(Duration::from_secs(1), Duration::from_secs(90)),
        || {
            let mut c = connect(std::slice::from_ref(&node_b)).map_err(|e| e.to_string())?;
            let got = rt
                .block_on(
                    c.get(
                        "/swarm/",
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_serializable(),
                        ),
                    ),
                )
                .map_err(|e| e.to_string())?;
            if got.kvs().len() == acked {
                Ok(())
            } else {
                Err(format!("{} of {acked}", got.kvs().len()))
            }
        },
    )
    .unwrap();
    until_blocking(
        "the cluster healthy again",
        Poll::every(Duration::from_secs(1), Duration::from_secs(60)),
        || {
            let o = env.kiln(&["health", "--wait-timeout", "20s"]);
            if o.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        },
    )
    .unwrap();

    // The gateway's namespace and the host's veth into it, by the names in the state.
    let netns = st["network"]["lab_netns"].as_str().unwrap().to_owned();
    let veth = format!("kg{}", netns.trim_start_matches("kgw-"));
    assert!(link_exists(&veth), "veth {veth}");
    let id_dir = state.clone();
    env.ok(&["cluster", "destroy", "--name", name]);
    assert!(!id_dir.exists());
    assert_eq!(
        (swarm_objects(a), swarm_objects(b)),
        before,
        "left on the engines"
    );
    assert!(!link_exists(&veth), "veth {veth} left");
    assert!(
        !Path::new("/var/run/netns").join(&netns).exists(),
        "namespace {netns} left"
    );
}
