//! `kiln gen config`: a control-plane document, a worker document and a client config from a
//! secrets bundle.

use std::collections::BTreeMap;

use kiln_pki::{LeafRequest, PemCertAndKey, PemKey, ROLE_ADMIN, SecretsBundle, SecretsError};

use crate::client::{ClientConfig, Context};
use crate::patch::{self, Patch, PatchError};
use crate::types::{
    Cluster, ClusterNetwork, Cni, ControlPlane, EtcdConfig, InstallConfig, Machine, MachineConfig,
    MachineType, NetworkConfig,
};
use crate::validate::{self, Mode, ValidationError};

/// Installer image written into generated documents.
pub const DEFAULT_INSTALLER_IMAGE: &str = concat!("kiln/installer:v", env!("CARGO_PKG_VERSION"));
/// The node image of this Kiln version (the container the `docker` provisioner runs a node
/// in), listed by `kiln image list`.
pub const DEFAULT_NODE_IMAGE: &str = concat!("kiln/node:v", env!("CARGO_PKG_VERSION"));
/// Install disk written into generated documents (virtio disk of the QEMU provisioner).
pub const DEFAULT_INSTALL_DISK: &str = "/dev/vda";

/// What `kiln gen config` is asked for.
#[derive(Debug, Clone)]
pub struct GenerateInput<'a> {
    /// Cluster name (also the client context name).
    pub cluster_name: &'a str,
    /// `https://host:port` of the control plane.
    pub endpoint: &'a str,
    /// The cluster's secrets.
    pub secrets: &'a SecretsBundle,
    /// Install disk.
    pub install_disk: &'a str,
    /// Installer image.
    pub install_image: &'a str,
    /// Patches for both documents.
    pub patches: &'a [Patch],
    /// Patches for the control-plane document only.
    pub control_plane_patches: &'a [Patch],
    /// Patches for the worker document only.
    pub worker_patches: &'a [Patch],
}

/// What `kiln gen config` writes.
#[derive(Debug, Clone)]
pub struct GeneratedConfigs {
    /// `controlplane.yaml`.
    pub controlplane: MachineConfig,
    /// `worker.yaml`.
    pub worker: MachineConfig,
    /// `kilnconfig`.
    pub client: ClientConfig,
}

/// Why configs could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The secrets bundle is unusable.
    #[error("secrets: {0}")]
    Secrets(#[from] SecretsError),
    /// Issuing the admin client certificate failed.
    #[error("issuing the os:admin client certificate: {0}")]
    ClientCertificate(#[from] kiln_pki::CaError),
    /// A patch failed.
    #[error("{role} config: {source}")]
    Patch {
        /// `controlplane` or `worker`.
        role: MachineType,
        /// What was wrong.
        source: PatchError,
    },
    /// The result does not validate.
    #[error("{role} config after patches: {source}")]
    Invalid {
        /// `controlplane` or `worker`.
        role: MachineType,
        /// What was wrong.
        source: ValidationError,
    },
    /// The endpoint is not `https://host[:port]`.
    #[error(
        "endpoint {0:?} is not an https URL; give the control-plane endpoint as https://HOST:6443, \
         e.g. https://10.5.0.1:6443"
    )]
    Endpoint(String),
}

fn base(input: &GenerateInput<'_>, machine_type: MachineType) -> MachineConfig {
    let s = input.secrets;
    let is_cp = machine_type == MachineType::Controlplane;
    let keep = |pair: &PemCertAndKey| {
        if is_cp {
            pair.clone()
        } else {
            pair.without_key()
        }
    };
    MachineConfig {
        version: "v1alpha1".to_owned(),
        debug: false,
        persist: true,
        machine: Machine {
            machine_type,
            token: s.trustdinfo.token.clone(),
            ca: Some(keep(&s.certs.os)),
            cert_sans: Vec::new(),
            network: Some(NetworkConfig::default()),
            time: None,
            install: Some(InstallConfig {
                disk: Some(input.install_disk.to_owned()),
                image: Some(input.install_image.to_owned()),
                wipe: false,
            }),
            registries: None,
            files: Vec::new(),
            env: BTreeMap::new(),
            pods: Vec::new(),
            features: None,
            kubelet: None,
        },
        cluster: Cluster {
            cluster_name: input.cluster_name.to_owned(),
            control_plane: ControlPlane {
                endpoint: input.endpoint.to_owned(),
            },
            network: Some(ClusterNetwork {
                cni: Some(Cni {
                    name: "flannel".to_owned(),
                }),
                dns_domain: Some("cluster.local".to_owned()),
                pod_subnets: vec!["10.244.0.0/16".to_owned()],
                service_subnets: vec!["10.96.0.0/12".to_owned()],
            }),
            token: Some(s.secrets.bootstraptoken.clone()),
            secretbox_encryption_secret: is_cp.then(|| s.secrets.secretboxencryptionsecret.clone()),
            ca: Some(keep(&s.certs.k8s)),
            aggregator_ca: is_cp.then(|| s.certs.k8saggregator.clone()),
            service_account: is_cp.then(|| PemKey {
                key: s.certs.k8sserviceaccount.key.clone(),
            }),
            etcd: is_cp.then(|| EtcdConfig {
                ca: Some(s.certs.etcd.clone()),
                extra_args: BTreeMap::new(),
            }),
            extra_manifests: Vec::new(),
        },
        extension_service_configs: Vec::new(),
    }
}

fn finish(
    input: &GenerateInput<'_>,
    role: MachineType,
    role_patches: &[Patch],
) -> Result<MachineConfig, GenerateError> {
    let all: Vec<Patch> = input.patches.iter().chain(role_patches).cloned().collect();
    let config = patch::apply(&base(input, role), &all)
        .map_err(|source| GenerateError::Patch { role, source })?;
    // Generated documents must pass the checks that do not depend on the platform.
    let report = validate::validate(&config, Mode::Metal);
    if !report.errors.is_empty() {
        return Err(GenerateError::Invalid {
            role,
            source: ValidationError(report.errors),
        });
    }
    Ok(config)
}

/// Host of an `https://host:port` endpoint.
pub fn endpoint_host(endpoint: &str) -> Option<String> {
    let url = url::Url::parse(endpoint).ok()?;
    if url.scheme() != "https" {
        return None;
    }
    url.host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
}

/// Generates both documents and the client config.
pub fn generate(input: &GenerateInput<'_>) -> Result<GeneratedConfigs, GenerateError> {
    let host = endpoint_host(input.endpoint)
        .ok_or_else(|| GenerateError::Endpoint(input.endpoint.to_owned()))?;
    let controlplane = finish(
        input,
        MachineType::Controlplane,
        input.control_plane_patches,
    )?;
    let worker = finish(input, MachineType::Worker, input.worker_patches)?;

    let os_ca = input.secrets.os_ca()?;
    let admin = os_ca.issue(&LeafRequest::client("admin", ROLE_ADMIN))?;
    let context = Context {
        endpoints: vec![host],
        nodes: Vec::new(),
        ca: input.secrets.certs.os.crt.clone(),
        crt: PemCertAndKey::from_pem(&admin.cert_pem, &admin.key_pem).crt,
        key: PemCertAndKey::from_pem(&admin.cert_pem, &admin.key_pem).key,
        lab: None,
    };
    let client = ClientConfig {
        context: Some(input.cluster_name.to_owned()),
        contexts: BTreeMap::from([(input.cluster_name.to_owned(), context)]),
    };
    Ok(GeneratedConfigs {
        controlplane,
        worker,
        client,
    })
}
