//! Kiln PKI: the certificate authorities of a cluster, the certificates issued from them, and
//! the secrets bundle (`kiln gen secrets`) that every machine configuration is generated from.
//!
//! # Design
//!
//! - [`CertificateAuthority`] wraps a CA certificate and its key as PEM. It is created fresh
//!   ([`CertificateAuthority::generate`]) or loaded from PEM ([`CertificateAuthority::from_pem`]),
//!   which checks that the key belongs to the certificate and that the certificate is a CA.
//! - Leaf certificates ([`LeafRequest`]) carry the subject organisation, which the OS API uses as
//!   the caller's role (`os:admin`, `os:operator`, `os:reader`).
//! - [`SecretsBundle`] holds everything a cluster shares: the OS API CA, the Kubernetes CA, the
//!   aggregator CA, the etcd CA, the service-account key, the bootstrap token, the machine
//!   token and the secretbox key. It is created fresh or imported from a kubeadm PKI directory
//!   ([`SecretsBundle::from_kubernetes_pki`]).
//! - Certificates and keys travel inside YAML documents as base64 of their PEM text
//!   ([`PemCertAndKey`]), as the machine configuration of the guides does.
//!
//! # Limitations
//!
//! - New keys are Ed25519 (OS API CA) or ECDSA P-256 (everything else). RSA keys are accepted
//!   when imported (kubeadm makes them) but never generated: the `ring` backend cannot.
//! - Encrypted private keys are not supported.

mod ca;
mod encoding;
mod keys;
mod kubeadm;
mod secrets;
mod token;

pub use ca::{CaError, subject_organizations};
pub use ca::{CertificateAuthority, IssuedCertificate, KeyAlgorithm, LeafRequest, Usage};
pub use encoding::{PemCertAndKey, PemDecodeError, PemKey, decode as decode_base64_pem};
pub use keys::{KeyError, parse_private_key_pem};
pub use kubeadm::KubeadmImportError;
pub use secrets::{BundleCerts, ClusterIdentity, Secrets, SecretsBundle, SecretsError, TrustdInfo};
pub use token::{TokenError, generate_token, validate_token};

/// Organisation of client certificates with full access to the OS API.
pub const ROLE_ADMIN: &str = "os:admin";
/// Organisation of client certificates that may operate but not reconfigure nodes.
pub const ROLE_OPERATOR: &str = "os:operator";
/// Organisation of client certificates with read-only access.
pub const ROLE_READER: &str = "os:reader";
/// Every role the OS API knows, most privileged first.
pub const ROLES: [&str; 3] = [ROLE_ADMIN, ROLE_OPERATOR, ROLE_READER];
