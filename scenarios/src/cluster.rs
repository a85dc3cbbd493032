//! A handle on a scenario's cluster: created through the provisioner library, driven through
//! the `Provisioner` trait (power and link faults), the OS API (through the load balancer,
//! with node targeting) and etcd (client certificate from the cluster's etcd CA).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use kiln_config::MachineType;
use kiln_os_api::client::request;
use kiln_os_api::pb;
use kiln_os_api::pb::machine_service_client::MachineServiceClient;
use kiln_provisioner::create::{self, CreateOptions, Created};
use kiln_provisioner::progress::Progress;
use kiln_provisioner::provision::{self, PowerAction, Provisioner};
use kiln_provisioner::state::NodeState;
use tonic::transport::Channel;

use crate::step::{NodeRef, SnapshotKind};
use crate::workload::{self, Workload};

/// A running cluster and what the scenario learned about it.
pub struct ClusterHandle {
    /// The created cluster.
    pub created: Created,
    provisioner: Box<dyn Provisioner>,
    /// Nodes that got their configuration after creation (maintenance mode).
    configured_later: BTreeSet<String>,
    /// The recovery snapshot, if one was taken.
    pub snapshot: Option<(SnapshotKind, Vec<u8>)>,
    /// The data workload.
    pub workload: Arc<Mutex<Workload>>,
    /// What the last `etcdStatus` step saw: (node, DB size, in use).
    pub db_sizes: Vec<(String, i64, i64)>,
    /// The etcd member ids by host name, as `rememberMembers` saw them.
    pub remembered_members: Option<std::collections::BTreeMap<String, u64>>,
    writer: Option<(
        tokio::task::JoinHandle<()>,
        tokio::sync::watch::Sender<bool>,
    )>,
    /// The releases of an upgrade scenario and their registry.
    pub releases: Option<crate::upgrade::Releases>,
    /// The kubeadm control plane of the migration rehearsal, once built: the scenario's etcd
    /// clients then go through its HAProxy.
    pub kubeadm: Option<crate::kubeadm::Legacy>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("cluster", &self.created.state.name)
            .finish_non_exhaustive()
    }
}

const CALL: Duration = Duration::from_secs(10);

impl ClusterHandle {
    /// Creates a cluster (and waits for health unless some workers start in maintenance mode).
    pub async fn create(opts: &CreateOptions, progress: &Progress) -> anyhow::Result<Self> {
        let provisioner = provision::by_name(&opts.provisioner)?;
        let created = create::create(opts, progress).await?;
        let prefix = format!("/kiln-scenario/{}", created.state.name);
        Ok(Self {
            created,
            provisioner,
            configured_later: BTreeSet::new(),
            snapshot: None,
            workload: Arc::new(Mutex::new(Workload::new(&prefix))),
            db_sizes: Vec::new(),
            writer: None,
            releases: None,
            kubeadm: None,
            remembered_members: None,
        })
    }

    /// The state of a node.
    pub fn node(&self, r: NodeRef) -> anyhow::Result<&NodeState> {
        let (role, i) = match r {
            NodeRef::ControlPlane(i) => (MachineType::Controlplane, i),
            NodeRef::Worker(i) => (MachineType::Worker, i),
        };
        self.created
            .state
            .nodes
            .iter()
            .filter(|n| n.role == role)
            .nth(i.saturating_sub(1))
            .with_context(|| format!("the cluster has no {r}"))
    }

    fn addr(&self, r: NodeRef) -> anyhow::Result<String> {
        Ok(self.node(r)?.address.to_string())
    }

    /// A client to the OS API through the load balancer (a new connection each time, so the
    /// balancer picks an upstream anew).
    pub async fn api(&self) -> anyhow::Result<MachineServiceClient<Channel>> {
        let ch = kiln_os_api::client::connect(
            &self.created.state.network.gateway.to_string(),
            &self.created.credentials,
        )
        .await?;
        Ok(kiln_os_api::client::machine_client(ch))
    }

    fn control_plane(&self) -> Vec<&NodeState> {
        self.created.state.control_plane().collect()
    }

    /// One etcd client per control-plane node (writes fail over between them).
    pub async fn etcd_clients(&self) -> anyhow::Result<Vec<etcd_client::Client>> {
        if let Some(legacy) = &self.kubeadm {
            return Ok(vec![legacy.client_through_lb().await?]);
        }
        let ca = self.created.secrets.etcd_ca()?;
        let leaf = ca.issue(&kiln_pki::LeafRequest::client(
            "kiln-scenario",
            "kiln-scenario",
        ))?;
        let mut out = Vec::new();
        for n in self.control_plane() {
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca.cert_pem()))
                .identity(etcd_client::Identity::from_pem(
                    leaf.cert_pem.clone(),
                    leaf.key_pem.clone(),
                ));
            let opts = etcd_client::ConnectOptions::new()
                .with_tls(tls)
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(3));
            // A node that is down now may come back: connect lazily.
            if let Ok(c) =
                etcd_client::Client::connect([format!("https://{}:2379", n.address)], Some(opts))
                    .await
            {
                out.push(c);
            }
        }
        if out.is_empty() {
            bail!("no control-plane node's etcd accepts connections");
        }
        Ok(out)
    }

    /// Power action through the provisioner.
    pub async fn power(&self, r: NodeRef, action: PowerAction) -> anyhow::Result<u32> {
        let name = self.node(r)?.name.clone();
        let status = self
            .provisioner
            .power(&self.created.dir, &self.created.state, &name, action)
            .await?;
        Ok(status.boots)
    }

    /// The network namespace of a node whose network is a namespace on this host: a process
    /// node's named namespace, a docker node's container (through its PID 1). A QEMU node's
    /// network is inside the guest.
    pub async fn net_namespace(&self, r: NodeRef) -> anyhow::Result<std::path::PathBuf> {
        use kiln_provisioner::provision::{docker, process};
        let node = self.node(r)?;
        match self.created.state.provisioner.as_str() {
            process::NAME => node
                .provider_state::<process::ProcessNode>(process::NAME)
                .and_then(|p| p.netns)
                .map(|ns| std::path::PathBuf::from(format!("/var/run/netns/{ns}")))
                .with_context(|| {
                    format!("{r} has no network namespace (a process node in bridge mode)")
                }),
            docker::NAME => {
                let status = self
                    .provisioner
                    .status(&self.created.dir, &self.created.state, &node.name)
                    .await?;
                let pid = status
                    .pid
                    .with_context(|| format!("{r}'s container is not running"))?;
                Ok(format!("/proc/{pid}/ns/net").into())
            }
            other => bail!("{r}'s network is not a namespace on this host ({other} node)"),
        }
    }

    async fn boots(&self, r: NodeRef) -> anyhow::Result<u32> {
        Ok(self
            .provisioner
            .status(&self.created.dir, &self.created.state, &self.node(r)?.name)
            .await?
            .boots)
    }

    /// Waits until the node's API answers with stage `running` (and, with `after_boot`, the
    /// node has booted again since `after_boot` boots).
    pub async fn wait_running(
        &self,
        r: NodeRef,
        after_boot: Option<u32>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let addr = self.addr(r)?;
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let booted = match after_boot {
                Some(b) => self.boots(r).await.map(|now| now > b).unwrap_or(false),
                None => true,
            };
            if booted {
                match self.api().await {
                    Ok(mut c) => match tokio::time::timeout(
                        CALL,
                        c.version(request(pb::Empty {}, std::slice::from_ref(&addr))),
                    )
                    .await
                    {
                        Ok(Ok(v)) => {
                            let m = v
                                .into_inner()
                                .messages
                                .into_iter()
                                .next()
                                .unwrap_or_default();
                            let stage = m.stage();
                            let err = m.metadata.map(|md| md.error).unwrap_or_default();
                            if err.is_empty() && stage == pb::Stage::Running {
                                return Ok(());
                            }
                            last = if err.is_empty() {
                                format!("stage {stage}")
                            } else {
                                err
                            };
                        }
                        Ok(Err(s)) => last = s.message().to_owned(),
                        Err(_) => last = "no answer".into(),
                    },
                    Err(e) => last = e.to_string(),
                }
            } else {
                last = "not booted again yet".into();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        bail!("{r} is not running after {timeout:?}: {last}")
    }

    /// Writes `count` keys; with `all`, every write must be acknowledged (each retried for
    /// up to 15 s across the control-plane nodes).
    pub async fn write_keys(&self, count: usize, all: bool) -> anyhow::Result<(usize, usize)> {
        let mut clients = self.etcd_clients().await?;
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..count {
            let key = self
                .workload
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_key();
            let deadline = Instant::now() + Duration::from_secs(if all { 15 } else { 3 });
            let mut acked = workload::put(&mut clients, &key, Duration::from_secs(2)).await;
            while all && !acked && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                acked = workload::put(&mut clients, &key, Duration::from_secs(2)).await;
            }
            self.workload
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(key.clone(), acked);
            if acked {
                ok += 1;
            } else if all {
                bail!("write of {key} was not acknowledged within 15s");
            } else {
                failed += 1;
            }
        }
        Ok((ok, failed))
    }

    /// Starts writing continuously in the background.
    /// With a kubeadm control plane, each write is a new connection through its HAProxy, so
    /// every request meets the load balancer's configuration of that moment (and a failed
    /// connection counts as a failed write).
    pub async fn start_writer(&mut self) -> anyhow::Result<()> {
        let mut clients = self.etcd_clients().await?;
        let through_lb = self.kubeadm.as_ref().map(crate::kubeadm::Legacy::connector);
        let workload = self.workload.clone();
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while !*stop.borrow() {
                let key = workload
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next_key();
                let result = match &through_lb {
                    Some((endpoint, options, deadline)) => {
                        put_through(endpoint, options, *deadline, &key).await
                    }
                    None => {
                        if workload::put(&mut clients, &key, Duration::from_secs(2)).await {
                            Ok(())
                        } else {
                            Err("no member acknowledged it within 2s".to_owned())
                        }
                    }
                };
                {
                    let mut w = workload.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(()) => w.record(key, true),
                        Err(reason) => w.record_failure(&key, reason),
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(25)) => {}
                    _ = stop.changed() => {}
                }
            }
        });
        self.writer = Some((task, stop_tx));
        Ok(())
    }

    /// Stops the background writer; returns (acknowledged, failed) so far.
    pub async fn stop_writer(&mut self) -> (usize, u64) {
        if let Some((task, stop)) = self.writer.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        let w = self.workload.lock().unwrap_or_else(|e| e.into_inner());
        (w.acked.len(), w.failures)
    }

    /// Takes the recovery snapshot and marks the recovery point.
    pub async fn snapshot(&mut self, r: NodeRef, kind: SnapshotKind) -> anyhow::Result<usize> {
        let addr = self.addr(r)?;
        let mut api = self.api().await?;
        let data = match kind {
            SnapshotKind::Api => {
                let mut s = api
                    .etcd_snapshot(request(pb::Empty {}, &[addr]))
                    .await
                    .map_err(|s| anyhow::anyhow!("etcd snapshot: {}", s.message()))?
                    .into_inner();
                let mut data = Vec::new();
                while let Some(chunk) = s.next().await {
                    data.extend_from_slice(
                        &chunk
                            .map_err(|s| anyhow::anyhow!("etcd snapshot: {}", s.message()))?
                            .bytes,
                    );
                }
                data
            }
            SnapshotKind::RawDb => {
                // The guide warns that a copy of a running etcd's database "might not be
                // fully consistent": writes acknowledged in the last batch interval are in the
                // WAL but not yet in the file. Stop etcd first (a clean stop commits the
                // batch), so the no-lost-writes rule holds for the copy as for a snapshot.
                api.service_stop(request(
                    pb::ServiceRequest { id: "etcd".into() },
                    std::slice::from_ref(&addr),
                ))
                .await
                .map_err(|s| anyhow::anyhow!("stopping etcd before the copy: {}", s.message()))?;
                let mut s = api
                    .file_copy(request(
                        pb::FileCopyRequest {
                            root_path: "/var/lib/etcd/member/snap/db".into(),
                        },
                        &[addr],
                    ))
                    .await
                    .map_err(|s| anyhow::anyhow!("cp: {}", s.message()))?
                    .into_inner();
                let mut tgz = Vec::new();
                while let Some(chunk) = s.next().await {
                    tgz.extend_from_slice(
                        &chunk
                            .map_err(|s| anyhow::anyhow!("cp: {}", s.message()))?
                            .bytes,
                    );
                }
                let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tgz.as_slice()));
                let mut entry = archive.entries()?.next().context("empty archive")??;
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data)?;
                data
            }
        };
        if data.is_empty() {
            bail!("the snapshot is empty");
        }
        let size = data.len();
        self.workload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mark_recovery_point();
        self.snapshot = Some((kind, data));
        Ok(size)
    }

    /// Reset wiping EPHEMERAL (not graceful: quorum may be gone), then waits for the node.
    pub async fn reset_ephemeral(&self, r: NodeRef) -> anyhow::Result<()> {
        let addr = self.addr(r)?;
        let before = self.boots(r).await?;
        let mut api = self.api().await?;
        let resp = api
            .reset(request(
                pb::ResetRequest {
                    graceful: false,
                    reboot: true,
                    system_labels_to_wipe: vec!["EPHEMERAL".into()],
                },
                &[addr],
            ))
            .await
            .map_err(|s| anyhow::anyhow!("reset: {}", s.message()))?;
        node_error(resp.get_ref().messages.iter().map(|m| m.metadata.as_ref()))?;
        self.wait_running(r, Some(before), Duration::from_secs(90))
            .await
    }

    /// Reboot through the API, then waits for the node.
    pub async fn reboot(&self, r: NodeRef) -> anyhow::Result<()> {
        let addr = self.addr(r)?;
        let before = self.boots(r).await?;
        let mut api = self.api().await?;
        let resp = api
            .reboot(request(pb::Empty {}, &[addr]))
            .await
            .map_err(|s| anyhow::anyhow!("reboot: {}", s.message()))?;
        node_error(resp.get_ref().messages.iter().map(|m| m.metadata.as_ref()))?;
        self.wait_running(r, Some(before), Duration::from_secs(90))
            .await
    }

    /// Uploads the snapshot and bootstraps from it.
    pub async fn recover(&self, r: NodeRef) -> anyhow::Result<()> {
        let (kind, data) = self
            .snapshot
            .as_ref()
            .context("no snapshot was taken earlier in the scenario")?;
        let addr = self.addr(r)?;
        let mut api = self.api().await?;
        // etcd waits for bootstrap in Preparing after the wipe; give it the time to get there.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = api
                .service_list(request(pb::Empty {}, std::slice::from_ref(&addr)))
                .await
                .map_err(|s| anyhow::anyhow!("services: {}", s.message()))?
                .into_inner();
            let etcd = s
                .messages
                .iter()
                .flat_map(|m| &m.services)
                .find(|s| s.id == "etcd")
                .map(pb::ServiceInfo::state)
                .unwrap_or_default();
            if etcd == pb::ServiceState::Preparing {
                break;
            }
            if Instant::now() > deadline {
                bail!("etcd on {r} is {etcd}, not waiting for bootstrap");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let chunks = kiln_os_api::client::data_chunks(data);
        api.etcd_recover(request(
            futures::stream::iter(chunks),
            std::slice::from_ref(&addr),
        ))
        .await
        .map_err(|s| anyhow::anyhow!("upload: {}", s.message()))?;
        let resp = api
            .bootstrap(request(
                pb::BootstrapRequest {
                    recover_etcd: true,
                    recover_skip_hash_check: *kind == SnapshotKind::RawDb,
                },
                &[addr],
            ))
            .await
            .map_err(|s| anyhow::anyhow!("bootstrap: {}", s.message()))?;
        node_error(resp.get_ref().messages.iter().map(|m| m.metadata.as_ref()))
    }

    /// `apply-config --insecure` the node's own configuration.
    pub async fn apply_insecure(&mut self, r: NodeRef) -> anyhow::Result<()> {
        let node = self.node(r)?.clone();
        let data = std::fs::read(&node.config)
            .with_context(|| format!("reading {}", node.config.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = node.address.to_string();
        loop {
            let attempt = async {
                let ch = kiln_os_api::client::connect_insecure(&addr).await?;
                let mut c = kiln_os_api::client::machine_client(ch);
                c.apply_configuration(pb::ApplyConfigurationRequest {
                    data: data.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow::anyhow!("apply-config: {}", s.message()))?;
                anyhow::Ok(())
            };
            match attempt.await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        self.configured_later.insert(node.name.clone());
        self.wait_running(r, None, Duration::from_secs(60)).await
    }

    /// The health topology: configured nodes, including ones configured later.
    pub fn topology(&self) -> kiln_provisioner::health::Topology {
        let mut t = create::topology(&self.created.state);
        for n in &self.created.state.nodes {
            if self.configured_later.contains(&n.name) && n.role == MachineType::Worker {
                t.workers.push((n.address.to_string(), n.name.clone()));
            }
        }
        t
    }

    /// Waits for cluster health.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut api = self.api().await?;
        Ok(
            kiln_provisioner::health::check(
                &mut api,
                &self.topology(),
                timeout,
                &Progress::plain(),
            )
            .await?,
        )
    }

    /// Addresses of the control-plane nodes.
    pub fn control_plane_addresses(&self) -> Vec<String> {
        self.control_plane()
            .iter()
            .map(|n| n.address.to_string())
            .collect()
    }

    /// Present keys under the workload's prefix.
    pub async fn present_keys(&self) -> anyhow::Result<BTreeSet<String>> {
        let prefix = self
            .workload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prefix()
            .to_owned();
        let mut last = None;
        for mut c in self.etcd_clients().await? {
            match c
                .get(
                    prefix.as_str(),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_keys_only(),
                    ),
                )
                .await
            {
                Ok(r) => {
                    return Ok(r
                        .kvs()
                        .iter()
                        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                        .collect());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("no etcd answered"), anyhow::Error::from))
    }

    /// Writes a crash dump into `dir`: state, every log of the state directory, and per node
    /// its service list with events and each service's log (through the API, best effort).
    pub async fn crash_dump(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(&self.created.dir.dir)?.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "state.yaml" || name.ends_with(".log") || name == "lb.yaml" {
                let _ = std::fs::copy(&p, dir.join(&name));
            }
        }
        if let Some(legacy) = &self.kubeadm {
            let logs = std::iter::once(legacy.dir.join("haproxy.log"))
                .chain(legacy.nodes.iter().map(|n| n.root.join("etcd.log")));
            for (i, log) in logs.enumerate() {
                let name = if i == 0 {
                    "kubeadm-haproxy.log".to_owned()
                } else {
                    format!("{}-etcd.log", legacy.nodes[i - 1].name)
                };
                let _ = std::fs::copy(&log, dir.join(name));
            }
        }
        let Ok(mut api) = tokio::time::timeout(CALL, self.api())
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
        else {
            return Ok(());
        };
        for n in &self.created.state.nodes {
            let addr = n.address.to_string();
            let mut text = String::new();
            if let Ok(Ok(r)) = tokio::time::timeout(
                CALL,
                api.service_list(request(pb::Empty {}, std::slice::from_ref(&addr))),
            )
            .await
            {
                for list in r.into_inner().messages {
                    if let Some(md) = list.metadata.filter(|m| !m.error.is_empty()) {
                        text += &format!("error: {}\n", md.error);
                    }
                    for s in list.services {
                        text += &format!("{} {} restarts={}\n", s.id, s.state(), s.restarts);
                        for e in &s.events {
                            text +=
                                &format!("  [{}]: {} ({})\n", e.state(), e.message, e.unix_millis);
                        }
                        if let Ok(Ok(stream)) = tokio::time::timeout(
                            CALL,
                            api.logs(request(
                                pb::LogsRequest {
                                    id: s.id.clone(),
                                    follow: false,
                                    tail_lines: 500,
                                },
                                std::slice::from_ref(&addr),
                            )),
                        )
                        .await
                        {
                            let mut log = Vec::new();
                            let mut stream = stream.into_inner();
                            while let Ok(Some(Ok(chunk))) =
                                tokio::time::timeout(CALL, stream.next()).await
                            {
                                log.extend_from_slice(&chunk.bytes);
                            }
                            let _ =
                                std::fs::write(dir.join(format!("{}-{}.log", n.name, s.id)), log);
                        }
                    }
                }
            }
            if let Ok(Ok(stream)) = tokio::time::timeout(
                CALL,
                api.events(request(
                    pb::EventsRequest {
                        follow: false,
                        tail_events: -1,
                    },
                    std::slice::from_ref(&addr),
                )),
            )
            .await
            {
                let mut stream = stream.into_inner();
                text += "events:\n";
                while let Ok(Some(Ok(e))) = tokio::time::timeout(CALL, stream.next()).await {
                    text += &format!("  {} {} {}: {}\n", e.unix_millis, e.kind, e.id, e.message);
                }
            }
            let _ = std::fs::write(dir.join(format!("{}-services.txt", n.name)), text);
        }
        Ok(())
    }

    /// Destroys the cluster.
    pub async fn destroy(mut self) -> anyhow::Result<()> {
        self.stop_writer().await;
        if let Some(mut legacy) = self.kubeadm.take() {
            legacy.destroy().await;
        }
        kiln_provisioner::destroy::destroy(&self.created.dir, false, &Progress::plain()).await?;
        Ok(())
    }
}

/// Fails with the first node-level error of an answer.
pub fn node_error<'a>(mds: impl Iterator<Item = Option<&'a pb::Metadata>>) -> anyhow::Result<()> {
    for md in mds.flatten() {
        if !md.error.is_empty() {
            bail!("{}: {}", md.hostname, md.error);
        }
    }
    Ok(())
}

/// One write of the background writer through a load balancer, on a new connection as a
/// client behind it would make. When etcd itself answers with an error (a leader change while
/// a member is removed or leadership moves, or the member closing the connection as it stops:
/// HTTP/2 GOAWAY), the endpoint was up: the put is sent once more on a new connection (the old
/// one may be the closed one, and the balancer picks a member that is still there), as etcd's
/// clients do. A connection that cannot be made, or no answer within `deadline` (3 s; more for
/// QEMU nodes), fails.
async fn put_through(
    endpoint: &str,
    options: &etcd_client::ConnectOptions,
    deadline: Duration,
    key: &str,
) -> Result<(), String> {
    let connect = || async {
        etcd_client::Client::connect([endpoint], Some(options.clone()))
            .await
            .map_err(|e| format!("connecting through {endpoint}: {e}"))
    };
    let attempt = async {
        let mut c = connect().await?;
        match c.put(key, "kiln-scenario", None).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(first)) => connect()
                .await?
                .put(key, "kiln-scenario", None)
                .await
                .map(|_| ())
                .map_err(|e| format!("etcd answered {}, then {e}", first.message())),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(deadline, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer through {endpoint} within {}s",
                deadline.as_secs()
            ))
        })
}
