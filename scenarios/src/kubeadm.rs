//! The kubeadm migration rehearsal ("Migrating from Kubeadm"): a kubeadm-style control plane
//! of legacy nodes running the real `etcd` with kubeadm's PKI layout, each in its own network
//! namespace on the cluster bridge (the process provisioner's, or the Docker network's Linux
//! bridge), behind a real HAProxy as the existing load balancer; and the guide's steps on it
//! (`gen secrets --from-kubernetes-pki`, `gen config` with the load balancer as the endpoint,
//! backends rewritten and HAProxy reloaded, a member removed and its node destroyed).
//!
//! No Kubernetes server binaries can be installed here (DESIGN.md), so HAProxy's frontend on
//! the control-plane endpoint port (6443) balances etcd's client port of the nodes, and the
//! background writer goes through it: every request the writer makes passes the existing load
//! balancer, and each is a new connection, so it meets the configuration HAProxy has at that
//! moment.
//!
//! Everything started here lives under `<state dir>/kubeadm/`: one directory per legacy node
//! (its `/etc/kubernetes/pki`, etcd data, pidfile and log) and HAProxy's configuration,
//! pidfiles and log. Processes are known by pidfile identity (pid and start time), namespaces
//! and host-side veths by name, the veths also by the cluster's owner mark. [`Legacy::destroy`]
//! removes all of it; the cluster's `destroy` runs it first. Before any of it is made, it is
//! recorded in the cluster's state directory as attachment [`ATTACHMENT`], so that `kiln
//! cluster destroy` removes it too when the harness was killed mid-run.
//!
//! # Limitations
//!
//! HAProxy retries a refused connection elsewhere, so the writer's failure count shows that the
//! endpoint answered, not the order of the steps.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kiln_os_api::wait::{Poll, until};
use kiln_provisioner::daemon::{self, Identity};
use kiln_provisioner::network::netlink;
use kiln_provisioner::state::{Attachment, ClusterState, StateDir};

/// The name of the attachment ([`Attachment`]) that records the objects made here.
pub const ATTACHMENT: &str = "kubeadm";

/// The port of the control-plane endpoint (kube-apiserver's) on HAProxy.
pub const ENDPOINT_PORT: u16 = 6443;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
use kiln_os_api::contract::{API_PORT, TRUST_PORT};

/// The bootstrap token of the rehearsal (`kubeadm token create --ttl 0` on a real cluster).
pub const BOOTSTRAP_TOKEN: &str = "kubead.m1grat10nt0ken00";

/// One legacy control-plane node.
#[derive(Debug, Clone)]
pub struct LegacyNode {
    /// Its name (the etcd member name, as kubeadm names members after hosts).
    pub name: String,
    /// Its address on the cluster network.
    pub address: Ipv4Addr,
    /// Its network namespace.
    pub netns: String,
    /// The host side of its veth.
    pub veth: String,
    /// Its root directory (holding `etc/kubernetes/pki`, `var/lib/etcd`).
    pub root: PathBuf,
    /// Whether it was removed from the cluster and destroyed.
    pub destroyed: bool,
}

impl LegacyNode {
    /// Its `/etc/kubernetes/pki`.
    pub fn pki(&self) -> PathBuf {
        self.root.join("etc/kubernetes/pki")
    }

    fn pidfile(&self) -> PathBuf {
        self.root.join("etcd.pid")
    }

    fn client_url(&self) -> String {
        format!("https://{}:{ETCD_CLIENT_PORT}", self.address)
    }

    fn peer_url(&self) -> String {
        format!("https://{}:{ETCD_PEER_PORT}", self.address)
    }
}

/// The kubeadm-style control plane of a scenario and what the guide's steps produced.
#[derive(Debug)]
pub struct Legacy {
    /// `<state dir>/kubeadm`.
    pub dir: PathBuf,
    /// The legacy control-plane nodes.
    pub nodes: Vec<LegacyNode>,
    /// HAProxy's address (the existing load balancer).
    pub lb: Ipv4Addr,
    lb_netns: String,
    lb_veth: String,
    /// Kiln control-plane nodes that joined etcd: (name, address), HAProxy backends too.
    pub kiln_members: Vec<(String, Ipv4Addr)>,
    /// Every HAProxy process started (a reload starts a new one; the old one finishes its
    /// connections and exits).
    haproxies: Vec<Identity>,
    reloads: usize,
    mark: String,
    /// The cluster's state directory, where what is made here is recorded as attachment
    /// [`ATTACHMENT`] for `kiln cluster destroy`.
    state_dir: StateDir,
    /// The apiserver-etcd-client certificate and key (PEM) and the etcd CA, for clients.
    client: (String, String, String),
    /// How long one etcd request through HAProxy may take: 3 s, 12 s for QEMU nodes (TCG
    /// guests joining and leaving answer slowly while the host is busy).
    deadline: Duration,
    /// Output of `gen secrets` and `gen config`, once run.
    pub secrets: Option<PathBuf>,
    /// `gen config`'s output directory, once run.
    pub configs: Option<PathBuf>,
}

async fn run(program: &str, args: &[&str], cwd: &Path) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A CA as `kubeadm init` writes it: RSA 2048 in PKCS#1, CA:TRUE, keyUsage as Go's
/// `certutil.NewSelfSignedCACert`.
async fn ca(dir: &Path, name: &str, cn: &str) -> anyhow::Result<()> {
    let key = format!("{name}.key");
    run(
        "openssl",
        &["genrsa", "-traditional", "-out", &key, "2048"],
        dir,
    )
    .await?;
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
            "-out",
            &format!("{name}.crt"),
        ],
        dir,
    )
    .await?;
    Ok(())
}

/// A leaf signed by `ca` (a path without extension, relative to `dir`), as kubeadm issues its
/// etcd certificates: RSA 2048, keyUsage digitalSignature and keyEncipherment, the given
/// extended key usages and subject alternative names.
async fn leaf(
    dir: &Path,
    name: &str,
    ca: &str,
    subject: &str,
    eku: &str,
    sans: &[String],
) -> anyhow::Result<()> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let ext = format!("{name}.ext");
    run(
        "openssl",
        &["genrsa", "-traditional", "-out", &key, "2048"],
        dir,
    )
    .await?;
    run(
        "openssl",
        &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
        dir,
    )
    .await?;
    let mut text = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={eku}\n"
    );
    if !sans.is_empty() {
        text += &format!("subjectAltName={}\n", sans.join(","));
    }
    std::fs::write(dir.join(&ext), text)?;
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &format!("0x{:016x}", rand_serial()),
            "-days",
            "365",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.crt"),
        ],
        dir,
    )
    .await?;
    let _ = std::fs::remove_file(dir.join(&csr));
    let _ = std::fs::remove_file(dir.join(&ext));
    Ok(())
}

fn rand_serial() -> u64 {
    // Distinct serials per certificate; the time in nanoseconds is enough for a lab PKI.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// Writes the shared part of kubeadm's PKI (the CAs and the service-account key pair, which
/// `kubeadm join --control-plane` copies to every control-plane node) into `dir`.
async fn shared_pki(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("etcd"))?;
    ca(dir, "ca", "kubernetes").await?;
    ca(dir, "front-proxy-ca", "front-proxy-ca").await?;
    ca(&dir.join("etcd"), "ca", "etcd-ca").await?;
    run(
        "openssl",
        &["genrsa", "-traditional", "-out", "sa.key", "2048"],
        dir,
    )
    .await?;
    run(
        "openssl",
        &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"],
        dir,
    )
    .await?;
    // What the kube-apiserver uses to reach etcd; the scenario's clients use it too.
    leaf(
        dir,
        "apiserver-etcd-client",
        "etcd/ca",
        "/O=system:masters/CN=kube-apiserver-etcd-client",
        "clientAuth",
        &[],
    )
    .await?;
    Ok(())
}

/// Copies the shared PKI into a node's `pki` directory and issues its etcd server, peer and
/// health-check certificates (kubeadm's `etcd/server`, `etcd/peer`,
/// `etcd/healthcheck-client`). The server certificate also names the load balancer
/// (kubeadm's `etcd.local.serverCertSANs`), since clients reach etcd through it here.
async fn node_pki(shared: &Path, node: &LegacyNode, lb: Ipv4Addr) -> anyhow::Result<()> {
    let pki = node.pki();
    std::fs::create_dir_all(pki.join("etcd"))?;
    for f in [
        "ca.crt",
        "ca.key",
        "front-proxy-ca.crt",
        "front-proxy-ca.key",
        "sa.key",
        "sa.pub",
        "etcd/ca.crt",
        "etcd/ca.key",
        "apiserver-etcd-client.crt",
        "apiserver-etcd-client.key",
    ] {
        std::fs::copy(shared.join(f), pki.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let etcd = pki.join("etcd");
    let mut sans = vec![
        format!("DNS:{}", node.name),
        "DNS:localhost".to_owned(),
        format!("IP:{}", node.address),
        "IP:127.0.0.1".to_owned(),
        "IP:0:0:0:0:0:0:0:1".to_owned(),
    ];
    let subject = format!("/CN={}", node.name);
    leaf(
        &etcd,
        "peer",
        "ca",
        &subject,
        "serverAuth,clientAuth",
        &sans,
    )
    .await?;
    sans.push(format!("IP:{lb}"));
    leaf(
        &etcd,
        "server",
        "ca",
        &subject,
        "serverAuth,clientAuth",
        &sans,
    )
    .await?;
    leaf(
        &etcd,
        "healthcheck-client",
        "ca",
        "/CN=kube-etcd-healthcheck-client",
        "clientAuth",
        &[],
    )
    .await?;
    Ok(())
}

/// Starts `program args` inside network namespace `netns` (through `ip netns exec`, which
/// execs it: the pid is the program's), output to `log`, in its own process group; records its
/// identity in `pidfile`.
fn spawn_in(
    netns: &str,
    program: &str,
    args: &[String],
    log: &Path,
    pidfile: &Path,
) -> anyhow::Result<Identity> {
    use std::os::unix::process::CommandExt as _;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program} in {netns}"))?;
    let id = daemon::write_pidfile(pidfile, child.id())?;
    // The child is reaped by whoever waits for it; this process stops it by identity, so the
    // handle is not needed (dropping it does not kill it).
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(id)
}

/// Addresses of the rehearsal at the top of the cluster network, which the lab does not hand
/// out (nodes get addresses from `.2` up): `count` legacy nodes below HAProxy's, which is the
/// last host address.
fn addresses(state: &ClusterState, count: usize) -> anyhow::Result<(Vec<Ipv4Addr>, Ipv4Addr)> {
    let net: ipnetwork::Ipv4Network = state
        .network
        .cidr
        .parse()
        .with_context(|| format!("cluster network {}", state.network.cidr))?;
    let last = u32::from(net.broadcast()) - 1;
    let lb = Ipv4Addr::from(last);
    let nodes: Vec<Ipv4Addr> = (1..=count as u32)
        .map(|i| Ipv4Addr::from(last - i))
        .collect();
    for a in nodes.iter().chain([&lb]) {
        if !net.contains(*a) || state.network.gateway == IpAddr::V4(*a) {
            bail!("{a} is not free on {}", state.network.cidr);
        }
        if let Some(n) = state.nodes.iter().find(|n| n.address == IpAddr::V4(*a)) {
            bail!(
                "{a} is taken by {}; the network {} is too small for the rehearsal",
                n.name,
                state.network.cidr
            );
        }
    }
    Ok((nodes, lb))
}

impl Legacy {
    /// Builds the control plane: PKI, `count` etcd members in their namespaces, HAProxy in
    /// front of them; waits until etcd answers through HAProxy.
    pub async fn create(
        dir: &StateDir,
        state: &ClusterState,
        count: usize,
    ) -> anyhow::Result<Self> {
        let Some(bridge) = state.network.bridge.clone() else {
            bail!(
                "the kubeadm control plane attaches its nodes to the cluster bridge, which the \
                 lab makes only as root"
            );
        };
        if count == 0 {
            bail!("a kubeadm control plane needs at least one node");
        }
        let (addrs, lb) = addresses(state, count)?;
        let root = dir.dir.join("kubeadm");
        std::fs::create_dir_all(&root)?;
        let id = dir.id();
        let prefix = net_prefix(&state.network.cidr)?;
        let gateway = match state.network.gateway {
            IpAddr::V4(g) => g,
            IpAddr::V6(_) => bail!("the rehearsal needs an IPv4 cluster network"),
        };
        let nodes: Vec<LegacyNode> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let name = format!("kubeadm-cp-{}", i + 1);
                LegacyNode {
                    netns: format!("kiln-{}-{name}", state.name),
                    veth: format!("kv{}k{}", &id[2..], i + 1),
                    root: root.join(&name),
                    name,
                    address: *a,
                    destroyed: false,
                }
            })
            .collect();
        // One write's deadline (a new TLS connection through HAProxy and the put, sent once
        // more after an etcd error). Containers get more than processes: a write that met a
        // leader change on docker nodes beside a CI run once took longer than 3 s.
        let deadline = match state.provisioner.as_str() {
            kiln_provisioner::provision::qemu::NAME => Duration::from_secs(12),
            kiln_provisioner::provision::docker::NAME => Duration::from_secs(6),
            _ => Duration::from_secs(3),
        };
        let mut legacy = Self {
            deadline,
            dir: root.clone(),
            nodes,
            lb,
            lb_netns: format!("kiln-{}-kubeadm-lb", state.name),
            lb_veth: format!("kv{}kl", &id[2..]),
            kiln_members: Vec::new(),
            haproxies: Vec::new(),
            reloads: 0,
            mark: dir.owner_mark(),
            state_dir: dir.clone(),
            client: Default::default(),
            secrets: None,
            configs: None,
        };
        // Recorded before anything is made: should this process be killed, `kiln cluster
        // destroy` removes it.
        dir.attach(
            ATTACHMENT,
            &Attachment {
                pid_dirs: vec![root.clone()],
                links: legacy.links().map(|(veth, _, _)| veth).collect(),
                netns: legacy.links().map(|(_, netns, _)| netns).collect(),
            },
        )?;
        // From here on, what fails is cleaned up by destroy (the caller keeps the handle).
        let shared = root.join("pki");
        shared_pki(&shared).await?;
        legacy.client = (
            std::fs::read_to_string(shared.join("etcd/ca.crt"))?,
            std::fs::read_to_string(shared.join("apiserver-etcd-client.crt"))?,
            std::fs::read_to_string(shared.join("apiserver-etcd-client.key"))?,
        );
        let handle = netlink::connect()?;
        let links = legacy.links().collect::<Vec<_>>();
        for (veth, netns, address) in links {
            netlink::create_node(
                &handle,
                &netlink::NodeLink {
                    netns,
                    veth: veth.clone(),
                    bridge: bridge.clone(),
                    address,
                    prefix,
                    gateway,
                    default_route: true,
                    mtu: state.network.mtu,
                },
            )
            .await?;
            netlink::set_alias(&handle, &veth, &legacy.mark).await?;
        }
        let initial_cluster = legacy
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for n in &legacy.nodes {
            node_pki(&shared, n, lb).await?;
            let pki = n.pki();
            let p = |f: &str| pki.join(f).display().to_string();
            // The command line of kubeadm's etcd static pod manifest.
            let args = vec![
                format!("--name={}", n.name),
                format!("--data-dir={}", n.root.join("var/lib/etcd").display()),
                format!(
                    "--listen-client-urls=https://127.0.0.1:{ETCD_CLIENT_PORT},{}",
                    n.client_url()
                ),
                format!("--advertise-client-urls={}", n.client_url()),
                format!("--listen-peer-urls={}", n.peer_url()),
                format!("--initial-advertise-peer-urls={}", n.peer_url()),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".to_owned(),
                format!("--initial-cluster-token=kubeadm-{}", state.name),
                format!("--cert-file={}", p("etcd/server.crt")),
                format!("--key-file={}", p("etcd/server.key")),
                "--client-cert-auth=true".to_owned(),
                format!("--trusted-ca-file={}", p("etcd/ca.crt")),
                format!("--peer-cert-file={}", p("etcd/peer.crt")),
                format!("--peer-key-file={}", p("etcd/peer.key")),
                "--peer-client-cert-auth=true".to_owned(),
                format!("--peer-trusted-ca-file={}", p("etcd/ca.crt")),
                "--snapshot-count=10000".to_owned(),
            ];
            spawn_in(
                &n.netns,
                "etcd",
                &args,
                &n.root.join("etcd.log"),
                &n.pidfile(),
            )?;
        }
        legacy.reload_haproxy()?;
        // The cluster answers through the load balancer: a write is acknowledged.
        until(
            "the kubeadm etcd cluster to accept a write through HAProxy",
            Poll::backoff(
                Duration::from_millis(100),
                Duration::from_millis(500),
                Duration::from_secs(30),
            ),
            || async {
                let mut c = legacy.client_through_lb().await?;
                c.put("/kiln-scenario/kubeadm-ready", "yes", None).await?;
                anyhow::Ok(())
            },
        )
        .await
        .map_err(|t| anyhow::anyhow!("{t}"))?;
        Ok(legacy)
    }

    /// (host-side veth, namespace, address) of every legacy node and of HAProxy.
    fn links(&self) -> impl Iterator<Item = (String, String, Ipv4Addr)> + '_ {
        self.nodes
            .iter()
            .map(|n| (n.veth.clone(), n.netns.clone(), n.address))
            .chain([(self.lb_veth.clone(), self.lb_netns.clone(), self.lb)])
    }

    /// The nodes not destroyed yet.
    pub fn live(&self) -> impl Iterator<Item = &LegacyNode> {
        self.nodes.iter().filter(|n| !n.destroyed)
    }

    /// The control-plane endpoint: `https://<HAProxy>:6443`.
    pub fn endpoint(&self) -> String {
        format!("https://{}:{ENDPOINT_PORT}", self.lb)
    }

    fn tls(&self) -> etcd_client::ConnectOptions {
        let (ca, cert, key) = &self.client;
        etcd_client::ConnectOptions::new()
            .with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(ca))
                    .identity(etcd_client::Identity::from_pem(cert, key)),
            )
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(self.deadline)
    }

    /// A new etcd client through HAProxy, with kubeadm's apiserver-etcd-client certificate.
    pub async fn client_through_lb(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint()], Some(self.tls())).await?)
    }

    /// What a client needs to connect through HAProxy on its own (the background writer).
    pub fn connector(&self) -> (String, etcd_client::ConnectOptions, Duration) {
        (self.endpoint(), self.tls(), self.deadline)
    }

    /// A client straight to the live legacy nodes and the Kiln members (not through HAProxy),
    /// for membership changes.
    async fn client_direct(&self, except: Option<&str>) -> anyhow::Result<etcd_client::Client> {
        let urls: Vec<String> = self
            .live()
            .filter(|n| Some(n.name.as_str()) != except)
            .map(LegacyNode::client_url)
            .chain(
                self.kiln_members
                    .iter()
                    .map(|(_, a)| format!("https://{a}:{ETCD_CLIENT_PORT}")),
            )
            .collect();
        Ok(etcd_client::Client::connect(urls, Some(self.tls())).await?)
    }

    /// Writes HAProxy's configuration with the live nodes as backends and starts HAProxy; when
    /// one runs, the new one takes over with `-sf` (the old one stops listening and finishes
    /// its connections).
    fn reload_haproxy(&mut self) -> anyhow::Result<()> {
        let cfg = self.dir.join("haproxy.cfg");
        let mut text = format!(
            "# Written by the kubeadm migration scenario: the existing load balancer.\n\
             global\n    maxconn 1000\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    retries 3\n    option redispatch\n\
             frontend control-plane\n    bind {lb}:{ENDPOINT_PORT}\n    default_backend control-plane\n\
             frontend etcd\n    bind {lb}:{ETCD_CLIENT_PORT}\n    default_backend control-plane\n\
             backend control-plane\n    balance roundrobin\n",
            lb = self.lb
        );
        for n in self.live() {
            text += &format!(
                "    server {} {}:{ETCD_CLIENT_PORT} check inter 500ms fall 2 rise 1\n",
                n.name, n.address
            );
        }
        for (name, address) in &self.kiln_members {
            text += &format!(
                "    server {name} {address}:{ETCD_CLIENT_PORT} check inter 500ms fall 2 rise 1\n"
            );
        }
        // The Kiln nodes' OS API and trustd (where workers get their API certificate with the
        // machine token) at the endpoint too; the legacy nodes have neither.
        for (service, port) in [("os-api", API_PORT), ("trustd", TRUST_PORT)] {
            text += &format!(
                "frontend {service}\n    bind {lb}:{port}\n    default_backend {service}\n\
                 backend {service}\n    balance roundrobin\n",
                lb = self.lb
            );
            for (name, address) in &self.kiln_members {
                text += &format!(
                    "    server {name} {address}:{port} check inter 500ms fall 2 rise 1\n"
                );
            }
        }
        std::fs::write(&cfg, text)?;
        let cfg = cfg.display().to_string();
        run_blocking("haproxy", &["-c", "-q", "-f", &cfg])?;
        let mut args = vec!["-f".to_owned(), cfg];
        let old: Vec<String> = self
            .haproxies
            .iter()
            .filter(|id| id.alive())
            .map(|id| id.pid.to_string())
            .collect();
        if !old.is_empty() {
            args.push("-sf".to_owned());
            args.extend(old);
        }
        self.reloads += 1;
        let pidfile = self.dir.join(format!("haproxy-{}.pid", self.reloads));
        let id = spawn_in(
            &self.lb_netns,
            "haproxy",
            &args,
            &self.dir.join("haproxy.log"),
            &pidfile,
        )?;
        self.haproxies.push(id);
        Ok(())
    }

    /// The guide's steps 12-15 for one legacy node: the load balancer's backends updated
    /// (HAProxy reloaded), etcd leadership moved off the node if it leads, the member removed,
    /// and the node destroyed (etcd stopped, its namespace deleted). Returns a report line.
    pub async fn remove_node(&mut self, index: usize) -> anyhow::Result<String> {
        let i = index
            .checked_sub(1)
            .filter(|i| *i < self.nodes.len())
            .with_context(|| format!("there is no kubeadm-cp-{index}"))?;
        let node = self.nodes[i].clone();
        if node.destroyed {
            bail!("{} was already removed", node.name);
        }
        if self.live().count() + self.kiln_members.len() < 2 {
            bail!(
                "{} is the last member of the kubeadm etcd cluster; join a Kiln node first",
                node.name
            );
        }
        self.nodes[i].destroyed = true;
        self.reload_haproxy()?;
        self.nodes[i].destroyed = false;
        let mut c = self.client_direct(None).await?;
        let members = c.member_list().await?;
        let member = members
            .members()
            .iter()
            .find(|m| m.name() == node.name)
            .with_context(|| format!("{} is not an etcd member", node.name))?
            .clone();
        let mut own = etcd_client::Client::connect([node.client_url()], Some(self.tls())).await?;
        let status = own.status().await?;
        let mut moved = String::new();
        if status.leader() == member.id() {
            let to = members
                .members()
                .iter()
                .find(|m| m.id() != member.id() && !m.is_learner())
                .context("no other voting member to hand leadership to")?;
            own.move_leader(to.id()).await?;
            moved = format!("leadership moved to {}, ", to.name());
        }
        let others = self.client_direct(Some(&node.name)).await?;
        let member_id = member.id();
        // etcd refuses a removal ("unhealthy cluster") until the remaining members have been
        // connected to each other for 5 s (its strict reconfiguration check), as on a cluster
        // that just started: wait for that, on etcd's code, not its text.
        until(
            format!("etcd to accept the removal of {}", node.name),
            Poll::backoff(
                Duration::from_millis(100),
                Duration::from_millis(500),
                Duration::from_secs(15),
            ),
            || {
                let mut others = others.clone();
                async move {
                    match others.member_remove(member_id).await {
                        Ok(_) => Ok(Ok(())),
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.code() == tonic::Code::Unavailable =>
                        {
                            Err(s.message().to_owned())
                        }
                        Err(e) => Ok(Err(e)),
                    }
                }
            },
        )
        .await
        .map_err(|t| anyhow::anyhow!("{t}"))??;
        self.nodes[i].destroyed = true;
        self.destroy_node(&node).await;
        Ok(format!(
            "HAProxy reloaded without it, {moved}member {:x} removed, node destroyed",
            member.id()
        ))
    }

    async fn destroy_node(&self, node: &LegacyNode) {
        daemon::stop_pidfile(&node.pidfile(), Duration::from_secs(10));
        self.delete_link(&node.veth, &node.netns).await;
    }

    async fn delete_link(&self, veth: &str, netns: &str) {
        if let Ok(handle) = netlink::connect() {
            let _ = netlink::delete_marked_link(&handle, veth, &self.mark).await;
        }
        let _ = netlink::delete_netns(netns).await;
    }

    /// The guide's steps 9-12 for a Kiln node booted in maintenance mode at `address`:
    /// `apply-config --insecure` the generated `controlplane.yaml` or `worker.yaml`; for a
    /// control-plane node, wait until it is a voting etcd member (it joins as a learner and is
    /// promoted), then add it to HAProxy's backends and reload.
    pub async fn apply_config(
        &mut self,
        name: &str,
        address: Ipv4Addr,
        controlplane: bool,
    ) -> anyhow::Result<String> {
        let out = self
            .configs
            .clone()
            .context("run genConfigWithKubeadmSecrets first")?;
        let file = if controlplane {
            "controlplane.yaml"
        } else {
            "worker.yaml"
        };
        let data = std::fs::read(out.join(file))?;
        let addr = address.to_string();
        until(
            format!("{name} to take {file} (apply-config --insecure)"),
            Poll::every(Duration::from_millis(300), Duration::from_secs(60)),
            || {
                let data = data.clone();
                let addr = addr.clone();
                async move {
                    let ch = kiln_os_api::client::connect_insecure(&addr).await?;
                    let mut c = kiln_os_api::client::machine_client(ch);
                    c.apply_configuration(kiln_os_api::pb::ApplyConfigurationRequest {
                        data,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("apply-config: {}", s.message()))?;
                    anyhow::Ok(())
                }
            },
        )
        .await
        .map_err(|t| anyhow::anyhow!("{t}"))?;
        if !controlplane {
            let ready = self.wait_running(name, &addr).await?;
            return Ok(format!(
                "{file} applied; running {:.1}s later (API certificate from trustd through HAProxy)",
                ready.as_secs_f64()
            ));
        }
        let started = std::time::Instant::now();
        until(
            format!("{name} to be a voting etcd member"),
            Poll::every(Duration::from_millis(300), Duration::from_secs(90)),
            || async {
                let mut c = self.client_through_lb().await?;
                let list = c.member_list().await?;
                match list.members().iter().find(|m| m.name() == name) {
                    Some(m) if !m.is_learner() => anyhow::Ok(()),
                    Some(_) => bail!("{name} is a learner"),
                    None => bail!("{name} is not a member (started) yet"),
                }
            },
        )
        .await
        .map_err(|t| anyhow::anyhow!("{t}"))?;
        let joined = started.elapsed();
        let ready = self.wait_running(name, &addr).await?;
        self.kiln_members.push((name.to_owned(), address));
        self.reload_haproxy()?;
        Ok(format!(
            "{file} applied; a voting etcd member {:.1}s later, running {:.1}s later; HAProxy reloaded with it",
            joined.as_secs_f64(),
            ready.as_secs_f64()
        ))
    }

    /// Waits until the node's OS API, reached with the admin credentials `gen config` wrote
    /// (`kilnconfig`, from the imported secrets' OS CA), answers with stage `running` (the
    /// guide's "verify that the new node is ready"); returns how long it took.
    async fn wait_running(&self, name: &str, addr: &str) -> anyhow::Result<Duration> {
        let out = self
            .configs
            .clone()
            .context("run genConfigWithKubeadmSecrets first")?;
        let path = out.join("kilnconfig");
        let config = kiln_config::ClientConfig::load(&path)?;
        let (_, ctx) = config.context(None, &path)?;
        let decode = |what: &str, b64: &str| {
            kiln_pki::decode_base64_pem(b64).with_context(|| format!("kilnconfig {what}"))
        };
        let creds = kiln_os_api::client::Credentials {
            ca_pem: decode("ca", &ctx.ca)?,
            cert_pem: decode("crt", &ctx.crt)?,
            key_pem: decode("key", &ctx.key)?,
        };
        let started = std::time::Instant::now();
        until(
            format!("{name} to run with its configuration"),
            Poll::every(Duration::from_millis(300), Duration::from_secs(90)),
            || async {
                let ch = kiln_os_api::client::connect(addr, &creds).await?;
                let mut c = kiln_os_api::client::machine_client(ch);
                let v = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.version(kiln_os_api::pb::Empty {}),
                )
                .await?
                .map_err(|s| anyhow::anyhow!("version: {}", s.message()))?;
                let stage = v
                    .into_inner()
                    .messages
                    .into_iter()
                    .next()
                    .unwrap_or_default()
                    .stage();
                if stage == kiln_os_api::pb::Stage::Running {
                    anyhow::Ok(())
                } else {
                    bail!("stage {stage}")
                }
            },
        )
        .await
        .map_err(|t| anyhow::anyhow!("{t}"))?;
        Ok(started.elapsed())
    }

    /// The member names of the etcd cluster (asked through HAProxy).
    pub async fn member_names(&self) -> anyhow::Result<Vec<String>> {
        let mut c = self.client_through_lb().await?;
        let mut names: Vec<String> = c
            .member_list()
            .await?
            .members()
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Stops every process started here and deletes the namespaces and links; idempotent.
    pub async fn destroy(&mut self) {
        for id in self.haproxies.drain(..) {
            daemon::stop(id, Duration::from_secs(5));
        }
        for n in &self.nodes {
            daemon::stop_pidfile(&n.pidfile(), Duration::from_secs(10));
        }
        let links: Vec<_> = self.links().collect();
        for (veth, netns, _) in links {
            self.delete_link(&veth, &netns).await;
        }
        for n in &mut self.nodes {
            n.destroyed = true;
        }
        self.state_dir.detach(ATTACHMENT);
    }

    /// Runs `kiln gen secrets --from-kubernetes-pki <first node's pki>
    /// --kubernetes-bootstrap-token TOKEN` (the guide's steps 1-3: the PKI directory is taken
    /// from a control-plane node).
    pub async fn gen_secrets(&mut self) -> anyhow::Result<String> {
        let node = self
            .live()
            .next()
            .context("no legacy node is left")?
            .clone();
        let pki = node.pki().display().to_string();
        let out = self.dir.join("kiln");
        std::fs::create_dir_all(&out)?;
        let secrets = out.join("secrets.yaml");
        let kiln = kiln_bin()?;
        run(
            &kiln,
            &[
                "gen",
                "secrets",
                "--from-kubernetes-pki",
                &pki,
                "--kubernetes-bootstrap-token",
                BOOTSTRAP_TOKEN,
                "--force",
                "-o",
                &secrets.display().to_string(),
            ],
            &out,
        )
        .await?;
        self.secrets = Some(secrets);
        Ok(format!("secrets from {}'s {pki}", node.name))
    }

    /// Runs `kiln gen config --with-secrets secrets.yaml NAME https://<HAProxy>:6443` (step 4:
    /// the existing load balancer as the endpoint).
    pub async fn gen_config(&mut self, cluster: &str) -> anyhow::Result<String> {
        let secrets = self
            .secrets
            .clone()
            .context("run genSecretsFromKubernetesPki first")?;
        let out = self.dir.join("kiln");
        let kiln = kiln_bin()?;
        let endpoint = self.endpoint();
        run(
            &kiln,
            &[
                "gen",
                "config",
                "--with-secrets",
                &secrets.display().to_string(),
                cluster,
                &endpoint,
                "--force",
                "-o",
                &out.display().to_string(),
            ],
            &out,
        )
        .await?;
        for f in ["controlplane.yaml", "worker.yaml"] {
            let text = std::fs::read_to_string(out.join(f))?;
            let cfg: kiln_config::MachineConfig =
                kiln_config::from_yaml(&text).with_context(|| f.to_string())?;
            if cfg.cluster.control_plane.endpoint != endpoint {
                bail!(
                    "{f} has endpoint {}, not the load balancer's {endpoint}",
                    cfg.cluster.control_plane.endpoint
                );
            }
        }
        self.configs = Some(out);
        Ok(format!(
            "controlplane.yaml and worker.yaml with endpoint {endpoint}"
        ))
    }

    /// The CA certificates (and the service-account key) in the generated configurations are
    /// byte-identical to the kubeadm files.
    pub fn assert_cas_kept(&self) -> anyhow::Result<String> {
        let out = self.configs.clone().context("run genConfig first")?;
        let pki = self.dir.join("pki");
        let file =
            |f: &str| std::fs::read_to_string(pki.join(f)).with_context(|| format!("reading {f}"));
        let load = |f: &str| -> anyhow::Result<kiln_config::MachineConfig> {
            Ok(kiln_config::from_yaml(&std::fs::read_to_string(
                out.join(f),
            )?)?)
        };
        let cp = load("controlplane.yaml")?;
        let worker = load("worker.yaml")?;
        let pem = |what: &str, p: Option<&kiln_pki::PemCertAndKey>| -> anyhow::Result<String> {
            Ok(p.with_context(|| format!("{what} is missing"))?
                .cert_pem()?)
        };
        let mut checked = Vec::new();
        let mut same = |what: &str, got: String, want: String| -> anyhow::Result<()> {
            if got.as_bytes() != want.as_bytes() {
                bail!("{what} differs from the kubeadm file");
            }
            checked.push(what.to_owned());
            Ok(())
        };
        same(
            "controlplane.yaml cluster.ca (ca.crt)",
            pem("cluster.ca", cp.cluster.ca.as_ref())?,
            file("ca.crt")?,
        )?;
        same(
            "controlplane.yaml cluster.ca key (ca.key)",
            cp.cluster
                .ca
                .as_ref()
                .and_then(|c| c.key_pem().ok().flatten())
                .context("cluster.ca.key is missing")?,
            file("ca.key")?,
        )?;
        same(
            "controlplane.yaml cluster.aggregatorCA (front-proxy-ca.crt)",
            pem("cluster.aggregatorCA", cp.cluster.aggregator_ca.as_ref())?,
            file("front-proxy-ca.crt")?,
        )?;
        same(
            "controlplane.yaml cluster.etcd.ca (etcd/ca.crt)",
            pem(
                "cluster.etcd.ca",
                cp.cluster.etcd.as_ref().and_then(|e| e.ca.as_ref()),
            )?,
            file("etcd/ca.crt")?,
        )?;
        same(
            "controlplane.yaml cluster.serviceAccount (sa.key)",
            cp.cluster
                .service_account
                .as_ref()
                .context("cluster.serviceAccount is missing")?
                .key_pem()?,
            file("sa.key")?,
        )?;
        same(
            "worker.yaml cluster.ca (ca.crt)",
            pem("worker cluster.ca", worker.cluster.ca.as_ref())?,
            file("ca.crt")?,
        )?;
        Ok(format!("byte-identical: {}", checked.len()))
    }
}

fn run_blocking(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn kiln_bin() -> anyhow::Result<String> {
    Ok(daemon::kiln_binary()?.display().to_string())
}

fn net_prefix(cidr: &str) -> anyhow::Result<u8> {
    let net: ipnetwork::Ipv4Network = cidr
        .parse()
        .with_context(|| format!("cluster network {cidr}"))?;
    Ok(net.prefix())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bootstrap_token_is_well_formed() {
        kiln_pki::validate_token(BOOTSTRAP_TOKEN).unwrap();
    }
}
