//! `ls`, `read` and `cp` over the node's volumes: `/system/state` (STATE), `/var`
//! (EPHEMERAL), `/system/meta` (META), and `/proc` on `metal`. Paths outside them, or escaping
//! them, are refused.

use std::path::{Component, Path, PathBuf};
use std::pin::Pin;

use futures::Stream;
use kiln_os_api::pb;
use tokio::io::AsyncReadExt as _;
use tonic::Status;

use super::status::{ApiError, ApiResult};
use crate::volumes::Volumes;

const CHUNK: usize = 1 << 20;

/// Maps a node path to the host path.
pub fn resolve(volumes: &Volumes, path: &str) -> ApiResult<PathBuf> {
    let roots = volumes.file_roots();
    let path = if path.is_empty() { "/" } else { path };
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::InvalidArgument(format!(
            "{path:?}: give an absolute path without '..'"
        )));
    }
    for (root, dir) in &roots {
        if let Ok(rest) = p.strip_prefix(root) {
            return Ok(dir.join(rest));
        }
    }
    Err(ApiError::NotFound(format!(
        "{path:?} is not on a node volume; readable roots: {}",
        roots.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
    )))
}

fn info(name: String, relative: String, meta: &std::fs::Metadata) -> pb::FileInfo {
    use std::os::unix::fs::MetadataExt as _;
    pb::FileInfo {
        metadata: None,
        name,
        size: meta.len() as i64,
        mode: meta.mode(),
        modified_unix: meta.mtime(),
        is_dir: meta.is_dir(),
        error: String::new(),
        relative_name: relative,
    }
}

/// Lists `root` down to `depth` levels (1: its entries).
pub fn list(volumes: &Volumes, root: &str, depth: i32) -> ApiResult<Vec<pb::FileInfo>> {
    let root = if root.is_empty() { "/" } else { root };
    if root == "/" || root == "/system" {
        return Ok(volumes
            .file_roots()
            .iter()
            .filter(|(r, _)| r.starts_with(root))
            .filter_map(|(r, d)| {
                std::fs::metadata(d)
                    .ok()
                    .map(|m| info((*r).to_owned(), (*r).trim_start_matches('/').to_owned(), &m))
            })
            .collect());
    }
    let base = resolve(volumes, root)?;
    let meta = std::fs::metadata(&base).map_err(|e| ApiError::NotFound(format!("{root}: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![info(root.to_owned(), String::new(), &meta)]);
    }
    let mut out = Vec::new();
    walk(&base, root, "", depth.max(1), &mut out);
    Ok(out)
}

fn walk(dir: &Path, node_dir: &str, relative: &str, depth: i32, out: &mut Vec<pb::FileInfo>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if relative.is_empty() {
            name.clone()
        } else {
            format!("{relative}/{name}")
        };
        let Ok(meta) = e.metadata() else { continue };
        out.push(info(
            format!("{}/{rel}", node_dir.trim_end_matches('/')),
            rel.clone(),
            &meta,
        ));
        if meta.is_dir() && depth > 1 {
            walk(&e.path(), node_dir, &rel, depth - 1, out);
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Streams a file in 1 MiB chunks; with `remove`, deletes it afterwards.
pub fn file_chunks(path: PathBuf, remove: bool) -> BoxStream<Vec<u8>> {
    let stream = async_stream(path.clone());
    if !remove {
        return stream;
    }
    let cleanup = futures::stream::once(async move {
        let _ = tokio::fs::remove_file(&path).await;
        None
    });
    Box::pin(futures::StreamExt::filter_map(
        futures::StreamExt::chain(futures::StreamExt::map(stream, Some), cleanup),
        |x| async move { x },
    ))
}

fn async_stream(path: PathBuf) -> BoxStream<Vec<u8>> {
    Box::pin(futures::stream::unfold(
        None::<tokio::fs::File>,
        move |file| {
            let path = path.clone();
            async move {
                let mut file = match file {
                    Some(f) => f,
                    None => match tokio::fs::File::open(&path).await {
                        Ok(f) => f,
                        Err(e) => {
                            return Some((
                                Err(Status::not_found(format!("{}: {e}", path.display()))),
                                None,
                            ));
                        }
                    },
                };
                let mut buf = vec![0u8; CHUNK];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(buf), Some(file)))
                    }
                    Err(e) => Some((
                        Err(Status::internal(format!("{}: {e}", path.display()))),
                        None,
                    )),
                }
            }
        },
    ))
}

/// Streams a gzipped tar of `path` (a file or directory).
pub fn tar_gz(path: PathBuf) -> BoxStream<pb::DataChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::DataChunk, Status>>(4);
    tokio::task::spawn_blocking(move || {
        struct Sink(tokio::sync::mpsc::Sender<Result<pb::DataChunk, Status>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .blocking_send(Ok(pb::DataChunk {
                        metadata: None,
                        bytes: buf.to_vec(),
                    }))
                    .map_err(|_| std::io::Error::other("the client went away"))?;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let result = (|| -> std::io::Result<()> {
            let gz = flate2::write::GzEncoder::new(
                std::io::BufWriter::with_capacity(CHUNK, Sink(tx.clone())),
                flate2::Compression::fast(),
            );
            let mut tar = tar::Builder::new(gz);
            let name = path
                .file_name()
                .map_or_else(|| "root".into(), |n| n.to_string_lossy().into_owned());
            if path.is_dir() {
                tar.append_dir_all(&name, &path)?;
            } else {
                tar.append_path_with_name(&path, &name)?;
            }
            let gz = tar.into_inner()?;
            let mut w = gz.finish()?;
            std::io::Write::flush(&mut w)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(Status::internal(format!("{}: {e}", path.display()))));
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_volumes_and_cannot_escape() {
        let v = Volumes::under(Path::new("/n"));
        assert_eq!(
            resolve(&v, "/var/lib/etcd").unwrap(),
            Path::new("/n/ephemeral/lib/etcd")
        );
        assert_eq!(
            resolve(&v, "/system/state/config.yaml").unwrap(),
            Path::new("/n/state/config.yaml")
        );
        assert!(matches!(
            resolve(&v, "/var/../../etc/passwd"),
            Err(ApiError::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve(&v, "var/lib"),
            Err(ApiError::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve(&v, "/etc/passwd"),
            Err(ApiError::NotFound(_))
        ));
    }
}
