//! TLS for the helpers: a self-signed certificate for an address or name (rcgen), and a rustls
//! acceptor from PEM files or from such a certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Making a certificate or a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not make the certificate.
    #[error("generating a self-signed certificate for {names:?}: {source}")]
    Generate {
        /// The subject alternative names asked for.
        names: Vec<String>,
        /// The cause.
        source: rcgen::Error,
    },
    /// A PEM file could not be read.
    #[error("reading TLS {what} {path}: {reason}; give a PEM file")]
    File {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// rustls refused the certificate and key.
    #[error("TLS configuration: {0}; do the certificate and key belong together?")]
    Config(#[from] rustls::Error),
}

/// A certificate and its key, PEM encoded.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A self-signed certificate valid for `names` (IP addresses become IP SANs).
pub fn self_signed(names: &[String]) -> Result<PemPair, TlsError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|source| {
        TlsError::Generate {
            names: names.to_vec(),
            source,
        }
    })?;
    Ok(PemPair {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    })
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An acceptor for an in-memory pair.
pub fn acceptor_from_pem(pair: &PemPair) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            what: "certificate",
            path: PathBuf::from("<memory>"),
            reason: e.to_string(),
        })?;
    let key =
        PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(|e| TlsError::File {
            what: "key",
            path: PathBuf::from("<memory>"),
            reason: e.to_string(),
        })?;
    server_config(certs, key)
}

/// An acceptor for PEM files.
pub fn acceptor_from_files(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::File {
            what: "certificate",
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        what: "key",
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    server_config(certs, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_makes_an_acceptor_and_names_the_address() {
        let pair = self_signed(&["10.5.0.1".into(), "proxy.kiln.internal".into()]).unwrap();
        assert!(pair.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        acceptor_from_pem(&pair).unwrap();
        let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser_lite(&der);
        assert!(cert, "the certificate names 10.5.0.1");
    }

    // The IP SAN is encoded as its 4 raw bytes after the [7] tag (0x87 0x04).
    fn x509_parser_lite(der: &CertificateDer<'_>) -> ((), bool) {
        let needle = [0x87, 0x04, 10, 5, 0, 1];
        ((), der.windows(needle.len()).any(|w| w == needle))
    }

    #[test]
    fn missing_files_say_which() {
        let err = acceptor_from_files(Path::new("/nonexistent/c.pem"), Path::new("/x"))
            .err()
            .unwrap();
        assert!(matches!(
            err,
            TlsError::File {
                what: "certificate",
                ..
            }
        ));
    }
}
