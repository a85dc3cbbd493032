//! Node information and service control: `version`, `services`, `service`.

use anyhow::bail;
use clap::ValueEnum;
use kiln_os_api::pb;
use serde::Serialize;

use super::print_actions;
use crate::cli::connect::{Api, NodeErrors, node_name, status_error};
use kiln_provisioner::output::{self, OutputFormat};

/// `service ID ACTION`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ServiceAction {
    /// Start the service.
    Start,
    /// Stop the service.
    Stop,
    /// Restart the service.
    Restart,
}

/// `version`: the client's tag and each node's.
pub(super) async fn version(
    api: &mut Api,
    errors: &mut NodeErrors,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let resp = api
        .client
        .version(api.request(pb::Empty {}))
        .await
        .map_err(status_error)?
        .into_inner();
    #[derive(Serialize)]
    struct Row {
        node: String,
        tag: String,
        platform: String,
        hostname: String,
        machine_type: String,
        stage: String,
    }
    let rows: Vec<Row> = resp
        .messages
        .into_iter()
        .filter(|m| errors.check(m.metadata.as_ref()))
        .map(|m| Row {
            node: node_name(m.metadata.as_ref()),
            // Empty while the node has no configuration, as before the enum.
            machine_type: match m.machine_type() {
                pb::MachineType::Unspecified => String::new(),
                t => t.to_string(),
            },
            stage: m.stage().to_string(),
            tag: m.tag,
            platform: m.platform,
            hostname: m.hostname,
        })
        .collect();
    output::print(output, &rows, |rows| {
        let mut s = format!(
            "Client:\n\tTag:         v{}\nServer:\n",
            env!("CARGO_PKG_VERSION")
        );
        for r in rows {
            s += &format!(
                "\tNODE:        {}\n\tTag:         {}\n\tPlatform:    {}\n\tHostname:    {}\n\tType:        {}\n\tStage:       {}\n",
                r.node, r.tag, r.platform, r.hostname, r.machine_type, r.stage
            );
        }
        s
    })?;
    Ok(())
}

/// `services`: one row per service per node.
pub(super) async fn services(api: &mut Api, errors: &mut NodeErrors) -> anyhow::Result<()> {
    let resp = api
        .client
        .service_list(api.request(pb::Empty {}))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut rows = Vec::new();
    for list in resp.messages {
        if !errors.check(list.metadata.as_ref()) {
            continue;
        }
        let node = node_name(list.metadata.as_ref());
        for s in list.services {
            let health = s.health.as_ref().map_or("?".to_owned(), |h| {
                if h.unknown {
                    "?".into()
                } else if h.healthy {
                    "OK".into()
                } else {
                    "Fail".into()
                }
            });
            let last = s.events.last();
            let state = s.state().to_string();
            rows.push(vec![
                node.clone(),
                s.id,
                state,
                health,
                last.map(|e| ago(e.unix_millis)).unwrap_or_default(),
                last.map(|e| e.message.clone()).unwrap_or_default(),
            ]);
        }
    }
    print!(
        "{}",
        output::table(
            &[
                "NODE",
                "SERVICE",
                "STATE",
                "HEALTH",
                "LAST CHANGE",
                "LAST EVENT"
            ],
            &rows
        )
    );
    Ok(())
}

/// `service ID [ACTION]`: show the service with its events, or start, stop or restart it.
pub(super) async fn service(
    api: &mut Api,
    errors: &mut NodeErrors,
    id: String,
    action: Option<ServiceAction>,
) -> anyhow::Result<()> {
    match action {
        None => {
            let resp = api
                .client
                .service_list(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut found = false;
            for list in resp.messages {
                if !errors.check(list.metadata.as_ref()) {
                    continue;
                }
                let node = node_name(list.metadata.as_ref());
                for s in list.services.into_iter().filter(|s| s.id == id) {
                    found = true;
                    let state = s.state();
                    let h = s.health.unwrap_or_default();
                    println!(
                        "NODE     {node}\nID       {}\nSTATE    {}\nHEALTH   {}\nRESTARTS {}\nEVENTS",
                        s.id,
                        state,
                        if h.unknown {
                            "?".to_owned()
                        } else if h.healthy {
                            "OK".to_owned()
                        } else {
                            format!("Fail: {}", h.last_message)
                        },
                        s.restarts
                    );
                    for e in s.events {
                        println!(
                            "         [{}]: {} ({})",
                            e.state(),
                            e.message.trim_start_matches(&format!("[{}]: ", e.state())),
                            ago(e.unix_millis)
                        );
                    }
                }
            }
            if !found {
                // The nodes' errors first: a node that failed may be the one with the service.
                std::mem::take(errors).finish()?;
                bail!("service {id:?} not found");
            }
        }
        Some(a) => {
            let req = api.request(pb::ServiceRequest { id });
            let resp = match a {
                ServiceAction::Start => api.client.service_start(req).await,
                ServiceAction::Stop => api.client.service_stop(req).await,
                ServiceAction::Restart => api.client.service_restart(req).await,
            }
            .map_err(status_error)?
            .into_inner();
            print_actions(resp, errors);
        }
    }
    Ok(())
}

/// How long ago a Unix time in milliseconds was, as `42s ago`, `3m7s ago` or `2h5m ago`.
fn ago(unix_millis: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - unix_millis) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}
