//! Reboot, shutdown and reset: answered first, carried out by the boot loop a moment later.

use std::time::Duration;

use kiln_config::MachineType;
use kiln_os_api::pb;
use tonic::Request;

use super::{MachineApi, action};
use crate::api::status::ApiResult;
use crate::etcd;
use crate::node::{PowerRequest, Stage};
use crate::platform::Power;

impl MachineApi {
    /// Asks the boot loop to end this boot once the response had time to reach the caller.
    pub(super) fn power_later(&self, power: Power, wipe: Vec<String>, reason: &str) {
        let node = self.node.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move {
            // Let the response reach the caller first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            node.request_power(PowerRequest {
                power,
                wipe,
                reason,
            })
            .await;
        });
    }
}

pub(super) async fn reboot(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::ActionResponse> {
    api.power_later(Power::Reboot, vec![], "reboot requested");
    Ok(action("rebooting"))
}

pub(super) async fn shutdown(
    api: &MachineApi,
    _req: Request<pb::Empty>,
) -> ApiResult<pb::ActionResponse> {
    api.power_later(Power::Shutdown, vec![], "shutdown requested");
    Ok(action("shutting down"))
}

pub(super) async fn reset(
    api: &MachineApi,
    req: Request<pb::ResetRequest>,
) -> ApiResult<pb::ActionResponse> {
    let r = req.into_inner();
    let mut labels = r.system_labels_to_wipe.clone();
    if labels.is_empty() {
        labels = crate::volumes::Volumes::WIPEABLE
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    }
    for l in &labels {
        api.node.platform.volumes().by_label(l)?;
    }
    let is_cp = api.node.machine_type() == Some(MachineType::Controlplane);
    if r.graceful && is_cp && etcd::has_data(&api.node) {
        api.leave_etcd().await?;
    }
    api.node.set_stage(Stage::Resetting);
    let power = if r.reboot {
        Power::Reboot
    } else {
        Power::Shutdown
    };
    api.power_later(power, labels.clone(), "reset");
    Ok(action(format!(
        "resetting: wiping {}, then {}",
        labels.join(", "),
        if r.reboot {
            "rebooting"
        } else {
            "powering off"
        }
    )))
}
