//! The secrets bundle: everything the machines of one cluster share.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use time::Duration;

use crate::ca::{CaError, CertificateAuthority, KeyAlgorithm};
use crate::encoding::{PemCertAndKey, PemDecodeError, PemKey};
use crate::keys::{KeyError, parse_private_key_pem};
use crate::kubeadm::{self, KubeadmImportError};
use crate::token::{TokenError, generate_token, validate_token};

const CA_VALIDITY: Duration = Duration::days(3650);

/// Identity of the cluster (random, used to tell clusters apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterIdentity {
    /// base64 of 32 random bytes.
    pub id: String,
    /// base64 of 32 random bytes.
    pub secret: String,
}

/// Shared tokens and keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// Kubernetes bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`).
    pub bootstraptoken: String,
    /// base64 of the 32-byte secretbox key that encrypts Kubernetes secrets at rest.
    pub secretboxencryptionsecret: String,
}

/// The machine token with which workers obtain their API certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustdInfo {
    /// Machine token (`[a-z0-9]{6}.[a-z0-9]{16}`).
    pub token: String,
}

/// The CAs and the service-account key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleCerts {
    /// etcd CA: peer, server and client certificates of etcd.
    pub etcd: PemCertAndKey,
    /// Kubernetes CA.
    pub k8s: PemCertAndKey,
    /// Kubernetes front-proxy (aggregation layer) CA.
    pub k8saggregator: PemCertAndKey,
    /// Kubernetes service-account signing key.
    pub k8sserviceaccount: PemKey,
    /// OS API CA: node API servers and `kiln` client certificates.
    pub os: PemCertAndKey,
}

/// Everything `kiln gen secrets` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsBundle {
    /// Cluster identity.
    pub cluster: ClusterIdentity,
    /// Tokens and the secretbox key.
    pub secrets: Secrets,
    /// Machine token.
    pub trustdinfo: TrustdInfo,
    /// CAs and keys.
    pub certs: BundleCerts,
}

/// Why a secrets bundle could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The YAML does not have the shape of a secrets bundle.
    #[error("not a secrets bundle: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A field that should hold base64 PEM does not.
    #[error("{field}: {source}")]
    Decode {
        /// Field path in the bundle.
        field: &'static str,
        /// What was wrong.
        source: PemDecodeError,
    },
    /// A CA in the bundle is unusable.
    #[error("{field}: {source}")]
    Ca {
        /// Field path in the bundle.
        field: &'static str,
        /// What was wrong.
        source: CaError,
    },
    /// The service-account key is unusable.
    #[error("certs.k8sserviceaccount.key: {0}")]
    ServiceAccountKey(#[source] KeyError),
    /// A token has the wrong shape.
    #[error("{field}: {source}")]
    Token {
        /// Field path in the bundle.
        field: &'static str,
        /// What was wrong.
        source: TokenError,
    },
    /// Importing a kubeadm PKI directory failed.
    #[error(transparent)]
    Kubeadm(#[from] KubeadmImportError),
    /// Generating a CA failed.
    #[error("generating the {what} CA: {source}")]
    Generate {
        /// Which CA.
        what: &'static str,
        /// What was wrong.
        source: CaError,
    },
}

fn random_b64() -> String {
    let bytes: [u8; 32] = rand::random();
    STANDARD.encode(bytes)
}

fn generate_ca(
    what: &'static str,
    cn: &str,
    alg: KeyAlgorithm,
) -> Result<PemCertAndKey, SecretsError> {
    let ca = CertificateAuthority::generate(cn, Some(cn), alg, CA_VALIDITY)
        .map_err(|source| SecretsError::Generate { what, source })?;
    Ok(PemCertAndKey::from_pem(ca.cert_pem(), ca.key_pem()))
}

fn generate_service_account_key() -> Result<PemKey, SecretsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
        SecretsError::Generate {
            what: "service-account",
            source: CaError::Sign {
                action: "generating the key",
                source: e,
            },
        }
    })?;
    Ok(PemKey::from_pem(&key.serialize_pem()))
}

impl SecretsBundle {
    /// Creates new CAs, keys and tokens.
    pub fn generate() -> Result<Self, SecretsError> {
        Ok(Self {
            cluster: ClusterIdentity {
                id: random_b64(),
                secret: random_b64(),
            },
            secrets: Secrets {
                bootstraptoken: generate_token(),
                secretboxencryptionsecret: random_b64(),
            },
            trustdinfo: TrustdInfo {
                token: generate_token(),
            },
            certs: BundleCerts {
                etcd: generate_ca("etcd", "etcd", KeyAlgorithm::EcdsaP256)?,
                k8s: generate_ca("Kubernetes", "kubernetes", KeyAlgorithm::EcdsaP256)?,
                k8saggregator: generate_ca(
                    "aggregator",
                    "front-proxy-ca",
                    KeyAlgorithm::EcdsaP256,
                )?,
                k8sserviceaccount: generate_service_account_key()?,
                os: generate_ca("OS API", "kiln", KeyAlgorithm::Ed25519)?,
            },
        })
    }

    /// Imports a kubeadm PKI directory (`/etc/kubernetes/pki` of a control-plane node):
    /// the Kubernetes, front-proxy and etcd CAs and the service-account key are taken from it,
    /// `bootstrap_token` becomes the bootstrap token, the rest is generated.
    pub fn from_kubernetes_pki(dir: &Path, bootstrap_token: &str) -> Result<Self, SecretsError> {
        validate_token(bootstrap_token).map_err(|source| SecretsError::Token {
            field: "--kubernetes-bootstrap-token",
            source,
        })?;
        let imported = kubeadm::read_pki_dir(dir)?;
        let mut bundle = Self::generate()?;
        bundle.secrets.bootstraptoken = bootstrap_token.to_owned();
        bundle.certs.k8s = imported.kubernetes_ca;
        bundle.certs.k8saggregator = imported.front_proxy_ca;
        bundle.certs.etcd = imported.etcd_ca;
        bundle.certs.k8sserviceaccount = imported.service_account;
        Ok(bundle)
    }

    /// Parses and checks a bundle (every CA key matches its certificate, tokens are well formed).
    pub fn from_yaml(text: &str) -> Result<Self, SecretsError> {
        let bundle: Self = serde_yaml::from_str(text)?;
        bundle.check()?;
        Ok(bundle)
    }

    /// Renders the bundle as YAML.
    pub fn to_yaml(&self) -> Result<String, SecretsError> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Checks every part of the bundle.
    pub fn check(&self) -> Result<(), SecretsError> {
        validate_token(&self.secrets.bootstraptoken).map_err(|source| SecretsError::Token {
            field: "secrets.bootstraptoken",
            source,
        })?;
        validate_token(&self.trustdinfo.token).map_err(|source| SecretsError::Token {
            field: "trustdinfo.token",
            source,
        })?;
        for (field, _) in self.cas() {
            self.ca(field)?;
        }
        let sa = self
            .certs
            .k8sserviceaccount
            .key_pem()
            .map_err(|source| SecretsError::Decode {
                field: "certs.k8sserviceaccount.key",
                source,
            })?;
        parse_private_key_pem(&sa).map_err(SecretsError::ServiceAccountKey)?;
        Ok(())
    }

    fn cas(&self) -> [(&'static str, &PemCertAndKey); 4] {
        [
            ("certs.os", &self.certs.os),
            ("certs.k8s", &self.certs.k8s),
            ("certs.k8saggregator", &self.certs.k8saggregator),
            ("certs.etcd", &self.certs.etcd),
        ]
    }

    fn ca(&self, field: &'static str) -> Result<CertificateAuthority, SecretsError> {
        let pair = self
            .cas()
            .into_iter()
            .find(|(f, _)| *f == field)
            .map(|(_, p)| p)
            .unwrap_or(&self.certs.os);
        ca_from_pair(field, pair)
    }

    /// The OS API CA.
    pub fn os_ca(&self) -> Result<CertificateAuthority, SecretsError> {
        self.ca("certs.os")
    }

    /// The Kubernetes CA.
    pub fn kubernetes_ca(&self) -> Result<CertificateAuthority, SecretsError> {
        self.ca("certs.k8s")
    }

    /// The etcd CA.
    pub fn etcd_ca(&self) -> Result<CertificateAuthority, SecretsError> {
        self.ca("certs.etcd")
    }
}

/// Loads a CA from its base64 form, naming `field` in errors.
pub(crate) fn ca_from_pair(
    field: &'static str,
    pair: &PemCertAndKey,
) -> Result<CertificateAuthority, SecretsError> {
    let cert = pair
        .cert_pem()
        .map_err(|source| SecretsError::Decode { field, source })?;
    let key = pair
        .key_pem()
        .map_err(|source| SecretsError::Decode { field, source })?
        .unwrap_or_default();
    CertificateAuthority::from_pem(&cert, &key).map_err(|source| SecretsError::Ca { field, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bundle_round_trips_and_checks() {
        let bundle = SecretsBundle::generate().unwrap();
        let text = bundle.to_yaml().unwrap();
        let back = SecretsBundle::from_yaml(&text).unwrap();
        assert_eq!(bundle, back);
    }

    #[test]
    fn swapped_keys_are_caught() {
        let mut bundle = SecretsBundle::generate().unwrap();
        std::mem::swap(&mut bundle.certs.k8s.key, &mut bundle.certs.etcd.key);
        let err = bundle.check().unwrap_err().to_string();
        assert!(err.starts_with("certs.k8s:"), "{err}");
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let bundle = SecretsBundle::generate().unwrap();
        let text = bundle
            .to_yaml()
            .unwrap()
            .replace("trustdinfo:", "trustdinfo:\n  extra: 1");
        let err = SecretsBundle::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }
}
