//! `get`: resources by type, or one by id, as a table, JSON or YAML documents.

use kiln_os_api::pb;
use serde::Serialize;

use crate::cli::connect::{Api, NodeErrors, node_name, status_error};
use kiln_provisioner::output::{self, OutputFormat};

/// `get TYPE [ID]`.
pub(super) async fn get(
    api: &mut Api,
    errors: &mut NodeErrors,
    resource: String,
    id: Option<String>,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let resp = match id {
        Some(id) => {
            api.client
                .get(api.request(pb::GetRequest {
                    r#type: resource,
                    id,
                }))
                .await
        }
        None => {
            api.client
                .list(api.request(pb::ListRequest { r#type: resource }))
                .await
        }
    }
    .map_err(status_error)?
    .into_inner();
    print_resources(resp, output, errors)?;
    Ok(())
}

#[derive(Serialize)]
struct ResourceOut {
    node: String,
    metadata: ResourceMeta,
    spec: serde_yaml::Value,
}

#[derive(Serialize)]
struct ResourceMeta {
    namespace: String,
    #[serde(rename = "type")]
    rtype: String,
    id: String,
    version: u64,
}

fn print_resources(
    resp: pb::ResourceResponse,
    format: OutputFormat,
    errors: &mut NodeErrors,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    for list in resp.messages {
        if !errors.check(list.metadata.as_ref()) {
            continue;
        }
        let node = node_name(list.metadata.as_ref());
        for r in list.resources {
            out.push(ResourceOut {
                node: node.clone(),
                metadata: ResourceMeta {
                    namespace: r.namespace,
                    rtype: r.r#type,
                    id: r.id,
                    version: r.version,
                },
                spec: serde_yaml::from_str(&r.spec).unwrap_or(serde_yaml::Value::String(r.spec)),
            });
        }
    }
    match format {
        OutputFormat::Yaml => {
            for r in &out {
                print!("---\n{}", serde_yaml::to_string(r)?);
            }
            Ok(())
        }
        _ => output::print(format, &out, |out| {
            let rows: Vec<Vec<String>> = out
                .iter()
                .map(|r| {
                    vec![
                        r.node.clone(),
                        r.metadata.namespace.clone(),
                        r.metadata.rtype.clone(),
                        r.metadata.id.clone(),
                        r.metadata.version.to_string(),
                    ]
                })
                .collect();
            output::table(&["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"], &rows)
        }),
    }
}
