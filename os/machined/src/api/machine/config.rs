//! `apply-config`: validation, the apply modes (no-reboot, reboot, staged, try) and
//! maintenance mode's first configuration.

use std::time::Duration;

use kiln_config::MachineConfig;
use kiln_os_api::pb::{self, ApplyMode, ApplyResultMode};
use tonic::Request;

use super::MachineApi;
use crate::api::status::{ApiError, ApiResult};
use crate::node::Stage;
use crate::platform::Power;

pub(super) async fn apply(
    api: &MachineApi,
    req: Request<pb::ApplyConfigurationRequest>,
) -> ApiResult<pb::ApplyConfigurationResponse> {
    api.local_apply(req.into_inner()).await
}

impl MachineApi {
    async fn local_apply(
        &self,
        req: pb::ApplyConfigurationRequest,
    ) -> ApiResult<pb::ApplyConfigurationResponse> {
        let text = String::from_utf8(req.data)
            .map_err(|_| ApiError::InvalidArgument("the configuration is not UTF-8 text".into()))?;
        let config =
            kiln_config::from_yaml(&text).map_err(|e| ApiError::InvalidConfig(e.to_string()))?;
        let report = kiln_config::validate(&config, self.node.platform.mode());
        if !report.errors.is_empty() {
            let list: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            return Err(ApiError::InvalidConfig(list.join("; ")));
        }
        let warnings: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
        let volumes = self.node.platform.volumes();
        let mode = ApplyMode::try_from(req.mode).unwrap_or(ApplyMode::Auto);
        let reply = |mode: ApplyResultMode, summary: String| pb::ApplyConfigurationResponse {
            messages: vec![pb::ApplyConfigurationResult {
                metadata: None,
                mode: mode.into(),
                summary,
                warnings: warnings.clone(),
            }],
        };

        if self.node.stage() == Stage::Maintenance {
            if req.dry_run {
                return Ok(reply(
                    ApplyResultMode::Maintenance,
                    "the configuration is valid; applying it would boot the node".into(),
                ));
            }
            crate::config_source::persist(volumes, &text)
                .map_err(ApiError::io("persisting the configuration"))?;
            self.node.set_config(config);
            self.node.config_applied.notify_one();
            return Ok(reply(
                ApplyResultMode::Maintenance,
                "configuration applied; the node leaves maintenance mode and boots".into(),
            ));
        }

        let current = self.require_config()?;
        if current.machine.machine_type != config.machine.machine_type {
            return Err(ApiError::FailedPrecondition(format!(
                "the machine type cannot change ({} to {}); reset the node and apply the new configuration in maintenance mode",
                current.machine.machine_type, config.machine.machine_type
            )));
        }
        let reboot_fields = fields_needing_reboot(&current, &config);
        let needs_reboot = !reboot_fields.is_empty();
        let fields = reboot_fields.join(", ");
        let mode_name = match mode {
            ApplyMode::Auto if needs_reboot => ApplyResultMode::Reboot,
            ApplyMode::Auto | ApplyMode::NoReboot => ApplyResultMode::NoReboot,
            ApplyMode::Reboot => ApplyResultMode::Reboot,
            ApplyMode::Staged => ApplyResultMode::Staged,
            ApplyMode::Try => ApplyResultMode::Try,
        };
        if needs_reboot && matches!(mode, ApplyMode::NoReboot | ApplyMode::Try) {
            return Err(ApiError::FailedPrecondition(format!(
                "the change of {fields} needs a reboot; apply with --mode reboot, auto or staged"
            )));
        }
        if req.dry_run {
            let what = if needs_reboot {
                format!("would apply and reboot (changed: {fields})")
            } else {
                "would apply without reboot".into()
            };
            return Ok(reply(mode_name, format!("dry run: {what}")));
        }
        // A new apply ends a pending `try`.
        if let Some(h) = self
            .node
            .try_revert
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
        match mode_name {
            ApplyResultMode::Staged => {
                crate::config_source::stage(volumes, &text)
                    .map_err(ApiError::io("staging the configuration"))?;
                Ok(reply(
                    mode_name,
                    "configuration staged; it applies at the next reboot".into(),
                ))
            }
            ApplyResultMode::Try => {
                let timeout = Duration::from_millis(
                    u64::try_from(req.try_timeout_millis)
                        .ok()
                        .filter(|t| *t > 0)
                        .unwrap_or(60_000),
                );
                self.node.set_config(config);
                let node = self.node.clone();
                let previous = (*current).clone();
                let handle = tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    node.set_config(previous);
                    node.events.publish(
                        crate::events::EventKind::Config,
                        "machineconfig",
                        "reverted",
                        "try timeout expired: previous configuration restored",
                    );
                });
                *self
                    .node
                    .try_revert
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(handle);
                Ok(reply(
                    mode_name,
                    format!(
                        "configuration applied for {timeout:?}; it reverts unless applied again with another mode"
                    ),
                ))
            }
            ApplyResultMode::NoReboot => {
                crate::config_source::persist(volumes, &text)
                    .map_err(ApiError::io("persisting the configuration"))?;
                self.node.set_config(config);
                Ok(reply(
                    mode_name,
                    "configuration applied without reboot".into(),
                ))
            }
            ApplyResultMode::Reboot
            | ApplyResultMode::Maintenance
            | ApplyResultMode::Unspecified => {
                crate::config_source::persist(volumes, &text)
                    .map_err(ApiError::io("persisting the configuration"))?;
                self.power_later(Power::Reboot, vec![], "apply-config");
                Ok(reply(
                    mode_name,
                    if fields.is_empty() {
                        "configuration applied; rebooting".into()
                    } else {
                        format!("configuration applied; rebooting (changed: {fields})")
                    },
                ))
            }
        }
    }
}

/// Sections whose change needs a reboot; the others apply live.
fn fields_needing_reboot(old: &MachineConfig, new: &MachineConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (o, n) = (&old.machine, &new.machine);
    if o.network != n.network {
        out.push("machine.network");
    }
    if o.install != n.install {
        out.push("machine.install");
    }
    if o.token != n.token || o.ca != n.ca {
        out.push("machine secrets");
    }
    if o.cert_sans != n.cert_sans {
        out.push("machine.certSANs");
    }
    if old.cluster != new.cluster {
        out.push("cluster");
    }
    out
}
