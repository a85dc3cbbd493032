//! Certificates and keys as they appear in YAML documents: base64 of the PEM text.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// A certificate and (optionally) its private key, each the base64 of its PEM text.
///
/// A worker's copy of a CA has the certificate only: `key` is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemCertAndKey {
    /// base64 of the certificate PEM.
    #[serde(default)]
    pub crt: String,
    /// base64 of the private key PEM; empty when the holder must not have the key.
    #[serde(default)]
    pub key: String,
}

/// A private key alone, the base64 of its PEM text (the service-account key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemKey {
    /// base64 of the private key PEM.
    #[serde(default)]
    pub key: String,
}

/// Why a base64 field could not be turned back into PEM text.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not base64.
    #[error("not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// base64 of something that is not UTF-8 text.
    #[error("base64 does not hold PEM text")]
    NotText,
}

impl PemCertAndKey {
    /// Encodes PEM texts.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Self {
        Self {
            crt: encode(cert_pem),
            key: encode(key_pem),
        }
    }

    /// The same certificate without its key (what a worker gets).
    pub fn without_key(&self) -> Self {
        Self {
            crt: self.crt.clone(),
            key: String::new(),
        }
    }

    /// Decodes the certificate PEM.
    pub fn cert_pem(&self) -> Result<String, DecodeError> {
        decode(&self.crt)
    }

    /// Decodes the key PEM; `None` when there is no key.
    pub fn key_pem(&self) -> Result<Option<String>, DecodeError> {
        if self.key.is_empty() {
            Ok(None)
        } else {
            decode(&self.key).map(Some)
        }
    }

    /// Whether both the certificate and its key are present.
    pub fn has_key(&self) -> bool {
        !self.key.is_empty()
    }
}

impl PemKey {
    /// Encodes a PEM text.
    pub fn from_pem(key_pem: &str) -> Self {
        Self {
            key: encode(key_pem),
        }
    }

    /// Decodes the key PEM.
    pub fn key_pem(&self) -> Result<String, DecodeError> {
        decode(&self.key)
    }
}

pub(crate) fn encode(text: &str) -> String {
    STANDARD.encode(text.as_bytes())
}

/// Decodes the base64 of a PEM text.
pub fn decode(b64: &str) -> Result<String, DecodeError> {
    let bytes = STANDARD.decode(b64.trim())?;
    String::from_utf8(bytes).map_err(|_| DecodeError::NotText)
}

pub use DecodeError as PemDecodeError;
