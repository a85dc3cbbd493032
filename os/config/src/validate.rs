//! Semantic checks of a parsed document, per platform mode. Every problem names the field
//! path, what is wrong and how to fix it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use kiln_pki::{CertificateAuthority, PemCertAndKey, ROLES, validate_token};

use crate::types::{Device, MachineConfig, MachineType, Route, TRUSTED_ROOTS_PATH};

/// The platform a document is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A (virtual) machine booted from disk: installs, configures real links.
    #[default]
    Metal,
    /// A container: no install, the container's network as given.
    Container,
    /// A process in a network namespace: no install, the launcher assigns the address.
    Process,
}

impl Mode {
    /// Every mode, for help texts.
    pub const ALL: [Mode; 3] = [Mode::Metal, Mode::Container, Mode::Process];
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Metal => "metal",
            Self::Container => "container",
            Self::Process => "process",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "metal" => Ok(Self::Metal),
            "container" => Ok(Self::Container),
            "process" => Ok(Self::Process),
            other => Err(format!(
                "unknown mode {other:?}: use metal, container or process"
            )),
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path (`machine.network.interfaces[0].addresses[1]`).
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.path, self.message, self.fix)
    }
}

/// Everything found in one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Problems that make the document unusable.
    pub errors: Vec<Problem>,
    /// Settings that will be ignored or look wrong.
    pub warnings: Vec<Problem>,
}

impl Report {
    /// Whether there are no errors (and, with `strict`, no warnings).
    pub fn is_ok(&self, strict: bool) -> bool {
        self.errors.is_empty() && (!strict || self.warnings.is_empty())
    }

    fn error(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.errors.push(Problem {
            path: path.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn warn(
        &mut self,
        path: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.warnings.push(Problem {
            path: path.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }
}

/// The errors of a document that failed validation.
#[derive(Debug, thiserror::Error)]
#[error("{} error(s):\n{}", .0.len(), list(.0))]
pub struct ValidationError(pub Vec<Problem>);

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

const BOND_MODES: [&str; 7] = [
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
];
const LACP_RATES: [&str; 2] = ["slow", "fast"];
const XMIT_HASH_POLICIES: [&str; 5] = ["layer2", "layer3+4", "layer2+3", "encap2+3", "encap3+4"];
const FILE_OPS: [&str; 3] = ["create", "append", "overwrite"];
const CNI_NAMES: [&str; 3] = ["flannel", "custom", "none"];
/// etcd flags machined sets itself; overriding them would break the node.
const RESERVED_ETCD_ARGS: [&str; 14] = [
    "name",
    "data-dir",
    "listen-client-urls",
    "listen-peer-urls",
    "advertise-client-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
];

/// Checks `config` for `mode`.
pub fn validate(config: &MachineConfig, mode: Mode) -> Report {
    let mut r = Report::default();
    let is_cp = config.machine.machine_type == MachineType::Controlplane;

    if config.version != "v1alpha1" {
        r.error(
            "version",
            format!("{:?} is not supported", config.version),
            "set version: v1alpha1",
        );
    }
    check_machine(config, mode, is_cp, &mut r);
    check_cluster(config, is_cp, &mut r);
    check_extension_service_configs(config, &mut r);
    r
}

/// `ExtensionServiceConfig` documents, named by `ExtensionServiceConfig[<name>]` in problems.
fn check_extension_service_configs(config: &MachineConfig, r: &mut Report) {
    for c in &config.extension_service_configs {
        let at = format!("ExtensionServiceConfig[{}]", c.name);
        if c.api_version != "v1alpha1" {
            r.error(
                format!("{at}.apiVersion"),
                format!("{:?} is not supported", c.api_version),
                "set apiVersion: v1alpha1",
            );
        }
        if c.name.is_empty() || c.name.contains('/') || c.name.starts_with('.') {
            r.error(
                format!("{at}.name"),
                format!("{:?} is not an extension service's name", c.name),
                "use the `name` of the service's definition (without `ext-`)",
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, f) in c.config_files.iter().enumerate() {
            let path = std::path::Path::new(&f.mount_path);
            let plain = path.components().all(|p| {
                matches!(
                    p,
                    std::path::Component::RootDir | std::path::Component::Normal(_)
                )
            });
            if !path.is_absolute() || !plain || path.parent().is_none() {
                r.error(
                    format!("{at}.configFiles[{i}].mountPath"),
                    format!("{:?} is not an absolute path to a file", f.mount_path),
                    "give the file's absolute path inside the service's root filesystem, e.g. /etc/app/app.conf",
                );
            } else if !seen.insert(path) {
                r.error(
                    format!("{at}.configFiles[{i}].mountPath"),
                    format!("{:?} is given twice", f.mount_path),
                    "give each file once",
                );
            }
        }
        for (i, e) in c.environment.iter().enumerate() {
            if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                r.error(
                    format!("{at}.environment[{i}]"),
                    format!("{e:?} is not NAME=value"),
                    "write each entry as NAME=value",
                );
            }
        }
    }
}

fn check_machine(config: &MachineConfig, mode: Mode, is_cp: bool, r: &mut Report) {
    let m = &config.machine;
    if m.token.is_empty() {
        r.error(
            "machine.token",
            "missing",
            "generate the document with `kiln gen config`, which sets it",
        );
    } else if let Err(e) = validate_token(&m.token) {
        r.error(
            "machine.token",
            e.to_string(),
            "use a token from `kiln gen secrets`",
        );
    }
    check_ca(r, "machine.ca", m.ca.as_ref(), is_cp, "the OS API CA");

    for (i, san) in m.cert_sans.iter().enumerate() {
        if san.parse::<IpAddr>().is_err() && !is_dns_name(san) {
            r.error(
                format!("machine.certSANs[{i}]"),
                format!("{san:?} is neither an IP address nor a DNS name"),
                "write an address such as 10.5.0.2 or a name such as cp.example.com",
            );
        }
    }

    if let Some(net) = &m.network {
        check_network(net, mode, r);
    }
    if let Some(time) = &m.time {
        for (i, s) in time.servers.iter().enumerate() {
            if s.trim().is_empty() || s.contains(char::is_whitespace) {
                r.error(
                    format!("machine.time.servers[{i}]"),
                    format!("{s:?} is not a host name or address"),
                    "write an NTP server such as time.cloudflare.com",
                );
            }
        }
    }
    check_install(config, mode, r);
    check_registries(config, r);
    check_files(config, r);
    for key in m.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains(char::is_whitespace) {
            r.error(
                format!("machine.env.{key}"),
                "is not a valid environment variable name",
                "use letters, digits and underscores, e.g. http_proxy",
            );
        }
    }
    for (i, pod) in m.pods.iter().enumerate() {
        let path = format!("machine.pods[{i}]");
        if pod.get("kind").and_then(|k| k.as_str()) != Some("Pod") {
            r.error(
                format!("{path}.kind"),
                "must be Pod",
                "static pods are Pod manifests: set kind: Pod",
            );
        }
        let has_name = pod
            .get("metadata")
            .and_then(|md| md.get("name"))
            .and_then(|n| n.as_str())
            .is_some_and(|n| !n.is_empty());
        if !has_name {
            r.error(
                format!("{path}.metadata.name"),
                "missing",
                "every static pod needs a name; it becomes the resource ID <namespace>-<name>",
            );
        }
    }
    if let Some(access) = m
        .features
        .as_ref()
        .and_then(|f| f.kubernetes_os_api_access.as_ref())
    {
        let base = "machine.features.kubernetesTalosAPIAccess";
        for (i, role) in access.allowed_roles.iter().enumerate() {
            if !ROLES.contains(&role.as_str()) {
                r.error(
                    format!("{base}.allowedRoles[{i}]"),
                    format!("unknown role {role:?}"),
                    format!("use one of {}", ROLES.join(", ")),
                );
            }
        }
        if access.enabled && access.allowed_roles.is_empty() {
            r.warn(
                format!("{base}.allowedRoles"),
                "the feature is enabled but no role is allowed, so no workload gets access",
                "add a role such as os:reader",
            );
        }
        if !is_cp && access.enabled {
            r.warn(
                format!("{base}.enabled"),
                "only control-plane nodes serve this feature",
                "enable it in the control-plane configuration",
            );
        }
    }
    if let Some(image) = m.kubelet.as_ref().and_then(|k| k.image.as_ref())
        && image.trim().is_empty()
    {
        r.error(
            "machine.kubelet.image",
            "is empty",
            "remove the field or give an image reference",
        );
    }
}

fn check_ca(r: &mut Report, path: &str, ca: Option<&PemCertAndKey>, need_key: bool, what: &str) {
    let Some(ca) = ca else {
        r.error(
            path,
            format!("missing {what}"),
            "generate the document with `kiln gen config`, which sets it",
        );
        return;
    };
    let cert = match ca.cert_pem() {
        Ok(c) if !c.trim().is_empty() => c,
        Ok(_) => {
            r.error(
                format!("{path}.crt"),
                format!("missing the certificate of {what}"),
                "set crt to the base64 PEM certificate",
            );
            return;
        }
        Err(e) => {
            r.error(
                format!("{path}.crt"),
                e.to_string(),
                "set crt to the base64 of the PEM certificate",
            );
            return;
        }
    };
    match ca.key_pem() {
        Err(e) => r.error(
            format!("{path}.key"),
            e.to_string(),
            "set key to the base64 of the PEM private key",
        ),
        Ok(None) if need_key => r.error(
            format!("{path}.key"),
            format!(
                "missing the private key of {what}; control-plane nodes issue certificates from it"
            ),
            "set key to the base64 PEM key (kiln gen config writes it into controlplane.yaml)",
        ),
        Ok(None) => {
            if pem_block_is(&cert, "CERTIFICATE").is_err() {
                r.error(
                    format!("{path}.crt"),
                    "is not a PEM certificate",
                    "set crt to the base64 of the PEM certificate",
                );
            }
        }
        Ok(Some(key)) => {
            if let Err(e) = CertificateAuthority::from_pem(&cert, &key) {
                r.error(
                    path,
                    e.to_string(),
                    "use the certificate and key from the same secrets bundle",
                );
            }
            if !need_key {
                r.warn(
                    format!("{path}.key"),
                    format!("a worker carries the private key of {what}"),
                    "remove the key from worker documents; only control-plane nodes need it",
                );
            }
        }
    }
}

fn pem_block_is(text: &str, tag: &str) -> Result<(), ()> {
    match text.trim_start().strip_prefix("-----BEGIN ") {
        Some(rest) if rest.starts_with(tag) => Ok(()),
        _ => Err(()),
    }
}

/// A CIDR with its prefix length (ipnetwork alone would read a bare address as a /32).
fn parse_cidr(value: &str) -> Result<IpNetwork, String> {
    if !value.contains('/') {
        return Err("no prefix length".to_owned());
    }
    value.parse::<IpNetwork>().map_err(|e| e.to_string())
}

fn check_cidr(r: &mut Report, path: String, value: &str, example: &str) {
    if let Err(e) = parse_cidr(value) {
        r.error(
            path,
            format!("{value:?} is not a valid CIDR ({e})"),
            format!("write an address with its prefix length, e.g. {example}"),
        );
    }
}

fn check_routes(r: &mut Report, base: &str, routes: &[Route]) {
    for (i, route) in routes.iter().enumerate() {
        let path = format!("{base}.routes[{i}]");
        check_cidr(
            r,
            format!("{path}.network"),
            &route.network,
            "0.0.0.0/0 for the default route",
        );
        if let Some(gw) = &route.gateway {
            match gw.parse::<IpAddr>() {
                Err(_) => r.error(
                    format!("{path}.gateway"),
                    format!("{gw:?} is not an IP address"),
                    "write the next hop's address, e.g. 10.0.0.1",
                ),
                Ok(gw) => {
                    if let Ok(net) = parse_cidr(&route.network)
                        && net.ip().is_ipv4() != gw.is_ipv4()
                    {
                        r.error(
                            format!("{path}.gateway"),
                            format!("{gw} and network {net} are of different address families"),
                            "use an IPv4 gateway for an IPv4 route and IPv6 for IPv6",
                        );
                    }
                }
            }
        }
    }
}

fn check_network(net: &crate::types::NetworkConfig, mode: Mode, r: &mut Report) {
    if let Some(h) = &net.hostname
        && !is_dns_name(h)
    {
        r.error(
            "machine.network.hostname",
            format!("{h:?} is not a valid host name"),
            "use letters, digits and '-', at most 63 characters per label",
        );
    }
    for (i, ns) in net.nameservers.iter().enumerate() {
        if ns.parse::<IpAddr>().is_err() {
            r.error(
                format!("machine.network.nameservers[{i}]"),
                format!("{ns:?} is not an IP address"),
                "write the DNS server's address, e.g. 10.0.0.1",
            );
        }
    }
    if mode == Mode::Process && !net.interfaces.is_empty() {
        r.warn(
            "machine.network.interfaces",
            "ignored on the process platform: the node launcher assigns the node's address",
            "remove the section or validate with --mode metal",
        );
    }

    // Which links are enslaved to a bond or bridge, and by whom.
    let mut members: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, dev) in net.interfaces.iter().enumerate() {
        let base = format!("machine.network.interfaces[{i}]");
        match &dev.device_selector {
            Some(sel) if !dev.interface.is_empty() => r.error(
                &base,
                format!(
                    "has both interface {:?} and a deviceSelector",
                    dev.interface
                ),
                "name the link or select it, not both",
            ),
            Some(sel) if sel.is_empty() => r.error(
                format!("{base}.deviceSelector"),
                "selects nothing: it has no field",
                "give hardwareAddr, driver or physical",
            ),
            _ => {}
        }
        if dev.interface.trim().is_empty() {
            if dev.device_selector.is_none() {
                r.error(
                    format!("{base}.interface"),
                    "is empty",
                    "name the link, e.g. eth0, or pick it with deviceSelector",
                );
            }
        } else if dev.interface.len() > 15 {
            r.error(
                format!("{base}.interface"),
                format!("{:?} is longer than 15 characters", dev.interface),
                "Linux link names have at most 15 characters",
            );
        }
        if !dev.interface.is_empty()
            && let Some(first) = seen.insert(dev.interface.as_str(), i)
        {
            r.error(
                format!("{base}.interface"),
                format!(
                    "{:?} is already configured by interfaces[{first}]",
                    dev.interface
                ),
                "merge the two entries into one",
            );
        }
        check_device(dev, &base, r);
        let kinds = [
            ("bond", dev.bond.as_ref().map(|b| &b.interfaces)),
            ("bridge", dev.bridge.as_ref().map(|b| &b.interfaces)),
        ];
        if dev.bond.is_some() && dev.bridge.is_some() {
            r.error(
                &base,
                "is both a bond and a bridge",
                "make it one or the other; a bridge can contain a bond",
            );
        }
        let selected = dev
            .bond
            .as_ref()
            .is_some_and(|b| !b.device_selectors.is_empty());
        if let Some(bond) = &dev.bond {
            for (j, sel) in bond.device_selectors.iter().enumerate() {
                if sel.is_empty() {
                    r.error(
                        format!("{base}.bond.deviceSelectors[{j}]"),
                        "selects nothing: it has no field",
                        "give hardwareAddr, driver or physical",
                    );
                }
            }
        }
        for (kind, links) in kinds {
            let Some(links) = links else { continue };
            if links.is_empty() && !(kind == "bond" && selected) {
                r.error(
                    format!("{base}.{kind}.interfaces"),
                    format!("the {kind} has no member links"),
                    "list the links to enslave, e.g. [eth0, eth1] (a bond may select them with deviceSelectors)",
                );
            }
            for (j, link) in links.iter().enumerate() {
                if link == &dev.interface {
                    r.error(
                        format!("{base}.{kind}.interfaces[{j}]"),
                        format!("{:?} cannot be a member of itself", link),
                        "list other links",
                    );
                } else if let Some((other, _)) = members.insert(link.as_str(), (i, kind)) {
                    r.error(
                        format!("{base}.{kind}.interfaces[{j}]"),
                        format!("{link:?} is already a member of interfaces[{other}]"),
                        "a link can be enslaved to one bond or bridge only",
                    );
                }
            }
        }
    }
    // A member link is configured through its master; an entry of its own conflicts.
    for (i, dev) in net.interfaces.iter().enumerate() {
        if let Some((master, kind)) = members.get(dev.interface.as_str()) {
            let configured = !dev.addresses.is_empty()
                || !dev.routes.is_empty()
                || dev.dhcp == Some(true)
                || !dev.vlans.is_empty()
                || dev.bond.is_some() && *kind == "bond";
            if configured {
                r.error(
                    format!("machine.network.interfaces[{i}]"),
                    format!(
                        "{:?} is enslaved to the {kind} {:?} (interfaces[{master}]) and also configured on its own",
                        dev.interface, net.interfaces[*master].interface
                    ),
                    format!("move its addresses, routes, DHCP and VLANs to the {kind}, or remove it from the {kind}"),
                );
            }
        }
    }
}

fn check_device(dev: &Device, base: &str, r: &mut Report) {
    for (j, a) in dev.addresses.iter().enumerate() {
        check_cidr(r, format!("{base}.addresses[{j}]"), a, "192.168.1.10/24");
    }
    check_routes(r, base, &dev.routes);
    if let Some(mtu) = dev.mtu
        && !(68..=65535).contains(&mtu)
    {
        r.error(
            format!("{base}.mtu"),
            format!("{mtu} is out of range"),
            "use an MTU between 68 and 65535 (1500 is usual)",
        );
    }
    if dev.ignore == Some(true) && (dev.dhcp == Some(true) || !dev.addresses.is_empty()) {
        r.warn(
            format!("{base}.ignore"),
            "the link is ignored, so its addresses and DHCP have no effect",
            "remove ignore: true or the other settings",
        );
    }
    if let Some(bond) = &dev.bond {
        let choices: [(&str, Option<&String>, &[&str]); 3] = [
            ("mode", bond.mode.as_ref(), &BOND_MODES),
            ("lacpRate", bond.lacp_rate.as_ref(), &LACP_RATES),
            (
                "xmitHashPolicy",
                bond.xmit_hash_policy.as_ref(),
                &XMIT_HASH_POLICIES,
            ),
        ];
        for (field, value, allowed) in choices {
            if let Some(v) = value
                && !allowed.contains(&v.as_str())
            {
                r.error(
                    format!("{base}.bond.{field}"),
                    format!("unknown value {v:?}"),
                    format!("use one of {}", allowed.join(", ")),
                );
            }
        }
        if bond.lacp_rate.is_some() && bond.mode.as_deref() != Some("802.3ad") {
            r.warn(
                format!("{base}.bond.lacpRate"),
                "only applies to mode 802.3ad",
                "set mode: 802.3ad or remove lacpRate",
            );
        }
    }
    let mut vlan_ids = BTreeSet::new();
    for (j, vlan) in dev.vlans.iter().enumerate() {
        let vbase = format!("{base}.vlans[{j}]");
        if !(1..=4094).contains(&vlan.vlan_id) {
            r.error(
                format!("{vbase}.vlanId"),
                format!("{} is out of range", vlan.vlan_id),
                "use a VLAN id from 1 to 4094",
            );
        }
        if !vlan_ids.insert(vlan.vlan_id) {
            r.error(
                format!("{vbase}.vlanId"),
                format!(
                    "VLAN {} is defined twice on {}",
                    vlan.vlan_id, dev.interface
                ),
                "merge the two entries",
            );
        }
        for (k, a) in vlan.addresses.iter().enumerate() {
            check_cidr(r, format!("{vbase}.addresses[{k}]"), a, "192.168.2.10/28");
        }
        check_routes(r, &vbase, &vlan.routes);
    }
}

fn check_install(config: &MachineConfig, mode: Mode, r: &mut Report) {
    let install = config.machine.install.as_ref();
    match mode {
        Mode::Metal => {
            let disk = install.and_then(|i| i.disk.as_deref()).unwrap_or("");
            if disk.is_empty() {
                r.error(
                    "machine.install.disk",
                    "required in metal mode",
                    "set the disk to install to, e.g. /dev/vda",
                );
            } else if !disk.starts_with("/dev/") {
                r.error(
                    "machine.install.disk",
                    format!("{disk:?} is not a device path"),
                    "use a path under /dev, e.g. /dev/vda",
                );
            }
            if install
                .and_then(|i| i.image.as_deref())
                .is_none_or(str::is_empty)
            {
                r.error(
                    "machine.install.image",
                    "required in metal mode",
                    "set the installer image, e.g. kiln/installer:v0.1.0",
                );
            }
        }
        Mode::Container | Mode::Process => {
            if install.is_some_and(|i| i.disk.is_some() || i.wipe) {
                r.warn(
                    "machine.install",
                    format!("ignored in {mode} mode: nothing is installed"),
                    "remove it or validate with --mode metal",
                );
            }
        }
    }
}

fn check_registries(config: &MachineConfig, r: &mut Report) {
    let Some(reg) = &config.machine.registries else {
        return;
    };
    for (host, mirror) in &reg.mirrors {
        let base = format!("machine.registries.mirrors.{host}");
        if mirror.endpoints.is_empty() {
            r.error(
                format!("{base}.endpoints"),
                "no endpoints",
                "list at least one mirror URL, e.g. http://10.5.0.1:5000",
            );
        }
        for (i, ep) in mirror.endpoints.iter().enumerate() {
            let ok = url::Url::parse(ep)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                r.error(
                    format!("{base}.endpoints[{i}]"),
                    format!("{ep:?} is not an http or https URL"),
                    "write the mirror as a URL, e.g. http://10.5.0.1:5000",
                );
            }
        }
    }
    for (host, cfg) in &reg.config {
        let base = format!("machine.registries.config.{host}");
        if let Some(tls) = &cfg.tls {
            if let Some(ca) = &tls.ca
                && !kiln_pki::decode_base64_pem(ca)
                    .is_ok_and(|p| pem_block_is(&p, "CERTIFICATE").is_ok())
            {
                r.error(
                    format!("{base}.tls.ca"),
                    "is not the base64 of a PEM certificate",
                    "set ca to the base64 of the PEM CA certificate",
                );
            }
            if let Some(id) = &tls.client_identity
                && (id.cert_pem().is_err() || id.key_pem().is_err())
            {
                r.error(
                    format!("{base}.tls.clientIdentity"),
                    "crt or key is not base64",
                    "set crt and key to the base64 of their PEM text",
                );
            }
        }
        if let Some(auth) = &cfg.auth
            && auth.username.is_some() != auth.password.is_some()
        {
            r.error(
                format!("{base}.auth"),
                "username and password must be given together",
                "set both, or use auth or identityToken instead",
            );
        }
    }
}

fn check_files(config: &MachineConfig, r: &mut Report) {
    for (i, file) in config.machine.files.iter().enumerate() {
        let base = format!("machine.files[{i}]");
        if !file.path.starts_with('/') {
            r.error(
                format!("{base}.path"),
                format!("{:?} is not an absolute path", file.path),
                "write the full path, e.g. /var/etc/app.conf",
            );
        } else if file.path.split('/').any(|c| c == "..") {
            r.error(
                format!("{base}.path"),
                "contains '..'",
                "write the path without '..'",
            );
        } else if file.path == TRUSTED_ROOTS_PATH {
            if file.op != "append" && FILE_OPS.contains(&file.op.as_str()) {
                r.error(
                    format!("{base}.op"),
                    format!(
                        "{TRUSTED_ROOTS_PATH} can only be appended to, not {:?}",
                        file.op
                    ),
                    "use op: append to add certificates to the trusted roots",
                );
            }
        } else if !file.path.starts_with("/var/") {
            r.error(
                format!("{base}.path"),
                format!(
                    "{} is not writable: the root filesystem of Kiln OS is read-only",
                    file.path
                ),
                format!(
                    "write under /var (e.g. /var/etc/app.conf), or append to {TRUSTED_ROOTS_PATH} to add trusted roots"
                ),
            );
        }
        if !FILE_OPS.contains(&file.op.as_str()) {
            r.error(
                format!("{base}.op"),
                format!("unknown operation {:?}", file.op),
                format!("use one of {}", FILE_OPS.join(", ")),
            );
        }
        if file.permissions > 0o7777 {
            r.error(
                format!("{base}.permissions"),
                format!("{:#o} is not a file mode", file.permissions),
                "write the mode in octal, e.g. 0o644",
            );
        }
    }
}

fn check_cluster(config: &MachineConfig, is_cp: bool, r: &mut Report) {
    let c = &config.cluster;
    for (i, m) in c.extra_manifests.iter().enumerate() {
        match url::Url::parse(m) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) | Err(_) => r.error(
                format!("cluster.extraManifests[{i}]"),
                format!("{m:?} is not an http or https URL"),
                "write the manifest's URL, e.g. https://10.5.0.1:8001/debug.yaml",
            ),
        }
    }
    if c.cluster_name.trim().is_empty() {
        r.error(
            "cluster.clusterName",
            "missing",
            "name the cluster, e.g. clusterName: kiln-default",
        );
    }
    let ep = &c.control_plane.endpoint;
    match url::Url::parse(ep) {
        Ok(u) if u.scheme() == "https" && u.host().is_some() => {}
        Ok(u) => r.error(
            "cluster.controlPlane.endpoint",
            format!("{ep:?} is not an https URL (scheme {:?})", u.scheme()),
            "write it as https://HOST:6443, e.g. https://10.5.0.1:6443",
        ),
        Err(e) => r.error(
            "cluster.controlPlane.endpoint",
            format!("{ep:?} is not an https URL ({e})"),
            "write it as https://HOST:6443, e.g. https://10.5.0.1:6443",
        ),
    }
    if let Some(net) = &c.network {
        for (i, s) in net.pod_subnets.iter().enumerate() {
            check_cidr(
                r,
                format!("cluster.network.podSubnets[{i}]"),
                s,
                "10.244.0.0/16",
            );
        }
        for (i, s) in net.service_subnets.iter().enumerate() {
            check_cidr(
                r,
                format!("cluster.network.serviceSubnets[{i}]"),
                s,
                "10.96.0.0/12",
            );
        }
        if let Some(cni) = &net.cni
            && !CNI_NAMES.contains(&cni.name.as_str())
        {
            r.error(
                "cluster.network.cni.name",
                format!("unknown CNI {:?}", cni.name),
                format!("use one of {}", CNI_NAMES.join(", ")),
            );
        }
        if let Some(d) = &net.dns_domain
            && !is_dns_name(d)
        {
            r.error(
                "cluster.network.dnsDomain",
                format!("{d:?} is not a DNS domain"),
                "use a domain such as cluster.local",
            );
        }
    }
    match &c.token {
        None => r.error(
            "cluster.token",
            "missing",
            "generate the document with `kiln gen config`, which sets it",
        ),
        Some(t) => {
            if let Err(e) = validate_token(t) {
                r.error(
                    "cluster.token",
                    e.to_string(),
                    "use a bootstrap token from `kiln gen secrets`",
                );
            }
        }
    }
    check_ca(r, "cluster.ca", c.ca.as_ref(), is_cp, "the Kubernetes CA");
    if is_cp {
        check_ca(
            r,
            "cluster.aggregatorCA",
            c.aggregator_ca.as_ref(),
            true,
            "the aggregator CA",
        );
        match c.service_account.as_ref().map(|sa| sa.key_pem()) {
            None => r.error(
                "cluster.serviceAccount.key",
                "missing",
                "generate the document with `kiln gen config`, which sets it",
            ),
            Some(Err(e)) => r.error(
                "cluster.serviceAccount.key",
                e.to_string(),
                "set key to the base64 of the PEM private key",
            ),
            Some(Ok(pem)) => {
                if let Err(e) = kiln_pki::parse_private_key_pem(&pem) {
                    r.error(
                        "cluster.serviceAccount.key",
                        e.to_string(),
                        "set key to the base64 of the PEM private key",
                    );
                }
            }
        }
        match &c.secretbox_encryption_secret {
            None => r.error(
                "cluster.secretboxEncryptionSecret",
                "missing",
                "generate the document with `kiln gen config`, which sets it",
            ),
            Some(s) => {
                use base64::Engine as _;
                let len = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map(|b| b.len());
                if len != Ok(32) {
                    r.error(
                        "cluster.secretboxEncryptionSecret",
                        "is not the base64 of 32 bytes",
                        "generate one with `head -c 32 /dev/urandom | base64`",
                    );
                }
            }
        }
        let etcd_ca = c.etcd.as_ref().and_then(|e| e.ca.as_ref());
        if etcd_ca.is_none() {
            r.error(
                "cluster.etcd.ca",
                "a control-plane document needs the etcd CA: etcd's peer, server and client certificates are issued from it",
                "add cluster.etcd.ca (crt and key) from your secrets bundle, or regenerate with `kiln gen config --with-secrets secrets.yaml`",
            );
        } else {
            check_ca(r, "cluster.etcd.ca", etcd_ca, true, "the etcd CA");
        }
    } else if c.etcd.is_some() {
        r.warn(
            "cluster.etcd",
            "ignored on workers: they do not run etcd",
            "remove the etcd section from worker documents",
        );
    }
    if let Some(etcd) = &c.etcd {
        for arg in etcd.extra_args.keys() {
            let name = arg.trim_start_matches('-');
            if RESERVED_ETCD_ARGS.contains(&name) {
                r.error(
                    format!("cluster.etcd.extraArgs.{arg}"),
                    "is set by machined and cannot be overridden",
                    "remove it",
                );
            } else if name != arg {
                r.error(
                    format!("cluster.etcd.extraArgs.{arg}"),
                    "flags are written without the leading dashes",
                    format!("write {name}: VALUE"),
                );
            }
        }
    }
}

/// RFC 1123 host or domain name.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns_name("cp-1.example.com"));
        assert!(!is_dns_name("-bad"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name("under_score"));
    }

    #[test]
    fn modes_parse() {
        for m in Mode::ALL {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert!(
            "vm".parse::<Mode>()
                .unwrap_err()
                .contains("metal, container or process")
        );
    }
}
