//! Power and wipe: `reboot`, `shutdown`, `reset`.

use clap::Args;
use kiln_os_api::pb;

use super::print_actions;
use crate::cli::connect::{Api, NodeErrors, status_error};

/// `reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Leave etcd first (control-plane nodes); refused if that would lose quorum.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = true, action = clap::ArgAction::Set)]
    graceful: bool,
    /// Reboot after the reset instead of powering off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    reboot: bool,
    /// Volumes to wipe: STATE, EPHEMERAL (default: both).
    #[arg(long = "system-labels-to-wipe", value_name = "LABEL")]
    labels: Vec<String>,
}

/// `reboot`.
pub(super) async fn reboot(api: &mut Api, errors: &mut NodeErrors) -> anyhow::Result<()> {
    print_actions(
        api.client
            .reboot(api.request(pb::Empty {}))
            .await
            .map_err(status_error)?
            .into_inner(),
        errors,
    );
    Ok(())
}

/// `shutdown`.
pub(super) async fn shutdown(api: &mut Api, errors: &mut NodeErrors) -> anyhow::Result<()> {
    print_actions(
        api.client
            .shutdown(api.request(pb::Empty {}))
            .await
            .map_err(status_error)?
            .into_inner(),
        errors,
    );
    Ok(())
}

/// `reset`: wipe the volumes, then reboot or power off.
pub(super) async fn reset(
    api: &mut Api,
    errors: &mut NodeErrors,
    a: ResetArgs,
) -> anyhow::Result<()> {
    let labels: Vec<String> = a
        .labels
        .iter()
        .flat_map(|l| l.split(','))
        .map(|l| l.trim().to_uppercase())
        .collect();
    let req = api.request(pb::ResetRequest {
        graceful: a.graceful,
        reboot: a.reboot,
        system_labels_to_wipe: labels,
    });
    print_actions(
        api.client
            .reset(req)
            .await
            .map_err(status_error)?
            .into_inner(),
        errors,
    );
    Ok(())
}
