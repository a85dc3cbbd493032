//! Entry points for the lab: the DNS zone and proxy allow list of a cluster, their config
//! files in the state directory, and the `kiln` command lines that start the helpers
//! (`kiln airgap dns run`, `kiln airgap proxy run`), each writing `<helper>.pid` and
//! `<helper>.log` beside them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork as IpNet;

use crate::allow::{AllowList, Rule, Target};
use crate::dns::{DEFAULT_DOMAIN, DnsConfig};
use crate::proxy::{Limits, ProxyConfig};

/// Helper name of the DNS server (`dns.pid`, `dns.log`, `dns.yaml`).
pub const DNS_HELPER: &str = "dns";
/// Helper name of the proxy (`proxy.pid`, `proxy.log`, `proxy.yaml`).
pub const PROXY_HELPER: &str = "proxy";
/// Plain HTTP proxy port on the gateway.
pub const PROXY_PORT: u16 = 3128;
/// HTTPS proxy port on the gateway.
pub const PROXY_TLS_PORT: u16 = 3129;

/// What the lab knows about a cluster's names.
#[derive(Debug, Clone)]
pub struct ClusterNames {
    /// Cluster name: `<cluster>.<domain>` is the control-plane endpoint.
    pub cluster: String,
    /// Lab domain (default [`DEFAULT_DOMAIN`]).
    pub domain: String,
    /// The gateway: control-plane endpoint (load balancer), DNS, proxy and registry live there.
    pub gateway: IpAddr,
    /// The cluster network.
    pub cidr: IpNet,
    /// Node host names and addresses.
    pub nodes: Vec<(String, IpAddr)>,
    /// The lab registry's address, when the lab runs one (`registry.<domain>`).
    pub registry: Option<IpAddr>,
}

impl ClusterNames {
    /// Names for `cluster` on `cidr` with the gateway at `gateway` and the default domain.
    pub fn new(cluster: &str, gateway: IpAddr, cidr: IpNet) -> Self {
        Self {
            cluster: cluster.to_owned(),
            domain: DEFAULT_DOMAIN.to_owned(),
            gateway,
            cidr,
            nodes: Vec::new(),
            registry: None,
        }
    }

    /// The control-plane endpoint's name.
    pub fn endpoint_name(&self) -> String {
        format!("{}.{}", self.cluster, self.domain)
    }

    /// The lab registry's name.
    pub fn registry_name(&self) -> String {
        format!("registry.{}", self.domain)
    }

    /// The DNS configuration: every node, the endpoint, `proxy`, `dns` and (if any) `registry`,
    /// served on the gateway's port 53. `airgapped` refuses every other name.
    pub fn dns_config(&self, airgapped: bool) -> DnsConfig {
        let mut c = DnsConfig::new(vec![SocketAddr::new(self.gateway, 53)]);
        c.domain = self.domain.clone();
        c.airgapped = airgapped;
        for (name, ip) in &self.nodes {
            c.records.entry(name.clone()).or_default().push(*ip);
        }
        c.records.insert(self.cluster.clone(), vec![self.gateway]);
        c.records.insert("proxy".into(), vec![self.gateway]);
        c.records.insert("dns".into(), vec![self.gateway]);
        if let Some(r) = self.registry {
            c.records.insert("registry".into(), vec![r]);
        }
        c
    }

    /// The proxy configuration on the gateway (HTTP on [`PROXY_PORT`], HTTPS on
    /// [`PROXY_TLS_PORT`] with a self-signed certificate): the cluster network and every lab
    /// name are allowed; in air-gapped mode nothing else, otherwise everything.
    pub fn proxy_config(&self, airgapped: bool) -> ProxyConfig {
        // The proxy resolves the lab's names itself: the host's resolver does not know them.
        let hosts = self
            .dns_config(airgapped)
            .records
            .into_iter()
            .map(|(name, ips)| (format!("{name}.{}", self.domain), ips))
            .collect();
        let mut allow = vec![
            Rule {
                target: Target::Net(self.cidr),
                ports: Vec::new(),
            },
            Rule {
                target: Target::Suffix(self.domain.clone()),
                ports: Vec::new(),
            },
        ];
        if !airgapped {
            allow.push(Rule {
                target: Target::Any,
                ports: Vec::new(),
            });
        }
        ProxyConfig {
            listen: Some(SocketAddr::new(self.gateway, PROXY_PORT)),
            tls_listen: Some(SocketAddr::new(self.gateway, PROXY_TLS_PORT)),
            tls_cert: None,
            tls_key: None,
            allow: AllowList(allow),
            resolve_for_networks: !airgapped,
            hosts,
            limits: Limits::default(),
        }
    }
}

/// Writes `<state>/<helper>.yaml` and returns the `kiln` arguments that run the helper on it,
/// for `kiln_provisioner::daemon::spawn(&args, &dir.log(helper), &dir.pidfile(helper))`.
pub fn helper_args(
    state_dir: &Path,
    helper: &str,
    config_yaml: &str,
) -> std::io::Result<Vec<String>> {
    let path = config_path(state_dir, helper);
    std::fs::write(&path, config_yaml)?;
    Ok(vec![
        "airgap".into(),
        helper.into(),
        "run".into(),
        "--state".into(),
        state_dir.display().to_string(),
        "--config".into(),
        path.display().to_string(),
    ])
}

/// `<state>/<helper>.yaml`.
pub fn config_path(state_dir: &Path, helper: &str) -> PathBuf {
    state_dir.join(format!("{helper}.yaml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_make_zone_and_allow_list() {
        let mut n = ClusterNames::new(
            "kiln-default",
            "10.5.0.1".parse().unwrap(),
            "10.5.0.0/24".parse().unwrap(),
        );
        n.nodes.push(("cp-1".into(), "10.5.0.2".parse().unwrap()));
        n.registry = Some("10.5.0.1".parse().unwrap());
        let dns = n.dns_config(true);
        assert_eq!(dns.listen, vec!["10.5.0.1:53".parse().unwrap()]);
        assert!(dns.airgapped);
        assert_eq!(
            dns.records["cp-1"],
            vec!["10.5.0.2".parse::<IpAddr>().unwrap()]
        );
        assert!(dns.records.contains_key("kiln-default"));
        assert!(dns.records.contains_key("registry"));
        assert_eq!(n.endpoint_name(), "kiln-default.kiln.internal");
        let p = n.proxy_config(true);
        assert!(p.allow.allows_name("10.5.0.9", 443));
        assert!(p.allow.allows_name("registry.kiln.internal", 5000));
        assert!(!p.allow.allows_name("example.com", 443));
        assert!(n.proxy_config(false).allow.allows_name("example.com", 443));
        assert_eq!(
            p.hosts["registry.kiln.internal"],
            vec!["10.5.0.1".parse::<IpAddr>().unwrap()]
        );
        let dir = tempfile::tempdir().unwrap();
        let args = helper_args(dir.path(), DNS_HELPER, &dns.to_yaml()).unwrap();
        assert_eq!(&args[..3], &["airgap", "dns", "run"]);
        let back = DnsConfig::load(&config_path(dir.path(), DNS_HELPER)).unwrap();
        assert_eq!(back, dns);
    }
}
