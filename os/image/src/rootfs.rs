//! The node root filesystem for containers: machined, etcd, etcdctl and the shared libraries
//! they link (the ELF closure of [`crate::elf`], as for the initramfs), a few empty directories,
//! nothing else (no shell). Written as a tar stream for `POST /images/create?fromSrc=-`, with a
//! version derived from the digest of its inputs so a provisioner imports it only when its
//! content changed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::builder::Progress;
use crate::elf::{self, ElfError};
use crate::store;

/// Where machined lives in the image.
pub const MACHINED: &str = "/usr/bin/machined";
/// Where etcd lives in the image.
pub const ETCD: &str = "/usr/bin/etcd";
/// Where etcdctl lives in the image.
pub const ETCDCTL: &str = "/usr/bin/etcdctl";
/// Where the node's volumes are mounted (`machined --root`).
pub const VOLUMES_ROOT: &str = "/var/lib/kiln";

/// Bumped when the layout changes for the same inputs.
const FORMAT: &str = "kiln-rootfs/1";

/// Empty directories of the image (mount points and scratch space).
const DIRECTORIES: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("etc", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("var", 0o755),
    ("var/lib", 0o755),
    ("var/lib/kiln", 0o700),
];

/// Why the root filesystem could not be made.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// A library could not be resolved.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// An input could not be read.
    #[error("reading {path} for the node image: {source}")]
    Input {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The tar stream could not be written.
    #[error("writing the node image's tar stream: {0}")]
    Write(#[source] std::io::Error),
}

/// The programs of a node image.
#[derive(Debug, Clone)]
pub struct RootfsInputs {
    /// The machined binary.
    pub machined: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `etcdctl`.
    pub etcdctl: PathBuf,
    /// Strip machined's debug information (`objcopy --strip-debug`; the digest is of the
    /// unstripped file).
    pub strip: bool,
}

impl RootfsInputs {
    /// machined as given, etcd and etcdctl from Debian's `etcd-server` and `etcd-client`.
    pub fn new(machined: PathBuf) -> Self {
        Self {
            machined,
            etcd: "/usr/bin/etcd".into(),
            etcdctl: "/usr/bin/etcdctl".into(),
            strip: true,
        }
    }
}

/// What goes into the image, resolved and digested.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// Path in the image (no leading `/`) → file on this machine.
    files: BTreeMap<String, PathBuf>,
    strip: bool,
    /// `sha256:<hex>` over the layout and every file's digest.
    pub digest: String,
}

impl Rootfs {
    /// Resolves the library closure and digests every input.
    pub fn resolve(inputs: &RootfsInputs) -> Result<Self, RootfsError> {
        let bins = [
            inputs.machined.as_path(),
            inputs.etcd.as_path(),
            inputs.etcdctl.as_path(),
        ];
        let mut files = BTreeMap::new();
        files.insert(rel(MACHINED), inputs.machined.clone());
        files.insert(rel(ETCD), inputs.etcd.clone());
        files.insert(rel(ETCDCTL), inputs.etcdctl.clone());
        for lib in elf::needed_libraries(&bins, &elf::default_dirs())? {
            files.insert(rel(&lib.to_string_lossy()), lib);
        }
        let mut summary = format!("{FORMAT}\nstrip={}\n", inputs.strip);
        for (name, path) in &files {
            let d = store::digest_file(path).map_err(|source| RootfsError::Input {
                path: path.clone(),
                source,
            })?;
            summary.push_str(&format!("{name}\t{d}\n"));
        }
        Ok(Self {
            files,
            strip: inputs.strip,
            digest: store::digest_bytes(summary.as_bytes()),
        })
    }

    /// `<crate version>-<first 12 hex digits of the digest>`: the image tag.
    pub fn version(&self) -> String {
        let hex = self.digest.trim_start_matches("sha256:");
        format!(
            "{}-{}",
            env!("CARGO_PKG_VERSION"),
            &hex[..12.min(hex.len())]
        )
    }

    /// The paths in the image (without leading `/`), files and directories, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut all: Vec<String> = self.files.keys().cloned().collect();
        all.extend(self.directories().into_keys());
        all.sort();
        all.dedup();
        all
    }

    fn directories(&self) -> BTreeMap<String, u32> {
        let mut dirs: BTreeMap<String, u32> = DIRECTORIES
            .iter()
            .map(|(d, m)| ((*d).to_owned(), *m))
            .collect();
        for name in self.files.keys() {
            let mut p = Path::new(name).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                dirs.entry(d.to_string_lossy().into_owned())
                    .or_insert(0o755);
                p = d.parent();
            }
        }
        dirs
    }

    /// Writes the image as a tar stream (owners root, mtimes zero, sorted entries). `scratch`
    /// holds the stripped machined while writing.
    pub fn write_tar<W: Write>(
        &self,
        out: W,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<W, RootfsError> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        for (dir, mode) in self.directories() {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_data(&mut h, format!("{dir}/"), std::io::empty())
                .map_err(RootfsError::Write)?;
        }
        for (name, path) in &self.files {
            let source = if self.strip && name == &rel(MACHINED) {
                crate::builder::strip(path, &scratch.join("machined"), progress)
            } else {
                path.clone()
            };
            let data = std::fs::read(&source).map_err(|e| RootfsError::Input {
                path: source.clone(),
                source: e,
            })?;
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            h.set_mtime(0);
            tar.append_data(&mut h, name, data.as_slice())
                .map_err(RootfsError::Write)?;
        }
        tar.into_inner().map_err(RootfsError::Write)
    }
}

fn rel(path: &str) -> String {
    path.trim_start_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> RootfsInputs {
        // Any dynamic executable stands in for machined, etcd and etcdctl.
        let exe = std::env::current_exe().unwrap();
        RootfsInputs {
            machined: exe.clone(),
            etcd: exe.clone(),
            etcdctl: exe,
            strip: false,
        }
    }

    #[test]
    fn holds_the_programs_their_libraries_and_no_shell() {
        let rootfs = Rootfs::resolve(&inputs()).unwrap();
        let paths = rootfs.paths();
        for want in [
            "usr/bin/machined",
            "usr/bin/etcd",
            "usr/bin/etcdctl",
            "tmp",
            "var/lib/kiln",
        ] {
            assert!(
                paths.iter().any(|p| p == want),
                "{want} missing from {paths:?}"
            );
        }
        assert!(paths.iter().any(|p| p.ends_with("/libc.so.6")), "{paths:?}");
        assert!(
            !paths
                .iter()
                .any(|p| p.ends_with("/sh") || p.ends_with("/bash"))
        );
        let dir = tempfile::tempdir().unwrap();
        let bytes = rootfs
            .write_tar(Vec::new(), dir.path(), &crate::Quiet)
            .unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_owned()
            })
            .collect();
        assert_eq!(names.len(), paths.len(), "{names:?}");
    }

    #[test]
    fn the_version_changes_only_with_the_content() {
        let a = Rootfs::resolve(&inputs()).unwrap();
        let b = Rootfs::resolve(&inputs()).unwrap();
        assert_eq!(a.version(), b.version());
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("machined");
        let mut data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        data.push(0);
        std::fs::write(&other, data).unwrap();
        let c = Rootfs::resolve(&RootfsInputs {
            machined: other,
            ..inputs()
        })
        .unwrap();
        assert_ne!(a.version(), c.version());
    }
}
