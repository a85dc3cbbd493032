//! Certificate authorities and the leaf certificates they issue.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::keys::{KeyError, parse_private_key_pem};

/// Key types Kiln generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// Ed25519: small and fast; the OS API CA uses it.
    Ed25519,
    /// ECDSA on P-256: what Kubernetes and etcd tooling expect.
    EcdsaP256,
}

impl KeyAlgorithm {
    fn generate(self) -> Result<KeyPair, rcgen::Error> {
        match self {
            Self::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            Self::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        }
    }
}

/// What a leaf certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS client authentication.
    Client,
    /// TLS server authentication.
    Server,
    /// Both (etcd peers are both).
    ServerAndClient,
}

/// The subject and use of a certificate to issue.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    /// Subject common name.
    pub common_name: String,
    /// Subject organisations; the OS API reads the caller's role from here.
    pub organizations: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Client, server or both.
    pub usage: Usage,
    /// How long the certificate is valid from now.
    pub validity: Duration,
    /// Key type of the new key.
    pub algorithm: KeyAlgorithm,
}

impl LeafRequest {
    /// A client certificate for `common_name` with `role` as organisation, valid for a year.
    pub fn client(common_name: &str, role: &str) -> Self {
        Self {
            common_name: common_name.to_owned(),
            organizations: vec![role.to_owned()],
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            usage: Usage::Client,
            validity: Duration::days(365),
            algorithm: KeyAlgorithm::Ed25519,
        }
    }
}

/// A certificate and its new private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// Why a CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key generation or signing failed inside rcgen.
    #[error("{action}: {source}")]
    Sign {
        /// What was being done.
        action: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// The certificate PEM is unreadable.
    #[error("certificate is not a valid PEM X.509 certificate: {0}")]
    Certificate(String),
    /// The key is unreadable.
    #[error("private key: {0}")]
    Key(#[from] KeyError),
    /// The certificate is not a CA.
    #[error(
        "certificate {subject:?} is not a CA (basicConstraints CA:TRUE missing); \
         give the CA certificate, not a leaf"
    )]
    NotACa {
        /// Subject of the certificate.
        subject: String,
    },
    /// The key does not belong to the certificate.
    #[error(
        "the private key does not match certificate {subject:?}: the certificate holds a \
         different public key; check that the .crt and .key files are a pair"
    )]
    KeyMismatch {
        /// Subject of the certificate.
        subject: String,
    },
}

/// A certificate authority: its certificate and private key, as PEM.
#[derive(Debug, Clone)]
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn sign_err(action: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |source| CaError::Sign { action, source }
}

impl CertificateAuthority {
    /// Creates a new self-signed CA valid for `validity` from now.
    pub fn generate(
        common_name: &str,
        organization: Option<&str>,
        algorithm: KeyAlgorithm,
        validity: Duration,
    ) -> Result<Self, CaError> {
        let key = algorithm
            .generate()
            .map_err(sign_err("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(org) = organization {
            dn.push(DnType::OrganizationName, org);
        }
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(sign_err("self-signing the CA"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA from PEM, checking that the certificate is a CA and the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let der = cert_der(cert_pem)?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| CaError::Certificate(e.to_string()))?;
        let subject = cert.subject().to_string();
        if !cert.is_ca() {
            return Err(CaError::NotACa { subject });
        }
        let key = parse_private_key_pem(key_pem)?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch { subject });
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a leaf certificate with a new key.
    pub fn issue(&self, request: &LeafRequest) -> Result<IssuedCertificate, CaError> {
        let ca_key = parse_private_key_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &ca_key)
            .map_err(sign_err("reading the CA certificate"))?;
        let key = request
            .algorithm
            .generate()
            .map_err(sign_err("generating a key"))?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for org in &request.organizations {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        dn.push(DnType::CommonName, request.common_name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match request.usage {
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::ServerAndClient => {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            }
        };
        for name in &request.dns_names {
            let san = name
                .clone()
                .try_into()
                .map_err(sign_err("adding a DNS subject alternative name"))?;
            params.subject_alt_names.push(SanType::DnsName(san));
        }
        for ip in &request.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + request.validity;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(sign_err("signing the certificate"))?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn cert_der(cert_pem: &str) -> Result<Vec<u8>, CaError> {
    let block = pem::parse(cert_pem).map_err(|e| CaError::Certificate(e.to_string()))?;
    if block.tag() != "CERTIFICATE" {
        return Err(CaError::Certificate(format!(
            "PEM block is {:?}, expected \"CERTIFICATE\"",
            block.tag()
        )));
    }
    Ok(block.into_contents())
}

/// The organisations in a certificate's subject (the OS API uses the first as the role).
pub fn subject_organizations(cert_pem: &str) -> Result<Vec<String>, CaError> {
    let der = cert_der(cert_pem)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| CaError::Certificate(e.to_string()))?;
    Ok(cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_loads_back() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let ca = CertificateAuthority::generate("test", Some("kiln"), alg, Duration::days(1))
                .unwrap();
            CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        }
    }

    #[test]
    fn key_of_another_ca_is_a_mismatch() {
        let a =
            CertificateAuthority::generate("a", None, KeyAlgorithm::EcdsaP256, Duration::days(1))
                .unwrap();
        let b =
            CertificateAuthority::generate("b", None, KeyAlgorithm::EcdsaP256, Duration::days(1))
                .unwrap();
        let err = CertificateAuthority::from_pem(a.cert_pem(), b.key_pem()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("are a pair"));
    }

    #[test]
    fn leaf_is_not_a_ca() {
        let ca =
            CertificateAuthority::generate("a", None, KeyAlgorithm::Ed25519, Duration::days(1))
                .unwrap();
        let leaf = ca
            .issue(&LeafRequest::client("admin", crate::ROLE_ADMIN))
            .unwrap();
        let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, CaError::NotACa { .. }), "{err}");
        assert_eq!(
            subject_organizations(&leaf.cert_pem).unwrap(),
            vec!["os:admin"]
        );
    }
}
