//! An air-gapped cluster's lab services on the gateway: the lab DNS (`kiln airgap dns run`,
//! `dns.pid`, `dns.log`, `dns.yaml`) answering only the cluster's names, and the
//! egress-auditing proxy (`kiln airgap proxy run`, `proxy.pid`, `proxy.log`, `proxy.yaml`)
//! allowing only the cluster network and lab names; both append to `airgap-audit.jsonl`, which
//! `kiln airgap audit` reads. Also the node patch that makes nodes use them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnetwork::IpNetwork;
use kiln_airgap::lab::{self, ClusterNames};
use kiln_config::Patch;

use crate::daemon;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, StateDir};

/// The lab names of `state`: every node, the endpoint, the proxy, DNS and (when the cluster
/// has one) the registry, all on the gateway except the nodes.
pub fn names(state: &ClusterState) -> anyhow::Result<ClusterNames> {
    let cidr: IpNetwork = state.network.cidr.parse().map_err(|e| {
        anyhow::anyhow!(
            "the cluster CIDR {} does not parse: {e}",
            state.network.cidr
        )
    })?;
    let mut names = ClusterNames::new(&state.name, state.network.gateway, cidr);
    names.nodes = state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.address))
        .collect();
    let has_registry = state
        .helpers
        .iter()
        .any(|h| h.name == crate::lab_registry::NAME);
    names.registry = has_registry.then_some(state.network.gateway);
    Ok(names)
}

/// The patch for an air-gapped cluster's nodes: the lab DNS as the only name server, and the
/// lab proxy for HTTP and HTTPS with the cluster network and the lab domain kept off it.
pub fn node_patch(gateway: IpAddr, cidr: &str) -> Result<Patch, kiln_config::PatchError> {
    let proxy = format!("http://{}", SocketAddr::new(gateway, lab::PROXY_PORT));
    let no_proxy = format!(
        "localhost,127.0.0.1,::1,{cidr},.{}",
        kiln_airgap::dns::DEFAULT_DOMAIN
    );
    let text = format!(
        "machine:\n  network:\n    nameservers: [\"{gateway}\"]\n  env:\n    http_proxy: \"{proxy}\"\n    https_proxy: \"{proxy}\"\n    no_proxy: \"{no_proxy}\"\n"
    );
    Patch::parse(&text, "--airgapped")
}

/// Starts the lab DNS and the proxy for an air-gapped cluster, records them as helpers and
/// waits until both listen.
pub fn start(dir: &StateDir, state: &mut ClusterState, progress: &Progress) -> anyhow::Result<()> {
    let names = names(state)?;
    let dns = names.dns_config(true);
    let proxy = names.proxy_config(true);
    for (helper, kind, yaml, listen) in [
        (lab::DNS_HELPER, "dns", dns.to_yaml(), dns.listen.clone()),
        (
            lab::PROXY_HELPER,
            "egress-proxy",
            proxy.to_yaml(),
            proxy
                .listen
                .iter()
                .chain(&proxy.tls_listen)
                .copied()
                .collect(),
        ),
    ] {
        state.helpers.push(HelperState {
            name: helper.to_owned(),
            kind: kind.to_owned(),
        });
        dir.save(state)?;
        let args = lab::helper_args(&dir.dir, helper, &yaml)?;
        let id = daemon::spawn(&args, &dir.log(helper), &dir.pidfile(helper))?;
        daemon::wait_listening(id, &listen, &dir.log(helper), Duration::from_secs(30))?;
    }
    progress.note(format!(
        "lab DNS on {}:53 answering {} names in {} only; egress proxy on {}:{} allowing {} and *.{} only",
        state.network.gateway,
        dns.records.len(),
        dns.domain,
        state.network.gateway,
        lab::PROXY_PORT,
        state.network.cidr,
        dns.domain
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn node_patch_sets_lab_dns_and_proxy_and_validates() {
        let patch = node_patch("10.9.0.1".parse().unwrap(), "10.9.0.0/24").unwrap();
        let secrets = kiln_pki::SecretsBundle::generate().unwrap();
        let generated = kiln_config::generate(&kiln_config::GenerateInput {
            cluster_name: "gap",
            endpoint: "https://10.9.0.1:6443",
            secrets: &secrets,
            install_disk: kiln_config::generate::DEFAULT_INSTALL_DISK,
            install_image: kiln_config::generate::DEFAULT_INSTALLER_IMAGE,
            patches: &[patch],
            control_plane_patches: &[],
            worker_patches: &[],
        })
        .unwrap();
        let m = &generated.worker.machine;
        assert_eq!(m.network.as_ref().unwrap().nameservers, ["10.9.0.1"]);
        assert_eq!(m.env["https_proxy"], "http://10.9.0.1:3128");
        assert!(m.env["no_proxy"].contains("10.9.0.0/24"));
    }
}
