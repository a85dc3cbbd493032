//! Running a scenario: create, each step timed and printed, a crash dump on failure, and
//! `destroy` at the end unless the cluster is kept for inspection.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_os_api::client::request;
use kiln_os_api::pb;
use kiln_provisioner::create::CreateOptions;
use kiln_provisioner::progress::Progress;
use kiln_provisioner::provision::PowerAction;

use crate::catalog::Scenario;
use crate::cluster::{ClusterHandle, node_error};
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
    /// Network of the cluster.
    pub cidr: String,
    /// Print each step as it runs.
    pub verbose: bool,
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
pub fn unavailable(scenario: &Scenario, provisioner: &str) -> Option<String> {
    if provisioner != "process" {
        return Some(format!(
            "the {provisioner} provisioner is not available in this build"
        ));
    }
    if scenario.needs_root() && !nix::unistd::Uid::effective().is_root() {
        return Some("cutting a node's link needs the bridge network: run as root".to_owned());
    }
    None
}

async fn execute(
    handle: &mut Option<ClusterHandle>,
    step: &Step,
    opts: &RunOptions,
    name: &str,
) -> anyhow::Result<String> {
    if let Step::CreateCluster {
        controlplanes,
        workers,
        maintenance_workers,
    } = step
    {
        let mut create = CreateOptions::new(name, opts.state_base.clone());
        create.provisioner = opts.provisioner.clone();
        create.controlplanes = *controlplanes;
        create.workers = *workers;
        create.cidr = opts.cidr.clone();
        create.maintenance_workers = *maintenance_workers;
        create.wait_timeout = Duration::from_secs(180);
        let h = ClusterHandle::create(&create, &Progress::plain()).await?;
        let detail = format!(
            "{} nodes in {:.1}s",
            h.created.state.nodes.len(),
            h.created.elapsed.as_secs_f64()
        );
        *handle = Some(h);
        return Ok(detail);
    }
    let h = handle
        .as_mut()
        .context("the scenario must create its cluster first")?;
    Ok(match step {
        Step::CreateCluster { .. } => String::new(),
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

/// Runs `scenario`; the cluster is named after it.
pub async fn run(scenario: &Scenario, opts: &RunOptions) -> Report {
    let started = Instant::now();
    let mut report = Report {
        scenario: scenario.name.to_owned(),
        provisioner: opts.provisioner.clone(),
        outcome: Outcome::Passed,
        steps: Vec::new(),
        duration: Duration::ZERO,
    };
    if let Some(why) = unavailable(scenario, &opts.provisioner) {
        report.outcome = Outcome::Skipped(why);
        return report;
    }
    let mut handle: Option<ClusterHandle> = None;
    let total = scenario.steps.len();
    for (i, step) in scenario.steps.iter().enumerate() {
        let description = step.describe();
        let t = Instant::now();
        if opts.verbose {
            eprintln!("[{}] step {}/{total}: {description}", scenario.name, i + 1);
        }
        let result = execute(&mut handle, step, opts, scenario.name).await;
        let duration = t.elapsed();
        match result {
            Ok(detail) => {
                if opts.verbose {
                    eprintln!(
                        "[{}]   ok ({:.1}s){}",
                        scenario.name,
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
                        "[{}]   FAILED ({:.1}s): {reason}",
                        scenario.name,
                        duration.as_secs_f64()
                    );
                }
                report.steps.push(StepReport {
                    description: description.clone(),
                    duration,
                    detail: String::new(),
                    error: Some(reason.clone()),
                });
                let artifacts = opts.artifacts.join(scenario.name);
                let state_dir = opts.state_base.join(scenario.name);
                match &handle {
                    Some(h) => {
                        if let Err(e) = h.crash_dump(&artifacts).await {
                            eprintln!("[{}] crash dump incomplete: {e:#}", scenario.name);
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
            "[{}] keeping the cluster for inspection: kiln cluster destroy --name {} --state {}",
            scenario.name,
            scenario.name,
            opts.state_base.display()
        );
    } else {
        let destroyed = match handle {
            Some(h) => h.destroy().await,
            None => {
                let dir = kiln_provisioner::state::StateDir::new(&opts.state_base, scenario.name);
                match kiln_provisioner::provision::by_name(&opts.provisioner) {
                    Ok(p) if dir.dir.exists() => {
                        p.destroy(&dir, scenario.name, &Progress::plain()).await
                    }
                    _ => Ok(()),
                }
            }
        };
        if let Err(e) = destroyed {
            eprintln!("[{}] destroy failed: {e:#}", scenario.name);
        }
    }
    report.duration = started.elapsed();
    report
}
