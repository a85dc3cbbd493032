//! A lab for real DHCP clients: a server network namespace holding a bridge, and one
//! namespace per client joined to it by a veth pair, all made and removed by the test. The
//! server runs in-process on a socket opened inside the server namespace.

#![allow(clippy::unwrap_used, dead_code)] // test helpers fail loudly on purpose

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_dhcpd::{Config, Counters, Handler, LeaseTable, Mac, StaticLease, server};

pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
pub const BRIDGE: &str = "br0";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespaces and links of one test; removed on drop.
#[derive(Debug)]
pub struct Lab {
    pub server_ns: String,
    pub clients: Vec<Client>,
    pub dir: tempfile::TempDir,
}

/// One client namespace.
#[derive(Debug, Clone)]
pub struct Client {
    pub ns: String,
    /// Its interface, named uniquely on the machine (dhcpcd keys files by interface name).
    pub iface: String,
    pub mac: Mac,
}

impl Lab {
    /// A server namespace with a bridge at 10.213.0.1/24 and `clients` client namespaces.
    pub fn new(clients: u8) -> anyhow::Result<Self> {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let server_ns = format!("kdhcp-{id}-s");
        let mut lab = Lab {
            server_ns: server_ns.clone(),
            clients: Vec::new(),
            dir: tempfile::tempdir()?,
        };
        run(&["ip", "netns", "add", &server_ns])?;
        let s = server_ns.as_str();
        run(&["ip", "-n", s, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", s, "link", "add", BRIDGE, "type", "bridge"])?;
        run(&["ip", "-n", s, "addr", "add", "10.213.0.1/24", "dev", BRIDGE])?;
        run(&["ip", "-n", s, "link", "set", BRIDGE, "up"])?;
        for i in 0..clients {
            let ns = format!("kdhcp-{id}-c{i}");
            run(&["ip", "netns", "add", &ns])?;
            lab.clients.push(Client {
                ns: ns.clone(),
                iface: format!("kd{id}c{i}"),
                mac: Mac([0x52, 0x54, 0x00, 0xdd, 0x00, 0x10 + i]),
            });
            let c = lab.clients.last().unwrap().clone();
            let peer = format!("kd{id}p{i}");
            run(&[
                "ip", "-n", s, "link", "add", &peer, "type", "veth", "peer", "name", &c.iface,
                "netns", &ns,
            ])?;
            run(&["ip", "-n", s, "link", "set", &peer, "master", BRIDGE, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "link",
                "set",
                &c.iface,
                "address",
                &c.mac.to_string(),
            ])?;
            run(&["ip", "-n", &ns, "link", "set", &c.iface, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Opens a UDP socket on `port` inside the server namespace, bound to the bridge.
    pub fn server_socket(&self, port: u16) -> anyhow::Result<std::net::UdpSocket> {
        let path = format!("/var/run/netns/{}", self.server_ns);
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<std::net::UdpSocket> {
                    let ns =
                        std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("entering the server namespace")?;
                    Ok(kiln_dhcpd::daemon::bind_udp(
                        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
                        Some(BRIDGE),
                    )?)
                })
                .join()
                .unwrap()
        })
    }

    /// The network's configuration with a static lease per client (`10.213.0.{10+i}`,
    /// host name `node-{i}`).
    pub fn config(&self) -> Config {
        let mut c = Config::new(SERVER, "10.213.0.0/24".parse().unwrap());
        c.router = Some(SERVER);
        c.dns_servers = vec![Ipv4Addr::new(10, 213, 0, 53), Ipv4Addr::new(10, 213, 0, 54)];
        c.domain_name = Some("lab.test".into());
        c.mtu = Some(1400);
        c.static_leases = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, cl)| StaticLease {
                mac: cl.mac,
                address: Ipv4Addr::new(10, 213, 0, 10 + i as u8),
                hostname: Some(format!("node-{i}")),
                mtu: None,
                router: None,
                dns_servers: None,
            })
            .collect();
        c
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the server with `config`, its lease journal in [`Lab::state_dir`].
    pub fn start(&self, config: Config) -> anyhow::Result<Running> {
        config.validate()?;
        std::fs::create_dir_all(self.state_dir())?;
        let table = LeaseTable::open(&self.state_dir(), server::unix_now())?;
        let socket = tokio::net::UdpSocket::from_std(self.server_socket(67)?)?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            socket,
            Handler::new(config, table, 67),
            counters.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Running {
            counters,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// A command run inside `ns`.
    pub fn in_ns(&self, ns: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// The IPv4 addresses on the client's interface.
    pub fn addresses(&self, client: &Client) -> String {
        run(&[
            "ip",
            "-n",
            &client.ns,
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            &client.iface,
        ])
        .unwrap_or_default()
    }

    /// Writes an executable script into the test directory.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &self.clients {
            let _ = run(&["ip", "netns", "del", &c.ns]);
        }
        let _ = run(&["ip", "netns", "del", &self.server_ns]);
    }
}

/// A running in-process server.
#[derive(Debug)]
pub struct Running {
    pub counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Handler>>,
}

impl Running {
    /// Stops the server and returns its handler (and so its lease table).
    pub async fn stop(mut self) -> Handler {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout` saying what
/// was awaited.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `key=value` lines of the last event block in a client script's log whose `reason`
/// is one of `reasons`.
pub fn last_event(
    log: &Path,
    reasons: &[&str],
) -> Option<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(log).ok()?;
    text.split("--\n")
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<std::collections::HashMap<_, _>>()
        })
        .filter(|m| {
            m.get("reason")
                .is_some_and(|r| reasons.contains(&r.as_str()))
        })
        .last()
}
