//! Support for the cross-crate end-to-end tests: the `kiln` binary (built if needed), a
//! private home directory per test, and leak checks that find a cluster's objects by the
//! names its state recorded, never by prefix.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // test support fails loudly

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use kiln_os_api::wait::{Poll, until_blocking};

/// The `kiln` binary: `$KILN_BIN`, or the workspace's, built once by cargo for this run.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test>: the binary is target/<profile>/kiln.
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "kiln", "--bin", "kiln"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cargo build -p kiln failed"
        );
        let bin = profile_dir.join("kiln");
        assert!(bin.exists(), "{} does not exist", bin.display());
        bin
    })
    .clone()
}

/// The `machined` binary (the init of QEMU images, the entrypoint of Docker node images):
/// `$KILN_MACHINED`, else next to `$KILN_BIN`, else the workspace's, built once by cargo.
pub fn machined_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("KILN_MACHINED") {
            return PathBuf::from(p);
        }
        let kiln = kiln_bin();
        if std::env::var_os("KILN_BIN").is_none() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "kiln-machined",
                "--bin",
                "machined",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
            if kiln.parent().is_some_and(|p| p.ends_with("release")) {
                cmd.arg("--release");
            }
            assert!(
                cmd.status().unwrap().success(),
                "cargo build -p kiln-machined failed"
            );
        }
        let bin = kiln.with_file_name("machined");
        assert!(bin.exists(), "{} does not exist", bin.display());
        bin
    })
    .clone()
}

/// A private home (client config, `~/.kiln/clusters`) for one test, and optionally another uid.
#[derive(Debug)]
pub struct Env {
    /// `$HOME` of the commands.
    pub home: PathBuf,
    /// Run as this uid (root tests of the unprivileged path).
    pub uid: Option<u32>,
    /// The binary run.
    pub bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A new home; with `uid`, a copy of the binary that uid can run.
    pub fn new(uid: Option<u32>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e")
            .tempdir()
            .unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut bin = kiln_bin();
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

    /// Runs `kiln ARGS`; a panic of kiln fails the test.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_env(args, &[])
    }

    /// Runs `kiln ARGS` with extra environment variables; a panic of kiln fails the test.
    pub fn kiln_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .envs(vars.iter().copied())
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

    /// Runs `kiln ARGS`, which must succeed; returns stdout and stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kiln {args:?} failed:\n{text}");
        text
    }

    /// Runs `kiln ARGS`, which must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "kiln {args:?} should fail:\n{err}");
        err
    }

    /// The default state directory of cluster `name`.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.home.join(".kiln/clusters").join(name)
    }

    /// The client config.
    pub fn kilnconfig(&self) -> PathBuf {
        self.home.join(".kiln/config")
    }

    /// The contexts in the client config.
    pub fn contexts(&self) -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(self.kilnconfig()) else {
            return Vec::new();
        };
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        v["contexts"]
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A test that fails leaves its clusters running: destroy every cluster whose state lies
/// under this home before the temporary directory (and with it the state) goes.
impl Drop for Env {
    fn drop(&mut self) {
        fn states(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
            if depth == 0 {
                return;
            }
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.join("state.yaml").is_file() {
                    out.push(p);
                } else if p.is_dir() {
                    states(&p, depth - 1, out);
                }
            }
        }
        let mut found = Vec::new();
        states(&self.home, 4, &mut found);
        for dir in found {
            let (Some(name), Some(base)) = (dir.file_name(), dir.parent()) else {
                continue;
            };
            let mut cmd = Command::new(&self.bin);
            cmd.args(["cluster", "destroy", "--name"])
                .arg(name)
                .arg("--state")
                .arg(base)
                .env("HOME", &self.home)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(uid) = self.uid {
                cmd.uid(uid).gid(uid);
            }
            let _ = cmd.status();
        }
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

/// The first free /24 from `10.<from>.0.0` on (no host route, no cluster under `base`).
pub fn free_cidr(base: &Path, from: u8) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(kiln_provisioner::network::free_cidr(base, from))
}

/// What a cluster's state names: its pid files' processes, namespaces and links.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    /// The state directory.
    pub dir: PathBuf,
    /// Processes from its pid files (pid, start time) that were running.
    pub processes: Vec<kiln_provisioner::daemon::Identity>,
    /// Network namespaces.
    pub netns: Vec<String>,
    /// Links (bridge, host-side veths, taps).
    pub links: Vec<String>,
}

/// Reads what the cluster in `dir` owns, from its state and pid files.
pub fn owned(dir: &Path) -> Owned {
    let state: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("state.yaml")).unwrap()).unwrap();
    let mut o = Owned {
        dir: dir.to_owned(),
        ..Owned::default()
    };
    for n in state["nodes"].as_sequence().into_iter().flatten() {
        if let Some(ns) = n["provider"]["process"]["netns"].as_str() {
            o.netns.push(ns.to_owned());
        }
        if let Some(v) = n["provider"]["process"]["veth"].as_str() {
            o.links.push(v.to_owned());
        }
        if let Some(t) = n["provider"]["qemu"]["tap"].as_str() {
            o.links.push(t.to_owned());
        }
        for nic in n["provider"]["qemu"]["extra_nics"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if let Some(t) = nic["tap"].as_str() {
                o.links.push(t.to_owned());
            }
        }
    }
    if let Some(b) = state["network"]["bridge"].as_str() {
        o.links.push(b.to_owned());
    }
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "pid")
            && let Some(id) = kiln_provisioner::daemon::running(&e.path())
        {
            o.processes.push(id);
        }
    }
    o
}

/// Network namespaces on this host.
pub fn netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether link `name` exists.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Asserts that every object in `o` still exists (a cluster left alone by another's destroy).
pub fn assert_alive(o: &Owned) {
    assert!(
        o.dir.join("state.yaml").exists(),
        "{} is gone",
        o.dir.display()
    );
    for p in &o.processes {
        assert!(p.alive(), "process {p:?} of {} died", o.dir.display());
    }
    let ns = netns();
    for n in &o.netns {
        assert!(ns.contains(n), "network namespace {n} is gone");
    }
    for l in &o.links {
        assert!(link_exists(l), "link {l} is gone");
    }
}

/// Asserts that nothing of `o` is left: no state directory, no process running under it, no
/// namespace or link it named.
pub fn assert_no_leaks(o: &Owned) {
    assert!(
        !o.dir.exists(),
        "state directory {} is left",
        o.dir.display()
    );
    until_blocking(
        "no process of the cluster left",
        Poll::every(Duration::from_millis(100), Duration::from_secs(10)),
        || {
            let left: Vec<String> = o
                .processes
                .iter()
                .filter(|p| p.alive())
                .map(|p| format!("{p:?}"))
                .chain(
                    kiln_provisioner::daemon::processes_under(&o.dir)
                        .into_iter()
                        .map(|(p, c)| format!("{p} {c}")),
                )
                .collect();
            if left.is_empty() { Ok(()) } else { Err(left) }
        },
    )
    .unwrap();
    let ns = netns();
    for n in &o.netns {
        assert!(!ns.contains(n), "network namespace {n} is left");
    }
    for l in &o.links {
        assert!(!link_exists(l), "link {l} is left");
    }
}

/// An etcd client of the cluster whose state directory is `dir`, with a client certificate
/// issued from its etcd CA (`secrets.yaml`), for the node addresses `endpoints` (port 2379),
/// with a 5 s timeout. The caller's `rt` drives it.
pub fn etcd_client(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    endpoints: &[String],
) -> Result<etcd_client::Client, etcd_client::Error> {
    let secrets = kiln_pki::SecretsBundle::from_yaml(
        &std::fs::read_to_string(dir.join("secrets.yaml")).unwrap(),
    )
    .unwrap();
    let ca = secrets.etcd_ca().unwrap();
    let leaf = ca
        .issue(&kiln_pki::LeafRequest::client("e2e", "e2e"))
        .unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(ca.cert_pem()))
        .identity(etcd_client::Identity::from_pem(leaf.cert_pem, leaf.key_pem));
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_timeout(Duration::from_secs(5));
    let urls: Vec<String> = endpoints
        .iter()
        .map(|a| format!("https://{a}:2379"))
        .collect();
    rt.block_on(etcd_client::Client::connect(urls, Some(opts)))
}
