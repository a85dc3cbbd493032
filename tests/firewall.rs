//! Living beside Docker: with Debian's Docker Engine started with its default firewall
//! settings on a host whose `net.ipv4.ip_forward` is 0 (as after a fresh boot: Docker then turns
//! forwarding on, sets the `FORWARD` policy to `DROP` and `bridge-nf-call-iptables` to 1), a
//! 3+2 cluster on its bridge becomes healthy, and after `destroy` the host's firewall rules are
//! exactly as before `create`. When the host already runs an engine with its chains in place
//! (a developer's, or the CI machine's), the test lives beside that one instead of starting a
//! second engine that would rewrite its chains.
//!
//! Runs in its own test binary: it changes host-wide settings (and restores them), so no other
//! cluster test may run beside it.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_e2e::{Env, assert_no_leaks, free_cidr, owned};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_test_tiers::dockerd::{Firewall, TestEngine, host_engine_running};
use kiln_test_tiers::{Tier, skip_unless};

/// The host's iptables rules (filter and nat), without counters and comments.
fn rules() -> String {
    let out = Command::new("iptables-save").output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                l.split(' ').take(2).collect::<Vec<_>>().join(" ")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Puts back what the test changed on the host, also when it fails.
struct Restore {
    /// The rules to put back: only when this test started an engine that rewrote them (a
    /// host engine's rules are its own, and may change meanwhile).
    rules: Option<String>,
    forward: Option<String>,
    bridge_nf: Option<String>,
    dockerd: Option<TestEngine>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // The engine stops (and its bridge goes) before the rules are put back.
        drop(self.dockerd.take());
        if let Some(rules) = &self.rules {
            let mut restore = Command::new("iptables-restore")
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            let _ = restore
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{rules}\n").as_bytes());
            let _ = restore.wait();
        }
        if let Some(v) = &self.forward {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", v);
        }
        if let Some(v) = &self.bridge_nf {
            let _ = std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", v);
        }
    }
}

/// Waits until two snapshots of the rules a second apart agree: an engine that has just
/// answered may still be adding chains, and a snapshot taken meanwhile would differ from the
/// rules after destroy for a reason that is not the lab's.
fn settled_rules() -> String {
    let mut last = rules();
    until_blocking(
        "the host's firewall rules to settle",
        Poll::every(Duration::from_secs(1), Duration::from_secs(30)),
        || {
            let now = rules();
            let same = now == last && now.contains("-A FORWARD -j DOCKER-USER");
            last = now;
            if same { Ok(()) } else { Err(()) }
        },
    )
    .unwrap_or_else(|_| panic!("the rules did not settle with Docker's chains in place:\n{last}"));
    last
}

#[test]
fn a_cluster_works_beside_dockers_firewall_and_leaves_it_as_it_was() {
    skip_unless!(Tier::Root, Tier::Docker, Tier::Firewall, Tier::Etcd);
    let work = tempfile::tempdir().unwrap();
    let mut restore = Restore {
        rules: None,
        forward: sysctl("/proc/sys/net/ipv4/ip_forward"),
        bridge_nf: sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        dockerd: None,
    };
    // Docker's bridge driver turns this on when it makes a bridge: set it as Docker would, also
    // when the host's engine already runs (then it is on already).
    std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1").unwrap();
    if host_engine_running() && rules().contains("-A FORWARD -j DOCKER-USER") {
        // A second engine with its own chains would rewrite the running one's (and break its
        // containers' port mappings): the firewall to live beside is already there.
        println!("the host's Docker engine runs: testing beside its firewall");
    } else {
        // As after a fresh boot: Docker turns forwarding on and sets the FORWARD policy to DROP.
        restore.rules = Some(rules());
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();
        restore.dockerd = Some(
            TestEngine::start(
                &work.path().join("d"),
                Firewall::DockerDefaults,
                &["--storage-driver=vfs"],
            )
            .unwrap(),
        );
    }
    let before = settled_rules();
    assert!(
        before.contains(":FORWARD DROP"),
        "Docker should have set the FORWARD policy to DROP:\n{before}"
    );

    let env = Env::new(None);
    let cidr = free_cidr(&env.home.join(".kiln/clusters"), 85);
    let out = env.ok(&[
        "cluster",
        "create",
        "--name",
        "it-docker",
        "--cidr",
        &cidr,
        "--controlplanes",
        "3",
        "--workers",
        "2",
        "--wait-timeout",
        "3m",
    ]);
    assert!(
        out.contains("host firewall drops forwarded traffic: added `iptables -A DOCKER-USER"),
        "{out}"
    );
    let during = rules();
    assert!(during.contains("-A DOCKER-USER -i kiln"), "{during}");
    let health = env.ok(&["health"]);
    assert!(health.contains("is healthy"), "{health}");

    // The rule is what lets the nodes talk: without it Docker's policy drops their traffic.
    let st: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(env.state_dir("it-docker").join("state.yaml")).unwrap(),
    )
    .unwrap();
    let ns0 = st["nodes"][0]["provider"]["process"]["netns"]
        .as_str()
        .unwrap()
        .to_owned();
    let addr1 = st["nodes"][1]["address"].as_str().unwrap().to_owned();
    let rule = &st["network"]["firewall"][0];
    let chain = rule["chain"].as_str().unwrap().to_owned();
    let spec: Vec<String> = rule["spec"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let reach = || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns0,
                "bash",
                "-c",
                &format!("timeout 2 bash -c '</dev/tcp/{addr1}/50000'"),
            ])
            .status()
            .unwrap()
            .success()
    };
    let iptables = |op: &[&str]| {
        let mut args: Vec<&str> = op.to_vec();
        args.extend(spec.iter().map(String::as_str));
        assert!(
            Command::new("iptables")
                .args(&args)
                .status()
                .unwrap()
                .success(),
            "iptables {args:?}"
        );
    };
    assert!(reach(), "a node reaches another through the bridge");
    iptables(&["-w", "-D", &chain]);
    assert!(
        !reach(),
        "without the rule, Docker's FORWARD policy drops bridge traffic (else this test proves nothing)"
    );
    iptables(&["-w", "-I", &chain, "1"]);
    assert!(reach());

    let objects = owned(&env.state_dir("it-docker"));
    let mark =
        kiln_provisioner::state::StateDir::new(&env.home.join(".kiln/clusters"), "it-docker")
            .owner_mark();
    env.ok(&["cluster", "destroy", "--name", "it-docker"]);
    assert_no_leaks(&objects);
    let after = rules();
    assert!(
        !after.contains(&mark),
        "a rule of the cluster is left:\n{after}"
    );
    // Other labs on this host may add or remove their own rules meanwhile: theirs are left out
    // of the comparison, everything else must be exactly as before.
    assert_eq!(
        without_other_labs(&after, &mark),
        without_other_labs(&before, &mark),
        "destroy removes exactly the rules create added"
    );
}

/// `rules` without the lines of other Kiln clusters (marked `kiln:<id>:<name>`, not `mark`).
fn without_other_labs(rules: &str, mark: &str) -> String {
    rules
        .lines()
        .filter(|l| !l.contains("kiln:") || l.contains(mark))
        .collect::<Vec<_>>()
        .join("\n")
}
