//! The initramfs: a zstd-compressed newc cpio archive written in Rust (the `cpio` crate), with
//! parent directories created for every entry and entries in a stable order, so the same inputs
//! give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir,
    /// A regular file copied from the host (symlinks followed), with its mode bits.
    File {
        /// Where its content comes from.
        source: PathBuf,
        /// Permission bits (`0o755`).
        mode: u32,
    },
    /// A regular file with the given content.
    Bytes {
        /// The content.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink(String),
    /// A character device node (major, minor), such as `/dev/console`.
    CharDevice(u32, u32),
}

/// Why the archive could not be written.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// A source file could not be read.
    #[error("reading {path} for the initramfs: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is too large for newc (4 GiB).
    #[error("{path} is larger than the 4 GiB a newc cpio entry can hold")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// Writing the archive failed.
    #[error("writing the initramfs: {0}")]
    Write(#[from] std::io::Error),
}

/// An archive being assembled; paths are relative (`usr/bin/etcd`), without a leading `/`.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// An empty archive with `/dev/console` (the kernel opens it for `/init`'s standard streams)
    /// and the mount points PID 1 needs.
    pub fn new() -> Self {
        let mut me = Initramfs::default();
        for dir in ["dev", "proc", "sys", "run", "tmp", "var", "etc"] {
            me.add(dir, Entry::Dir);
        }
        me.add("dev/console", Entry::CharDevice(5, 1));
        me
    }

    /// Adds (or replaces) `path`, creating its parent directories.
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Entry::Dir);
            parent = p.parent();
        }
        self.entries.insert(path, entry);
    }

    /// Adds a host file at the same path, keeping its permission bits.
    pub fn add_host_file(&mut self, path: &Path) -> Result<(), InitramfsError> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path).map_err(|source| InitramfsError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.add(
            &path.to_string_lossy(),
            Entry::File {
                source: path.to_owned(),
                mode: meta.permissions().mode() & 0o7777,
            },
        );
        Ok(())
    }

    /// The entries, in archive order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Writes the uncompressed newc archive to `out`. Every entry has uid/gid 0 and mtime 0.
    pub fn write_cpio<W: Write>(&self, mut out: W) -> Result<W, InitramfsError> {
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let header = cpio::newc::Builder::new(path)
                .ino(u32::try_from(ino + 1).unwrap_or(u32::MAX))
                .uid(0)
                .gid(0)
                .mtime(0);
            out = match entry {
                Entry::Dir => {
                    let w = header.mode(0o040_755).nlink(2).write(out, 0);
                    w.finish()?
                }
                Entry::File { source, mode } => {
                    let data = std::fs::read(source).map_err(|e| InitramfsError::Read {
                        path: source.clone(),
                        source: e,
                    })?;
                    write_file(header, out, path, &data, 0o100_000 | mode)?
                }
                Entry::Bytes { data, mode } => {
                    write_file(header, out, path, data, 0o100_000 | mode)?
                }
                Entry::Symlink(target) => {
                    write_file(header, out, path, target.as_bytes(), 0o120_777)?
                }
                Entry::CharDevice(major, minor) => {
                    let w = header
                        .mode(0o020_600)
                        .nlink(1)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .write(out, 0);
                    w.finish()?
                }
            };
        }
        Ok(cpio::newc::trailer(out)?)
    }

    /// Writes the archive compressed with zstd (which the cloud kernel unpacks: `CONFIG_RD_ZSTD`).
    pub fn write_zstd<W: Write>(&self, out: W, level: i32) -> Result<W, InitramfsError> {
        let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
        // The kernel's unpacker decodes with a bounded window; keep the default one (no --long).
        encoder.include_checksum(true)?;
        let encoder = self.write_cpio(encoder)?;
        Ok(encoder.finish()?)
    }
}

fn write_file<W: Write>(
    header: cpio::newc::Builder,
    out: W,
    path: &str,
    data: &[u8],
    mode: u32,
) -> Result<W, InitramfsError> {
    let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge {
        path: path.to_owned(),
    })?;
    let mut w = header.mode(mode).nlink(1).write(out, size);
    w.write_all(data)?;
    Ok(w.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut input = archive;
        loop {
            let mut reader = cpio::newc::Reader::new(input).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let name = reader.entry().name().to_owned();
            let mode = reader.entry().mode();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            out.push((name, mode, data));
            input = reader.finish().unwrap();
        }
        out
    }

    #[test]
    fn parents_are_created_and_entries_are_sorted() {
        let mut fs = Initramfs::new();
        fs.add(
            "/usr/bin/etcd",
            Entry::Bytes {
                data: b"etcd".to_vec(),
                mode: 0o755,
            },
        );
        fs.add("lib64", Entry::Symlink("usr/lib64".into()));
        let archive = fs.write_cpio(Vec::new()).unwrap();
        let entries = list(&archive);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "lib64",
                "proc",
                "run",
                "sys",
                "tmp",
                "usr",
                "usr/bin",
                "usr/bin/etcd",
                "var"
            ]
        );
        let etcd = entries.iter().find(|e| e.0 == "usr/bin/etcd").unwrap();
        assert_eq!((etcd.1, etcd.2.as_slice()), (0o100_755, &b"etcd"[..]));
        let link = entries.iter().find(|e| e.0 == "lib64").unwrap();
        assert_eq!((link.1, link.2.as_slice()), (0o120_777, &b"usr/lib64"[..]));
    }

    #[test]
    fn the_same_entries_give_the_same_bytes() {
        let mut fs = Initramfs::new();
        fs.add(
            "init",
            Entry::Bytes {
                data: vec![1, 2, 3],
                mode: 0o755,
            },
        );
        let a = fs.write_zstd(Vec::new(), 3).unwrap();
        let b = fs.clone().write_zstd(Vec::new(), 3).unwrap();
        assert_eq!(a, b);
        let plain = zstd::decode_all(&a[..]).unwrap();
        assert_eq!(plain, fs.write_cpio(Vec::new()).unwrap());
    }
}
