//! Pulling a Kiln OS installer image: its manifest (the linux/amd64 entry of an index), the
//! version from the image configuration's labels, and its layers unpacked into a directory.
//! Used by machined for `upgrade` (through the node's registry mirrors) and by the lab for
//! `cluster create --install-image`.

use std::path::{Path, PathBuf};

use futures_util::StreamExt as _;
use serde::Deserialize;

use crate::client::{ClientError, RegistryClient};
use crate::reference::{Digest, Reference, RepoName};

/// The label of the image configuration that carries the OS version.
pub const VERSION_LABEL: &str = "org.opencontainers.image.version";

/// Why an installer could not be pulled.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// The registry refused or could not be reached.
    #[error(transparent)]
    Registry(#[from] ClientError),
    /// A document is not what an installer has.
    #[error("{what} of {image}: {reason}")]
    Invalid {
        /// Which document.
        what: &'static str,
        /// The image.
        image: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing the unpacked files failed.
    #[error("unpacking into {path}: {source}")]
    Unpack {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A pulled installer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledInstaller {
    /// The OS version from the image configuration.
    pub version: String,
    /// The manifest's digest.
    pub digest: Digest,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Entry>,
    #[serde(default)]
    config: Option<Entry>,
    #[serde(default)]
    layers: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    config: Option<ConfigSection>,
}

#[derive(Debug, Deserialize)]
struct ConfigSection {
    #[serde(default, rename = "Labels")]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// Pulls `name:reference` with `client` and unpacks its layers into `dest` (created; it should
/// be empty). Digests of the manifest, configuration and layers are checked.
pub async fn pull(
    client: &RegistryClient,
    name: &RepoName,
    reference: &Reference,
    dest: &Path,
) -> Result<PulledInstaller, InstallerError> {
    let image = format!("{name}:{reference}");
    let invalid = |what, reason: String| InstallerError::Invalid {
        what,
        image: image.clone(),
        reason,
    };
    let (_, bytes, mut digest) = client.get_manifest(name, reference).await?;
    let mut doc: Doc =
        serde_json::from_slice(&bytes).map_err(|e| invalid("manifest", e.to_string()))?;
    if doc.config.is_none() && !doc.manifests.is_empty() {
        // An index: take the linux/amd64 image (or the only one).
        let pick = doc
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .or_else(|| doc.manifests.first().filter(|_| doc.manifests.len() == 1))
            .ok_or_else(|| invalid("index", "it lists no linux/amd64 image".into()))?;
        let d: Digest = pick
            .digest
            .parse()
            .map_err(|e: crate::reference::InvalidReference| invalid("index", e.to_string()))?;
        let (_, bytes, _) = client
            .get_manifest(name, &Reference::Digest(d.clone()))
            .await?;
        digest = d;
        doc = serde_json::from_slice(&bytes).map_err(|e| invalid("manifest", e.to_string()))?;
    }
    let config = doc.config.as_ref().ok_or_else(|| {
        invalid(
            "manifest",
            format!(
                "it has no image configuration (media type {})",
                doc.media_type.as_deref().unwrap_or("unknown")
            ),
        )
    })?;
    let config_bytes = fetch(client, name, &config.digest, &image).await?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid("image configuration", e.to_string()))?;
    let version = config
        .config
        .and_then(|c| c.labels)
        .and_then(|l| l.get(VERSION_LABEL).cloned())
        .ok_or_else(|| {
            invalid(
                "image configuration",
                format!("no {VERSION_LABEL} label: this is not a Kiln OS installer"),
            )
        })?;
    std::fs::create_dir_all(dest).map_err(|source| InstallerError::Unpack {
        path: dest.to_owned(),
        source,
    })?;
    for layer in &doc.layers {
        let data = fetch(client, name, &layer.digest, &image).await?;
        let gz = layer.media_type.ends_with("gzip");
        let dest = dest.to_owned();
        tokio::task::spawn_blocking(move || unpack(&data, gz, &dest))
            .await
            .map_err(|e| InstallerError::Unpack {
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })??;
    }
    Ok(PulledInstaller { version, digest })
}

async fn fetch(
    client: &RegistryClient,
    name: &RepoName,
    digest: &str,
    image: &str,
) -> Result<Vec<u8>, InstallerError> {
    let d: Digest = digest
        .parse()
        .map_err(
            |e: crate::reference::InvalidReference| InstallerError::Invalid {
                what: "manifest",
                image: image.to_owned(),
                reason: e.to_string(),
            },
        )?;
    let resp = client.get_blob(name, &d).await?;
    let url = resp.url().to_string();
    let mut body = resp.bytes_stream();
    let mut data = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        data.extend_from_slice(&chunk);
    }
    let actual = Digest::of(&data);
    if actual != d {
        return Err(ClientError::DigestMismatch {
            digest: d,
            url,
            actual,
        }
        .into());
    }
    Ok(data)
}

fn unpack(data: &[u8], gz: bool, dest: &Path) -> Result<(), InstallerError> {
    let err = |source| InstallerError::Unpack {
        path: dest.to_owned(),
        source,
    };
    let reader: Box<dyn std::io::Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(data))
    } else {
        Box::new(data)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.unpack(dest).map_err(err)
}
