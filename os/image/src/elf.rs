//! Shared libraries an executable needs: its ELF interpreter and the transitive closure of its
//! `DT_NEEDED` entries, found in the system library directories (what `ldd` prints, without
//! running the binary).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;
use thiserror::Error;

/// Where libraries are looked for, in order (Debian amd64, merged /usr).
pub const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/lib",
    "/usr/lib",
];

/// Why an executable's libraries could not be resolved.
#[derive(Debug, Error)]
pub enum ElfError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not a readable ELF.
    #[error("{path} is not an ELF file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: goblin::error::Error,
    },
    /// A needed library is in none of the library directories.
    #[error("{library}, needed by {by}, is in none of {dirs:?}: install the package that ships it")]
    NotFound {
        /// The library's name (`DT_NEEDED`).
        library: String,
        /// The file that needs it.
        by: PathBuf,
        /// Where it was looked for.
        dirs: Vec<PathBuf>,
    },
}

/// The libraries (interpreter included) that the executables `bins` need, as paths on this
/// machine (symlinks not resolved: the initramfs keeps the names the loader asks for).
pub fn needed_libraries(bins: &[&Path], dirs: &[PathBuf]) -> Result<BTreeSet<PathBuf>, ElfError> {
    let mut found = BTreeSet::new();
    let mut queue: Vec<PathBuf> = bins.iter().map(|p| p.to_path_buf()).collect();
    let mut seen = BTreeSet::new();
    while let Some(path) = queue.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let data = std::fs::read(&path).map_err(|source| ElfError::Read {
            path: path.clone(),
            source,
        })?;
        let elf = Elf::parse(&data).map_err(|source| ElfError::Parse {
            path: path.clone(),
            source,
        })?;
        if let Some(interp) = elf.interpreter {
            let interp = PathBuf::from(interp);
            if found.insert(interp.clone()) {
                queue.push(interp);
            }
        }
        for lib in &elf.libraries {
            let hit = dirs.iter().map(|d| d.join(lib)).find(|p| p.exists());
            let Some(hit) = hit else {
                return Err(ElfError::NotFound {
                    library: (*lib).to_owned(),
                    by: path.clone(),
                    dirs: dirs.to_vec(),
                });
            };
            if found.insert(hit.clone()) {
                queue.push(hit);
            }
        }
    }
    Ok(found)
}

/// [`LIBRARY_DIRS`] as paths.
pub fn default_dirs() -> Vec<PathBuf> {
    LIBRARY_DIRS.iter().map(PathBuf::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_needs_libc_and_its_loader() {
        let exe = std::env::current_exe().unwrap();
        let libs = needed_libraries(&[&exe], &default_dirs()).unwrap();
        let names: Vec<String> = libs
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"libc.so.6".to_owned()), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("ld-linux")), "{names:?}");
    }

    #[test]
    fn a_missing_library_names_who_needs_it() {
        let exe = std::env::current_exe().unwrap();
        let err = needed_libraries(&[&exe], &[PathBuf::from("/nonexistent")]).unwrap_err();
        assert!(matches!(err, ElfError::NotFound { ref by, .. } if *by == exe));
    }
}
