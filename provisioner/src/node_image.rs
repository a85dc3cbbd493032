//! What a process node boots besides its configuration: its image directory
//! (`<state>/<node>/image/`, the node's `/`: extension services under
//! `usr/local/etc/containers` and `usr/local/lib/containers`) and its kernel command line
//! (`<state>/<node>.cmdline`, given to machined by the node launcher).

use std::path::{Path, PathBuf};

use crate::create::CreateOptions;
use crate::state::StateDir;

/// Where extension service definitions live in an image.
pub const DEFINITIONS_DIR: &str = "usr/local/etc/containers";

/// Why a node's image or command line could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum NodeImageError {
    /// The extensions directory is not laid out like an image.
    #[error(
        "--extensions {0}: no usr/local/etc/containers/ in it; give a directory laid out like the node's root (usr/local/etc/containers/<name>.yaml, usr/local/lib/containers/<name>/)"
    )]
    NoDefinitions(PathBuf),
    /// Copying failed.
    #[error("copying {from} to {to}: {source}")]
    Copy {
        /// The source.
        from: PathBuf,
        /// The destination.
        to: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing the command line failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The node's image directory.
pub fn image_dir(dir: &StateDir, node: &str) -> PathBuf {
    dir.node_root(node).join("image")
}

/// The file holding the node's kernel command line.
pub fn cmdline_path(dir: &StateDir, node: &str) -> PathBuf {
    dir.dir.join(format!("{node}.cmdline"))
}

/// The node's kernel command line, if it has one.
pub fn cmdline(dir: &StateDir, node: &str) -> Option<String> {
    std::fs::read_to_string(cmdline_path(dir, node))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Checks an `--extensions` directory before anything is created.
pub fn check_extensions(ext: &Path) -> Result<(), NodeImageError> {
    if ext.join(DEFINITIONS_DIR).is_dir() {
        Ok(())
    } else {
        Err(NodeImageError::NoDefinitions(ext.to_owned()))
    }
}

/// Writes `node`'s image directory and kernel command line from `opts`.
pub fn prepare(dir: &StateDir, node: &str, opts: &CreateOptions) -> Result<(), NodeImageError> {
    if let Some(ext) = &opts.extensions {
        copy_tree(ext, &image_dir(dir, node))?;
    }
    if !opts.extra_boot_kernel_args.is_empty() {
        let path = cmdline_path(dir, node);
        std::fs::write(&path, opts.extra_boot_kernel_args.join(" "))
            .map_err(|source| NodeImageError::Write { path, source })?;
    }
    Ok(())
}

/// Copies a directory tree (files keep their modes, symbolic links stay links).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), NodeImageError> {
    let err = |from: &Path, to: &Path| {
        let (from, to) = (from.to_owned(), to.to_owned());
        move |source| NodeImageError::Copy { from, to, source }
    };
    std::fs::create_dir_all(to).map_err(err(from, to))?;
    for entry in std::fs::read_dir(from).map_err(err(from, to))? {
        let entry = entry.map_err(err(from, to))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(err(&src, &dst))?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(err(&src, &dst))?;
            std::os::unix::fs::symlink(target, &dst).map_err(err(&src, &dst))?;
        } else {
            std::fs::copy(&src, &dst).map_err(err(&src, &dst))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_copied_with_modes_and_links_and_a_bad_one_is_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let src = tempfile::tempdir().unwrap();
        let defs = src.path().join(DEFINITIONS_DIR);
        std::fs::create_dir_all(&defs).unwrap();
        std::fs::write(defs.join("a.yaml"), "name: a").unwrap();
        let bin = src.path().join("usr/local/lib/containers/a/run");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("run", bin.with_file_name("link")).unwrap();
        check_extensions(src.path()).unwrap();
        let dst = tempfile::tempdir().unwrap();
        copy_tree(src.path(), dst.path()).unwrap();
        let copied = dst.path().join("usr/local/lib/containers/a/run");
        assert_eq!(
            std::fs::metadata(&copied).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read_link(copied.with_file_name("link")).unwrap(),
            Path::new("run")
        );
        let e = check_extensions(dst.path().join("usr").as_path()).unwrap_err();
        assert!(
            e.to_string().contains("no usr/local/etc/containers/"),
            "{e}"
        );
    }
}
