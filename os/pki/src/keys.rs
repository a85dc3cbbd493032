//! Private keys from PEM in the three encodings that tools write: PKCS#8 (`PRIVATE KEY`),
//! PKCS#1 (`RSA PRIVATE KEY`, kubeadm and older OpenSSL) and SEC1 (`EC PRIVATE KEY`).
//!
//! rcgen's `ring` backend reads PKCS#8 only, so the other two are re-wrapped as PKCS#8 first.

use pkcs8::der::asn1::{AnyRef, Null, ObjectIdentifier};
use pkcs8::der::{Decode as _, Encode as _};
use rcgen::KeyPair;

const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");

/// A private key that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not PEM.
    #[error("not a PEM private key: {0}")]
    Pem(#[from] pem::PemError),
    /// PEM of something other than a private key.
    #[error(
        "PEM block is {0:?}, expected \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" \
         (encrypted keys are not supported; decrypt with `openssl pkey -in KEY -out KEY.plain`)"
    )]
    UnexpectedBlock(String),
    /// The DER inside the PEM block is malformed.
    #[error("malformed {kind} key: {reason}")]
    Malformed {
        /// PKCS#1, SEC1 or PKCS#8.
        kind: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// A well-formed key of a type or size that cannot sign.
    #[error("unsupported private key: {0} (supported: Ed25519, ECDSA P-256/P-384, RSA 2048-8192)")]
    Unsupported(rcgen::Error),
}

/// Reads a private key from PEM, whichever of PKCS#8, PKCS#1 or SEC1 it is.
pub fn parse_private_key_pem(text: &str) -> Result<KeyPair, KeyError> {
    let block = pem::parse(text)?;
    let pkcs8 = match block.tag() {
        "PRIVATE KEY" => block.contents().to_vec(),
        "RSA PRIVATE KEY" => rsa_pkcs1_to_pkcs8(block.contents())?,
        "EC PRIVATE KEY" => sec1_to_pkcs8(block.contents())?,
        other => return Err(KeyError::UnexpectedBlock(other.to_owned())),
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(KeyError::Unsupported)
}

fn malformed(kind: &'static str) -> impl Fn(pkcs8::der::Error) -> KeyError {
    move |e| KeyError::Malformed {
        kind,
        reason: e.to_string(),
    }
}

fn rsa_pkcs1_to_pkcs8(der: &[u8]) -> Result<Vec<u8>, KeyError> {
    // Decoding checks that this really is an RSAPrivateKey before we wrap it.
    pkcs1::RsaPrivateKey::from_der(der).map_err(malformed("PKCS#1"))?;
    let info = pkcs8::PrivateKeyInfo {
        algorithm: pkcs8::AlgorithmIdentifierRef {
            oid: OID_RSA_ENCRYPTION,
            parameters: Some(AnyRef::from(Null)),
        },
        private_key: der,
        public_key: None,
    };
    info.to_der().map_err(malformed("PKCS#8"))
}

fn sec1_to_pkcs8(der: &[u8]) -> Result<Vec<u8>, KeyError> {
    let key = sec1::EcPrivateKey::from_der(der).map_err(malformed("SEC1"))?;
    let curve = key
        .parameters
        .and_then(|p| p.named_curve())
        .ok_or_else(|| KeyError::Malformed {
            kind: "SEC1",
            reason: "the key does not name its curve".to_owned(),
        })?;
    // PKCS#8 carries the curve in the algorithm identifier; the inner key must not repeat it.
    let inner = sec1::EcPrivateKey {
        parameters: None,
        ..key
    }
    .to_der()
    .map_err(malformed("SEC1"))?;
    let info = pkcs8::PrivateKeyInfo {
        algorithm: pkcs8::AlgorithmIdentifierRef {
            oid: OID_EC_PUBLIC_KEY,
            parameters: Some(AnyRef::from(&curve)),
        },
        private_key: &inner,
        public_key: None,
    };
    info.to_der().map_err(malformed("PKCS#8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_generated_pkcs8() {
        let key = KeyPair::generate().unwrap();
        let back = parse_private_key_pem(&key.serialize_pem()).unwrap();
        use rcgen::PublicKeyData as _;
        assert_eq!(
            key.subject_public_key_info(),
            back.subject_public_key_info()
        );
    }

    #[test]
    fn rejects_other_blocks() {
        let text = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_private_key_pem(text),
            Err(KeyError::UnexpectedBlock(_))
        ));
        assert!(matches!(
            parse_private_key_pem("garbage"),
            Err(KeyError::Pem(_))
        ));
    }
}
