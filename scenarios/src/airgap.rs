//! The air-gapped rehearsal's steps: fill the lab registry with every image `kiln image list`
//! names, upgrade a node from it, read the egress audit, and make requests to the outside from
//! a node. The cluster is created with `airgapped: true` (no route out; the lab registry, DNS
//! and egress proxy on the gateway; every node mirrors every registry to the lab registry).
//!
//! What a user would run is what runs: the `kiln` commands (`image installer`, `image cache`,
//! `image list`, `airgap audit`), and `dig` and `curl` inside a node's network namespace
//! (process nodes), so the requests come from a node's address as a workload's would.

use std::path::Path;
use std::process::{Output, Stdio};

use anyhow::{Context as _, bail, ensure};

use crate::cluster::ClusterHandle;
use crate::step::NodeRef;
use crate::upgrade::{self, Expect, UpgradeFlags};

/// The outside name the rehearsal asks for (RFC 2606: never a real destination).
const OUTSIDE: &str = "example.com";

/// This release's installer by its plain name, as `kiln image list` lists it.
fn installer() -> &'static str {
    kiln_config::generate::DEFAULT_INSTALLER_IMAGE
}

/// Runs `kiln ARGS` and returns its output, whatever its exit code.
async fn kiln(args: &[&str]) -> anyhow::Result<Output> {
    let bin = kiln_provisioner::daemon::kiln_binary()?;
    tokio::process::Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The lab registry's address (`<gateway>:5000`), when the cluster has one.
fn lab_registry(h: &ClusterHandle) -> anyhow::Result<String> {
    let st = &h.created.state;
    ensure!(
        st.helpers.iter().any(|x| x.name == "registry-mirror"),
        "the cluster has no lab registry: create it with `airgapped: true` or `withRegistry: true`"
    );
    Ok(format!("{}:5000", st.network.gateway))
}

fn state_dir(h: &ClusterHandle) -> &Path {
    &h.created.dir.dir
}

/// `kiln image cache` of every listed image into the lab registry.
pub async fn cache_images(h: &ClusterHandle) -> anyhow::Result<String> {
    let registry = lab_registry(h)?;
    let listed = kiln(&["image", "list", "-o", "json"]).await?;
    ensure!(
        listed.status.success(),
        "kiln image list: {}",
        text(&listed)
    );
    let images: Vec<serde_json::Value> =
        serde_json::from_slice(&listed.stdout).context("kiln image list -o json")?;
    let names: Vec<String> = images
        .iter()
        .filter_map(|i| i["image"].as_str().map(str::to_owned))
        .collect();
    // This release's installer as an OCI layout named as `image cache --from` looks for it.
    let from = tempfile::Builder::new()
        .prefix("kiln-airgap-images")
        .tempdir()?;
    let tag = installer()
        .rsplit_once(':')
        .map(|(_, t)| t)
        .context("installer reference without a tag")?;
    let layout = from.path().join(installer().replace(['/', ':'], "_"));
    let built = kiln(&[
        "image",
        "installer",
        "--image-version",
        tag,
        "--out",
        &layout.display().to_string(),
    ])
    .await?;
    ensure!(
        built.status.success(),
        "kiln image installer: {}",
        text(&built)
    );
    let cached = kiln(&[
        "image",
        "cache",
        "--from",
        &from.path().display().to_string(),
        "--to",
        &registry,
        "--plain-http",
    ])
    .await?;
    let out = text(&cached);
    ensure!(cached.status.success(), "kiln image cache: {out}");
    for n in &names {
        ensure!(
            out.lines().any(|l| l.starts_with(n.as_str())),
            "{n} is not in the summary of kiln image cache:\n{out}"
        );
    }
    Ok(format!(
        "{} images into {registry}: {}",
        names.len(),
        names.join(", ")
    ))
}

/// How many pulls of the installer's manifest the lab registry's request log shows.
fn installer_pulls(h: &ClusterHandle) -> anyhow::Result<usize> {
    let log = state_dir(h).join("registry-mirror.log");
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    Ok(text
        .matches(&format!("pull manifest {}", installer()))
        .count())
}

/// `upgrade --preserve` to the installer by its plain name, through the node's mirrors.
pub async fn upgrade_from_lab_registry(h: &ClusterHandle, node: NodeRef) -> anyhow::Result<String> {
    let before = installer_pulls(h)?;
    let flags = UpgradeFlags {
        preserve: true,
        stage: false,
        force: false,
    };
    let said = upgrade::upgrade_to(h, node, installer(), flags, Expect::Confirmed).await?;
    let after = installer_pulls(h)?;
    ensure!(
        after > before,
        "the lab registry's request log shows no pull of {} during the upgrade",
        installer()
    );
    let version = upgrade::version(h, node).await?;
    ensure!(
        version == env!("CARGO_PKG_VERSION"),
        "{node} reports version {version} after the upgrade, not {}",
        env!("CARGO_PKG_VERSION")
    );
    Ok(format!(
        "{said}; {} pull(s) of {} in the lab registry's log",
        after - before,
        installer()
    ))
}

/// The audit as JSON and whether `kiln airgap audit` exited 0.
async fn audit(h: &ClusterHandle) -> anyhow::Result<(bool, serde_json::Value)> {
    let dir = state_dir(h).display().to_string();
    let out = kiln(&["airgap", "audit", "--state", &dir, "-o", "json"]).await?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("kiln airgap audit -o json: {}", text(&out)))?;
    match out.status.code() {
        Some(0) => Ok((true, report)),
        Some(1) => Ok((false, report)),
        _ => bail!("kiln airgap audit failed: {}", text(&out)),
    }
}

/// Nothing was denied.
pub async fn assert_audit_clean(h: &ClusterHandle) -> anyhow::Result<String> {
    let (clean, report) = audit(h).await?;
    let summary = &report["summary"];
    ensure!(clean, "the egress audit is not clean: {summary}");
    Ok(format!(
        "{} attempt(s), {} denied",
        summary["attempts"], summary["denied"]
    ))
}

/// `destination` was denied, and every denied attempt came from a node of the cluster.
pub async fn assert_audit_denied(h: &ClusterHandle, destination: &str) -> anyhow::Result<String> {
    let (clean, report) = audit(h).await?;
    ensure!(
        !clean,
        "the egress audit is clean; expected {destination} denied"
    );
    let denied: Vec<&str> = report["summary"]["denied_destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str())
        .collect();
    ensure!(
        denied
            .iter()
            .any(|d| *d == destination || d.starts_with(&format!("{destination}:"))),
        "{destination} is not among the denied destinations {denied:?}"
    );
    let nodes: Vec<String> = h
        .created
        .state
        .nodes
        .iter()
        .map(|n| n.address.to_string())
        .collect();
    for e in report["events"].as_array().into_iter().flatten() {
        if e["decision"] != "allowed" {
            let client = e["client"].as_str().unwrap_or_default();
            ensure!(
                nodes.iter().any(|a| client.starts_with(a.as_str())),
                "a denied attempt came from {client}, which is not a node: {e}"
            );
        }
    }
    Ok(format!("denied: {}", denied.join(", ")))
}

/// Runs `program args` in `node`'s network namespace.
async fn in_node(
    h: &ClusterHandle,
    node: NodeRef,
    program: &str,
    args: &[&str],
) -> anyhow::Result<Output> {
    let netns = h.net_namespace(node).await?;
    tokio::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program} in {}", netns.display()))
}

/// From `node`: the lab DNS refuses the outside name and the egress proxy denies a fetch of it.
pub async fn request_outside(h: &ClusterHandle, node: NodeRef) -> anyhow::Result<String> {
    let gw = h.created.state.network.gateway.to_string();
    // No way out but the lab's services: the node has no default route.
    let routes = in_node(h, node, "ip", &["-4", "route", "show", "default"]).await?;
    ensure!(
        routes.status.success() && routes.stdout.iter().all(u8::is_ascii_whitespace),
        "{node} has a default route in an air-gapped cluster: {}",
        text(&routes)
    );
    let dig = in_node(
        h,
        node,
        "dig",
        &[&format!("@{gw}"), OUTSIDE, "+time=2", "+tries=1"],
    )
    .await?;
    let answer = text(&dig);
    ensure!(
        answer.contains("status: REFUSED"),
        "the lab DNS did not refuse {OUTSIDE}:\n{answer}"
    );
    let curl = in_node(
        h,
        node,
        "curl",
        &[
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            &format!("http://{gw}:3128"),
            &format!("http://{OUTSIDE}/"),
        ],
    )
    .await?;
    let code = String::from_utf8_lossy(&curl.stdout).trim().to_owned();
    ensure!(
        code == "403",
        "the egress proxy answered {code:?} for http://{OUTSIDE}/ (expected 403): {}",
        text(&curl)
    );
    Ok(format!("no default route, DNS REFUSED, proxy {code}"))
}
