//! etcd on control-plane nodes: the real `etcd` binary under the supervisor, with
//! certificates from the configuration's etcd CA. One node is bootstrapped through the API;
//! the others wait in Preparing until an existing member adds them as learners, start, and are
//! promoted. `bootstrap --recover-from` restores an uploaded snapshot with `etcdctl snapshot
//! restore` first.

pub mod ops;
pub mod pki;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use kiln_os_api::contract::{ETCD_CLIENT_PORT, ETCD_PEER_PORT};
use kiln_os_api::pb;
use tokio::sync::watch;

use crate::node::Node;
use crate::supervisor::{CommandSpec, Prepared, Service, ServiceContext, ServiceError};

pub use pki::EtcdPki;

/// The service id.
pub const SERVICE_ID: &str = "etcd";

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

/// A learner to promote once it runs.
#[derive(Debug, Clone)]
struct PendingPromotion {
    member_id: u64,
    client_urls: Vec<String>,
}

/// Bootstrap and join state shared by the API and the etcd service.
#[derive(Debug)]
pub struct EtcdState {
    bootstrap: watch::Sender<Option<BootstrapRequest>>,
    initial: Mutex<Option<Initial>>,
    promotion: Mutex<Option<PendingPromotion>>,
    pki: Mutex<Option<EtcdPki>>,
}

impl Default for EtcdState {
    fn default() -> Self {
        Self {
            bootstrap: watch::channel(None).0,
            initial: Mutex::new(None),
            promotion: Mutex::new(None),
            pki: Mutex::new(None),
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
    url(node.platform.address(), ETCD_CLIENT_PORT)
}

/// This node's peer URL.
pub fn peer_url(node: &Node) -> String {
    url(node.platform.address(), ETCD_PEER_PORT)
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

/// Asks the OS API of `candidate` to add this node as a learner.
async fn try_join(node: &Node, candidate: &str) -> Result<(String, PendingPromotion), String> {
    let ch = node
        .channel_to(candidate)
        .await
        .map_err(|s| s.message().to_owned())?;
    let mut client = kiln_os_api::client::machine_client(ch);
    let mut req = tonic::Request::new(pb::EtcdMemberAddRequest {
        name: node.hostname(),
        peer_urls: vec![peer_url(node)],
        learner: true,
    });
    crate::api::auth::set_forwarded_role(&mut req, kiln_pki::ROLE_ADMIN);
    let resp = client.etcd_member_add(req).await.map_err(|s| {
        node.forget_channel(candidate);
        s.message().to_owned()
    })?;
    let result = resp
        .into_inner()
        .messages
        .into_iter()
        .next()
        .ok_or("empty answer")?;
    if !result.metadata.as_ref().is_none_or(|m| m.error.is_empty()) {
        return Err(result.metadata.map(|m| m.error).unwrap_or_default());
    }
    let me = result.member_id;
    let mut parts = Vec::new();
    for m in &result.members {
        let name = if m.id == me {
            node.hostname()
        } else {
            m.hostname.clone()
        };
        if name.is_empty() {
            continue;
        }
        for p in &m.peer_urls {
            parts.push(format!("{name}={p}"));
        }
    }
    Ok((
        parts.join(","),
        PendingPromotion {
            member_id: me,
            client_urls: result.client_urls,
        },
    ))
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
        let pki = pki::issue(&config, &dir, &node.hostname(), node.platform.address())
            .map_err(ServiceError::new)?;
        *node.etcd.pki.lock().unwrap_or_else(|e| e.into_inner()) = Some(pki);
        std::fs::create_dir_all(data_dir(&node).parent().unwrap_or(&data_dir(&node)))
            .map_err(ServiceError::new)?;

        let mut bootstrap = node.etcd.bootstrap.subscribe();
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
            let mut last_error = String::new();
            for c in &candidates {
                match try_join(&node, c).await {
                    Ok((initial_cluster, promotion)) => {
                        *node.etcd.initial.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(Initial::Join { initial_cluster });
                        *node
                            .etcd
                            .promotion
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(promotion);
                        return Ok(Prepared::Run);
                    }
                    Err(e) => last_error = format!("{c}: {e}"),
                }
            }
            ctx.progress(if candidates.is_empty() {
                "Waiting for `kiln bootstrap`: no other control-plane node is known to join through"
                    .to_owned()
            } else {
                format!(
                    "Waiting for `kiln bootstrap` or to join the cluster through {} ({last_error})",
                    candidates.join(", ")
                )
            });
            // Poll for a member to join through every 2 s; a bootstrap request wakes us at once.
            tokio::select! {
                _ = bootstrap.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
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
        let mut last = String::new();
        for attempt in 0..300 {
            match ops::connect(&pki, &p.client_urls).await {
                Ok(mut c) => match c.member_promote(p.member_id).await {
                    Ok(_) => {
                        ctx.log().write(
                            format!("promoted learner {:x} to voting member\n", p.member_id)
                                .as_bytes(),
                        );
                        *node
                            .etcd
                            .promotion
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = None;
                        return Ok(());
                    }
                    Err(e) if e.to_string().contains("not a learner") => {
                        *node
                            .etcd
                            .promotion
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = None;
                        return Ok(());
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(if attempt < 20 { 500 } else { 2000 })).await;
        }
        Err(ServiceError::new(format!(
            "could not promote learner {:x}: {last}",
            p.member_id
        )))
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
