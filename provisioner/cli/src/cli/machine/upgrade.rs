//! `upgrade` and `rollback`: ask the nodes, then follow each node's upgrade events across its
//! reboot (like `kiln logs -f machined`) until the new release is confirmed, or the upgrade
//! fails and the node is back on its old release.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::Args;
use kiln_os_api::pb;
use kiln_os_api::upgrade::{UpgradeEnd, follow};

use super::print_actions;
use crate::cli::connect::{Api, NodeErrors, node_name, status_error};

/// `upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Installer image: HOST[:PORT]/NAME:TAG (pulled through the nodes' registry mirrors).
    #[arg(long, value_name = "REF")]
    image: String,
    /// Keep the etcd membership and EPHEMERAL.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    preserve: bool,
    /// Write the release into the inactive slot and apply it at the next reboot.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    stage: bool,
    /// Upgrade even if etcd would lose quorum.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    force: bool,
    /// Follow each node's upgrade until it is confirmed or rolled back.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// How long to follow.
    #[arg(long, default_value = "15m", value_parser = crate::cli::parse_duration)]
    timeout: Duration,
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `upgrade`.
pub(super) async fn upgrade(
    api: &mut Api,
    errors: &mut NodeErrors,
    a: UpgradeArgs,
) -> anyhow::Result<()> {
    let since = now_millis();
    let req = api.request(pb::UpgradeRequest {
        image: a.image.clone(),
        preserve: a.preserve,
        stage: a.stage,
        force: a.force,
    });
    let resp = api
        .client
        .upgrade(req)
        .await
        .map_err(status_error)?
        .into_inner();
    // Nodes that refused (their reason is printed with the other node errors) are not followed.
    let refused: Vec<String> = resp
        .messages
        .iter()
        .filter_map(|m| m.metadata.as_ref())
        .filter(|md| !md.error.is_empty())
        .map(|md| md.hostname.clone())
        .collect();
    let accepted = resp.messages.len() - refused.len();
    print_actions(resp, errors);
    if !a.wait || accepted == 0 {
        return Ok(());
    }
    let mut failed = Vec::new();
    let client = api.client.clone();
    let print = |e: &pb::Event| {
        println!(
            "{}: {}: {}",
            node_name(e.metadata.as_ref()),
            e.state,
            e.message
        );
    };
    let targets = api
        .stream_targets()
        .into_iter()
        .filter(|t| !refused.contains(t));
    let follows = targets.map(|node| {
        let client = client.clone();
        async move {
            let end = follow(&client, &node, since, a.timeout, &print).await;
            (node, end)
        }
    });
    for (node, end) in futures::future::join_all(follows).await {
        match end {
            Ok(UpgradeEnd::Confirmed | UpgradeEnd::Staged) => {}
            Ok(UpgradeEnd::RolledBack | UpgradeEnd::Aborted) => failed.push(node),
            Err(e) => failed.push(format!("{node} ({e})")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "the upgrade did not complete on {}; see `kiln events` on those nodes",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `rollback`.
pub(super) async fn rollback(api: &mut Api, errors: &mut NodeErrors) -> anyhow::Result<()> {
    print_actions(
        api.client
            .rollback(api.request(pb::Empty {}))
            .await
            .map_err(status_error)?
            .into_inner(),
        errors,
    );
    Ok(())
}
