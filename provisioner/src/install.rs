//! Releases on lab nodes: the boot directory of each node (slots A and B and their record, see
//! [`kiln_os_api::slots`]), how a node launcher picks the slot at every power-on, and
//! `cluster create --install-image`, which pulls an installer once and puts it into slot A of
//! every node. Node launchers of every provisioner that plays the bootloader use this module.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_os_api::slots::{BootChoice, Slot, SlotContent, SlotError, SlotRecord};
use kiln_registry_mirror::client::{ClientConfig, RegistryClient};
use kiln_registry_mirror::installer::{InstallerError, PulledInstaller};
use kiln_registry_mirror::reference::{ImageRef, InvalidImageRef};

use crate::state::StateDir;

/// Why a release could not be put on a node.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The slot record.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// The reference does not parse.
    #[error("--install-image {image}: {source}")]
    Reference {
        /// The reference given.
        image: String,
        /// Why it does not parse.
        source: InvalidImageRef,
    },
    /// The registry client could not be made.
    #[error("--install-image {image}: {source}")]
    Client {
        /// The reference given.
        image: String,
        /// The cause.
        source: kiln_registry_mirror::client::ClientError,
    },
    /// Pulling failed.
    #[error(
        "pulling the installer {image}: {source} (is it pushed? `kiln image installer --push` or `kiln image build --push`)"
    )]
    Pull {
        /// The reference.
        image: String,
        /// The cause.
        source: InstallerError,
    },
    /// Copying the release into a node's slot failed.
    #[error("putting the release into {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A node's boot directory (beside its volumes, like a BOOT partition).
pub fn boot_dir(dir: &StateDir, node: &str) -> PathBuf {
    dir.node_root(node).join("boot")
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The release built into this `kiln` binary (`kiln machined`), for nodes created without
/// `--install-image`.
pub fn builtin_release() -> SlotContent {
    SlotContent {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        source: "builtin".to_owned(),
        builtin: true,
    }
}

/// What a launcher does at power-on: reads the record (a fresh one with the built-in release in
/// slot A when there is none), applies the boot rules and writes the record back. `why` says how
/// the previous boot ended.
pub fn choose_slot(boot_dir: &Path, why: &str) -> Result<BootChoice, InstallError> {
    let mut record =
        SlotRecord::load(boot_dir)?.unwrap_or_else(|| SlotRecord::fresh(builtin_release()));
    let choice = record.choose(why, now_millis());
    record.store(boot_dir)?;
    Ok(choice)
}

/// The program a launcher starts for `choice` and its extra arguments: `kiln machined` for the
/// built-in release, else the slot's machined with the slot's etcd.
pub fn machined_command(
    boot_dir: &Path,
    choice: &BootChoice,
    kiln: &Path,
) -> (PathBuf, Vec<std::ffi::OsString>) {
    use kiln_os_api::slots::{ETCD, ETCDCTL, MACHINED};
    let builtin = choice.content.as_ref().is_none_or(|c| c.builtin);
    if builtin {
        return (kiln.to_owned(), vec!["machined".into()]);
    }
    let slot = boot_dir.join(choice.slot.name());
    (
        slot.join(MACHINED),
        vec![
            "--etcd-bin".into(),
            slot.join(ETCD).into_os_string(),
            "--etcdctl-bin".into(),
            slot.join(ETCDCTL).into_os_string(),
        ],
    )
}

/// Pulls the installer `image` (plain HTTP when `plain_http`) into `dest`.
pub async fn pull_release(
    image: &str,
    plain_http: bool,
    dest: &Path,
) -> Result<PulledInstaller, InstallError> {
    let r: ImageRef = image.parse().map_err(|source| InstallError::Reference {
        image: image.to_owned(),
        source,
    })?;
    let scheme = if plain_http { "http" } else { "https" };
    let client_err = |source| InstallError::Client {
        image: image.to_owned(),
        source,
    };
    let url = url::Url::parse(&format!("{scheme}://{}", r.host)).map_err(|e| {
        client_err(kiln_registry_mirror::client::ClientError::Tls(format!(
            "registry host {:?}: {e}",
            r.host
        )))
    })?;
    let client = RegistryClient::new(ClientConfig::new(url)).map_err(client_err)?;
    kiln_registry_mirror::installer::pull(&client, &r.name, &r.reference, dest)
        .await
        .map_err(|source| InstallError::Pull {
            image: image.to_owned(),
            source,
        })
}

/// Puts the unpacked release at `release` into slot A of the node whose boot directory is
/// `boot_dir` (hard links where the file system allows, copies otherwise) and writes a fresh
/// record.
pub fn seed(boot_dir: &Path, release: &Path, content: SlotContent) -> Result<(), InstallError> {
    let slot = boot_dir.join(Slot::A.name());
    let _ = std::fs::remove_dir_all(&slot);
    link_tree(release, &slot)?;
    SlotRecord::fresh(content).store(boot_dir)?;
    Ok(())
}

fn link_tree(from: &Path, to: &Path) -> Result<(), InstallError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| InstallError::Io { path: p, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io(&src))?.is_dir() {
            link_tree(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(io(&dst))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_a_record_boots_the_builtin_release_from_slot_a() {
        let tmp = tempfile::tempdir().unwrap();
        let choice = choose_slot(tmp.path(), "power-on").unwrap();
        assert_eq!(choice.slot, Slot::A);
        let (program, args) =
            machined_command(tmp.path(), &choice, Path::new("/usr/local/bin/kiln"));
        assert_eq!(program, Path::new("/usr/local/bin/kiln"));
        assert_eq!(args, ["machined"]);
        assert!(SlotRecord::load(tmp.path()).unwrap().is_some());
    }

    #[test]
    fn a_seeded_node_runs_the_slot_machined_and_etcd() {
        let tmp = tempfile::tempdir().unwrap();
        let release = tmp.path().join("release");
        std::fs::create_dir_all(release.join("usr/bin")).unwrap();
        std::fs::write(release.join("usr/bin/machined"), b"x").unwrap();
        let boot = tmp.path().join("boot");
        seed(
            &boot,
            &release,
            SlotContent {
                version: "1.0".into(),
                source: "r/i:1.0".into(),
                builtin: false,
            },
        )
        .unwrap();
        assert!(boot.join("a/usr/bin/machined").is_file());
        let choice = choose_slot(&boot, "power-on").unwrap();
        let (program, args) = machined_command(&boot, &choice, Path::new("/kiln"));
        assert_eq!(program, boot.join("a/usr/bin/machined"));
        assert_eq!(args[1], boot.join("a/usr/bin/etcd").into_os_string());
    }
}
