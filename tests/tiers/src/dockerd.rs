//! A Docker Engine of a test's own, beside whatever engine the host already runs.
//!
//! Every test that needs an engine starts one with its own socket, data and exec roots and its
//! own default bridge. Never `--bridge=none`: dockerd then *deletes the host's `docker0`*
//! (`removeDefaultBridgeInterface` in Engine 20.10), the bridge of the user's or the CI
//! machine's engine. Instead [`EngineBridge`] makes a bridge of the test's own, named
//! `kdeng<N>` with an address in `198.18.0.0/15` (the benchmarking range, RFC 2544), which the
//! engine takes as its default bridge and which is deleted when the test is done.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A bridge made for one test engine's default network; deleted on drop.
#[derive(Debug)]
pub struct EngineBridge {
    name: String,
}

impl EngineBridge {
    /// Makes the first free `kdeng<N>` bridge. Creating the link is the claim: a name another
    /// test engine holds fails with "exists" and the next one is tried.
    ///
    /// # Errors
    /// When no bridge could be made (not root, or all names taken), with `ip`'s message.
    pub fn create() -> Result<Self, String> {
        let mut last = String::new();
        for n in 0u32..256 {
            let name = format!("kdeng{n}");
            let out = ip(&["link", "add", &name, "type", "bridge"])?;
            if !out.status.success() {
                last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                continue;
            }
            let bridge = Self { name };
            let cidr = format!("198.18.{}.{}/30", n / 64, (n % 64) * 4 + 1);
            let out = ip(&["addr", "add", &cidr, "dev", &bridge.name])?;
            if !out.status.success() {
                return Err(format!(
                    "adding {cidr} to {}: {}",
                    bridge.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            return Ok(bridge);
        }
        Err(format!("no free kdeng<N> bridge name: {last}"))
    }

    /// The bridge's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dockerd flag that makes this bridge the engine's default one.
    #[must_use]
    pub fn flag(&self) -> String {
        format!("--bridge={}", self.name)
    }
}

impl Drop for EngineBridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<Output, String> {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))
}

/// What the test engine does to the host's firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    /// `--iptables=false --ip6tables=false`: no chains of its own, so it cannot disturb
    /// another engine's (the lab adds what its bridges need).
    Untouched,
    /// Docker's defaults: its chains, `FORWARD` policy `DROP`. The caller restores the rules.
    DockerDefaults,
}

/// A running dockerd of a test's own; stopped on drop, then its bridge deleted.
#[derive(Debug)]
pub struct TestEngine {
    child: Child,
    dir: PathBuf,
    // Dropped after the engine has stopped (field order).
    _bridge: Option<EngineBridge>,
}

impl TestEngine {
    /// Starts dockerd with its socket (`d.sock`), data and exec roots and logs under `dir` (keep
    /// the path short: containerd's sockets live under it), and waits until it answers.
    ///
    /// # Errors
    /// When the bridge cannot be made, dockerd cannot be started, or it does not answer within
    /// 60 s (with its error log).
    pub fn start(dir: &Path, firewall: Firewall, extra: &[&str]) -> Result<Self, String> {
        let bridge = EngineBridge::create()?;
        let flag = bridge.flag();
        Self::launch(
            dir,
            None,
            Some(bridge),
            firewall,
            &[&[flag.as_str()], extra].concat(),
        )
    }

    /// Starts dockerd inside the existing network namespace `netns` (`nsenter --net`), with
    /// Docker's defaults there (its own `docker0` and chains live in that namespace).
    ///
    /// # Errors
    /// As [`TestEngine::start`].
    pub fn start_in_netns(dir: &Path, netns: &str, extra: &[&str]) -> Result<Self, String> {
        Self::launch(dir, Some(netns), None, Firewall::DockerDefaults, extra)
    }

    fn launch(
        dir: &Path,
        netns: Option<&str>,
        bridge: Option<EngineBridge>,
        firewall: Firewall,
        extra: &[&str],
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let file = |name: &str| {
            std::fs::File::create(dir.join(name))
                .map_err(|e| format!("creating {}: {e}", dir.join(name).display()))
        };
        let mut cmd = match netns {
            // Not `ip netns exec`: it mounts a new /sys, without the cgroup hierarchy
            // dockerd needs ("Devices cgroup isn't mounted").
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg("dockerd");
                c
            }
            None => Command::new("dockerd"),
        };
        cmd.arg("--host")
            .arg(format!("unix://{}", dir.join("d.sock").display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("d.pid"));
        if firewall == Firewall::Untouched {
            cmd.args(["--iptables=false", "--ip6tables=false"]);
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file("dockerd.log")?)
            .stderr(file("dockerd.err")?)
            .spawn()
            .map_err(|e| format!("starting dockerd: {e}"))?;
        let engine = Self {
            child,
            dir: dir.to_owned(),
            _bridge: bridge,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !engine
            .docker(&["version"])
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd did not answer within 60s: {}",
                    std::fs::read_to_string(dir.join("dockerd.err")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(engine)
    }

    /// The engine's socket.
    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.dir.join("d.sock")
    }

    /// `unix://` and the socket, for `DOCKER_HOST` and `--docker-host`.
    #[must_use]
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Runs the Docker CLI against this engine.
    ///
    /// # Errors
    /// When `/usr/bin/docker` cannot be run.
    pub fn docker(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("/usr/bin/docker")
            .arg("-H")
            .arg(self.host())
            .args(args)
            .stdin(Stdio::null())
            .output()
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id().cast_signed()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Whether a dockerd process runs on this host (a user's or the CI machine's engine).
#[must_use]
pub fn host_engine_running() -> bool {
    std::fs::read_dir("/proc").is_ok_and(|dir| {
        dir.flatten().any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "dockerd")
        })
    })
}

/// Two engines joined in a Docker Swarm on one machine, each in a network namespace of its own
/// (`ksw<N>a`, `ksw<N>b`) linked to a host bridge `ksw<N>` (`198.19.<N>.1/24`, the engines at
/// `.2` and `.3`): engine `a` is the manager. [`SwarmPair::cut`] sets `b`'s link down. Drop
/// leaves the swarm, stops both engines and removes the namespaces, the bridge and the firewall
/// rule that lets the engines' traffic across the bridge past a host engine's `FORWARD` drop.
#[derive(Debug)]
pub struct SwarmPair {
    n: u32,
    /// The manager.
    pub a: Option<TestEngine>,
    /// The worker.
    pub b: Option<TestEngine>,
    rule: Option<Vec<String>>,
}

impl SwarmPair {
    /// Makes the namespaces and bridge, starts both engines under `dir` (keep it short) and
    /// joins them.
    ///
    /// # Errors
    /// When a link, an engine or the swarm cannot be made, with the tool's message.
    pub fn start(dir: &Path) -> Result<Self, String> {
        let run = |args: &[&str]| -> Result<(), String> {
            let out = ip(args)?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let mut claimed = None;
        for n in 0u32..64 {
            if ip(&["link", "add", &format!("ksw{n}"), "type", "bridge"])?
                .status
                .success()
            {
                claimed = Some(n);
                break;
            }
        }
        let n = claimed.ok_or("no free ksw<N> bridge name")?;
        let mut pair = Self {
            n,
            a: None,
            b: None,
            rule: None,
        };
        let br = format!("ksw{n}");
        run(&["addr", "add", &format!("198.19.{n}.1/24"), "dev", &br])?;
        run(&["link", "set", &br, "up"])?;
        for (side, host) in [("a", 2), ("b", 3)] {
            let ns = format!("ksw{n}{side}");
            let veth = format!("ksw{n}{side}0");
            run(&["netns", "add", &ns])?;
            run(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["link", "set", &veth, "master", &br, "up"])?;
            run(&["-n", &ns, "link", "set", "lo", "up"])?;
            run(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.19.{n}.{host}/24"),
                "dev",
                "eth0",
            ])?;
            run(&["-n", &ns, "link", "set", "eth0", "up"])?;
            run(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{n}.1"),
            ])?;
        }
        // A host engine's FORWARD policy DROP with bridge-nf-call-iptables would drop the
        // engines' gossip and VXLAN across the bridge.
        let rule: Vec<String> = ["FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let out = Command::new("iptables")
            .args(["-w", "-I"])
            .args(&rule)
            .output()
            .map_err(|e| format!("running iptables: {e}"))?;
        if out.status.success() {
            pair.rule = Some(rule);
        }
        pair.a = Some(TestEngine::start_in_netns(
            &dir.join("a"),
            &format!("ksw{n}a"),
            &[],
        )?);
        pair.b = Some(TestEngine::start_in_netns(
            &dir.join("b"),
            &format!("ksw{n}b"),
            &[],
        )?);
        let docker = |e: &TestEngine, args: &[&str]| -> Result<String, String> {
            let out = e
                .docker(args)
                .map_err(|e| format!("running docker {}: {e}", args.join(" ")))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            } else {
                Err(format!(
                    "docker {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let (Some(a), Some(b)) = (&pair.a, &pair.b) else {
            return Err("engines missing".into());
        };
        let addr_a = format!("198.19.{n}.2");
        docker(
            a,
            &[
                "swarm",
                "init",
                "--advertise-addr",
                &addr_a,
                "--listen-addr",
                &format!("{addr_a}:2377"),
            ],
        )?;
        let token = docker(a, &["swarm", "join-token", "-q", "worker"])?;
        docker(
            b,
            &[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &format!("198.19.{n}.3"),
                &format!("{addr_a}:2377"),
            ],
        )?;
        Ok(pair)
    }

    /// Sets engine `b`'s link to the bridge down (`false`) or up (`true`).
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn link_b(&self, up: bool) -> Result<(), String> {
        let veth = format!("ksw{}b0", self.n);
        let out = ip(&["link", "set", &veth, if up { "up" } else { "down" }])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for SwarmPair {
    fn drop(&mut self) {
        let _ = self.link_b(true);
        for e in [&self.b, &self.a].into_iter().flatten() {
            let _ = e.docker(&["swarm", "leave", "--force"]);
        }
        self.b.take();
        self.a.take();
        for side in ["a", "b"] {
            let _ = ip(&["netns", "del", &format!("ksw{}{side}", self.n)]);
        }
        let _ = ip(&["link", "del", &format!("ksw{}", self.n)]);
        if let Some(rule) = &self.rule {
            let _ = Command::new("iptables")
                .args(["-w", "-D"])
                .args(rule)
                .output();
        }
    }
}
