//! The four manifest formats the registry understands (OCI image manifest and index, Docker
//! schema 2 manifest and manifest list), reduced to what a registry needs: the media type and
//! the descriptors a manifest refers to.
//!
//! Written by hand rather than with `oci-spec`: a registry must accept OCI and Docker formats
//! alike, unknown fields included, and only reads `mediaType`, `config`, `layers`,
//! `manifests` and `subject`, which a few lines of serde cover for all four.

use serde::{Deserialize, Serialize};

use crate::reference::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The `Accept` header the mirror and the archive commands send.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(default)]
    pub media_type: String,
    /// Its digest, as text (validated by [`Descriptor::digest`]).
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Annotations (kept for image layouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    /// Platform of an index entry (kept for image layouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    /// The validated digest.
    pub fn digest(&self) -> Result<Digest, ManifestError> {
        self.digest
            .parse()
            .map_err(|_| ManifestError::BadDigest(self.digest.clone()))
    }

    /// Whether this descriptor points at another manifest.
    pub fn is_manifest(&self) -> bool {
        is_manifest_type(&self.media_type)
    }
}

/// Whether `media_type` is one of the manifest types served from `/manifests/`.
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
}

/// A manifest could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// `schemaVersion` is not 2.
    #[error("manifest schemaVersion must be 2 (schema 1 is not supported)")]
    SchemaVersion,
    /// The media type is not one of the four supported.
    #[error("unsupported manifest media type {0:?}")]
    MediaType(String),
    /// The body's `mediaType` and the `Content-Type` disagree.
    #[error("Content-Type {header:?} does not match the manifest's mediaType {body:?}")]
    MediaTypeMismatch {
        /// From the request header.
        header: String,
        /// From the body.
        body: String,
    },
    /// A descriptor's digest is malformed.
    #[error("descriptor digest {0:?} is not a sha256 digest")]
    BadDigest(String),
}

/// What a parsed manifest refers to.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    /// Its media type.
    pub media_type: String,
    /// Config and layers (image manifests).
    pub blobs: Vec<Descriptor>,
    /// Child manifests (indexes and manifest lists).
    pub manifests: Vec<Descriptor>,
}

impl ParsedManifest {
    /// Parses `bytes`; `content_type` is the request's `Content-Type`, if any.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self, ManifestError> {
        let raw: RawManifest = serde_json::from_slice(bytes)?;
        if raw.schema_version != Some(2) {
            return Err(ManifestError::SchemaVersion);
        }
        let header = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| is_manifest_type(c));
        let media_type = match (&raw.media_type, header) {
            (Some(body), Some(h)) if body != h => {
                return Err(ManifestError::MediaTypeMismatch {
                    header: h.to_owned(),
                    body: body.clone(),
                });
            }
            (Some(body), _) => body.clone(),
            (None, Some(h)) => h.to_owned(),
            (None, None) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
            (None, None) => OCI_MANIFEST.to_owned(),
        };
        if !is_manifest_type(&media_type) {
            return Err(ManifestError::MediaType(media_type));
        }
        let mut blobs: Vec<Descriptor> = raw.config.into_iter().chain(raw.layers).collect();
        let mut manifests = raw.manifests.unwrap_or_default();
        if let Some(subject) = raw.subject {
            // The subject of a referrer may legitimately be absent; it is not required here.
            let _ = subject.digest()?;
        }
        for d in blobs.iter_mut().chain(manifests.iter_mut()) {
            d.digest()?;
        }
        Ok(Self {
            media_type,
            blobs,
            manifests,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_types() {
        let d = Digest::of(b"x");
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"a","digest":"{d}","size":1}},"layers":[{{"mediaType":"b","digest":"{d}","size":1}}]}}"#
        );
        let m = ParsedManifest::parse(image.as_bytes(), None).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert_eq!(m.blobs.len(), 2);
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}]}}"#
        );
        let m = ParsedManifest::parse(index.as_bytes(), None).unwrap();
        assert_eq!(m.media_type, OCI_INDEX);
        assert_eq!(m.manifests.len(), 1);
        let m = ParsedManifest::parse(index.as_bytes(), Some(DOCKER_MANIFEST_LIST)).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST_LIST);
        assert!(matches!(
            ParsedManifest::parse(image.as_bytes(), Some(OCI_MANIFEST)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        assert!(ParsedManifest::parse(br#"{"schemaVersion":1}"#, None).is_err());
        assert!(ParsedManifest::parse(b"not json", None).is_err());
        let bad = r#"{"schemaVersion":2,"layers":[{"digest":"sha256:zz","size":1}]}"#;
        assert!(matches!(
            ParsedManifest::parse(bad.as_bytes(), None),
            Err(ManifestError::BadDigest(_))
        ));
    }
}
