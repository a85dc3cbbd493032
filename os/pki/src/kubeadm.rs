//! Import of a kubeadm PKI directory (`/etc/kubernetes/pki`) for migrations.

use std::path::{Path, PathBuf};

use crate::ca::{CaError, CertificateAuthority};
use crate::encoding::{PemCertAndKey, PemKey};
use crate::keys::{KeyError, parse_private_key_pem};
use rcgen::PublicKeyData as _;

/// Why a kubeadm PKI directory could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum KubeadmImportError {
    /// A file the import needs is not there.
    #[error(
        "kubeadm PKI directory {dir}: {file} ({what}) is missing; copy the whole \
         /etc/kubernetes/pki directory from a control-plane node of the kubeadm cluster"
    )]
    MissingFile {
        /// The directory given.
        dir: PathBuf,
        /// The file, relative to the directory.
        file: &'static str,
        /// What the file is.
        what: &'static str,
    },
    /// A file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA certificate and key are unusable together.
    #[error("{cert} and {key}: {source}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What was wrong.
        source: CaError,
    },
    /// The service-account key cannot be read.
    #[error("{path}: {source}")]
    ServiceAccountKey {
        /// The key file.
        path: PathBuf,
        /// What was wrong.
        source: KeyError,
    },
    /// `sa.pub` is not the public half of `sa.key`.
    #[error(
        "{public} is not the public key of {private}; check that both come from the same \
         control-plane node"
    )]
    ServiceAccountMismatch {
        /// `sa.pub`.
        public: PathBuf,
        /// `sa.key`.
        private: PathBuf,
    },
}

/// The parts of a kubeadm PKI directory Kiln takes over.
#[derive(Debug)]
pub(crate) struct KubeadmPki {
    pub(crate) kubernetes_ca: PemCertAndKey,
    pub(crate) front_proxy_ca: PemCertAndKey,
    pub(crate) etcd_ca: PemCertAndKey,
    pub(crate) service_account: PemKey,
}

fn read(dir: &Path, file: &'static str, what: &'static str) -> Result<String, KubeadmImportError> {
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(KubeadmImportError::MissingFile {
                dir: dir.to_owned(),
                file,
                what,
            })
        }
        Err(source) => Err(KubeadmImportError::Read { path, source }),
    }
}

fn read_ca(
    dir: &Path,
    cert_file: &'static str,
    key_file: &'static str,
    what: &'static str,
) -> Result<PemCertAndKey, KubeadmImportError> {
    let cert = read(dir, cert_file, what)?;
    let key = read(dir, key_file, what)?;
    CertificateAuthority::from_pem(&cert, &key).map_err(|source| KubeadmImportError::Pair {
        cert: dir.join(cert_file),
        key: dir.join(key_file),
        source,
    })?;
    Ok(PemCertAndKey::from_pem(&cert, &key))
}

pub(crate) fn read_pki_dir(dir: &Path) -> Result<KubeadmPki, KubeadmImportError> {
    let kubernetes_ca = read_ca(dir, "ca.crt", "ca.key", "the Kubernetes CA")?;
    let front_proxy_ca = read_ca(
        dir,
        "front-proxy-ca.crt",
        "front-proxy-ca.key",
        "the front-proxy CA",
    )?;
    let etcd_ca = read_ca(dir, "etcd/ca.crt", "etcd/ca.key", "the etcd CA")?;

    let sa_key = read(dir, "sa.key", "the service-account private key")?;
    let key =
        parse_private_key_pem(&sa_key).map_err(|source| KubeadmImportError::ServiceAccountKey {
            path: dir.join("sa.key"),
            source,
        })?;
    let sa_pub = read(dir, "sa.pub", "the service-account public key")?;
    let public_matches = pem::parse(&sa_pub)
        .map(|block| block.contents() == key.subject_public_key_info().as_slice())
        .unwrap_or(false);
    if !public_matches {
        return Err(KubeadmImportError::ServiceAccountMismatch {
            public: dir.join("sa.pub"),
            private: dir.join("sa.key"),
        });
    }
    Ok(KubeadmPki {
        kubernetes_ca,
        front_proxy_ca,
        etcd_ca,
        service_account: PemKey::from_pem(&sa_key),
    })
}
