//! The v1alpha1 machine configuration document: the field names of the guides, for the parts
//! Kiln covers. Unknown fields are rejected everywhere (`deny_unknown_fields`).

use std::collections::BTreeMap;

use kiln_pki::{PemCertAndKey, PemKey};
use serde::{Deserialize, Serialize};

use crate::lenient;

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_true() -> bool {
    true
}

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineConfig {
    /// Always `v1alpha1`.
    pub version: String,
    /// Print service output on the console.
    #[serde(default, skip_serializing_if = "is_false")]
    pub debug: bool,
    /// Keep the configuration across reboots.
    #[serde(default = "default_true")]
    pub persist: bool,
    /// The machine's own settings.
    pub machine: Machine,
    /// The settings shared by the cluster.
    pub cluster: Cluster,
    /// The `ExtensionServiceConfig` documents that followed this one in its file (`---`
    /// separated): configuration files and environment for extension services. Not a field of
    /// the v1alpha1 document; [`crate::from_yaml`] fills it and [`crate::to_yaml`] writes it
    /// back as documents of their own.
    #[serde(skip)]
    pub extension_service_configs: Vec<ExtensionServiceConfig>,
}

/// Configuration files and environment for one extension service, a document of its own:
///
/// ```yaml
/// apiVersion: v1alpha1
/// kind: ExtensionServiceConfig
/// name: hello-world
/// configFiles:
///   - content: greeting=hi
///     mountPath: /etc/hello/hello.conf
/// environment:
///   - GREETING=hi
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionServiceConfig {
    /// Always `v1alpha1`.
    pub api_version: String,
    /// Always `ExtensionServiceConfig`.
    pub kind: String,
    /// The extension service's name (its definition's `name`, without `ext-`).
    pub name: String,
    /// Files mounted read-only into the service's root filesystem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_files: Vec<ExtensionConfigFile>,
    /// `NAME=value` entries added to the service's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment: Vec<String>,
}

/// One file of an [`ExtensionServiceConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionConfigFile {
    /// The file's content.
    pub content: String,
    /// Where it appears in the service's root filesystem (absolute).
    pub mount_path: String,
}

/// The `kind` of an [`ExtensionServiceConfig`] document.
pub const EXTENSION_SERVICE_CONFIG: &str = "ExtensionServiceConfig";

/// `controlplane` runs etcd; `worker` does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// Runs etcd and the Kubernetes control plane.
    Controlplane,
    /// Runs workloads only.
    Worker,
}

impl std::fmt::Display for MachineType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Controlplane => "controlplane",
            Self::Worker => "worker",
        })
    }
}

/// `machine:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Machine {
    /// Role of the machine.
    #[serde(rename = "type")]
    pub machine_type: MachineType,
    /// Machine token: a worker presents it to get its API certificate.
    #[serde(default)]
    pub token: String,
    /// OS API CA; workers carry the certificate only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PemCertAndKey>,
    /// Extra names and addresses for the API server certificate.
    #[serde(default, rename = "certSANs", skip_serializing_if = "Vec::is_empty")]
    pub cert_sans: Vec<String>,
    /// Network settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Time synchronisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeConfig>,
    /// Installation target (metal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallConfig>,
    /// Registry mirrors and per-registry TLS and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registries: Option<RegistriesConfig>,
    /// Files written on the machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<MachineFile>,
    /// Environment of the machine's services.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "lenient::string_map"
    )]
    pub env: BTreeMap<String, String>,
    /// Static pod manifests, kept as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<serde_yaml::Mapping>,
    /// Feature switches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeaturesConfig>,
    /// Kubelet settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet: Option<KubeletConfig>,
}

/// `machine.network`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfig {
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Interfaces to configure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Device>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// One entry of `machine.network.interfaces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// Link name (`eth0`, `bond0`, `br0`, `lo`); empty when `deviceSelector` picks the link.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
    /// Picks the link by its properties instead of its name (the first match, by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_selector: Option<DeviceSelector>,
    /// Static addresses in CIDR notation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Link MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Acquire an address with DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    /// Leave the link alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore: Option<bool>,
    /// Make this link a bond of others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bond: Option<Bond>,
    /// Make this link a bridge of others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<Bridge>,
    /// VLANs on this link.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<Vlan>,
}

/// `deviceSelector`: a link picked by what it is rather than by its name. Every field given
/// must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceSelector {
    /// Hardware address; `*` matches any characters (`52:54:00:*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware_addr: Option<String>,
    /// Kernel driver (`virtio_net`); `*` matches any characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Only links backed by a device (`true`) or only virtual ones (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<bool>,
}

impl DeviceSelector {
    /// Whether no field is given (it would match every link).
    pub fn is_empty(&self) -> bool {
        self.hardware_addr.is_none() && self.driver.is_none() && self.physical.is_none()
    }
}

/// A static route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Destination in CIDR notation (`0.0.0.0/0` for the default route).
    pub network: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Route metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// `bond:` of an interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bond {
    /// Member links.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Member links picked by their properties (every match of each selector).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_selectors: Vec<DeviceSelector>,
    /// Bonding mode (`balance-rr`, `active-backup`, `balance-xor`, `broadcast`, `802.3ad`,
    /// `balance-tlb`, `balance-alb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// LACP rate (`slow` or `fast`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lacp_rate: Option<String>,
    /// Transmit hash policy (`layer2`, `layer3+4`, `layer2+3`, `encap2+3`, `encap3+4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xmit_hash_policy: Option<String>,
    /// Link monitoring interval, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miimon: Option<u32>,
    /// Delay before enabling a recovered member, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updelay: Option<u32>,
    /// Delay before disabling a failed member, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downdelay: Option<u32>,
}

/// `bridge:` of an interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bridge {
    /// Member links.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Spanning tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stp: Option<Stp>,
}

/// `bridge.stp`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stp {
    /// Run spanning tree on the bridge.
    #[serde(default)]
    pub enabled: bool,
}

/// A VLAN on an interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Vlan {
    /// VLAN id, 1 to 4094.
    pub vlan_id: u16,
    /// Static addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Acquire an address with DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<bool>,
    /// VLAN link MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `machine.time`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeConfig {
    /// NTP servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
}

/// `machine.install`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstallConfig {
    /// Disk to install to (`/dev/sda`, `/dev/vda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Installer image reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Wipe the disk before installing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub wipe: bool,
}

/// `machine.registries`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistriesConfig {
    /// Mirrors per registry host (`docker.io`, `*` for every host).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mirrors: BTreeMap<String, RegistryMirror>,
    /// TLS and credentials per registry host (`host` or `host:port`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, RegistryConfig>,
}

/// `machine.registries.mirrors.<host>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryMirror {
    /// Mirror URLs, tried in order.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// `machine.registries.config.<host>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryConfig {
    /// TLS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RegistryTls>,
    /// Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegistryAuth>,
}

/// `machine.registries.config.<host>.tls`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryTls {
    /// Client certificate and key for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_identity: Option<PemCertAndKey>,
    /// base64 PEM of the CA that signs the registry's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Accept any server certificate.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_verify: bool,
}

/// `machine.registries.config.<host>.auth`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryAuth {
    /// User name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// base64 of `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Identity token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_token: Option<String>,
}

/// The one file outside `/var` that `machine.files` may change: the trusted roots, and only by
/// `append` (the air-gapped guide appends its proxy's certificate to it).
pub const TRUSTED_ROOTS_PATH: &str = "/etc/ssl/certs/ca-certificates";

/// One entry of `machine.files`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MachineFile {
    /// File content.
    pub content: String,
    /// Mode bits (`0o644`).
    #[serde(default)]
    pub permissions: u32,
    /// Absolute path.
    pub path: String,
    /// `create`, `append` or `overwrite`.
    pub op: String,
}

/// `machine.features`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeaturesConfig {
    /// OS API access from Kubernetes workloads.
    #[serde(
        default,
        rename = "kubernetesTalosAPIAccess",
        skip_serializing_if = "Option::is_none"
    )]
    pub kubernetes_os_api_access: Option<KubernetesOsApiAccess>,
}

/// `machine.features.kubernetesTalosAPIAccess` (field name kept from the guides).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesOsApiAccess {
    /// Switch the feature on.
    #[serde(default)]
    pub enabled: bool,
    /// Roles workloads may receive (`os:reader`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_roles: Vec<String>,
    /// Namespaces whose workloads may receive them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_kubernetes_namespaces: Vec<String>,
}

/// `machine.kubelet`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeletConfig {
    /// Kubelet image reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `cluster:`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// Cluster name.
    #[serde(default)]
    pub cluster_name: String,
    /// Control-plane endpoint.
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Cluster networking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<ClusterNetwork>,
    /// Kubernetes bootstrap token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// base64 secretbox key for Kubernetes secrets at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secretbox_encryption_secret: Option<String>,
    /// Kubernetes CA (workers: certificate only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PemCertAndKey>,
    /// Front-proxy CA.
    #[serde(
        default,
        rename = "aggregatorCA",
        skip_serializing_if = "Option::is_none"
    )]
    pub aggregator_ca: Option<PemCertAndKey>,
    /// Service-account signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<PemKey>,
    /// etcd settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
    /// URLs of extra Kubernetes manifests the control plane fetches and applies after
    /// bootstrap (through the machine's proxy environment).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_manifests: Vec<String>,
}

/// `cluster.controlPlane`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    /// `https://host:port` of the control plane (a load balancer in front of the nodes).
    #[serde(default)]
    pub endpoint: String,
}

/// `cluster.network`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterNetwork {
    /// CNI plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<Cni>,
    /// Cluster DNS domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_domain: Option<String>,
    /// Pod CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_subnets: Vec<String>,
    /// Service CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_subnets: Vec<String>,
}

/// `cluster.network.cni`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cni {
    /// `flannel`, `custom` or `none`.
    pub name: String,
}

/// `cluster.etcd`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdConfig {
    /// etcd CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PemCertAndKey>,
    /// Extra etcd flags without the leading `--` (`quota-backend-bytes: 4294967296`).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "lenient::string_map"
    )]
    pub extra_args: BTreeMap<String, String>,
}

impl MachineConfig {
    /// The network section, or an empty one.
    pub fn network(&self) -> NetworkConfig {
        self.machine.network.clone().unwrap_or_default()
    }
}
