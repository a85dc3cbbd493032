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
    _bridge: EngineBridge,
}

impl TestEngine {
    /// Starts dockerd with its socket (`d.sock`), data and exec roots and logs under `dir` (keep
    /// the path short: containerd's sockets live under it), and waits until it answers.
    ///
    /// # Errors
    /// When the bridge cannot be made, dockerd cannot be started, or it does not answer within
    /// 60 s (with its error log).
    pub fn start(dir: &Path, firewall: Firewall, extra: &[&str]) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let bridge = EngineBridge::create()?;
        let file = |name: &str| {
            std::fs::File::create(dir.join(name))
                .map_err(|e| format!("creating {}: {e}", dir.join(name).display()))
        };
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(format!("unix://{}", dir.join("d.sock").display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("d.pid"))
            .arg(bridge.flag());
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
