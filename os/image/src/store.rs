//! The image store: one directory per version under `~/.kiln/images/` with a `manifest.json`
//! recording the digests of every input and output, so a build with the same inputs is skipped
//! and `kiln image ls` can list what is there.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// The file in each image directory that describes it.
pub const MANIFEST: &str = "manifest.json";

/// One output file of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// File (or directory) name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `sha256:...` of the content; `None` for the disk image (a sparse file of mostly zeroes
    /// that is not worth reading back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What `manifest.json` records about a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// The OS version (the directory's name).
    pub version: String,
    /// When it was built, seconds since the Unix epoch.
    pub created: u64,
    /// The kernel release.
    pub kernel_release: String,
    /// Digest over all inputs (the default version is derived from it).
    pub inputs_digest: String,
    /// Each input: name → `sha256:...`.
    pub inputs: BTreeMap<String, String>,
    /// The outputs.
    pub outputs: Vec<Output>,
    /// Kernel modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Shared libraries in the initramfs.
    pub libraries: Vec<String>,
    /// The installer image's manifest digest, when one was built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installer_digest: Option<String>,
}

/// Why the store could not be read.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A manifest is not valid JSON of the expected shape.
    #[error("{path} is not a valid image manifest ({source}): remove the directory and rebuild")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// `$HOME/.kiln/images`.
pub fn default_root() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".kiln").join("images"))
}

/// `sha256:<hex>` of a file's content.
pub fn digest_file(path: &Path) -> Result<String, std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// `sha256:<hex>` of bytes.
pub fn digest_bytes(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Reads `dir/manifest.json`; `Ok(None)` when there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<ImageManifest>, StoreError> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StoreError::Manifest { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io { path, source }),
    }
}

/// Whether every output the manifest names is still present with its size.
pub fn outputs_present(dir: &Path, manifest: &ImageManifest) -> bool {
    manifest.outputs.iter().all(|o| {
        std::fs::metadata(dir.join(&o.name)).is_ok_and(|m| m.is_dir() || m.len() == o.size)
    })
}

/// The images under `root`, oldest first. Directories without a manifest (a build in progress,
/// something else) are skipped; a broken manifest is an error.
pub fn list(root: &Path) -> Result<Vec<ImageManifest>, StoreError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: root.to_owned(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Io {
            path: root.to_owned(),
            source,
        })?;
        if entry.file_name().to_string_lossy().starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        if let Some(m) = read_manifest(&entry.path())? {
            out.push(m);
        }
    }
    out.sort_by(|a, b| (a.created, &a.version).cmp(&(b.created, &b.version)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str, created: u64) -> ImageManifest {
        ImageManifest {
            version: version.into(),
            created,
            kernel_release: "6.12".into(),
            inputs_digest: "sha256:00".into(),
            inputs: BTreeMap::new(),
            outputs: vec![Output {
                name: "vmlinuz".into(),
                size: 3,
                digest: Some(digest_bytes(b"abc")),
            }],
            modules: vec![],
            libraries: vec![],
            installer_digest: None,
        }
    }

    #[test]
    fn list_reads_manifests_oldest_first_and_skips_the_rest() {
        let root = tempfile::tempdir().unwrap();
        for (v, t) in [("b", 2), ("a", 1)] {
            let dir = root.path().join(v);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(
                dir.join(MANIFEST),
                serde_json::to_vec(&manifest(v, t)).unwrap(),
            )
            .unwrap();
        }
        std::fs::create_dir(root.path().join(".build-c")).unwrap();
        std::fs::create_dir(root.path().join("empty")).unwrap();
        let versions: Vec<String> = list(root.path())
            .unwrap()
            .into_iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(versions, ["a", "b"]);
        assert!(list(&root.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn outputs_must_keep_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest("a", 1);
        assert!(!outputs_present(dir.path(), &m));
        std::fs::write(dir.path().join("vmlinuz"), b"abc").unwrap();
        assert!(outputs_present(dir.path(), &m));
        std::fs::write(dir.path().join("vmlinuz"), b"abcd").unwrap();
        assert!(!outputs_present(dir.path(), &m));
    }

    #[test]
    fn a_broken_manifest_is_an_error_that_says_what_to_do() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("x")).unwrap();
        std::fs::write(root.path().join("x").join(MANIFEST), b"{").unwrap();
        let err = list(root.path()).unwrap_err();
        assert!(matches!(err, StoreError::Manifest { .. }));
    }
}
