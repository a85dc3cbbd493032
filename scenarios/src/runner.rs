//! Running a scenario: create, each step timed and printed, a crash dump on failure, and
//! `destroy` at the end unless the cluster is kept for inspection. [`run_many`] runs a matrix
//! of scenarios and provisioners, `jobs` at a time, each on its own network.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_os_api::client::request;
use kiln_os_api::pb;
use kiln_provisioner::create::CreateOptions;
use kiln_provisioner::progress::Progress;
use kiln_provisioner::provision::PowerAction;

use crate::cluster::{ClusterHandle, node_error};
use crate::file::Scenario;
use crate::step::Step;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Provisioner.
    pub provisioner: String,
    /// Where crash dumps go (`<artifacts>/<scenario>/`).
    pub artifacts: PathBuf,
    /// Keep the cluster when the scenario fails.
    pub keep_on_failure: bool,
    /// Directory holding the clusters' state directories.
    pub state_base: PathBuf,
    /// Network of the cluster; `None`: a free /24 from `10.<cidr_from>.0.0` on (or the
    /// scenario file's `network.cidr`).
    pub cidr: Option<String>,
    /// Where free networks are looked for.
    pub cidr_from: u8,
    /// Put before the scenario's name to name its cluster.
    pub name_prefix: String,
    /// Print each step as it runs.
    pub verbose: bool,
}

impl RunOptions {
    /// Defaults for `provisioner`, state under `state_base`, dumps into `artifacts`.
    pub fn new(provisioner: &str, state_base: PathBuf, artifacts: PathBuf) -> Self {
        Self {
            provisioner: provisioner.to_owned(),
            artifacts,
            keep_on_failure: false,
            state_base,
            cidr: None,
            cidr_from: 120,
            name_prefix: String::new(),
            verbose: true,
        }
    }

    /// The cluster's name for `scenario`.
    pub fn cluster_name(&self, scenario: &Scenario) -> String {
        format!("{}{}", self.name_prefix, scenario.name)
    }
}

/// Networks handed out by this process to clusters that may not have written their state yet.
/// The lock is held while a network is picked, so two trials starting together never get the
/// same one.
static RESERVED: tokio::sync::Mutex<Vec<ipnetwork::Ipv4Network>> =
    tokio::sync::Mutex::const_new(Vec::new());

async fn reserve_cidr(opts: &RunOptions) -> String {
    let mut reserved = RESERVED.lock().await;
    let cidr =
        kiln_provisioner::network::free_cidr_excluding(&opts.state_base, opts.cidr_from, &reserved)
            .await;
    if let Ok(net) = cidr.parse() {
        reserved.push(net);
    }
    cidr
}

/// Creates the scenario's cluster on `cidr`. A network this process picked can be taken by
/// another process (another test run, another user) before the bridge exists; `cluster create`
/// then refuses it as overlapping, and a new one is picked, at most three times.
async fn create_on_free_network(
    scenario: &Scenario,
    opts: &RunOptions,
    cidr: &mut String,
    picked: bool,
) -> anyhow::Result<ClusterHandle> {
    let mut attempts = 0;
    loop {
        let result = create(scenario, opts, cidr).await;
        match &result {
            Err(e) if picked && attempts < 3 && format!("{e:#}").contains(" overlaps ") => {
                attempts += 1;
                let taken = std::mem::take(cidr);
                *cidr = reserve_cidr(opts).await;
                release_cidr(&taken).await;
                if opts.verbose {
                    eprintln!("  {taken} was taken meanwhile; trying {cidr}");
                }
            }
            _ => return result,
        }
    }
}

async fn release_cidr(cidr: &str) {
    if let Ok(net) = cidr.parse::<ipnetwork::Ipv4Network>() {
        RESERVED.lock().await.retain(|n| *n != net);
    }
}

/// One step's result.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// What it was.
    pub description: String,
    /// How long it took.
    pub duration: Duration,
    /// What it found (counts, sizes).
    pub detail: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// How a scenario ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step passed.
    Passed,
    /// A step failed.
    Failed {
        /// The step.
        step: String,
        /// Why.
        reason: String,
        /// The crash dump.
        artifacts: PathBuf,
    },
    /// The scenario cannot run here.
    Skipped(String),
}

/// A scenario's report.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Provisioner.
    pub provisioner: String,
    /// Result.
    pub outcome: Outcome,
    /// Steps run.
    pub steps: Vec<StepReport>,
    /// Total time.
    pub duration: Duration,
}

impl Report {
    /// A one-paragraph summary of a failure.
    pub fn failure_message(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Failed {
                step,
                reason,
                artifacts,
            } => Some(format!(
                "scenario {} failed at step \"{step}\": {reason}\ncrash dump: {}",
                self.scenario,
                artifacts.display()
            )),
            _ => None,
        }
    }
}

/// Why a scenario cannot run with `provisioner` here, if it cannot.
/// The provisioner says what it supports here; a scenario that needs more is skipped with its
/// reason.
pub fn unavailable(scenario: &Scenario, provisioner: &str) -> Option<String> {
    let p = match kiln_provisioner::provision::by_name(provisioner) {
        Ok(p) => p,
        Err(e) => return Some(e.to_string()),
    };
    let caps = match p.network_mode() {
        Ok(mode) => p.capabilities(mode),
        Err(e) => return Some(e.to_string()),
    };
    if scenario.needs_link_faults()
        && let Err(why) = caps.link_faults
    {
        return Some(why);
    }
    if scenario.needs_pause()
        && let Err(why) = caps.pause
    {
        return Some(why);
    }
    if scenario.needs_slots()
        && let Err(why) = caps.slots
    {
        return Some(why);
    }
    if scenario.needs_airgap()
        && let Some(why) = bridge_with_tools(
            &*p,
            provisioner,
            &[
                kiln_provisioner::provision::process::NAME,
                kiln_provisioner::provision::docker::NAME,
            ],
            AIRGAP_ELSEWHERE,
            "an air-gapped cluster puts its nodes in network namespaces on the cluster bridge, \
             which needs root",
            AIRGAP_TOOLS,
        )
    {
        return Some(why);
    }
    if scenario.needs_kubeadm()
        && let Some(why) = bridge_with_tools(
            &*p,
            provisioner,
            // Its legacy nodes are namespaces on the cluster's Linux bridge, which every
            // provisioner makes on this host in bridge mode (QEMU nodes' taps are on it too;
            // their etcd requests get 12 s instead of 3: TCG guests answer slowly).
            &[
                kiln_provisioner::provision::process::NAME,
                kiln_provisioner::provision::docker::NAME,
                kiln_provisioner::provision::qemu::NAME,
            ],
            "the kubeadm control plane is built on the cluster's Linux bridge",
            "the kubeadm control plane puts its nodes in network namespaces on the cluster \
             bridge, which needs root",
            KUBEADM_TOOLS,
        )
    {
        return Some(why);
    }
    None
}

/// The etcd member ids by host name, as a control-plane node that answers sees them.
async fn member_ids(h: &ClusterHandle) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let cps = h.control_plane_addresses();
    let mut api = h.api().await?;
    let mut last = None;
    for cp in cps {
        match api
            .etcd_member_list(request(pb::Empty {}, std::slice::from_ref(&cp)))
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if let Some(m) = r
                    .messages
                    .into_iter()
                    .find(|m| m.metadata.as_ref().is_none_or(|md| md.error.is_empty()))
                {
                    return Ok(m.members.into_iter().map(|m| (m.hostname, m.id)).collect());
                }
            }
            Err(s) => last = Some(s.message().to_owned()),
        }
    }
    bail!(
        "no control-plane node listed the etcd members{}",
        last.map(|l| format!(": {l}")).unwrap_or_default()
    )
}

/// Why the air-gapped rehearsal does not run on a provisioner other than `process` and
/// `docker`.
pub const AIRGAP_ELSEWHERE: &str = "the air-gapped rehearsal checks nodes from their network \
     namespace on this host (process and docker nodes), which a QEMU node's is not";
/// The host tools the air-gapped rehearsal runs (each with an argument that makes it answer).
pub const AIRGAP_TOOLS: &[(&str, &str)] = &[("dig", "-v"), ("curl", "--version")];
/// The host tools the kubeadm rehearsal runs.
pub const KUBEADM_TOOLS: &[(&str, &str)] = &[("haproxy", "-v"), ("openssl", "version")];

/// The first of `tools` that is not installed, as a reason.
pub fn missing_tool(tools: &[(&str, &str)]) -> Option<String> {
    tools.iter().find_map(|(tool, arg)| {
        let ok = std::process::Command::new(tool)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!ok).then(|| format!("{tool} is not installed (scripts/install-deps installs it)"))
    })
}

/// Why steps that put their own processes in network namespaces on the cluster's bridge
/// cannot run: a provisioner not in `supported` (`elsewhere`), no bridge without root
/// (`no_bridge`), or a missing tool (each `(tool, argument that makes it answer)`).
fn bridge_with_tools(
    p: &dyn kiln_provisioner::provision::Provisioner,
    provisioner: &str,
    supported: &[&str],
    elsewhere: &str,
    no_bridge: &str,
    tools: &[(&str, &str)],
) -> Option<String> {
    if !supported.contains(&provisioner) {
        return Some(elsewhere.to_owned());
    }
    if p.network_mode().ok() != Some(kiln_provisioner::state::NetworkMode::Bridge) {
        return Some(no_bridge.to_owned());
    }
    missing_tool(tools)
}

/// Creates the scenario's cluster: its cluster file, then the run's provisioner, name and
/// network; with `release:`, after publishing the upgrade releases, on that release.
async fn create(
    scenario: &Scenario,
    opts: &RunOptions,
    cidr: &str,
) -> anyhow::Result<ClusterHandle> {
    let mut create = CreateOptions::new(&opts.cluster_name(scenario), opts.state_base.clone());
    create.wait_timeout = Duration::from_secs(180);
    scenario
        .cluster
        .apply(&mut create, std::path::Path::new("."))?;
    let (cps, workers) = scenario.shape();
    create.controlplanes = cps;
    create.workers = workers;
    create.provisioner = opts.provisioner.clone();
    create.name = opts.cluster_name(scenario);
    create.state_base = opts.state_base.clone();
    create.cidr = cidr.to_owned();
    if create.provisioner == kiln_provisioner::provision::qemu::NAME {
        let store = kiln_provisioner::provision::qemu::image_store()
            .context("no image store: set KILN_IMAGE_STORE or HOME")?;
        create.provisioner_options.qemu = kiln_provisioner::provision::qemu::QemuOptions {
            cpus: 1,
            memory_mib: 768,
            ..kiln_provisioner::provision::qemu::QemuOptions::from_store(&store)?
        };
    }
    match scenario.release {
        Some(release) => {
            let metal = create.provisioner == kiln_provisioner::provision::qemu::NAME;
            let releases = crate::upgrade::publish(metal).await?;
            crate::upgrade::create_on(create, releases, release).await
        }
        None => ClusterHandle::create(&create, &Progress::plain()).await,
    }
}

async fn execute(handle: &mut Option<ClusterHandle>, step: &Step) -> anyhow::Result<String> {
    let h = handle
        .as_mut()
        .context("the scenario must create its cluster first")?;
    Ok(match step {
        Step::WriteKeys { count } => {
            let (ok, failed) = h.write_keys(*count, false).await?;
            if ok == 0 {
                bail!("no write was acknowledged ({failed} failed)");
            }
            format!("{ok} acknowledged, {failed} failed")
        }
        Step::StartWriter => {
            h.start_writer().await?;
            String::new()
        }
        Step::StopWriter => {
            let (acked, failed) = h.stop_writer().await;
            format!("{acked} acknowledged, {failed} failed in total")
        }
        Step::Snapshot { node, kind } => format!("{} bytes", h.snapshot(*node, *kind).await?),
        Step::PowerOff(n) => {
            h.power(*n, PowerAction::Stop).await?;
            String::new()
        }
        Step::PowerOn(n) => {
            h.power(*n, PowerAction::Start).await?;
            h.wait_running(*n, None, Duration::from_secs(90)).await?;
            String::new()
        }
        Step::Pause(n) => {
            h.power(*n, PowerAction::Pause).await?;
            String::new()
        }
        Step::Resume(n) => {
            h.power(*n, PowerAction::Resume).await?;
            String::new()
        }
        Step::LinkDown(n) => {
            h.power(*n, PowerAction::LinkDown).await?;
            String::new()
        }
        Step::LinkUp(n) => {
            h.power(*n, PowerAction::LinkUp).await?;
            String::new()
        }
        Step::ResetEphemeral(n) => {
            h.reset_ephemeral(*n).await?;
            String::new()
        }
        Step::Reboot(n) => {
            h.reboot(*n).await?;
            String::new()
        }
        Step::RecoverFromSnapshot(n) => {
            h.recover(*n).await?;
            String::new()
        }
        Step::ApplyConfigInsecure(n) => {
            h.apply_insecure(*n).await?;
            String::new()
        }
        Step::ExpectEtcdUnhealthy(n) => {
            let addr = h.node(*n)?.address.to_string();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let mut api = h.api().await?;
                let r = api
                    .service_list(request(pb::Empty {}, std::slice::from_ref(&addr)))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                    .into_inner();
                let etcd = r
                    .messages
                    .iter()
                    .flat_map(|m| &m.services)
                    .find(|s| s.id == "etcd")
                    .cloned();
                if let Some(health) = etcd
                    .and_then(|s| s.health)
                    .filter(|h| !h.unknown && !h.healthy)
                {
                    break format!("etcd reports: {}", health.last_message);
                }
                if Instant::now() > deadline {
                    bail!("etcd on {n} still reports healthy after 60s");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Step::WaitHealthy { timeout } => {
            h.wait_healthy(*timeout).await?;
            String::new()
        }
        Step::AssertMembers(want) => {
            let cps = h.control_plane_addresses();
            let mut api = h.api().await?;
            let r = api
                .etcd_member_list(request(pb::Empty {}, &cps))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
            for m in &r.messages {
                let voting = m.members.iter().filter(|m| !m.is_learner).count();
                if voting != *want || m.members.len() != *want {
                    bail!(
                        "{} sees {} members ({voting} voting), expected {want}",
                        m.metadata
                            .as_ref()
                            .map(|m| m.hostname.as_str())
                            .unwrap_or(""),
                        m.members.len()
                    );
                }
            }
            format!("{want} voting members on {} nodes", r.messages.len())
        }
        Step::AssertWritable { count } => {
            let started = Instant::now();
            let (ok, _) = h.write_keys(*count, true).await?;
            format!("{ok} writes in {:.1}s", started.elapsed().as_secs_f64())
        }
        Step::AssertApiThroughLoadBalancer { count } => {
            for i in 0..*count {
                let mut api = h
                    .api()
                    .await
                    .with_context(|| format!("call {} of {count}", i + 1))?;
                api.version(pb::Empty {})
                    .await
                    .map_err(|s| anyhow::anyhow!("call {} of {count}: {}", i + 1, s.message()))?;
            }
            format!("{count} of {count} answered")
        }
        Step::RememberMembers => {
            let members = member_ids(h).await?;
            let text = members
                .iter()
                .map(|(name, id)| format!("{name} {id:x}"))
                .collect::<Vec<_>>()
                .join(", ");
            h.remembered_members = Some(members);
            text
        }
        Step::AssertRejoined(n) => {
            let before = h
                .remembered_members
                .clone()
                .context("no member ids remembered: add `rememberMembers` before this step")?;
            let now = member_ids(h).await?;
            let name = h.node(*n)?.name.clone();
            let (Some(old), Some(new)) = (before.get(&name), now.get(&name)) else {
                bail!(
                    "{n} ({name}) is not a member before and after: before {before:x?}, now {now:x?}"
                );
            };
            if old == new {
                bail!("{n} is still member {old:x}: it did not leave and rejoin");
            }
            for (other, id) in before.iter().filter(|(o, _)| **o != name) {
                if now.get(other) != Some(id) {
                    bail!("{other} was member {id:x} and now is {:x?}", now.get(other));
                }
            }
            format!("{name}: member {old:x} left, {new:x} joined; the others unchanged")
        }
        Step::AssertCaughtUp(n) => {
            let addr = h.node(*n)?.address.to_string();
            let cps = h.control_plane_addresses();
            let mut api = h.api().await?;
            let r = api
                .etcd_status(request(pb::Empty {}, &cps))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let target = r
                .messages
                .iter()
                .filter_map(|m| m.member_status.as_ref())
                .map(|s| s.raft_index)
                .max()
                .unwrap_or(0);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = api
                    .etcd_status(request(pb::Empty {}, std::slice::from_ref(&addr)))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                    .into_inner();
                let applied = r
                    .messages
                    .first()
                    .and_then(|m| m.member_status.as_ref())
                    .map_or(0, |s| s.raft_applied_index);
                if applied >= target {
                    break format!("applied index {applied} >= leader's {target}");
                }
                if Instant::now() > deadline {
                    bail!("{n} applied index {applied} is behind {target} after 60s");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Step::AssertRunning(n) => {
            let node = h.node(*n)?.clone();
            h.wait_running(*n, None, Duration::from_secs(30)).await?;
            let mut api = h.api().await?;
            let r = api
                .get(request(
                    pb::GetRequest {
                        r#type: "machineconfig".into(),
                        id: String::new(),
                    },
                    &[node.address.to_string()],
                ))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
            let spec = r
                .messages
                .first()
                .and_then(|m| m.resources.first())
                .map(|r| r.spec.clone())
                .unwrap_or_default();
            if !spec.contains(&format!("hostname: {}", node.name)) {
                bail!(
                    "{n} runs without its configuration (no hostname {} in it)",
                    node.name
                );
            }
            "running with its configuration".to_owned()
        }
        Step::AssertNoLostWrites => {
            let present = h.present_keys().await?;
            let check = h
                .workload
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check(&present);
            let detail = format!(
                "{} acknowledged before the recovery point, {} present, {} lost, {} unexpected",
                check.expected,
                check.present,
                check.lost.len(),
                check.unexpected.len()
            );
            if !check.lost.is_empty() || !check.unexpected.is_empty() {
                bail!(
                    "{detail}; first lost: {:?}; first unexpected: {:?}",
                    check.lost.iter().take(5).collect::<Vec<_>>(),
                    check.unexpected.iter().take(5).collect::<Vec<_>>()
                );
            }
            if check.expected == 0 {
                bail!("nothing was acknowledged, so nothing was checked");
            }
            detail
        }
        Step::FillUntilNoSpace {
            value_bytes,
            limit_bytes,
        } => {
            let written = h.fill_until_no_space(*value_bytes, *limit_bytes).await?;
            format!("etcd refused a write (NOSPACE) after {written} bytes")
        }
        Step::AssertAlarm(want) => {
            // Each member raises the alarm when its own backend passes the quota; once one has,
            // writes stop, so a member a little behind may never pass it. Every node must list
            // the alarm; wait a while for every member to raise it, and report how many did.
            let members = h.member_ids().await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let alarms = h.alarms(false).await?;
                let raised = |list: &Vec<(u64, String)>| {
                    members
                        .iter()
                        .filter(|m| list.iter().any(|(id, a)| id == *m && a == want))
                        .count()
                };
                let listed = alarms.iter().filter(|(_, l)| raised(l) > 0).count();
                let by = alarms.iter().map(|(_, l)| raised(l)).min().unwrap_or(0);
                if listed == alarms.len() && (by == members.len() || Instant::now() > deadline) {
                    break format!(
                        "every node ({}) lists {want}, raised by {by} of {} members",
                        alarms.len(),
                        members.len()
                    );
                }
                if Instant::now() > deadline {
                    bail!("{want} is not listed by every node: {alarms:?}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Step::AssertNoAlarm => {
            let alarms = h.alarms(false).await?;
            if let Some((node, list)) = alarms.iter().find(|(_, l)| !l.is_empty()) {
                bail!("{node} still reports alarms: {list:?}");
            }
            format!("no alarm on {} nodes", alarms.len())
        }
        Step::AssertNotWritable => {
            let (ok, failed) = h.write_keys(1, false).await?;
            if ok > 0 {
                bail!("a write was acknowledged");
            }
            format!("{failed} write refused")
        }
        Step::EtcdStatus => {
            h.db_sizes = h.db_sizes().await?;
            crate::maintenance::describe_sizes(&h.db_sizes)
        }
        Step::Compact => format!("compacted to revision {}", h.compact().await?),
        Step::Defrag => {
            h.defrag().await?;
            let after = h.db_sizes().await?;
            let detail = crate::maintenance::compare_sizes(&h.db_sizes, &after)?;
            h.db_sizes = after;
            detail
        }
        Step::DisarmAlarms => {
            let before = h.alarms(true).await?;
            format!(
                "disarmed {} alarms",
                before.iter().map(|(_, l)| l.len()).max().unwrap_or(0)
            )
        }
        Step::Upgrade {
            node,
            to,
            preserve,
            stage,
            force,
            expect,
        } => {
            let flags = crate::upgrade::UpgradeFlags {
                preserve: *preserve,
                stage: *stage,
                force: *force,
            };
            crate::upgrade::upgrade(h, *node, *to, flags, *expect).await?
        }
        Step::UpgradeAll { to, concurrent } => {
            crate::upgrade::upgrade_all(h, *to, *concurrent).await?
        }
        Step::Rollback(n) => crate::upgrade::rollback(h, *n).await?,
        Step::AssertRelease { node, release } => {
            crate::upgrade::assert_release(h, *node, *release).await?
        }
        Step::CreateKubeadmControlPlane { nodes } => {
            if h.kubeadm.is_some() {
                bail!("the scenario already built its kubeadm control plane");
            }
            let legacy =
                crate::kubeadm::Legacy::create(&h.created.dir, &h.created.state, *nodes).await;
            match legacy {
                Ok(l) => {
                    let detail = format!(
                        "{} at {}, HAProxy at {}",
                        l.nodes
                            .iter()
                            .map(|n| n.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        l.nodes
                            .iter()
                            .map(|n| n.address.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        l.endpoint()
                    );
                    h.kubeadm = Some(l);
                    detail
                }
                Err(e) => return Err(e),
            }
        }
        Step::GenSecretsFromKubernetesPki => kubeadm(h)?.gen_secrets().await?,
        Step::GenConfigWithKubeadmSecrets => {
            let name = h.created.state.name.clone();
            kubeadm(h)?.gen_config(&name).await?
        }
        Step::AssertKubeadmCasKept => kubeadm(h)?.assert_cas_kept()?,
        Step::RemoveKubeadmNode(i) => kubeadm(h)?.remove_node(*i).await?,
        Step::AssertEtcdMemberNames(want) => {
            let mut want = want.clone();
            want.sort();
            let got = kubeadm(h)?.member_names().await?;
            if got != want {
                bail!("the etcd members are {got:?}, expected {want:?}");
            }
            format!("members: {}", got.join(", "))
        }
        Step::ApplyKubeadmConfig {
            node,
            control_plane,
        } => {
            let n = h.node(*node)?.clone();
            let std::net::IpAddr::V4(address) = n.address else {
                bail!("{node} has no IPv4 address");
            };
            kubeadm(h)?
                .apply_config(&n.name, address, *control_plane)
                .await?
        }
        Step::AssertOnlyKilnMembers(want) => {
            let lab: Vec<String> = h
                .created
                .state
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .collect();
            let got = kubeadm(h)?.member_names().await?;
            if got.len() != *want || got.iter().any(|m| !lab.contains(m)) {
                bail!("the etcd members are {got:?}, expected {want} Kiln nodes");
            }
            format!("members: {}", got.join(", "))
        }
        Step::CacheImages => crate::airgap::cache_images(h).await?,
        Step::UpgradeFromLabRegistry(n) => crate::airgap::upgrade_from_lab_registry(h, *n).await?,
        Step::AssertAuditClean => crate::airgap::assert_audit_clean(h).await?,
        Step::RequestOutside(n) => crate::airgap::request_outside(h, *n).await?,
        Step::AssertAuditDenied(d) => crate::airgap::assert_audit_denied(h, d).await?,
        Step::AssertNoFailedWrites => {
            let w = h.workload.lock().unwrap_or_else(|e| e.into_inner());
            let detail = format!(
                "{} writes, {} acknowledged, {} failed",
                w.attempted.len(),
                w.acked.len(),
                w.failures
            );
            if w.failures > 0 {
                bail!("{detail}: {}", w.failure_reasons.join("; "));
            }
            if w.acked.is_empty() {
                bail!("nothing was written, so nothing was checked");
            }
            detail
        }
        Step::AssertKeyPresent(key) => {
            let mut found = false;
            for mut c in h.etcd_clients().await? {
                if let Ok(r) = c.get(key.as_str(), None).await {
                    found = !r.kvs().is_empty();
                    break;
                }
            }
            if !found {
                bail!("key {key:?} is not in etcd");
            }
            String::new()
        }
    })
}

fn kubeadm(h: &mut ClusterHandle) -> anyhow::Result<&mut crate::kubeadm::Legacy> {
    h.kubeadm
        .as_mut()
        .context("run createKubeadmControlPlane first")
}

/// Runs `scenario`; the cluster is named after it ([`RunOptions::cluster_name`]).
pub async fn run(scenario: &Scenario, opts: &RunOptions) -> Report {
    let started = Instant::now();
    let mut report = Report {
        scenario: scenario.name.clone(),
        provisioner: opts.provisioner.clone(),
        outcome: Outcome::Passed,
        steps: Vec::new(),
        duration: Duration::ZERO,
    };
    if let Some(why) = unavailable(scenario, &opts.provisioner) {
        report.outcome = Outcome::Skipped(why);
        return report;
    }
    let file_cidr = scenario
        .cluster
        .network
        .as_ref()
        .and_then(|n| n.cidr.clone());
    let (mut cidr, reserved) = match (&opts.cidr, file_cidr) {
        (Some(c), _) => (c.clone(), false),
        (None, Some(c)) => (c, false),
        (None, None) => (reserve_cidr(opts).await, true),
    };
    let label = format!("{}::{}", opts.provisioner, scenario.name);
    let cluster = opts.cluster_name(scenario);
    let mut handle: Option<ClusterHandle> = None;
    let total = scenario.steps.len() + 1;
    let steps = std::iter::once(None).chain(scenario.steps.iter().map(Some));
    for (i, step) in steps.enumerate() {
        let description = match step {
            None => format!("{} on {cidr}", scenario.describe_cluster()),
            Some(s) => s.describe(),
        };
        let t = Instant::now();
        if opts.verbose {
            eprintln!("[{label}] step {}/{total}: {description}", i + 1);
        }
        let result = match step {
            None => match create_on_free_network(scenario, opts, &mut cidr, reserved).await {
                Ok(h) => {
                    let detail = format!(
                        "{} nodes in {:.1}s",
                        h.created.state.nodes.len(),
                        h.created.elapsed.as_secs_f64()
                    );
                    handle = Some(h);
                    Ok(detail)
                }
                Err(e) => Err(e),
            },
            Some(step) => execute(&mut handle, step).await,
        };
        let duration = t.elapsed();
        match result {
            Ok(detail) => {
                if opts.verbose {
                    eprintln!(
                        "[{label}]   ok ({:.1}s){}",
                        duration.as_secs_f64(),
                        if detail.is_empty() {
                            String::new()
                        } else {
                            format!(": {detail}")
                        }
                    );
                }
                report.steps.push(StepReport {
                    description,
                    duration,
                    detail,
                    error: None,
                });
            }
            Err(e) => {
                let reason = format!("{e:#}");
                if opts.verbose {
                    eprintln!(
                        "[{label}]   FAILED ({:.1}s): {reason}",
                        duration.as_secs_f64()
                    );
                }
                report.steps.push(StepReport {
                    description: description.clone(),
                    duration,
                    detail: String::new(),
                    error: Some(reason.clone()),
                });
                let artifacts = opts.artifacts.join(label.replace("::", "-"));
                let state_dir = opts.state_base.join(&cluster);
                match &handle {
                    Some(h) => {
                        if let Err(e) = h.crash_dump(&artifacts).await {
                            eprintln!("[{label}] crash dump incomplete: {e:#}");
                        }
                    }
                    None => {
                        // The create itself failed: keep what its state directory has.
                        let _ = std::fs::create_dir_all(&artifacts);
                        if let Ok(entries) = std::fs::read_dir(&state_dir) {
                            for e in entries.flatten() {
                                let n = e.file_name().to_string_lossy().into_owned();
                                if n.ends_with(".log") || n == "state.yaml" {
                                    let _ = std::fs::copy(e.path(), artifacts.join(n));
                                }
                            }
                        }
                    }
                }
                report.outcome = Outcome::Failed {
                    step: description,
                    reason,
                    artifacts,
                };
                break;
            }
        }
    }
    let keep = opts.keep_on_failure && matches!(report.outcome, Outcome::Failed { .. });
    if keep {
        eprintln!(
            "[{label}] keeping the cluster for inspection: kiln cluster destroy --name {cluster} --state {}",
            opts.state_base.display()
        );
    } else {
        let destroyed = match handle {
            Some(h) => h.destroy().await,
            None => {
                // A create that failed halfway: its state names what it made.
                let dir = kiln_provisioner::state::StateDir::new(&opts.state_base, &cluster);
                kiln_provisioner::destroy::destroy(&dir, true, &Progress::plain())
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
        };
        if let Err(e) = destroyed {
            eprintln!("[{label}] destroy failed: {e:#}");
        }
    }
    if reserved {
        release_cidr(&cidr).await;
    }
    report.duration = started.elapsed();
    report
}

/// Runs every scenario on every provisioner, `jobs` trials at a time (each its own cluster on
/// its own network); reports in the order of `scenarios` × `provisioners`. With more than one
/// provisioner, clusters are named `<prefix><provisioner>-<scenario>` so trials never share a
/// name.
pub async fn run_many(
    scenarios: &[Scenario],
    provisioners: &[String],
    opts: &RunOptions,
    jobs: usize,
) -> Vec<Report> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = Vec::new();
    for s in scenarios {
        for p in provisioners {
            let mut o = opts.clone();
            o.provisioner = p.clone();
            if provisioners.len() > 1 {
                o.name_prefix = format!("{}{p}-", opts.name_prefix);
            }
            let s = s.clone();
            let slots = slots.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire_owned().await;
                run(&s, &o).await
            }));
        }
    }
    let mut reports = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => reports.push(r),
            Err(e) => reports.push(Report {
                scenario: "?".into(),
                provisioner: "?".into(),
                outcome: Outcome::Failed {
                    step: "run".into(),
                    reason: format!("the trial's task ended abnormally: {e}"),
                    artifacts: opts.artifacts.clone(),
                },
                steps: vec![],
                duration: Duration::ZERO,
            }),
        }
    }
    reports
}
