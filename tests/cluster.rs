//! `kiln cluster create` end to end (from flags, and from a cluster file saying the same), as root (bridge, namespaces, veths) and as an
//! unprivileged user (127.x addresses): the cluster ends healthy, `kiln health` works from the
//! context (also for a cluster under another `--state`) and with explicit node lists through
//! the load balancer, the load balancer keeps the API reachable when a control-plane node
//! stops, two clusters called `a` and `a-2` live side by side, the guides' reset-and-recover
//! sequence runs back to back, and `destroy` leaves no process, namespace, link, state file or
//! context behind, also after a create killed halfway.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_e2e::{Env, assert_alive, assert_no_leaks, etcd_client, free_cidr, owned};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_test_tiers::{Tier, skip_unless};

const NOBODY: u32 = 65534;

fn state_yaml(dir: &std::path::Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(dir.join("state.yaml")).unwrap()).unwrap()
}

/// Creates a 3 + 2 cluster, from flags or (`from_file`) from a cluster file saying the same,
/// and checks the same things of both.
fn create_healthy_and_destroy(env: &Env, name: &str, state: Option<&str>, from_file: bool) {
    let base = state.map_or_else(|| env.home.join(".kiln/clusters"), |s| env.home.join(s));
    let cidr = free_cidr(&base, 77);
    let file = env.home.join("cluster.yaml");
    std::fs::write(
        &file,
        format!(
            "name: {name}\nnetwork:\n  cidr: {cidr}\nnodes:\n  - role: controlplane\n    count: 3\n  - role: worker\n    count: 2\n"
        ),
    )
    .unwrap();
    let file = file.display().to_string();
    let mut args = if from_file {
        vec!["cluster", "create", "-f", file.as_str()]
    } else {
        vec![
            "cluster",
            "create",
            "--name",
            name,
            "--cidr",
            &cidr,
            "--controlplanes",
            "3",
            "--workers",
            "2",
        ]
    };
    args.extend(["--wait-timeout", "3m"]);
    let base_str = base.display().to_string();
    if state.is_some() {
        args.extend(["--state", base_str.as_str()]);
    }
    let out = env.ok(&args);
    for phase in [
        "validating CIDR and reserving IPs",
        "generating PKI and tokens",
        "creating network",
        "creating load balancer",
        "creating control-plane nodes",
        "creating worker nodes",
        "waiting for API",
        "bootstrapping cluster",
        "waiting for etcd members to be consistent across nodes",
    ] {
        assert!(out.contains(phase), "phase {phase:?} not printed:\n{out}");
    }
    let dir = base.join(name);
    let st = state_yaml(&dir);
    let shape: Vec<(String, String)> = st["nodes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        "controlplane-1",
        "controlplane-2",
        "controlplane-3",
        "worker-1",
        "worker-2",
    ]
    .iter()
    .map(|n| {
        (
            format!("{name}-{n}"),
            n.trim_end_matches(char::is_numeric)
                .trim_end_matches('-')
                .to_owned(),
        )
    })
    .collect();
    assert_eq!(shape, want, "from_file: {from_file}");
    assert_eq!(st["network"]["cidr"].as_str(), Some(cidr.as_str()));
    let addr = |i: usize| st["nodes"][i]["address"].as_str().unwrap().to_owned();
    let cp3 = st["nodes"][2]["name"].as_str().unwrap().to_owned();
    let gateway = st["network"]["gateway"].as_str().unwrap().to_owned();

    // Through the load balancer (the context's endpoint), to a node.
    let members = env.ok(&["-n", &addr(0), "etcd", "members"]);
    assert_eq!(
        members.lines().filter(|l| l.contains("https://")).count(),
        3,
        "{members}"
    );
    // From the context alone: it knows where the lab state is, whatever --state was.
    let health = env.ok(&["health"]);
    assert!(
        health.contains(&format!("cluster {name} is healthy")),
        "{health}"
    );
    // Explicit node lists through the load balancer.
    let cps = format!("{},{},{}", addr(0), addr(1), addr(2));
    let workers = format!("{},{}", addr(3), addr(4));
    let health = env.ok(&[
        "-e",
        &gateway,
        "health",
        "--control-plane-nodes",
        &cps,
        "--worker-nodes",
        &workers,
        "--wait-timeout",
        "1m",
    ]);
    assert!(health.contains("is healthy"), "{health}");
    let mut show_args = vec!["cluster", "show", "--name", name, "-o", "json"];
    if state.is_some() {
        show_args.extend(["--state", base_str.as_str()]);
    }
    let show = env.ok(&show_args);
    let show: serde_json::Value = serde_json::from_str(
        show.lines()
            .skip_while(|l| !l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap();
    assert_eq!(show["nodes"].as_array().unwrap().len(), 5);
    assert!(show["load_balancer"].is_object(), "{show}");

    // One control-plane node off: the API through the load balancer still answers, every time
    // (a refused connection makes the balancer try the next node).
    let mut node_args = vec!["cluster", "node", "stop", cp3.as_str(), "--name", name];
    if state.is_some() {
        node_args.extend(["--state", base_str.as_str()]);
    }
    env.ok(&node_args);
    for _ in 0..10 {
        env.ok(&["version"]);
    }
    node_args[2] = "start";
    env.ok(&node_args);

    let objects = owned(&dir);
    assert!(
        objects.processes.len() >= 6,
        "launchers, nodes and the load balancer: {objects:?}"
    );
    let mut destroy = vec!["cluster", "destroy", "--name", name];
    if state.is_some() {
        destroy.extend(["--state", base_str.as_str()]);
    }
    let out = env.ok(&destroy);
    assert!(
        out.contains(&format!("removed context \"{name}\"")),
        "{out}"
    );
    assert_no_leaks(&objects);
    assert!(
        !env.contexts().contains(&name.to_owned()),
        "context {name} left: {:?}",
        env.contexts()
    );
    // Idempotent.
    env.ok(&destroy);
}

#[test]
fn create_as_root_ends_healthy_and_destroy_leaves_nothing() {
    skip_unless!(Tier::Root, Tier::Etcd);
    create_healthy_and_destroy(&Env::new(None), "it-root", None, false);
}

#[test]
fn create_unprivileged_under_another_state_dir_ends_healthy_and_destroy_leaves_nothing() {
    skip_unless!(Tier::Etcd);
    let env = if nix::unistd::Uid::effective().is_root() {
        Env::new(Some(NOBODY))
    } else {
        Env::new(None)
    };
    let probe = env.kiln(&["--version"]);
    if !probe.status.success() {
        kiln_test_tiers::skip(
            "create_unprivileged",
            Tier::Root,
            &format!(
                "uid {NOBODY} cannot run kiln here: {}",
                String::from_utf8_lossy(&probe.stderr)
            ),
        );
        return;
    }
    // The same 3 + 2 cluster from a cluster file (`kiln cluster create -f`).
    create_healthy_and_destroy(&env, "it-user", Some("elsewhere"), true);
}

#[test]
fn clusters_a_and_a_2_live_side_by_side() {
    skip_unless!(Tier::Root, Tier::Etcd);
    let env = Env::new(None);
    let base = env.home.join(".kiln/clusters");
    let mut made = Vec::new();
    for (name, from) in [("a", 81u8), ("a-2", 82)] {
        let cidr = free_cidr(&base, from);
        env.ok(&[
            "cluster",
            "create",
            "--name",
            name,
            "--cidr",
            &cidr,
            "--workers",
            "1",
            "--wait-timeout",
            "2m",
        ]);
        made.push(owned(&env.state_dir(name)));
    }
    assert!(env.contexts().contains(&"a".to_owned()) && env.contexts().contains(&"a-2".to_owned()));
    env.ok(&["cluster", "destroy", "--name", "a"]);
    assert_no_leaks(&made[0]);
    // a-2 lost nothing: every process, namespace and link, and it is healthy.
    assert_alive(&made[1]);
    let health = env.ok(&["--context", "a-2", "health", "--wait-timeout", "1m"]);
    assert!(health.contains("cluster a-2 is healthy"), "{health}");
    env.ok(&["cluster", "destroy", "--name", "a-2"]);
    assert_no_leaks(&made[1]);
    assert!(
        env.contexts().is_empty(),
        "contexts left: {:?}",
        env.contexts()
    );
}

#[test]
fn the_guides_reset_then_recover_sequence_runs_back_to_back() {
    skip_unless!(Tier::Etcd);
    let env = Env::new(None);
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 83);
    let name = "it-recover";
    env.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "3",
        "--workers",
        "0",
    ]);
    let dir = env.state_dir(name);
    let st = state_yaml(&dir);
    let cps: Vec<String> = (0..3)
        .map(|i| st["nodes"][i]["address"].as_str().unwrap().to_owned())
        .collect();

    // Keys written before the snapshot, through a real etcd client with the cluster's etcd CA.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect = |endpoints: Vec<String>| etcd_client(&rt, &dir, &endpoints);
    let mut etcd = connect(cps.clone()).unwrap();
    for i in 0..100 {
        rt.block_on(etcd.put(format!("/e2e/{i:03}"), "v", None))
            .unwrap();
    }
    let snapshot = env.home.join("db.snapshot");
    env.ok(&[
        "-n",
        &cps[0],
        "etcd",
        "snapshot",
        snapshot.to_str().unwrap(),
    ]);

    // The guide's reset on all three, then at once the recovery: the bootstrap waits for the
    // wipe (or says the node is still resetting) instead of refusing for data it is wiping.
    let all = cps.join(",");
    env.ok(&[
        "-n",
        &all,
        "reset",
        "--graceful=false",
        "--reboot",
        "--system-labels-to-wipe=EPHEMERAL",
    ]);
    let recovered = until_blocking(
        "bootstrap --recover-from",
        Poll::every(Duration::from_millis(500), Duration::from_secs(60)),
        || {
            let out = env.kiln(&[
                "-n",
                &cps[0],
                "bootstrap",
                "--recover-from",
                snapshot.to_str().unwrap(),
            ]);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                !err.contains("reset EPHEMERAL before recovering"),
                "bootstrap refused a node whose wipe was still running: {err}"
            );
            if out.status.success() {
                Ok(())
            } else {
                Err(err)
            }
        },
    );
    recovered.unwrap();
    let health = env.ok(&["health", "--wait-timeout", "3m"]);
    assert!(health.contains("is healthy"), "{health}");
    let mut etcd = connect(cps).unwrap();
    let got = rt
        .block_on(etcd.get("/e2e/", Some(etcd_client::GetOptions::new().with_prefix())))
        .unwrap();
    assert_eq!(
        got.kvs().len(),
        100,
        "every key written before the snapshot is present"
    );
    let objects = owned(&dir);
    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&objects);
}

#[test]
fn destroy_cleans_up_after_a_create_killed_halfway() {
    skip_unless!(Tier::Etcd);
    let env = Env::new(None);
    let name = "it-killed";
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 79);
    let mut child = Command::new(&env.bin)
        .args([
            "cluster",
            "create",
            "--name",
            name,
            "--cidr",
            &cidr,
            "--controlplanes",
            "3",
            "--workers",
            "1",
        ])
        .env("HOME", &env.home)
        .env_remove("KILNCONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some nodes run but before it finishes.
    let dir = env.state_dir(name);
    until_blocking(
        "create to get to the nodes",
        Poll::every(Duration::from_millis(20), Duration::from_secs(60)),
        || {
            if dir
                .join(format!("{name}-controlplane-2-launcher.pid"))
                .exists()
            {
                Ok(())
            } else {
                Err(())
            }
        },
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait();
    let objects = owned(&dir);
    assert!(
        !objects.processes.is_empty(),
        "the killed create should have left node processes"
    );
    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&objects);
}

#[test]
fn conflicting_cidrs_are_refused_with_a_suggestion() {
    let env = Env::new(None);
    if nix::unistd::Uid::effective().is_root() {
        // A range that overlaps a route of this host (the first non-default one).
        let routes = std::fs::read_to_string("/proc/net/route").unwrap();
        let route = routes.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_be(u32::from_str_radix(f[1], 16).ok()?);
            (dest != 0).then(|| std::net::Ipv4Addr::from(dest))
        });
        if let Some(dest) = route {
            let err = env.fails(&[
                "cluster",
                "create",
                "--name",
                "it-conflict",
                "--cidr",
                &format!("{dest}/24"),
            ]);
            assert!(
                err.contains("overlaps the host route") && err.contains("--cidr"),
                "{err}"
            );
        }
    }
    let err = env.fails(&[
        "cluster",
        "create",
        "--name",
        "it-bad",
        "--cidr",
        "10.5.0.0/33",
    ]);
    assert!(err.contains("is not an IPv4 CIDR"), "{err}");
    assert!(
        !env.state_dir("it-bad").exists(),
        "a refused create leaves nothing"
    );
    let err = env.fails(&[
        "cluster",
        "create",
        "--name",
        "it-bad",
        "--provisioner",
        "vmware",
    ]);
    assert!(err.contains("possible values: process"), "{err}");
}

#[test]
fn destroy_of_a_root_cluster_without_root_removes_nothing() {
    skip_unless!(Tier::Root, Tier::Etcd);
    let root = Env::new(None);
    let base = root.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 84);
    let name = "it-rootonly";
    root.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--workers",
        "0",
        "--wait=false",
    ]);
    let dir = root.state_dir(name);
    let objects = owned(&dir);
    // The same state, read by an unprivileged user.
    use std::os::unix::fs::PermissionsExt as _;
    let mut p = root.home.clone();
    while p != std::path::Path::new("/") {
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
        p.pop();
    }
    let _ = std::fs::set_permissions(
        dir.join("state.yaml"),
        std::fs::Permissions::from_mode(0o644),
    );
    let nobody = Env::new(Some(NOBODY));
    let mut cmd = Command::new(&nobody.bin);
    use std::os::unix::process::CommandExt as _;
    let out = cmd
        .args([
            "cluster",
            "destroy",
            "--name",
            name,
            "--state",
            base.to_str().unwrap(),
        ])
        .env("HOME", "/nonexistent")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        && err.contains("Permission denied")
        && !err.contains("created by root")
    {
        kiln_test_tiers::skip(
            "destroy_without_root",
            Tier::Root,
            &format!("uid {NOBODY} cannot read the state here: {err}"),
        );
    } else {
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("created by root") && err.contains("nothing was removed"),
            "{err}"
        );
        assert_alive(&objects);
    }
    root.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&objects);
}

/// A tool outside the lab (the kubeadm rehearsal) records what it makes beside a cluster as an
/// attachment; `kiln cluster destroy` removes it when the tool could not: processes by pid
/// file, links only with the cluster's owner mark, namespaces by name, and nothing else.
#[test]
fn destroy_removes_what_a_tool_attached_to_the_cluster_and_nothing_else() {
    skip_unless!(Tier::Root, Tier::Etcd);
    let env = Env::new(None);
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 86);
    let name = "it-attach";
    env.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--workers",
        "0",
        "--wait=false",
    ]);
    let dir = kiln_provisioner::state::StateDir::new(&base, name);
    let bridge = state_yaml(&dir.dir)["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_owned();
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let tag = std::process::id() % 100_000;
    let (ns, ns_other) = (format!("kiln-{name}-tool"), format!("kiln-{name}-other"));
    let (marked, unmarked) = (format!("kat{tag}m"), format!("kat{tag}u"));
    // What the tool records: a namespace with a marked veth on the bridge and a process in it,
    // a link of a recorded name that does not carry the mark (someone else's).
    dir.attach(
        "tool",
        &kiln_provisioner::state::Attachment {
            pid_dirs: vec![dir.dir.join("tool")],
            links: vec![marked.clone(), unmarked.clone()],
            netns: vec![ns.clone()],
        },
    )
    .unwrap();
    ip(&["netns", "add", &ns]);
    ip(&["netns", "add", &ns_other]);
    ip(&[
        "link", "add", &marked, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    ip(&["link", "set", &marked, "master", &bridge]);
    ip(&["link", "set", &marked, "alias", &dir.owner_mark()]);
    ip(&[
        "link",
        "add",
        &unmarked,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{unmarked}p"),
    ]);
    std::fs::create_dir_all(dir.dir.join("tool/node-1")).unwrap();
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &ns, "sleep", "600"])
        .spawn()
        .unwrap();
    kiln_provisioner::daemon::write_pidfile(&dir.dir.join("tool/node-1/sleep.pid"), sleeper.id())
        .unwrap();

    env.ok(&["cluster", "destroy", "--name", name]);
    // The sleeper is this test's child: reaped here once destroy stopped it.
    let stopped = until_blocking(
        "the attached process to stop",
        Poll::every(Duration::from_millis(100), Duration::from_secs(10)),
        || match sleeper.try_wait() {
            Ok(Some(_)) => Ok(()),
            _ => Err(()),
        },
    )
    .is_ok();
    let namespaces = kiln_e2e::netns();
    let left = [
        (!stopped, "the attached process"),
        (namespaces.contains(&ns), "the attached namespace"),
        (kiln_e2e::link_exists(&marked), "the attached link"),
        (dir.dir.exists(), "the state directory"),
    ];
    // Not the cluster's: must be left alone.
    let removed = [
        (
            !namespaces.contains(&ns_other),
            "a namespace nobody recorded",
        ),
        (
            !kiln_e2e::link_exists(&unmarked),
            "a link without the cluster's mark",
        ),
    ];
    // Clean up whatever the outcome, then judge.
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    for n in [&ns, &ns_other] {
        let _ = Command::new("ip")
            .args(["netns", "delete", n])
            .stderr(Stdio::null())
            .status();
    }
    for l in [&marked, &unmarked] {
        let _ = Command::new("ip")
            .args(["link", "delete", l])
            .stderr(Stdio::null())
            .status();
    }
    for (bad, what) in left {
        assert!(!bad, "{what} is left after destroy");
    }
    for (bad, what) in removed {
        assert!(!bad, "destroy removed {what}");
    }
}
