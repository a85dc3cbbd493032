//! OCI image layouts (directories and `tar` archives of them) in and out of a registry, so an
//! air-gapped machine can be filled from files: [`push_archive`] uploads an image from a
//! layout, [`export`] writes one (with every platform of an index) into a layout archive.
//! [`build_image`] writes a small multi-layer image into a layout, for tests and benchmarks.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::client::{ClientError, RegistryClient};
use crate::manifest::{self, Descriptor, ParsedManifest};
use crate::reference::{Digest, Reference, RepoName};

/// The annotation naming an image in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Moving an archive in or out failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing files failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The layout's JSON is not valid.
    #[error("{path}: {reason}")]
    Layout {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The layout holds several images and none is named as asked.
    #[error(
        "the archive holds {count} images and none is named {wanted:?} (names: {names:?}); pass the tag of one"
    )]
    Ambiguous {
        /// Images in the index.
        count: usize,
        /// The name asked for.
        wanted: String,
        /// The names present.
        names: Vec<String>,
    },
    /// A manifest in the layout or registry is not valid.
    #[error("manifest {digest}: {source}")]
    Manifest {
        /// Which.
        digest: String,
        /// Why.
        source: manifest::ManifestError,
    },
    /// A blob's content does not match its digest.
    #[error("blob {digest} in the layout has digest {actual}")]
    Corrupt {
        /// Expected.
        digest: Digest,
        /// Found.
        actual: Digest,
    },
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] ClientError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Creates an empty layout in `dir`.
    pub fn create(dir: &Path) -> Result<Self, ArchiveError> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err("create", &blobs))?;
        let marker = dir.join("oci-layout");
        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(io_err("write", &marker))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<Self, ArchiveError> {
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            return Err(ArchiveError::Layout {
                path: marker,
                reason: "not an OCI image layout (no oci-layout file)".to_owned(),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` is.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    /// Writes a blob; returns its digest.
    pub fn write_blob(&self, data: &[u8]) -> Result<Digest, ArchiveError> {
        let d = Digest::of(data);
        let p = self.blob_path(&d);
        std::fs::write(&p, data).map_err(io_err("write", &p))?;
        Ok(d)
    }

    /// Reads a blob.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, ArchiveError> {
        let p = self.blob_path(digest);
        std::fs::read(&p).map_err(io_err("read", &p))
    }

    /// The manifests listed in `index.json`.
    pub fn index(&self) -> Result<Vec<Descriptor>, ArchiveError> {
        let p = self.dir.join("index.json");
        let bytes = std::fs::read(&p).map_err(io_err("read", &p))?;
        let parsed = ParsedManifest::parse(&bytes, Some(manifest::OCI_INDEX)).map_err(|e| {
            ArchiveError::Layout {
                path: p.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(parsed.manifests)
    }

    /// Writes `index.json` listing `manifests`.
    pub fn write_index(&self, manifests: &[Descriptor]) -> Result<(), ArchiveError> {
        let p = self.dir.join("index.json");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_INDEX,
            "manifests": manifests,
        });
        std::fs::write(&p, index.to_string()).map_err(io_err("write", &p))
    }
}

/// Picks the image named `tag` from a layout index, or its only image.
pub fn select<'a>(index: &'a [Descriptor], tag: &str) -> Result<&'a Descriptor, ArchiveError> {
    let name_of = |d: &Descriptor| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    if let Some(d) = index
        .iter()
        .find(|d| name_of(d).is_some_and(|n| n == tag || n.ends_with(&format!(":{tag}"))))
    {
        return Ok(d);
    }
    match index {
        [only] => Ok(only),
        _ => Err(ArchiveError::Ambiguous {
            count: index.len(),
            wanted: tag.to_owned(),
            names: index.iter().filter_map(name_of).collect(),
        }),
    }
}

/// Unpacks a layout archive (or uses a layout directory as it is).
fn open_layout(file: &Path, scratch: &Path) -> Result<OciLayout, ArchiveError> {
    if file.is_dir() {
        return OciLayout::open(file);
    }
    let f = std::fs::File::open(file).map_err(io_err("open", file))?;
    // `tar` refuses entries that would land outside the target directory.
    tar::Archive::new(f)
        .unpack(scratch)
        .map_err(io_err("unpack", file))?;
    OciLayout::open(scratch)
}

/// Pushes the image named by `reference`'s tag (or the only image) from a layout archive or
/// directory to `name` in the registry; returns the pushed manifest's digest.
pub async fn push_archive(
    client: &RegistryClient,
    file: &Path,
    name: &RepoName,
    reference: &Reference,
) -> Result<Digest, ArchiveError> {
    let scratch =
        tempfile::tempdir().map_err(io_err("create temporary directory", Path::new("/tmp")))?;
    let (file2, scratch_path) = (file.to_owned(), scratch.path().to_owned());
    let layout = tokio::task::spawn_blocking(move || open_layout(&file2, &scratch_path))
        .await
        .map_err(|e| io_err("unpack", file)(io::Error::other(e)))??;
    let index = layout.index()?;
    let tag = match reference {
        Reference::Tag(t) => t.as_str().to_owned(),
        Reference::Digest(d) => d.to_string(),
    };
    let root = select(&index, &tag)?.clone();
    let digest = push_tree(client, &layout, name, &root, reference).await?;
    tracing::info!(%name, %reference, %digest, "pushed archive");
    Ok(digest)
}

/// Pushes a manifest and everything below it; the root goes under `reference`, children by
/// digest.
async fn push_tree(
    client: &RegistryClient,
    layout: &OciLayout,
    name: &RepoName,
    root: &Descriptor,
    reference: &Reference,
) -> Result<Digest, ArchiveError> {
    // Depth-first, children before parents, so every manifest's references exist when pushed.
    let mut stack = vec![(root.clone(), false)];
    let root_digest = root.digest().map_err(|source| ArchiveError::Manifest {
        digest: root.digest.clone(),
        source,
    })?;
    while let Some((desc, expanded)) = stack.pop() {
        let digest = desc.digest().map_err(|source| ArchiveError::Manifest {
            digest: desc.digest.clone(),
            source,
        })?;
        let bytes = layout.read_blob(&digest)?;
        let actual = Digest::of(&bytes);
        if actual != digest {
            return Err(ArchiveError::Corrupt { digest, actual });
        }
        let parsed = ParsedManifest::parse(&bytes, Some(&desc.media_type)).map_err(|source| {
            ArchiveError::Manifest {
                digest: digest.to_string(),
                source,
            }
        })?;
        if !expanded {
            stack.push((desc.clone(), true));
            for child in &parsed.manifests {
                stack.push((child.clone(), false));
            }
            continue;
        }
        for blob in &parsed.blobs {
            let bd = blob.digest().map_err(|source| ArchiveError::Manifest {
                digest: blob.digest.clone(),
                source,
            })?;
            client
                .push_blob_file(name, &bd, &layout.blob_path(&bd))
                .await?;
        }
        let target = if digest == root_digest {
            reference.clone()
        } else {
            Reference::Digest(digest.clone())
        };
        client
            .put_manifest(name, &target, &parsed.media_type, Bytes::from(bytes))
            .await?;
    }
    Ok(root_digest)
}

/// Exports `name:reference` from the registry, with every manifest and blob below it, into an
/// OCI layout archive at `file`; returns the root manifest's digest.
pub async fn export(
    client: &RegistryClient,
    name: &RepoName,
    reference: &Reference,
    file: &Path,
) -> Result<Digest, ArchiveError> {
    let scratch =
        tempfile::tempdir().map_err(io_err("create temporary directory", Path::new("/tmp")))?;
    let layout = OciLayout::create(scratch.path())?;
    let (media_type, bytes, root) = client.get_manifest(name, reference).await?;
    let root_desc = Descriptor {
        media_type: media_type.clone(),
        digest: root.to_string(),
        size: bytes.len() as u64,
        annotations: match reference {
            Reference::Tag(t) => {
                let mut a = serde_json::Map::new();
                a.insert(REF_NAME.to_owned(), t.as_str().into());
                Some(a)
            }
            Reference::Digest(_) => None,
        },
        platform: None,
    };
    let mut queue = vec![(media_type, bytes)];
    while let Some((media_type, bytes)) = queue.pop() {
        layout.write_blob(&bytes)?;
        let parsed = ParsedManifest::parse(&bytes, Some(&media_type)).map_err(|source| {
            ArchiveError::Manifest {
                digest: Digest::of(&bytes).to_string(),
                source,
            }
        })?;
        for child in &parsed.manifests {
            let d = child.digest().map_err(|source| ArchiveError::Manifest {
                digest: child.digest.clone(),
                source,
            })?;
            let (mt, b, _) = client.get_manifest(name, &Reference::Digest(d)).await?;
            queue.push((mt, b));
        }
        for blob in &parsed.blobs {
            let d = blob.digest().map_err(|source| ArchiveError::Manifest {
                digest: blob.digest.clone(),
                source,
            })?;
            download_blob(client, name, &d, &layout.blob_path(&d)).await?;
        }
    }
    layout.write_index(&[root_desc])?;
    let (dir, out) = (scratch.path().to_owned(), file.to_owned());
    tokio::task::spawn_blocking(move || write_tar(&dir, &out))
        .await
        .map_err(|e| io_err("write", file)(io::Error::other(e)))??;
    Ok(root)
}

async fn download_blob(
    client: &RegistryClient,
    name: &RepoName,
    digest: &Digest,
    path: &Path,
) -> Result<(), ArchiveError> {
    use futures_util::StreamExt as _;
    use sha2::Digest as _;
    let resp = client.get_blob(name, digest).await?;
    let mut out = std::fs::File::create(path).map_err(io_err("create", path))?;
    let mut hasher = sha2::Sha256::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| ClientError::Http {
            url: format!("blob {digest}"),
            source,
        })?;
        hasher.update(&chunk);
        out.write_all(&chunk).map_err(io_err("write", path))?;
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
    if actual != *digest {
        return Err(ArchiveError::Corrupt {
            digest: digest.clone(),
            actual,
        });
    }
    Ok(())
}

fn write_tar(dir: &Path, out: &Path) -> Result<(), ArchiveError> {
    let f = std::fs::File::create(out).map_err(io_err("create", out))?;
    let mut b = tar::Builder::new(io::BufWriter::new(f));
    b.mode(tar::HeaderMode::Deterministic);
    for name in ["oci-layout", "index.json", "blobs"] {
        let p = dir.join(name);
        let r = if p.is_dir() {
            b.append_dir_all(name, &p)
        } else {
            b.append_path_with_name(&p, name)
        };
        r.map_err(io_err("write", out))?;
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(io_err("write", out))
}

/// Which media types [`build_image`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// OCI image manifest, config and layers.
    Oci,
    /// Docker schema 2 manifest, config and layers.
    Docker,
}

/// Writes an image into `layout` (and names it `tag` in `index.json`): one gzip-compressed
/// tar layer per entry of `layers`, each a list of `(path, contents)` files (mode 0644), and a
/// config whose `rootfs.diff_ids` match the layers, so container engines can unpack it.
pub fn build_image(
    layout: &OciLayout,
    layers: &[Vec<(String, Vec<u8>)>],
    format: ImageFormat,
    tag: &str,
) -> Result<Descriptor, ArchiveError> {
    let err = |e: io::Error| ArchiveError::Io {
        what: "build layer",
        path: layout.dir().to_owned(),
        source: e,
    };
    let mut tars = Vec::new();
    for files in layers {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, path, data.as_slice())
                .map_err(err)?;
        }
        tars.push(tar.into_inner().map_err(err)?);
    }
    build_image_from_tars(
        layout,
        &tars,
        &serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}),
        format,
        tag,
    )
}

/// Writes an image of ready tar layers (uncompressed; each is gzip-compressed here) with
/// `run_config` as the config's `config` (`Entrypoint`, `Env`, `Labels`, ...) into `layout`,
/// and names it `tag` in `index.json`.
pub fn build_image_from_tars(
    layout: &OciLayout,
    tars: &[Vec<u8>],
    run_config: &serde_json::Value,
    format: ImageFormat,
    tag: &str,
) -> Result<Descriptor, ArchiveError> {
    let (manifest_type, config_type, layer_type) = match format {
        ImageFormat::Oci => (
            manifest::OCI_MANIFEST,
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        ImageFormat::Docker => (
            manifest::DOCKER_MANIFEST,
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    };
    let err = |e: io::Error| ArchiveError::Io {
        what: "build layer",
        path: layout.dir().to_owned(),
        source: e,
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for raw in tars {
        diff_ids.push(Digest::of(raw).to_string());
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::fast());
        gz.write_all(raw).map_err(err)?;
        let compressed = gz.finish().map_err(err)?;
        let d = layout.write_blob(&compressed)?;
        layer_descs.push(serde_json::json!({"mediaType": layer_type, "digest": d.to_string(), "size": compressed.len()}));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": diff_ids.iter().map(|_| serde_json::json!({"created_by": "kiln build_image"})).collect::<Vec<_>>(),
    })
    .to_string();
    let config_digest = layout.write_blob(config.as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest.to_string(), "size": config.len()},
        "layers": layer_descs,
    })
    .to_string();
    let digest = layout.write_blob(manifest.as_bytes())?;
    let mut annotations = serde_json::Map::new();
    annotations.insert(REF_NAME.to_owned(), tag.into());
    let desc = Descriptor {
        media_type: manifest_type.to_owned(),
        digest: digest.to_string(),
        size: manifest.len() as u64,
        annotations: Some(annotations),
        platform: None,
    };
    let mut index = if layout.dir().join("index.json").exists() {
        layout.index()?
    } else {
        Vec::new()
    };
    index.push(desc.clone());
    layout.write_index(&index)?;
    Ok(desc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_layout_and_selects_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let a = build_image(
            &layout,
            &[vec![("a".into(), b"1".to_vec())]],
            ImageFormat::Oci,
            "v1",
        )
        .unwrap();
        let b = build_image(
            &layout,
            &[vec![("b".into(), b"2".to_vec())]],
            ImageFormat::Docker,
            "v2",
        )
        .unwrap();
        let index = OciLayout::open(dir.path()).unwrap().index().unwrap();
        assert_eq!(index.len(), 2);
        assert_eq!(select(&index, "v1").unwrap(), &a);
        assert_eq!(select(&index, "v2").unwrap(), &b);
        assert!(matches!(
            select(&index, "v3"),
            Err(ArchiveError::Ambiguous { .. })
        ));
        let m =
            ParsedManifest::parse(&layout.read_blob(&b.digest().unwrap()).unwrap(), None).unwrap();
        assert_eq!(m.media_type, manifest::DOCKER_MANIFEST);
        assert_eq!(m.blobs.len(), 2);
    }
}
