//! `kiln cluster create` end to end, as root (bridge, namespaces, veths) and as an
//! unprivileged user (127.x addresses): the cluster ends healthy, the load balancer keeps the
//! API reachable when a control-plane node stops, and `destroy` leaves no process, namespace,
//! link or state file behind, also after a create killed halfway.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

struct Env {
    home: PathBuf,
    uid: Option<u32>,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new(uid: Option<u32>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-cluster-test")
            .tempdir()
            .unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
        if let Some(uid) = uid {
            // The build directory may not be reachable for that user (a checkout under /root):
            // run a copy of the binary from the test's own directory.
            use std::os::unix::fs::PermissionsExt as _;
            let copy = dir.path().join("kiln");
            std::fs::copy(&bin, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            bin = copy;
            chown_r(dir.path(), uid);
        }
        Self {
            home,
            uid,
            bin,
            _dir: dir,
        }
    }

    fn kiln(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HOME", &self.home)
            .env_remove("KILNCONFIG")
            .current_dir(&self.home)
            .stdin(Stdio::null());
        if let Some(uid) = self.uid {
            cmd.uid(uid).gid(uid);
        }
        let out = cmd.output().unwrap();
        assert_ne!(
            out.status.code(),
            Some(101),
            "kiln {args:?} panicked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kiln {args:?} failed:\n{text}");
        text
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.home.join(".kiln/clusters").join(name)
    }
}

fn chown_r(path: &Path, uid: u32) {
    let _ = nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    );
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            chown_r(&e.path(), uid);
        }
    }
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn have_etcd() -> bool {
    Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("etcdctl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Processes (not zombies) whose command line mentions `marker`.
fn processes(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            if stat.rsplit(')').next()?.trim_start().starts_with('Z') || pid == std::process::id() {
                return None;
            }
            let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?)
                .replace('\0', " ");
            cmd.contains(marker).then(|| format!("{pid} {cmd}"))
        })
        .collect()
}

/// Asserts that nothing of cluster `name` is left.
fn assert_no_leaks(env: &Env, name: &str) {
    let dir = env.state_dir(name);
    assert!(!dir.exists(), "state directory {} is left", dir.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes(&dir.display().to_string());
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {left:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    if is_root() {
        let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let ours: Vec<&String> = netns
            .iter()
            .filter(|n| n.starts_with(&format!("kiln-{name}-")))
            .collect();
        assert!(ours.is_empty(), "network namespaces left: {ours:?}");
        let links = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-o", "link"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .into_owned();
        let bridge = kiln_provisioner::network::bridge_name(name);
        let veth = kiln_provisioner::network::veth_name(name, 0);
        let veth_prefix = veth.trim_end_matches("n0");
        assert!(
            !links.contains(&format!(": {bridge}:")),
            "bridge {bridge} left:\n{links}"
        );
        assert!(
            !links.contains(&format!(": {veth_prefix}")),
            "veths {veth_prefix}* left:\n{links}"
        );
    }
}

fn create_healthy_and_destroy(env: &Env, name: &str, cidr: &str) {
    let out = env.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        cidr,
        "--controlplanes",
        "3",
        "--workers",
        "2",
        "--wait-timeout",
        "3m",
    ]);
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
    let state: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(env.state_dir(name).join("state.yaml")).unwrap(),
    )
    .unwrap();
    let cp1 = state["nodes"][0]["address"].as_str().unwrap().to_owned();
    let cp3 = state["nodes"][2]["name"].as_str().unwrap().to_owned();

    // Through the load balancer (the context's endpoint), to a node.
    let members = env.ok(&["-n", &cp1, "etcd", "members"]);
    assert_eq!(
        members.lines().filter(|l| l.contains("https://")).count(),
        3,
        "{members}"
    );
    let health = env.ok(&["health", "--cluster", name]);
    assert!(health.contains("is healthy"), "{health}");
    let show = env.ok(&["cluster", "show", "--name", name, "-o", "json"]);
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

    // One control-plane node off: the API through the load balancer still answers.
    env.ok(&["cluster", "node", "stop", &cp3, "--name", name]);
    // Every call succeeds: a refused connection makes the balancer try the next node.
    for _ in 0..10 {
        env.ok(&["version"]);
    }
    env.ok(&["cluster", "node", "start", &cp3, "--name", name]);

    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(env, name);
    // Idempotent.
    env.ok(&["cluster", "destroy", "--name", name]);
}

#[test]
fn create_as_root_ends_healthy_and_destroy_leaves_nothing() {
    if !is_root() {
        println!(
            "skipped: needs root for bridges and network namespaces (the unprivileged test covers the rest)"
        );
        return;
    }
    if !have_etcd() {
        println!("skipped: etcd is not installed (scripts/install-deps installs it)");
        return;
    }
    create_healthy_and_destroy(&Env::new(None), "it-root", "10.77.0.0/24");
}

#[test]
fn create_unprivileged_ends_healthy_and_destroy_leaves_nothing() {
    if !have_etcd() {
        println!("skipped: etcd is not installed (scripts/install-deps installs it)");
        return;
    }
    let env = if is_root() {
        Env::new(Some(NOBODY))
    } else {
        Env::new(None)
    };
    let probe = env.kiln(&["--version"]);
    if !probe.status.success() {
        println!(
            "skipped: uid {NOBODY} cannot run kiln here: {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        return;
    }
    create_healthy_and_destroy(&env, "it-user", "10.78.0.0/24");
}

#[test]
fn destroy_cleans_up_after_a_create_killed_halfway() {
    if !have_etcd() {
        println!("skipped: etcd is not installed (scripts/install-deps installs it)");
        return;
    }
    let env = Env::new(None);
    let name = "it-killed";
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "cluster",
            "create",
            "--name",
            name,
            "--cidr",
            "10.79.0.0/24",
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
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir
        .join(format!("{name}-controlplane-2-launcher.pid"))
        .exists()
    {
        assert!(Instant::now() < deadline, "create never got to the nodes");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait();
    assert!(
        !processes(&dir.display().to_string()).is_empty(),
        "the killed create should have left node processes"
    );
    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&env, name);
}

#[test]
fn conflicting_cidrs_are_refused_with_a_suggestion() {
    let env = Env::new(None);
    if is_root() {
        // A range that overlaps a route of this host (the first non-default one).
        let routes = std::fs::read_to_string("/proc/net/route").unwrap();
        let route = routes.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_be(u32::from_str_radix(f[1], 16).ok()?);
            (dest != 0).then(|| std::net::Ipv4Addr::from(dest))
        });
        if let Some(dest) = route {
            let out = env.kiln(&[
                "cluster",
                "create",
                "--name",
                "it-conflict",
                "--cidr",
                &format!("{dest}/24"),
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                err.contains("overlaps the host route") && err.contains("--cidr"),
                "{err}"
            );
        }
    }
    let out = env.kiln(&[
        "cluster",
        "create",
        "--name",
        "it-bad",
        "--cidr",
        "10.5.0.0/33",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an IPv4 CIDR"));
    assert!(
        !env.state_dir("it-bad").exists(),
        "a refused create leaves nothing"
    );
}
