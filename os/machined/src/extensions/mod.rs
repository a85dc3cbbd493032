//! Extension services: machined scans `/usr/local/etc/containers/*.yaml` in the node image
//! ([`crate::platform::Platform::image_root`]) and runs each definition as the service
//! `ext-<name>` under the supervisor, in its own mount, PID and UTS namespaces with the root
//! filesystem `/usr/local/lib/containers/<name>` ([`container`]). A definition that does not
//! parse or check is reported as an event and skipped; the rest of the node is unaffected.

pub mod container;
mod service;
pub mod spec;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use service::ExtensionService;
use spec::{ExtensionServiceSpec, SpecError};

use crate::events::EventKind;
use crate::node::Node;

/// Where definitions live, relative to the image root.
pub const DEFINITIONS_DIR: &str = "usr/local/etc/containers";
/// Where root filesystems live, relative to the image root.
pub const ROOTFS_DIR: &str = "usr/local/lib/containers";

/// A definition that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("extension service definition {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid definition.
    #[error(
        "extension service definition {path} is not valid: {source}; the service is not started"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: SpecError,
    },
    /// Two files define the same name.
    #[error(
        "extension service definition {path} names {name:?}, already defined by {first}; the second is not started"
    )]
    Duplicate {
        /// The second file.
        path: PathBuf,
        /// The name.
        name: String,
        /// The first file.
        first: PathBuf,
    },
}

/// The definitions under `image_root`, sorted by file name: each loaded or why not.
pub fn scan(image_root: &Path) -> Vec<Result<(PathBuf, ExtensionServiceSpec), LoadError>> {
    let dir = image_root.join(DEFINITIONS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && p.is_file())
        .collect();
    files.sort();
    let mut seen: Vec<(String, PathBuf)> = Vec::new();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
                path: path.clone(),
                source,
            })?;
            let spec = ExtensionServiceSpec::parse(&text).map_err(|source| LoadError::Invalid {
                path: path.clone(),
                source,
            })?;
            if let Some((_, first)) = seen.iter().find(|(n, _)| *n == spec.name) {
                return Err(LoadError::Duplicate {
                    path,
                    name: spec.name,
                    first: first.clone(),
                });
            }
            seen.push((spec.name.clone(), path.clone()));
            Ok((path, spec))
        })
        .collect()
}

/// Registers every valid definition of the node's image with the supervisor; reports the
/// others as events.
pub fn start(node: &Arc<Node>) {
    let image_root = node.platform.image_root();
    for result in scan(&image_root) {
        match result {
            Ok((path, spec)) => {
                let id = spec.service_id();
                if node.supervisor.has(&id) {
                    continue;
                }
                node.events.publish(
                    EventKind::Service,
                    &id,
                    "registered",
                    format!("extension service {id} from {}", path.display()),
                );
                let rootfs = image_root.join(ROOTFS_DIR).join(&spec.name);
                node.supervisor
                    .add(Arc::new(ExtensionService::new(node, spec, rootfs)));
            }
            Err(e) => {
                tracing::warn!("{e}");
                node.events
                    .publish(EventKind::Service, "extensions", "invalid", e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_loads_good_definitions_and_names_the_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let defs = dir.path().join(DEFINITIONS_DIR);
        std::fs::create_dir_all(&defs).unwrap();
        std::fs::write(
            defs.join("a.yaml"),
            "name: hello-world\ncontainer: {entrypoint: ./hello}\nrestart: always\n",
        )
        .unwrap();
        std::fs::write(defs.join("b.yaml"), "name: [oops\n").unwrap();
        std::fs::write(
            defs.join("c.yaml"),
            "name: hello-world\ncontainer: {entrypoint: ./x}\nrestart: never\n",
        )
        .unwrap();
        std::fs::write(defs.join("notes.txt"), "not a definition").unwrap();
        let found = scan(dir.path());
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].as_ref().unwrap().1.name, "hello-world");
        let e = found[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("b.yaml is not valid") && e.contains("not started"),
            "{e}"
        );
        let e = found[2].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("already defined by") && e.contains("a.yaml"),
            "{e}"
        );
        assert!(scan(&dir.path().join("absent")).is_empty());
    }
}
