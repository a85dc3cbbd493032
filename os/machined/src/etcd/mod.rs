//! etcd on control-plane nodes: the real `etcd` binary under the supervisor, with
//! certificates from the configuration's etcd CA. One node is bootstrapped through the API;
//! the others wait in Preparing until an existing member adds them as learners ([`join`]),
//! start, and are promoted. `bootstrap --recover-from` restores an uploaded snapshot with
//! `etcdctl snapshot restore` first. etcd runs with `--strict-reconfig-check=false` (its
//! command line says why): otherwise every join waits 5 s after the previous one.

pub mod join;
pub mod ops;
pub mod pki;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use kiln_os_api::contract::{ETCD_CLIENT_PORT, ETCD_PEER_PORT};
use tokio::sync::watch;

use crate::node::Node;
use crate::supervisor::{CommandSpec, Prepared, Service, ServiceContext, ServiceError};

pub use pki::EtcdPki;

/// The service id.
pub const SERVICE_ID: &str = "etcd";

/// First pause after every control-plane node failed to answer a join (none started yet);
/// doubles up to [`JOIN_RETRY_MAX`]. Candidates that answer hold the request instead.
const JOIN_RETRY: Duration = Duration::from_millis(100);
/// Longest pause between join rounds.
const JOIN_RETRY_MAX: Duration = Duration::from_secs(1);

/// What `bootstrap` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapRequest {
    /// A new cluster of one member.
    New,
    /// A snapshot was restored into the data directory: start from it.
    Recover,
}

/// How etcd will start.
#[derive(Debug, Clone)]
enum Initial {
    /// Data directory exists: no cluster flags.
    Existing,
    /// New cluster (bootstrap or restored snapshot).
    New,
    /// Joining: the cluster's members as `name=peer-url`.
    Join { initial_cluster: String },
}

/// Bootstrap and join state shared by the API and the etcd service.
#[derive(Debug)]
pub struct EtcdState {
    bootstrap: watch::Sender<Option<BootstrapRequest>>,
    initial: Mutex<Option<Initial>>,
    promotion: Mutex<Option<join::Joined>>,
    pki: Mutex<Option<EtcdPki>>,
    /// Bumped when this node sees the membership change (a learner it added or it itself was
    /// promoted): member-add requests waiting here for the learner slot look again at once.
    membership: watch::Sender<u64>,
}

impl Default for EtcdState {
    fn default() -> Self {
        Self {
            bootstrap: watch::channel(None).0,
            initial: Mutex::new(None),
            promotion: Mutex::new(None),
            pki: Mutex::new(None),
            membership: watch::channel(0).0,
        }
    }
}

impl EtcdState {
    /// Records a bootstrap request for the waiting etcd service.
    pub fn request_bootstrap(&self, request: BootstrapRequest) {
        self.bootstrap.send_replace(Some(request));
    }

    /// The issued certificates, once etcd prepared.
    pub fn pki(&self) -> Option<EtcdPki> {
        self.pki.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `https://addr:port`.
pub fn url(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("https://{a}:{port}"),
        IpAddr::V6(a) => format!("https://[{a}]:{port}"),
    }
}

/// This node's client URL.
pub fn client_url(node: &Node) -> String {
    url(node.address(), ETCD_CLIENT_PORT)
}

/// This node's peer URL.
pub fn peer_url(node: &Node) -> String {
    url(node.address(), ETCD_PEER_PORT)
}

/// etcd's client URL at the control-plane endpoint's host (where a load balancer in front of
/// an existing control plane may also balance etcd), unless that host is this node.
fn etcd_endpoint(node: &Node) -> Option<String> {
    let cfg = node.config()?;
    let host = kiln_config::generate::endpoint_host(&cfg.cluster.control_plane.endpoint)?;
    if node.is_self(&host) {
        return None;
    }
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => url(ip, ETCD_CLIENT_PORT),
        Err(_) => format!("https://{host}:{ETCD_CLIENT_PORT}"),
    })
}

/// Whether etcd has data on this node.
pub fn has_data(node: &Node) -> bool {
    node.platform.volumes().etcd_data().join("member").exists()
}

/// The etcd service.
#[derive(Debug)]
pub struct EtcdService {
    node: Weak<Node>,
}

impl EtcdService {
    /// The service of `node`.
    pub fn new(node: &Arc<Node>) -> Self {
        Self {
            node: Arc::downgrade(node),
        }
    }

    fn node(&self) -> Result<Arc<Node>, ServiceError> {
        self.node
            .upgrade()
            .ok_or_else(|| ServiceError::new("the node is shutting down"))
    }
}

fn data_dir(node: &Node) -> PathBuf {
    node.platform.volumes().etcd_data()
}

/// Restores the uploaded snapshot into etcd's data directory with `etcdctl snapshot restore`
/// (a new cluster of one member: this node). The waiting etcd service then starts from it.
pub async fn restore(node: &Node, skip_hash_check: bool) -> Result<(), ServiceError> {
    let snapshot = node.platform.volumes().etcd_recover_snapshot();
    if !snapshot.exists() {
        return Err(ServiceError::new(
            "no snapshot was uploaded; run `kiln bootstrap --recover-from FILE`",
        ));
    }
    let name = node.hostname();
    let peer = peer_url(node);
    let target = data_dir(node);
    let tmp = target.with_extension("restoring");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut cmd = tokio::process::Command::new(&node.etcdctl_bin);
    cmd.env("ETCDCTL_API", "3")
        .arg("snapshot")
        .arg("restore")
        .arg(&snapshot)
        .args([
            "--name",
            &name,
            "--initial-cluster",
            &format!("{name}={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .arg("--data-dir")
        .arg(&tmp);
    if skip_hash_check {
        cmd.arg("--skip-hash-check");
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| ServiceError::new(format!("running {}: {e}", node.etcdctl_bin)))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ServiceError::new(format!(
            "etcdctl snapshot restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&tmp, &target).map_err(ServiceError::new)?;
    let _ = std::fs::remove_file(&snapshot);
    Ok(())
}

#[async_trait]
impl Service for EtcdService {
    fn id(&self) -> &'static str {
        SERVICE_ID
    }

    async fn pre_start(&self, ctx: &ServiceContext) -> Result<Prepared, ServiceError> {
        let node = self.node()?;
        let config = node
            .config()
            .ok_or_else(|| ServiceError::new("no machine configuration"))?;
        ctx.progress("Issuing etcd certificates");
        let dir = node.platform.volumes().run.join("etcd-pki");
        let pki = pki::issue(&config, &dir, &node.hostname(), node.address())
            .map_err(ServiceError::new)?;
        *node.etcd.pki.lock().unwrap_or_else(|e| e.into_inner()) = Some(pki);
        std::fs::create_dir_all(data_dir(&node).parent().unwrap_or(&data_dir(&node)))
            .map_err(ServiceError::new)?;

        let mut bootstrap = node.etcd.bootstrap.subscribe();
        let mut retry = JOIN_RETRY;
        loop {
            if has_data(&node) {
                *node.etcd.initial.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Initial::Existing);
                return Ok(Prepared::Run);
            }
            let request = *bootstrap.borrow_and_update();
            match request {
                Some(BootstrapRequest::New) => {
                    *node.etcd.initial.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Initial::New);
                    return Ok(Prepared::Run);
                }
                Some(BootstrapRequest::Recover) => {
                    // The API restored the snapshot; the data directory check above starts
                    // etcd. Without data the request is stale.
                    node.etcd.bootstrap.send_replace(None);
                }
                None => {}
            }
            let candidates = node.control_plane_candidates();
            // Every candidate is asked at once and holds the request until it can add this
            // node (its etcd running, the learner slot free), so the answer comes the moment
            // the cluster is ready; only when every candidate failed is there a pause.
            let asked = tokio::select! {
                r = join::ask_all(&node, &candidates) => Some(r),
                _ = bootstrap.changed() => None,
            };
            let errors = match asked {
                None => continue,
                Some(Ok(joined)) => {
                    *node.etcd.initial.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Initial::Join {
                            initial_cluster: joined.initial_cluster.clone(),
                        });
                    *node
                        .etcd
                        .promotion
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(joined);
                    return Ok(Prepared::Run);
                }
                Some(Err(errors)) => errors,
            };
            // No Kiln node added us: the members may run no Kiln API at all (a kubeadm control
            // plane being migrated). Ask etcd itself at the control-plane endpoint.
            if let Some(endpoint) = etcd_endpoint(&node) {
                let pki = node
                    .etcd
                    .pki()
                    .ok_or_else(|| ServiceError::new("etcd certificates were not issued"))?;
                match join::join_through_etcd(&node, &pki, std::slice::from_ref(&endpoint)).await {
                    Ok(joined) => {
                        ctx.progress(format!("Joining etcd through {endpoint}"));
                        *node.etcd.initial.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Initial::Join {
                                initial_cluster: joined.initial_cluster.clone(),
                            });
                        *node
                            .etcd
                            .promotion
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(joined);
                        return Ok(Prepared::Run);
                    }
                    Err(e) => {
                        tracing::debug!(%endpoint, error = %e, "no etcd to join at the endpoint")
                    }
                }
            }
            ctx.progress(if candidates.is_empty() {
                "Waiting for `kiln bootstrap`: no other control-plane node is known to join through"
                    .to_owned()
            } else {
                format!(
                    "Waiting for `kiln bootstrap` or to join the cluster through {} ({})",
                    candidates.join(", "),
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            });
            // Every candidate failed at once (not started yet, unreachable): back off, but a
            // bootstrap request on this node wakes us at once.
            tokio::select! {
                _ = bootstrap.changed() => retry = JOIN_RETRY,
                () = tokio::time::sleep(retry) => retry = (retry * 2).min(JOIN_RETRY_MAX),
            }
        }
    }

    fn command(&self) -> Result<CommandSpec, ServiceError> {
        let node = self.node()?;
        let config = node
            .config()
            .ok_or_else(|| ServiceError::new("no machine configuration"))?;
        let pki = node
            .etcd
            .pki()
            .ok_or_else(|| ServiceError::new("etcd certificates were not issued"))?;
        let initial = node
            .etcd
            .initial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(Initial::Existing);
        let name = node.hostname();
        let peer = peer_url(&node);
        let client = client_url(&node);
        let path = |p: &PathBuf| p.display().to_string();
        let mut args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", data_dir(&node).display()),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--cert-file={}", path(&pki.cert)),
            format!("--key-file={}", path(&pki.key)),
            format!("--trusted-ca-file={}", path(&pki.ca)),
            "--client-cert-auth=true".to_owned(),
            format!("--peer-cert-file={}", path(&pki.cert)),
            format!("--peer-key-file={}", path(&pki.key)),
            format!("--peer-trusted-ca-file={}", path(&pki.ca)),
            "--peer-client-cert-auth=true".to_owned(),
            // With the strict check etcd refuses every member-add until the serving member has
            // been connected to all voting members for 5 s, so each join would wait 5 s after
            // the previous promotion. Kiln only adds learners, which never count toward quorum,
            // and etcd still refuses to promote a learner that has not caught up. A machine
            // config can turn it back on with `extraArgs: {strict-reconfig-check: "true"}`.
            "--strict-reconfig-check=false".to_owned(),
        ];
        match initial {
            Initial::Existing => {}
            Initial::New => {
                args.push(format!("--initial-cluster={name}={peer}"));
                args.push("--initial-cluster-state=new".to_owned());
            }
            Initial::Join { initial_cluster } => {
                args.push(format!("--initial-cluster={initial_cluster}"));
                args.push("--initial-cluster-state=existing".to_owned());
            }
        }
        if let Some(etcd) = &config.cluster.etcd {
            for (k, v) in &etcd.extra_args {
                args.push(format!("--{k}={v}"));
            }
        }
        Ok(CommandSpec {
            program: node.etcd_bin.clone(),
            args,
            env: vec![(
                "ETCD_UNSUPPORTED_ARCH".into(),
                std::env::consts::ARCH.into(),
            )],
        })
    }

    async fn post_start(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        let node = self.node()?;
        let Some(p) = node
            .etcd
            .promotion
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let pki = node
            .etcd
            .pki()
            .ok_or_else(|| ServiceError::new("no etcd certificates"))?;
        // A learner cannot promote itself: ask the members that were running when we joined.
        // The node that added us promotes us too; whichever is first wins.
        let result = join::promote(&pki, &p.client_urls, p.member_id).await;
        *node
            .etcd
            .promotion
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        join::announce(&node);
        match result {
            Ok(how) => {
                ctx.log().write(
                    format!(
                        "learner {:x} is a voting member ({})\n",
                        p.member_id,
                        match how {
                            join::Promoted::Now => "promoted it",
                            join::Promoted::Already => "promoted by the node that added it",
                        }
                    )
                    .as_bytes(),
                );
                Ok(())
            }
            Err(e) => Err(ServiceError::new(format!(
                "could not promote learner {:x}: {e}",
                p.member_id
            ))),
        }
    }

    async fn health_check(&self) -> Option<Result<(), String>> {
        let node = self.node.upgrade()?;
        let pki = node.etcd.pki()?;
        let endpoints = [client_url(&node)];
        let result = async {
            let mut c = ops::connect(&pki, &endpoints)
                .await
                .map_err(|e| e.to_string())?;
            let status = c.status().await.map_err(|e| e.to_string())?;
            // Status answers locally even without quorum; no leader means the member cannot
            // serve writes.
            if status.leader() == 0 {
                return Err("no leader: the member cannot reach a quorum of the cluster".to_owned());
            }
            if status.errors().is_empty() {
                Ok(())
            } else {
                Err(status.errors().join("; "))
            }
        }
        .await;
        Some(result)
    }

    fn health_interval(&self) -> Duration {
        Duration::from_secs(3)
    }

    fn stop_grace(&self) -> Duration {
        Duration::from_secs(15)
    }
}
