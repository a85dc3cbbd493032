//! Living beside Docker: with Debian's Docker Engine started with its default firewall
//! settings on a host whose `net.ipv4.ip_forward` is 0 (as after a fresh boot: Docker then turns
//! forwarding on, sets the `FORWARD` policy to `DROP` and `bridge-nf-call-iptables` to 1), a
//! 3+2 cluster on its bridge becomes healthy, and after `destroy` the host's firewall rules are
//! exactly as before `create`.
//!
//! Runs in its own test binary: it changes host-wide settings (and restores them), so no other
//! cluster test may run beside it.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_e2e::{Env, assert_no_leaks, free_cidr, owned};
use kiln_os_api::wait::{Poll, until_blocking};
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
    rules: String,
    forward: Option<String>,
    bridge_nf: Option<String>,
    dockerd: Option<Child>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(mut d) = self.dockerd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = d.wait();
        }
        let mut restore = Command::new("iptables-restore")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        let _ = restore
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{}\n", self.rules).as_bytes());
        let _ = restore.wait();
        if let Some(v) = &self.forward {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", v);
        }
        if let Some(v) = &self.bridge_nf {
            let _ = std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", v);
        }
    }
}

fn start_dockerd(dir: &Path) -> Child {
    let sock = dir.join("docker.sock");
    let child = Command::new("dockerd")
        .args(["--data-root", dir.join("data").to_str().unwrap()])
        .args(["--exec-root", dir.join("exec").to_str().unwrap()])
        .args(["--pidfile", dir.join("docker.pid").to_str().unwrap()])
        .args(["-H", &format!("unix://{}", sock.display())])
        // Its own default bridge would collide with a developer's Docker; the firewall
        // behaviour (FORWARD policy DROP, DOCKER-USER, bridge-nf-call-iptables) is the same.
        .args(["--bridge=none", "--storage-driver=vfs"])
        .stdout(std::fs::File::create(dir.join("dockerd.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("dockerd.err")).unwrap())
        .spawn()
        .unwrap();
    until_blocking(
        "dockerd to set up its firewall",
        Poll::every(Duration::from_millis(100), Duration::from_secs(60)),
        || {
            // The jump from FORWARD comes last: a snapshot taken before it would differ
            // from the rules after destroy for a reason that is not the lab's.
            if rules().contains("-A FORWARD -j DOCKER-USER") && sock.exists() {
                Ok(())
            } else {
                Err(())
            }
        },
    )
    .unwrap_or_else(|_| {
        panic!(
            "dockerd did not start: {}",
            std::fs::read_to_string(dir.join("dockerd.err")).unwrap_or_default()
        )
    });
    child
}

#[test]
fn a_cluster_works_beside_dockers_firewall_and_leaves_it_as_it_was() {
    skip_unless!(Tier::Root, Tier::Docker, Tier::Firewall, Tier::Etcd);
    let work = tempfile::tempdir().unwrap();
    let mut restore = Restore {
        rules: rules(),
        forward: sysctl("/proc/sys/net/ipv4/ip_forward"),
        bridge_nf: sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        dockerd: None,
    };
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();
    // Docker's bridge driver turns this on when it makes its default bridge, which this
    // engine does not (--bridge=none, so it cannot collide with a developer's docker0): set it
    // as Docker would.
    std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1").unwrap();
    restore.dockerd = Some(start_dockerd(work.path()));
    let before = rules();
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
    env.ok(&["cluster", "destroy", "--name", "it-docker"]);
    assert_no_leaks(&objects);
    assert_eq!(
        rules(),
        before,
        "destroy removes exactly the rules create added"
    );
}
