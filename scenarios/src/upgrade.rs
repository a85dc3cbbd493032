//! Upgrade scenarios: three real releases built with `kiln image installer` (N−1 and N from this
//! workspace's machined with different versions, and one whose machined cannot start) pushed to
//! a registry the scenario runs (`kiln registry serve`), a cluster created on N−1 with that
//! registry as the nodes' mirror (a scenario file's `release: previous`), and the steps that
//! upgrade, roll back and check versions.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use kiln_os_api::client::request;
use kiln_os_api::pb;
use kiln_os_api::upgrade::{UpgradeEnd, follow};
use kiln_os_api::wait::{Poll, until};
use kiln_provisioner::create::CreateOptions;
use kiln_provisioner::progress::Progress;

use crate::cluster::{ClusterHandle, node_error};
use crate::step::{NodeRef, Release};

/// The host name installers are referred to by; the nodes' mirror for it is the scenario's
/// registry.
pub const REGISTRY_HOST: &str = "releases.kiln.lab";
const REPOSITORY: &str = "kiln/installer";
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(300);

/// The scenario's registry and the releases in it.
#[derive(Debug)]
pub struct Releases {
    registry: tokio::process::Child,
    _dir: tempfile::TempDir,
    /// The version of N−1.
    pub previous: String,
    /// The version of N.
    pub current: String,
    /// The version of the release whose machined cannot start.
    pub broken: String,
}

impl Releases {
    /// The reference of `release` (through the mirror host).
    pub fn reference(&self, release: Release) -> String {
        let tag = match release {
            Release::Previous => self.previous.as_str(),
            Release::Current => self.current.as_str(),
            Release::BootFailure => self.broken.as_str(),
            Release::Missing => "does-not-exist",
        };
        format!("{REGISTRY_HOST}/{REPOSITORY}:{tag}")
    }

    /// The version a node reports when it runs `release`.
    pub fn version(&self, release: Release) -> &str {
        match release {
            Release::Previous => &self.previous,
            Release::Current => &self.current,
            Release::BootFailure => &self.broken,
            Release::Missing => "does-not-exist",
        }
    }
}

impl Drop for Releases {
    fn drop(&mut self) {
        let _ = self.registry.start_kill();
    }
}

pub(crate) async fn kiln(args: &[&str]) -> anyhow::Result<String> {
    let bin = kiln_provisioner::daemon::kiln_binary()?;
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "kiln {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the registry and builds and pushes the three releases: installers of machined and
/// etcd (`kiln image installer`), or, for `metal` nodes (`qemu`), with the kernel and an
/// initramfs whose `/init` is the release's machined (`kiln image build --push`).
pub async fn publish(metal: bool) -> anyhow::Result<Releases> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-upgrade-releases")
        .tempdir()?;
    let ready = dir.path().join("registry.addr");
    let bin = kiln_provisioner::daemon::kiln_binary()?;
    let registry = tokio::process::Command::new(&bin)
        .args(["registry", "serve", "--addr", "0.0.0.0:0", "--root"])
        .arg(dir.path().join("registry"))
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting kiln registry serve")?;
    let url = until(
        "the scenario's registry",
        Poll::every(Duration::from_millis(100), Duration::from_secs(20)),
        || async {
            std::fs::read_to_string(&ready)
                .map(|s| s.trim().to_owned())
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    let port = url
        .rsplit(':')
        .next()
        .context("registry address without a port")?
        .to_owned();
    let base = env!("CARGO_PKG_VERSION");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let releases = Releases {
        registry,
        previous: format!("{base}-previous.{stamp}"),
        current: format!("{base}-current.{stamp}"),
        broken: format!("{base}-broken.{stamp}"),
        _dir: dir,
    };
    let push = format!("127.0.0.1:{port}");
    for (version, init) in [
        (&releases.previous, None),
        (&releases.current, None),
        (&releases.broken, Some("/bin/false")),
    ] {
        let out = releases._dir.path().join(version);
        let mut args = vec![
            "image",
            if metal { "build" } else { "installer" },
            "--image-version",
            version.as_str(),
            "--push",
            push.as_str(),
            "--plain-http",
            "--out",
        ];
        let out = out.to_string_lossy().into_owned();
        args.push(&out);
        if metal {
            // The installer only: nodes boot its kernel and initramfs from their slot.
            args.push("--no-disk");
        }
        if let Some(init) = init {
            args.extend(["--init", init]);
        }
        kiln(&args).await?;
    }
    Ok(releases)
}

/// The address nodes reach the host's registry at: the bridge gateway, or the loopback.
fn registry_endpoint(opts: &CreateOptions, port: &str) -> String {
    let root = nix::unistd::Uid::effective().is_root();
    let host = match opts.cidr.parse::<ipnetwork::Ipv4Network>() {
        Ok(net) if root => net.nth(1).map_or("127.0.0.1".into(), |a| a.to_string()),
        _ => "127.0.0.1".to_owned(),
    };
    format!("http://{host}:{port}")
}

/// Creates the cluster on `release` (N−1 for `release: previous`) with the registry as the
/// nodes' mirror.
pub async fn create_on(
    mut create: CreateOptions,
    releases: Releases,
    release: Release,
) -> anyhow::Result<ClusterHandle> {
    let port = registry_port(&releases)?;
    let registry_port = port.as_str();
    let patch = format!(
        "machine:\n  registries:\n    mirrors:\n      {REGISTRY_HOST}:\n        endpoints: [\"{}\"]\n",
        registry_endpoint(&create, registry_port)
    );
    create.patches.push(kiln_config::patch::Patch::parse(
        &patch,
        "upgrade scenario mirror",
    )?);
    // The host pulls the release straight from the registry.
    create.install_image = Some(format!(
        "127.0.0.1:{registry_port}/{REPOSITORY}:{}",
        releases.version(release)
    ));
    create.install_plain_http = true;
    let mut h = ClusterHandle::create(&create, &Progress::plain()).await?;
    h.releases = Some(releases);
    Ok(h)
}

/// The port of the registry in `releases`.
pub fn registry_port(releases: &Releases) -> anyhow::Result<String> {
    let ready = releases._dir.path().join("registry.addr");
    let url = std::fs::read_to_string(&ready)?;
    Ok(url
        .trim()
        .rsplit(':')
        .next()
        .context("registry address without a port")?
        .to_owned())
}

fn releases(h: &ClusterHandle) -> anyhow::Result<&Releases> {
    h.releases
        .as_ref()
        .context("the scenario has no releases: add `release: previous` to its file")
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What an upgrade step expects; in files `confirmed`, `staged`, `rolledBack`, `refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Expect {
    /// The new release runs and is permanent.
    #[default]
    Confirmed,
    /// Written, applied at the next reboot.
    Staged,
    /// The new release did not come up and the node is back on the old one.
    RolledBack,
    /// The node refused or aborted before changing anything.
    Refused,
}

/// Options of one upgrade.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeFlags {
    /// `--preserve`.
    pub preserve: bool,
    /// `--stage`.
    pub stage: bool,
    /// `--force`.
    pub force: bool,
}

/// Upgrades one node and checks the outcome; returns a detail line.
pub async fn upgrade(
    h: &ClusterHandle,
    node: NodeRef,
    to: Release,
    flags: UpgradeFlags,
    expect: Expect,
) -> anyhow::Result<String> {
    let image = releases(h)?.reference(to);
    upgrade_to(h, node, &image, flags, expect).await
}

/// Upgrades `node` to the installer `image` (any reference its mirrors resolve) and checks
/// how it ends.
pub async fn upgrade_to(
    h: &ClusterHandle,
    node: NodeRef,
    image: &str,
    flags: UpgradeFlags,
    expect: Expect,
) -> anyhow::Result<String> {
    let image = image.to_owned();
    let addr = h.node(node)?.address.to_string();
    let started = Instant::now();
    let since = now_millis();
    let mut api = h.api().await?;
    let resp = api
        .upgrade(request(
            pb::UpgradeRequest {
                image: image.clone(),
                preserve: flags.preserve,
                stage: flags.stage,
                force: flags.force,
            },
            std::slice::from_ref(&addr),
        ))
        .await;
    let refusal = match resp {
        Err(s) => Some(s.message().to_owned()),
        Ok(r) => r.into_inner().messages.into_iter().find_map(|m| {
            m.metadata
                .filter(|md| !md.error.is_empty())
                .map(|md| md.error)
        }),
    };
    if let Some(reason) = refusal {
        if expect == Expect::Refused {
            return Ok(format!("refused: {reason}"));
        }
        bail!("upgrading {node} to {image} was refused: {reason}");
    }
    if expect == Expect::Refused {
        bail!("upgrading {node} to {image} was accepted; expected a refusal");
    }
    let events = std::sync::Mutex::new(Vec::new());
    let end = follow(&api, &addr, since, UPGRADE_TIMEOUT, &|e| {
        events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}: {}", e.state, e.message));
    })
    .await?;
    let got = match end {
        UpgradeEnd::Confirmed => Expect::Confirmed,
        UpgradeEnd::Staged => Expect::Staged,
        UpgradeEnd::RolledBack => Expect::RolledBack,
        UpgradeEnd::Aborted => Expect::Refused,
    };
    let seen = events.lock().unwrap_or_else(|p| p.into_inner()).join(" | ");
    if got != expect {
        bail!("upgrading {node} to {image} ended {end:?}, expected {expect:?}; events: {seen}");
    }
    if matches!(got, Expect::Confirmed | Expect::RolledBack) {
        h.wait_running(node, None, Duration::from_secs(90)).await?;
    }
    Ok(format!(
        "{end:?} in {:.1}s: {seen}",
        started.elapsed().as_secs_f64()
    ))
}

/// The version `node` reports.
pub async fn version(h: &ClusterHandle, node: NodeRef) -> anyhow::Result<String> {
    let addr = h.node(node)?.address.to_string();
    let mut api = h.api().await?;
    let r = api
        .version(request(pb::Empty {}, &[addr]))
        .await
        .map_err(|s| anyhow::anyhow!("version: {}", s.message()))?
        .into_inner();
    node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
    let tag = r
        .messages
        .first()
        .map(|m| m.tag.clone())
        .unwrap_or_default();
    Ok(tag.trim_start_matches('v').to_owned())
}

/// Every node named (all nodes for `None`) reports `release`.
pub async fn assert_release(
    h: &ClusterHandle,
    node: Option<NodeRef>,
    release: Release,
) -> anyhow::Result<String> {
    let want = releases(h)?.version(release).to_owned();
    let nodes = match node {
        Some(n) => vec![n],
        None => all_nodes(h),
    };
    for n in &nodes {
        h.wait_running(*n, None, Duration::from_secs(90)).await?;
        let got = version(h, *n).await?;
        if got != want {
            bail!("{n} runs {got}, expected {want}");
        }
    }
    Ok(format!("{} node(s) on {want}", nodes.len()))
}

fn all_nodes(h: &ClusterHandle) -> Vec<NodeRef> {
    let cps = h.created.state.control_plane().count();
    let workers = h.created.state.nodes.len() - cps;
    (1..=cps)
        .map(NodeRef::ControlPlane)
        .chain((1..=workers).map(NodeRef::Worker))
        .collect()
}

/// Upgrades every node: one after another (checking the load-balanced API answers after
/// each), or all control-plane nodes at once (checking that at most one is ever away: the
/// upgrade lease).
pub async fn upgrade_all(
    h: &ClusterHandle,
    to: Release,
    concurrent: bool,
) -> anyhow::Result<String> {
    let flags = UpgradeFlags {
        preserve: true,
        stage: false,
        force: false,
    };
    let started = Instant::now();
    if !concurrent {
        let mut times = Vec::new();
        for n in all_nodes(h) {
            let t = Instant::now();
            upgrade(h, n, to, flags, Expect::Confirmed).await?;
            times.push(format!("{n} {:.1}s", t.elapsed().as_secs_f64()));
            let mut api = h.api().await?;
            api.version(pb::Empty {})
                .await
                .map_err(|s| anyhow::anyhow!("the load-balanced API after {n}: {}", s.message()))?;
        }
        return Ok(format!(
            "rolling upgrade in {:.1}s ({})",
            started.elapsed().as_secs_f64(),
            times.join(", ")
        ));
    }
    let cps: Vec<NodeRef> = all_nodes(h)
        .into_iter()
        .filter(|n| matches!(n, NodeRef::ControlPlane(_)))
        .collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = async {
        // Samples how many control-plane nodes are away at once.
        let mut most = 0usize;
        let mut samples = 0u32;
        while !*stop_rx.borrow() {
            let mut away = 0;
            for n in &cps {
                if version(h, *n).await.is_err() {
                    away += 1;
                }
            }
            most = most.max(away);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (most, samples)
    };
    let upgrades = async {
        let all = futures::future::join_all(
            cps.iter()
                .map(|n| upgrade(h, *n, to, flags, Expect::Confirmed)),
        )
        .await;
        let _ = stop_tx.send(true);
        all
    };
    let (results, (most, samples)) = tokio::join!(upgrades, watcher);
    for r in results {
        r?;
    }
    if most > 1 {
        bail!("{most} control-plane nodes were away at once; the upgrade lease allows one");
    }
    Ok(format!(
        "{} control-plane nodes upgraded in {:.1}s; at most {most} away at once over {samples} samples",
        cps.len(),
        started.elapsed().as_secs_f64()
    ))
}

/// `rollback` on `node`, waiting for it to come back.
pub async fn rollback(h: &ClusterHandle, node: NodeRef) -> anyhow::Result<String> {
    let addr = h.node(node)?.address.to_string();
    let before = version(h, node).await?;
    let mut api = h.api().await?;
    let r = api
        .rollback(request(pb::Empty {}, std::slice::from_ref(&addr)))
        .await
        .map_err(|s| anyhow::anyhow!("rollback: {}", s.message()))?
        .into_inner();
    node_error(r.messages.iter().map(|m| m.metadata.as_ref()))?;
    let after = until(
        format!("{node} on another release"),
        Poll::every(Duration::from_millis(300), Duration::from_secs(90)),
        || async {
            match version(h, node).await {
                Ok(v) if v != before => Ok(v),
                Ok(v) => Err(format!("still {v}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await?;
    h.wait_running(node, None, Duration::from_secs(90)).await?;
    Ok(format!("{before} -> {after}"))
}
