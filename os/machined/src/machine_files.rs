//! `machine.files`: written at every boot once the volumes are ready, before services start.
//!
//! Kiln OS's root filesystem is read-only, so a file lives under `/var` (EPHEMERAL, mapped
//! to the node's volume as the file API maps it) or is the one exception the configuration
//! validator allows: `append` to [`TRUSTED_ROOTS_PATH`], which adds certificates to the roots
//! machined's own HTTPS clients trust (the extra manifests, [`crate::manifests`]). Those are
//! kept under the boot's scratch volume, so they are rebuilt from the configuration at every
//! boot.
//!
//! The operations are idempotent across boots, since EPHEMERAL survives a reboot: `create`
//! leaves a file that exists, `overwrite` replaces it, `append` adds the content unless the
//! file already ends with it.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use kiln_config::types::{MachineFile, TRUSTED_ROOTS_PATH};

use crate::volumes::Volumes;

/// Where the appended trusted roots are kept, under the `run` volume.
const TRUSTED_ROOTS_FILE: &str = "trusted-roots.pem";

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (created, replaced or appended to).
    Written,
    /// Left as it was: `create` of a file that exists, or `append` of content it ends with.
    Unchanged,
}

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not one machined may write.
    #[error(
        "{path} is not writable: write under /var, or append to {TRUSTED_ROOTS_PATH} (`kiln validate` reports this before a config is applied)"
    )]
    NotWritable {
        /// The node path.
        path: String,
    },
    /// The operation is not `create`, `append` or `overwrite`.
    #[error("{path}: unknown operation {op:?}; use create, append or overwrite")]
    UnknownOp {
        /// The node path.
        path: String,
        /// The operation given.
        op: String,
    },
    /// Writing failed.
    #[error("writing {path} ({host}): {source}")]
    Io {
        /// The node path.
        path: String,
        /// Where it is on the host.
        host: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The host path of the trusted roots appended by the configuration.
pub fn trusted_roots_file(volumes: &Volumes) -> PathBuf {
    volumes.run.join(TRUSTED_ROOTS_FILE)
}

/// The certificates the configuration appended to the trusted roots (PEM), if any.
pub fn trusted_roots(volumes: &Volumes) -> Option<Vec<u8>> {
    std::fs::read(trusted_roots_file(volumes))
        .ok()
        .filter(|b| !b.is_empty())
}

/// Where a node path is written on this node.
fn host_path(volumes: &Volumes, path: &str) -> Result<PathBuf, FileError> {
    let p = Path::new(path);
    let not_writable = || FileError::NotWritable {
        path: path.to_owned(),
    };
    if path == TRUSTED_ROOTS_PATH {
        return Ok(trusted_roots_file(volumes));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(not_writable());
    }
    let rest = p.strip_prefix("/var").map_err(|_| not_writable())?;
    if rest.as_os_str().is_empty() {
        return Err(not_writable());
    }
    Ok(volumes.ephemeral.join(rest))
}

/// Writes one file.
pub fn apply_one(volumes: &Volumes, file: &MachineFile) -> Result<Outcome, FileError> {
    let host = host_path(volumes, &file.path)?;
    if file.path == TRUSTED_ROOTS_PATH && file.op != "append" {
        return Err(FileError::NotWritable {
            path: file.path.clone(),
        });
    }
    let io = |source| FileError::Io {
        path: file.path.clone(),
        host: host.clone(),
        source,
    };
    if let Some(dir) = host.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let outcome = match file.op.as_str() {
        "create" if host.exists() => Outcome::Unchanged,
        "create" | "overwrite" => {
            std::fs::write(&host, &file.content).map_err(io)?;
            Outcome::Written
        }
        "append" => {
            let existing = std::fs::read(&host).unwrap_or_default();
            if !file.content.is_empty() && existing.ends_with(file.content.as_bytes()) {
                Outcome::Unchanged
            } else {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&host)
                    .map_err(io)?;
                // Appended certificates must not run into the previous one's last line.
                if !existing.is_empty() && !existing.ends_with(b"\n") {
                    f.write_all(b"\n").map_err(io)?;
                }
                f.write_all(file.content.as_bytes()).map_err(io)?;
                Outcome::Written
            }
        }
        op => {
            return Err(FileError::UnknownOp {
                path: file.path.clone(),
                op: op.to_owned(),
            });
        }
    };
    if file.permissions != 0 && outcome == Outcome::Written {
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(file.permissions))
            .map_err(io)?;
    }
    Ok(outcome)
}

/// Writes every file; one that fails does not stop the others.
pub fn apply(
    volumes: &Volumes,
    files: &[MachineFile],
) -> Vec<(String, Result<Outcome, FileError>)> {
    files
        .iter()
        .map(|f| (f.path.clone(), apply_one(volumes, f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, op: &str, content: &str) -> MachineFile {
        MachineFile {
            content: content.to_owned(),
            permissions: 0o600,
            path: path.to_owned(),
            op: op.to_owned(),
        }
    }

    fn volumes() -> (tempfile::TempDir, Volumes) {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::under(dir.path());
        v.prepare().unwrap();
        (dir, v)
    }

    #[test]
    fn var_files_land_on_ephemeral_and_operations_are_idempotent_across_boots() {
        let (_d, v) = volumes();
        let create = file("/var/etc/app.conf", "create", "one\n");
        assert_eq!(apply_one(&v, &create).unwrap(), Outcome::Written);
        let host = v.ephemeral.join("etc/app.conf");
        assert_eq!(std::fs::read_to_string(&host).unwrap(), "one\n");
        assert_eq!(
            std::fs::metadata(&host).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        // A second boot: create leaves it, append adds once, overwrite replaces.
        assert_eq!(apply_one(&v, &create).unwrap(), Outcome::Unchanged);
        let append = file("/var/etc/app.conf", "append", "two\n");
        assert_eq!(apply_one(&v, &append).unwrap(), Outcome::Written);
        assert_eq!(apply_one(&v, &append).unwrap(), Outcome::Unchanged);
        assert_eq!(std::fs::read_to_string(&host).unwrap(), "one\ntwo\n");
        let over = file("/var/etc/app.conf", "overwrite", "three\n");
        assert_eq!(apply_one(&v, &over).unwrap(), Outcome::Written);
        assert_eq!(std::fs::read_to_string(&host).unwrap(), "three\n");
    }

    #[test]
    fn trusted_roots_take_appends_only_and_nothing_else_outside_var_is_written() {
        let (_d, v) = volumes();
        assert!(trusted_roots(&v).is_none());
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        apply_one(&v, &file(TRUSTED_ROOTS_PATH, "append", pem)).unwrap();
        apply_one(&v, &file(TRUSTED_ROOTS_PATH, "append", "second")).unwrap();
        let roots = String::from_utf8(trusted_roots(&v).unwrap()).unwrap();
        assert_eq!(roots, format!("{pem}\nsecond"));
        for (path, op) in [
            (TRUSTED_ROOTS_PATH, "overwrite"),
            ("/etc/passwd", "create"),
            ("/var", "create"),
            ("/var/../etc/x", "create"),
            ("/system/state/config.yaml", "overwrite"),
        ] {
            let err = apply_one(&v, &file(path, op, "x")).unwrap_err();
            assert!(
                matches!(err, FileError::NotWritable { .. }),
                "{path}: {err}"
            );
        }
        let err = apply_one(&v, &file("/var/x", "replace", "x")).unwrap_err();
        assert!(
            err.to_string().contains("create, append or overwrite"),
            "{err}"
        );
    }

    #[test]
    fn one_failing_file_does_not_stop_the_rest() {
        let (_d, v) = volumes();
        let out = apply(
            &v,
            &[
                file("/etc/x", "create", "x"),
                file("/var/ok", "create", "ok"),
            ],
        );
        assert!(out[0].1.is_err());
        assert_eq!(out[1].1.as_ref().unwrap(), &Outcome::Written);
    }
}
