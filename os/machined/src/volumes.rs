//! The node's volumes: STATE (configuration), EPHEMERAL (etcd data, runtime state) and META
//! (small key/value records that survive a wipe of the others). On `process` and `container`
//! they are directories; on `metal`, partitions mounted at the same places.

use std::path::{Path, PathBuf};

use kiln_os_api::contract::{LABEL_EPHEMERAL, LABEL_META, LABEL_STATE};

/// Paths of the volumes.
#[derive(Debug, Clone)]
pub struct Volumes {
    /// STATE: the persisted machine configuration.
    pub state: PathBuf,
    /// EPHEMERAL: `/var` of the node (etcd data under `lib/etcd`).
    pub ephemeral: PathBuf,
    /// META: key/value records.
    pub meta: PathBuf,
    /// Scratch space recreated at every boot (certificates issued at boot, sockets).
    pub run: PathBuf,
    /// The machine's `/proc`, readable through the file API where the node is the machine
    /// (`metal`); `None` where `/proc` would be the host's.
    pub proc: Option<PathBuf>,
}

/// A volume label that is not STATE, EPHEMERAL or META.
#[derive(Debug, thiserror::Error)]
#[error("unknown volume label {0:?}: use STATE or EPHEMERAL")]
pub struct UnknownLabel(pub String);

impl Volumes {
    /// The volumes of a node whose root directory is `root`.
    pub fn under(root: &Path) -> Self {
        Self {
            state: root.join("state"),
            ephemeral: root.join("ephemeral"),
            meta: root.join("meta"),
            run: root.join("run"),
            proc: None,
        }
    }

    /// Creates the directories (mode 0700) and empties `run`.
    pub fn prepare(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        let _ = std::fs::remove_dir_all(&self.run);
        for dir in [&self.state, &self.ephemeral, &self.meta, &self.run] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(())
    }

    /// The path of a wipeable volume by label.
    pub fn by_label(&self, label: &str) -> Result<&Path, UnknownLabel> {
        match label {
            LABEL_STATE => Ok(&self.state),
            LABEL_EPHEMERAL => Ok(&self.ephemeral),
            other => Err(UnknownLabel(other.to_owned())),
        }
    }

    /// Empties a volume (keeps the directory).
    pub fn wipe(&self, label: &str) -> std::io::Result<()> {
        let dir = self.by_label(label).map_err(std::io::Error::other)?;
        if dir.exists() {
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
        }
        Ok(())
    }

    /// etcd's data directory (`/var/lib/etcd` on the node).
    pub fn etcd_data(&self) -> PathBuf {
        self.ephemeral.join("lib/etcd")
    }

    /// Where an uploaded recovery snapshot waits for `bootstrap --recover-from`.
    pub fn etcd_recover_snapshot(&self) -> PathBuf {
        self.ephemeral.join("lib/etcd-recover.snapshot")
    }

    /// The persisted machine configuration.
    pub fn config_path(&self) -> PathBuf {
        self.state.join("config.yaml")
    }

    /// A configuration staged for the next boot.
    pub fn staged_config_path(&self) -> PathBuf {
        self.state.join("config.staged.yaml")
    }

    /// The virtual paths the file API serves, and where they are.
    pub fn file_roots(&self) -> Vec<(&'static str, &Path)> {
        let mut roots = vec![
            ("/system/state", self.state.as_path()),
            ("/var", self.ephemeral.as_path()),
            ("/system/meta", self.meta.as_path()),
        ];
        if let Some(p) = &self.proc {
            roots.push(("/proc", p.as_path()));
        }
        roots
    }

    /// All labels, for messages.
    pub const WIPEABLE: [&'static str; 2] = [LABEL_STATE, LABEL_EPHEMERAL];
}

/// META labels are not wipeable by reset.
pub const META: &str = LABEL_META;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_empties_only_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::under(dir.path());
        v.prepare().unwrap();
        std::fs::create_dir_all(v.etcd_data().join("member")).unwrap();
        std::fs::write(v.config_path(), "x").unwrap();
        v.wipe("EPHEMERAL").unwrap();
        assert!(v.ephemeral.exists() && !v.etcd_data().exists());
        assert!(v.config_path().exists());
        assert!(v.wipe("BOOT").is_err());
    }
}
