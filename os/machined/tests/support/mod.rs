//! A small lab for machined integration tests: nodes are real `machined` processes on
//! 127.x addresses (no root needed) with real etcd, restarted on the reboot exit code like the
//! node launcher does, and killed with their etcd when the test ends.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_config::{GenerateInput, GeneratedConfigs};
use kiln_os_api::client::{self, Credentials};
use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN};
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
use kiln_os_api::wait::{Poll, until};
use kiln_pki::{LeafRequest, SecretsBundle};
use tonic::transport::Channel;

/// Polls `f` until it returns `Ok` or `timeout` passes (panics with the last reason).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    match until(what, Poll::every(Duration::from_millis(250), timeout), f).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// One node and its launcher thread.
pub struct Node {
    pub address: IpAddr,
    pub root: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    /// Exit codes seen (reboots and power-offs).
    pub exits: Arc<Mutex<Vec<i32>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    launcher: Option<std::thread::JoinHandle<()>>,
}

/// A set of nodes sharing one secrets bundle.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub secrets: SecretsBundle,
    pub configs: GeneratedConfigs,
    pub nodes: Vec<Node>,
    pub net: u8,
}

fn spawn(root: &Path, address: IpAddr, config: Option<&Path>, join_peers: &[String]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_machined"));
    cmd.arg("--root")
        .arg(root)
        .arg("--address")
        .arg(address.to_string())
        .arg("--hostname")
        .arg(format!("node-{address}").replace('.', "-"));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    for p in join_peers {
        cmd.arg("--join-peer").arg(p);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.with_extension("log"))
        .unwrap();
    cmd.stdout(Stdio::null())
        .stderr(log)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_CONFIG_DATA");
    cmd.spawn().unwrap()
}

impl Lab {
    /// Configurations for a cluster whose endpoint is the first node, on 127.`net`.0.x.
    pub fn new(net: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secrets = SecretsBundle::generate().unwrap();
        let endpoint = format!("https://127.{net}.0.2:6443");
        let configs = kiln_config::generate(&GenerateInput {
            cluster_name: "lab",
            endpoint: &endpoint,
            secrets: &secrets,
            install_disk: "/dev/vda",
            install_image: "kiln/installer:v0.1.0",
            patches: &[],
            control_plane_patches: &[],
            worker_patches: &[],
        })
        .unwrap();
        std::fs::write(
            dir.path().join("controlplane.yaml"),
            kiln_config::to_yaml(&configs.controlplane).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("worker.yaml"),
            kiln_config::to_yaml(&configs.worker).unwrap(),
        )
        .unwrap();
        Self {
            dir,
            secrets,
            configs,
            nodes: Vec::new(),
            net,
        }
    }

    pub fn address(&self, i: usize) -> IpAddr {
        format!("127.{}.0.{}", self.net, i + 2).parse().unwrap()
    }

    /// Starts node `i` with the given config file name (`None`: maintenance mode).
    pub fn start(&mut self, config: Option<&str>) -> usize {
        let i = self.nodes.len();
        let address = self.address(i);
        let root = self.dir.path().join(format!("node{i}"));
        let config = config.map(|c| self.dir.path().join(c));
        let peers: Vec<String> = (0..3).map(|j| self.address(j).to_string()).collect();
        let child = Arc::new(Mutex::new(Some(spawn(
            &root,
            address,
            config.as_deref(),
            &peers,
        ))));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The launcher: start again on the reboot code, stop on the power-off code.
        let launcher = {
            let (child, exits, stop, root) =
                (child.clone(), exits.clone(), stop.clone(), root.clone());
            std::thread::spawn(move || {
                loop {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let status = {
                        let mut guard = child.lock().unwrap();
                        match guard.as_mut().map(Child::try_wait) {
                            Some(Ok(Some(s))) => {
                                *guard = None;
                                Some(s.code().unwrap_or(-1))
                            }
                            _ => None,
                        }
                    };
                    if let Some(code) = status {
                        exits.lock().unwrap().push(code);
                        if code == EXIT_REBOOT && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                            *child.lock().unwrap() =
                                Some(spawn(&root, address, config.as_deref(), &peers));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        self.nodes.push(Node {
            address,
            root,
            child,
            exits,
            stop,
            launcher: Some(launcher),
        });
        i
    }

    /// Starts a node that was powered off again (same root, no config flag: STATE has it).
    pub fn power_on(&mut self, i: usize) {
        let n = &self.nodes[i];
        let peers: Vec<String> = (0..3).map(|j| self.address(j).to_string()).collect();
        *n.child.lock().unwrap() = Some(spawn(&n.root, n.address, None, &peers));
    }

    /// Waits until node `i` exited with `code` (counting earlier exits).
    pub async fn wait_exit(&self, i: usize, code: i32, count: usize) {
        let exits = self.nodes[i].exits.clone();
        eventually(
            &format!("node {i} to exit with {code}"),
            Duration::from_secs(60),
            || {
                let exits = exits.clone();
                async move {
                    let seen = exits.lock().unwrap().iter().filter(|c| **c == code).count();
                    if seen >= count {
                        Ok(())
                    } else {
                        Err(format!("exits so far: {:?}", exits.lock().unwrap()))
                    }
                }
            },
        )
        .await;
    }

    pub fn credentials(&self, role: &str) -> Credentials {
        let ca = self.secrets.os_ca().unwrap();
        let leaf = ca.issue(&LeafRequest::client("test", role)).unwrap();
        Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        }
    }

    /// An API client to node `i` with `role`, once the node answers.
    pub async fn client(&self, i: usize, role: &str) -> MachineServiceClient<Channel> {
        let creds = self.credentials(role);
        let addr = self.address(i).to_string();
        eventually(
            &format!("the API of node {i}"),
            Duration::from_secs(30),
            || {
                let (creds, addr) = (creds.clone(), addr.clone());
                async move {
                    let ch = client::connect(&addr, &creds)
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut c = client::machine_client(ch);
                    c.version(kiln_os_api::pb::Empty {})
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(c)
                }
            },
        )
        .await
    }

    /// An etcd client for the cluster (certificate from the etcd CA).
    pub async fn etcd(&self, nodes: &[usize]) -> etcd_client::Client {
        let ca = self.secrets.etcd_ca().unwrap();
        let leaf = ca.issue(&LeafRequest::client("test", "test")).unwrap();
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca.cert_pem()))
            .identity(etcd_client::Identity::from_pem(leaf.cert_pem, leaf.key_pem));
        let endpoints: Vec<String> = nodes
            .iter()
            .map(|i| format!("https://{}:2379", self.address(*i)))
            .collect();
        etcd_client::Client::connect(
            endpoints,
            Some(
                etcd_client::ConnectOptions::new()
                    .with_tls(tls)
                    .with_timeout(Duration::from_secs(5)),
            ),
        )
        .await
        .unwrap()
    }

    /// Waits until etcd on the node behind `c` waits for bootstrap (Preparing).
    pub async fn wait_etcd_preparing(&self, c: &MachineServiceClient<Channel>) {
        eventually(
            "etcd to wait for bootstrap",
            Duration::from_secs(30),
            || {
                let mut c = c.clone();
                async move {
                    let s = c
                        .service_list(kiln_os_api::pb::Empty {})
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    let etcd = s.messages[0]
                        .services
                        .iter()
                        .find(|s| s.id == "etcd")
                        .ok_or("no etcd service")?;
                    if etcd.state() == kiln_os_api::pb::ServiceState::Preparing {
                        Ok(())
                    } else {
                        Err(format!("etcd is {}", etcd.state()))
                    }
                }
            },
        )
        .await;
    }

    /// Bootstraps node `i` and waits until etcd on `members` reports them all as voting members.
    pub async fn bootstrap_and_wait(&self, i: usize, members: &[usize]) {
        let mut c = self.client(i, kiln_pki::ROLE_ADMIN).await;
        self.wait_etcd_preparing(&c).await;
        c.bootstrap(kiln_os_api::pb::BootstrapRequest::default())
            .await
            .unwrap();
        self.wait_members(members).await;
    }

    /// Waits until every node in `members` sees all of them as voting members.
    pub async fn wait_members(&self, members: &[usize]) {
        for &n in members {
            let c = self.client(n, kiln_pki::ROLE_READER).await;
            let want = members.len();
            eventually(
                &format!("node {n} to see {want} voting etcd members"),
                Duration::from_secs(90),
                || {
                    let mut c = c.clone();
                    async move {
                        let r = c
                            .etcd_member_list(kiln_os_api::pb::Empty {})
                            .await
                            .map_err(|e| e.to_string())?
                            .into_inner();
                        let m = &r.messages[0].members;
                        let voting = m
                            .iter()
                            .filter(|m| !m.is_learner && !m.hostname.is_empty())
                            .count();
                        if m.len() == want && voting == want {
                            Ok(())
                        } else {
                            Err(format!("{m:?}"))
                        }
                    }
                },
            )
            .await;
        }
    }

    /// The console log of node `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].root.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(mut c) = n.child.lock().unwrap().take() {
                // SIGKILL: etcd dies with machined (parent-death signal).
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Some(l) = n.launcher.take() {
                let _ = l.join();
            }
        }
        if std::thread::panicking() {
            for (i, n) in self.nodes.iter().enumerate() {
                eprintln!(
                    "---- console of node {i} ({}) ----\n{}",
                    n.address,
                    std::fs::read_to_string(n.root.with_extension("log")).unwrap_or_default()
                );
            }
        }
    }
}

pub const EXIT_OFF: i32 = EXIT_SHUTDOWN;
