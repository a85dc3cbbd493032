//! Resources for `get` / `list`: typed views of the node's state, each with an id and a YAML
//! spec. `machineconfig` is redacted for callers below `os:admin`.

use kiln_config::{MachineConfig, MachineType};
use kiln_os_api::pb;
use kiln_pki::{CertificateAuthority, KeyAlgorithm, LeafRequest, ROLE_ADMIN, Usage};
use serde_yaml::{Mapping, Value};

use super::status::{ApiError, ApiResult};
use crate::etcd;
use crate::node::Node;

/// Resource types, with aliases, for messages.
pub const TYPES: [&str; 12] = [
    "machinetype",
    "machinestatus",
    "services",
    "members",
    "etcdmembers",
    "addresses",
    "links",
    "routes",
    "hostname",
    "staticpods",
    "meta",
    "machineconfig",
];

fn resource(
    namespace: &str,
    rtype: &str,
    id: &str,
    version: u64,
    spec: &impl serde::Serialize,
) -> pb::Resource {
    pb::Resource {
        namespace: namespace.to_owned(),
        r#type: rtype.to_owned(),
        id: id.to_owned(),
        version,
        spec: serde_yaml::to_string(spec).unwrap_or_default(),
    }
}

fn canonical(rtype: &str) -> Option<&'static str> {
    let t = rtype.to_ascii_lowercase();
    let t = t.trim_end_matches('s');
    TYPES.iter().copied().find(|c| {
        c.trim_end_matches('s') == t
            || (t == "mc" && *c == "machineconfig")
            || (t == "member" && *c == "members")
    })
}

/// Lists resources of `rtype`.
pub async fn list(node: &Node, rtype: &str, role: &str) -> ApiResult<Vec<pb::Resource>> {
    let Some(t) = canonical(rtype) else {
        return Err(ApiError::NotFound(format!(
            "unknown resource type {rtype:?}; known types: {}",
            TYPES.join(", ")
        )));
    };
    let config = node.config();
    let generation = node.config_generation();
    Ok(match t {
        "machinetype" => {
            let mt = node.machine_type().map(|t| t.to_string()).unwrap_or_else(|| "unknown".into());
            vec![resource("config", "MachineType", "machine-type", generation, &mt)]
        }
        "machinestatus" => {
            let unmet: Vec<String> = node
                .supervisor
                .list()
                .into_iter()
                .filter(|s| !s.is_up() && s.state != crate::supervisor::ServiceState::Skipped)
                .map(|s| format!("service {} is {}", s.id, s.state.as_str()))
                .collect();
            let spec = serde_yaml::to_value(serde_json::json!({
                "stage": node.stage().as_str(),
                "status": {"ready": unmet.is_empty() && node.stage() == crate::node::Stage::Running, "unmetConditions": unmet},
            }))
            .unwrap_or_default();
            vec![resource("runtime", "MachineStatus", "machine", 1, &spec)]
        }
        "services" => node
            .supervisor
            .list()
            .into_iter()
            .map(|s| {
                let spec = serde_json::json!({"running": s.state == crate::supervisor::ServiceState::Running, "healthy": s.health.healthy, "unknown": s.health.unknown, "state": s.state.as_str()});
                resource("runtime", "Service", &s.id, u64::from(s.restarts) + 1, &spec)
            })
            .collect(),
        "members" | "etcdmembers" => {
            let mut out = Vec::new();
            if t == "members" {
                let spec = serde_json::json!({
                    "hostname": node.hostname(),
                    "addresses": node.addresses().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "machineType": node.machine_type().map(|t| t.to_string()).unwrap_or_default(),
                    "operatingSystem": format!("Kiln OS (v{})", env!("CARGO_PKG_VERSION")),
                });
                out.push(resource("cluster", "Member", &node.hostname(), 1, &spec));
            }
            if let Some(pki) = node.etcd.pki()
                && let Ok(mut c) = etcd::ops::connect(&pki, &[etcd::client_url(node)]).await
                && let Ok(list) = c.member_list().await
            {
                for m in list.members() {
                    if t == "members" && m.name() == node.hostname() {
                        continue;
                    }
                    let spec = serde_json::json!({
                        "memberID": format!("{:x}", m.id()),
                        "hostname": m.name(),
                        "peerURLs": m.peer_urls(),
                        "clientURLs": m.client_urls(),
                        "isLearner": m.is_learner(),
                    });
                    let hex_id = format!("{:x}", m.id());
                    let (ns, rt, id) = if t == "members" { ("cluster", "Member", m.name()) } else { ("etcd", "EtcdMember", hex_id.as_str()) };
                    out.push(resource(ns, rt, id, 1, &spec));
                }
            } else if t == "etcdmembers" && node.machine_type() == Some(MachineType::Controlplane) {
                return Err(ApiError::FailedPrecondition("etcd is not running on this node".into()));
            }
            out
        }
        "addresses" if let Some(live) = node.platform.address_status().await.map_err(|e| ApiError::Unavailable(e.to_string()))? => live
            .into_iter()
            .map(|a| resource("network", "AddressStatus", &format!("{}/{}", a.link_name, a.address), 1, &a))
            .collect(),
        "links" => node
            .platform
            .link_status()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .ok_or_else(|| ApiError::FailedPrecondition("links are the host's or the container runtime's on this platform: `kiln get addresses` shows the node's".into()))?
            .into_iter()
            .map(|l| resource("network", "LinkStatus", &l.name, 1, &l))
            .collect(),
        "routes" => node
            .platform
            .route_status()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .ok_or_else(|| ApiError::FailedPrecondition("routes are the host's or the container runtime's on this platform".into()))?
            .into_iter()
            .map(|r| resource("network", "RouteStatus", &format!("{}/{}/{}", r.out_link_name, r.gateway.as_deref().unwrap_or("link"), r.destination), 1, &r))
            .collect(),
        "addresses" => node
            .addresses()
            .into_iter()
            .map(|a| a.to_string())
            .map(|a| resource("network", "AddressStatus", &a, 1, &serde_json::json!({"address": a, "family": if a.contains(':') {"inet6"} else {"inet4"}})))
            .collect(),
        "hostname" => vec![resource("network", "HostnameStatus", "hostname", 1, &serde_json::json!({"hostname": node.hostname(), "domainname": ""}))],
        "staticpods" => static_pods(config.as_deref()).into_iter().map(|(id, pod)| resource("k8s", "StaticPod", &id, generation, &pod)).collect(),
        "meta" => node
            .meta
            .list()?
            .into_iter()
            .map(|(k, v)| resource("runtime", "MetaKey", &format!("{k:#x}"), 1, &serde_json::json!({"value": String::from_utf8_lossy(&v)})))
            .collect(),
        "machineconfig" => {
            let cfg = config.ok_or_else(|| ApiError::NotFound("the node has no configuration".into()))?;
            let mut value = serde_yaml::to_value(&*cfg).map_err(|e| ApiError::Unavailable(e.to_string()))?;
            if role != ROLE_ADMIN {
                redact(&mut value);
            }
            vec![resource("config", "MachineConfig", "v1alpha1", generation, &value)]
        }
        _ => Vec::new(),
    })
}

/// Replaces keys, tokens and secrets with a marker.
fn redact(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                let key = k.as_str().unwrap_or_default();
                if matches!(
                    key,
                    "key"
                        | "token"
                        | "secretboxEncryptionSecret"
                        | "password"
                        | "auth"
                        | "identityToken"
                ) && val.as_str().is_some_and(|s| !s.is_empty())
                {
                    *val = Value::String("******".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Static pods: the configuration's pods (id `<namespace>-<name>`) and, on control-plane nodes,
/// the rendered control-plane pods.
pub fn static_pods(config: Option<&MachineConfig>) -> Vec<(String, Mapping)> {
    let Some(cfg) = config else { return Vec::new() };
    let mut out = Vec::new();
    for pod in &cfg.machine.pods {
        let md = pod.get("metadata");
        let name = md
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("unnamed");
        let ns = md
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        out.push((format!("{ns}-{name}"), pod.clone()));
    }
    if cfg.machine.machine_type == MachineType::Controlplane {
        let endpoint = &cfg.cluster.control_plane.endpoint;
        let service_cidr = cfg
            .cluster
            .network
            .as_ref()
            .and_then(|n| n.service_subnets.first().cloned())
            .unwrap_or_else(|| "10.96.0.0/12".into());
        let pod_cidr = cfg
            .cluster
            .network
            .as_ref()
            .and_then(|n| n.pod_subnets.first().cloned())
            .unwrap_or_else(|| "10.244.0.0/16".into());
        let components: [(&str, Vec<String>); 3] = [
            (
                "kube-apiserver",
                vec![
                    "--etcd-servers=https://localhost:2379".into(),
                    format!("--service-cluster-ip-range={service_cidr}"),
                    "--client-ca-file=/system/secrets/kubernetes/ca.crt".into(),
                    "--encryption-provider-config=/system/secrets/kubernetes/encryptionconfig.yaml"
                        .into(),
                    format!("--advertise-address-from={endpoint}"),
                ],
            ),
            (
                "kube-controller-manager",
                vec![
                    format!("--cluster-cidr={pod_cidr}"),
                    format!("--service-cluster-ip-range={service_cidr}"),
                ],
            ),
            ("kube-scheduler", vec!["--leader-elect=true".into()]),
        ];
        for (name, args) in components {
            let pod: Mapping = serde_yaml::from_value(serde_yaml::to_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": "kube-system"},
                "spec": {"hostNetwork": true, "containers": [{"name": name, "image": format!("registry.k8s.io/{name}:v1.31.0"), "command": [format!("/usr/local/bin/{name}")], "args": args}]},
            })).unwrap_or_default()).unwrap_or_default();
            out.push((name.to_owned(), pod));
        }
    }
    out
}

/// An admin kubeconfig for the cluster, signed by its Kubernetes CA.
pub fn kubeconfig(cfg: &MachineConfig) -> ApiResult<Vec<u8>> {
    let pair = cfg
        .cluster
        .ca
        .as_ref()
        .ok_or_else(|| ApiError::FailedPrecondition("cluster.ca is missing".into()))?;
    let cert = pair
        .cert_pem()
        .map_err(|e| ApiError::FailedPrecondition(format!("cluster.ca.crt: {e}")))?;
    let key = pair
        .key_pem()
        .map_err(|e| ApiError::FailedPrecondition(format!("cluster.ca.key: {e}")))?
        .ok_or_else(|| {
            ApiError::FailedPrecondition(
                "cluster.ca.key is missing: only control-plane nodes can issue a kubeconfig".into(),
            )
        })?;
    let ca = CertificateAuthority::from_pem(&cert, &key)
        .map_err(|e| ApiError::FailedPrecondition(format!("cluster.ca: {e}")))?;
    let admin = ca
        .issue(&LeafRequest {
            common_name: "admin".into(),
            organizations: vec!["system:masters".into()],
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: time::Duration::days(365),
            algorithm: KeyAlgorithm::EcdsaP256,
        })
        .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let name = &cfg.cluster.cluster_name;
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": cfg.cluster.control_plane.endpoint, "certificate-authority-data": b64(&cert)}}],
        "users": [{"name": format!("admin@{name}"), "user": {"client-certificate-data": b64(&admin.cert_pem), "client-key-data": b64(&admin.key_pem)}}],
        "contexts": [{"name": format!("admin@{name}"), "context": {"cluster": name, "namespace": "default", "user": format!("admin@{name}")}}],
        "current-context": format!("admin@{name}"),
    });
    serde_yaml::to_string(&doc)
        .map(String::into_bytes)
        .map_err(|e| ApiError::Unavailable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_aliases() {
        assert_eq!(canonical("etcdmembers"), Some("etcdmembers"));
        assert_eq!(canonical("service"), Some("services"));
        assert_eq!(canonical("mc"), Some("machineconfig"));
        assert_eq!(canonical("staticpod"), Some("staticpods"));
        assert_eq!(canonical("nope"), None);
    }

    #[test]
    fn redaction_hides_keys_and_tokens() {
        let mut v: Value = serde_yaml::from_str(
            "machine: {token: abc, ca: {crt: C, key: K}}\ncluster: {secretboxEncryptionSecret: S}",
        )
        .unwrap();
        redact(&mut v);
        let text = serde_yaml::to_string(&v).unwrap();
        assert!(
            !text.contains("abc") && !text.contains(" K") && !text.contains(" S"),
            "{text}"
        );
        assert!(text.contains("crt: C"));
    }
}
