//! Content-addressed storage on disk: blobs (layers, configs and manifests alike) under
//! `blobs/sha256/<hex>`, per-repository links and tags, and resumable upload sessions.
//!
//! Every blob is written to a temporary file in `tmp/`, synced, its digest checked, and only
//! then renamed into `blobs/`; a crash or a broken upload leaves at worst a stray temporary
//! file, never a wrong blob. Links and tags are small files replaced by rename as well.
//!
//! Layout under the root:
//!
//! ```text
//! blobs/sha256/<hex>                         content, shared by all repositories
//! repos/<name>/_layers/<hex>                 blob linked into a pushed repository
//! repos/<name>/_manifests/revisions/<hex>    manifest in the repository; holds its media type
//! repos/<name>/_manifests/tags/<tag>         holds the digest the tag points at
//! mirrors/<host>/<name>/...                  the same, for content cached from an upstream
//! uploads/<uuid>/{data,name}                 upload sessions
//! tmp/                                       files being written
//! ```

use std::collections::HashMap;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWriteExt as _, BufWriter};

use crate::reference::{Digest, Reference, RepoName, Tag};

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The content's digest is not the one the client said.
    #[error("digest mismatch: expected {expected}, content is {actual}")]
    DigestMismatch {
        /// The digest given by the client.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The content's length is not the one announced.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Announced length.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// The body stream broke off (client went away, upstream failed).
    #[error("content stream broke off after {received} bytes: {reason}")]
    Stream {
        /// Bytes received before the break.
        received: u64,
        /// Why.
        reason: String,
    },
    /// No upload session with that id for that repository.
    #[error("upload session {0} is unknown (finished, cancelled or expired)")]
    UploadUnknown(String),
    /// A chunk did not start where the session ends.
    #[error("chunk starts at byte {start} but the upload session holds {offset} bytes")]
    UploadRange {
        /// Bytes already in the session.
        offset: u64,
        /// Where the chunk said it starts.
        start: u64,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Which set of repositories: those pushed here, or the cache of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace<'a> {
    /// Repositories pushed to this registry.
    Local,
    /// Content cached from the upstream with this host name (validated by the mirror config).
    Mirror(&'a str),
}

/// A manifest as stored.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    /// Its digest.
    pub digest: Digest,
    /// The media type it was pushed or fetched with.
    pub media_type: String,
    /// The bytes.
    pub bytes: Bytes,
    /// For a tag: when the tag was last written (pushed or refreshed from upstream).
    pub tag_written: Option<SystemTime>,
}

/// The registry's storage root.
#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
    /// One lock per upload session, so two requests never append to one session at once.
    upload_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Size of the buffer between the network and the disk.
const IO_BUF: usize = 1 << 20;

impl Storage {
    /// Opens (creating if needed) the storage under `root`, removing stray temporary files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        for dir in ["blobs/sha256", "repos", "mirrors", "uploads", "tmp"] {
            let p = root.join(dir);
            std::fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            root,
            upload_locks: Mutex::new(HashMap::new()),
        })
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives once stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// The size of a stored blob, or `None` when it is not stored.
    pub async fn blob_size(&self, digest: &Digest) -> Option<u64> {
        tokio::fs::metadata(self.blob_path(digest))
            .await
            .ok()
            .map(|m| m.len())
    }

    /// A new empty temporary file in `tmp/` (same file system as `blobs/`, so rename works).
    pub fn temp_path(&self) -> PathBuf {
        self.root.join("tmp").join(uuid::Uuid::new_v4().to_string())
    }

    fn repo_dir(&self, ns: Namespace<'_>, name: &RepoName) -> PathBuf {
        match ns {
            Namespace::Local => self.root.join("repos").join(name.as_str()),
            Namespace::Mirror(host) => self
                .root
                .join("mirrors")
                .join(host.replace(':', "_"))
                .join(name.as_str()),
        }
    }

    /// Moves a verified temporary file into place as blob `digest`.
    async fn commit_blob(&self, tmp: &Path, digest: &Digest) -> Result<(), StorageError> {
        let dest = self.blob_path(digest);
        tokio::fs::rename(tmp, &dest)
            .await
            .map_err(io_err("rename into", &dest))
    }

    /// Stores a blob that arrives as a stream, checking its digest (and length when given).
    /// Nothing becomes visible unless both match.
    pub async fn write_blob_stream<S, E>(
        &self,
        stream: S,
        expected: Option<&Digest>,
        expected_len: Option<u64>,
    ) -> Result<(Digest, u64), StorageError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let tmp = self.temp_path();
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(io_err("create", &tmp))?;
            let mut out = BufWriter::with_capacity(IO_BUF, file);
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            let mut stream = std::pin::pin!(stream);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| StorageError::Stream {
                    received: len,
                    reason: e.to_string(),
                })?;
                hasher.update(&chunk);
                len += chunk.len() as u64;
                out.write_all(&chunk).await.map_err(io_err("write", &tmp))?;
            }
            out.flush().await.map_err(io_err("write", &tmp))?;
            out.get_ref()
                .sync_data()
                .await
                .map_err(io_err("sync", &tmp))?;
            let actual = Digest::from_sha256(hasher.finalize().into());
            if let Some(expected) = expected_len.filter(|&e| e != len) {
                return Err(StorageError::SizeMismatch {
                    expected,
                    actual: len,
                });
            }
            if let Some(expected) = expected.filter(|&e| *e != actual) {
                return Err(StorageError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
            self.commit_blob(&tmp, &actual).await?;
            Ok((actual, len))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Stores a blob held in memory.
    pub async fn write_blob_bytes(
        &self,
        data: Bytes,
        expected: Option<&Digest>,
    ) -> Result<Digest, StorageError> {
        let len = data.len() as u64;
        let stream = futures_util::stream::iter([Ok::<_, io::Error>(data)]);
        Ok(self.write_blob_stream(stream, expected, Some(len)).await?.0)
    }

    /// Moves an already-written, already-verified temporary file into place.
    pub async fn commit_verified(&self, tmp: &Path, digest: &Digest) -> Result<(), StorageError> {
        self.commit_blob(tmp, digest).await
    }

    /// Whether blob `digest` is linked into repository `name`.
    pub async fn blob_linked(&self, ns: Namespace<'_>, name: &RepoName, digest: &Digest) -> bool {
        tokio::fs::try_exists(self.repo_dir(ns, name).join("_layers").join(digest.hex()))
            .await
            .unwrap_or(false)
    }

    /// Links blob `digest` into repository `name`.
    pub async fn link_blob(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        let path = self.repo_dir(ns, name).join("_layers").join(digest.hex());
        self.write_small_file(&path, b"").await
    }

    /// Removes blob `digest` from repository `name`; false when it was not linked.
    pub async fn unlink_blob(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        let path = self.repo_dir(ns, name).join("_layers").join(digest.hex());
        remove_if_exists(&path).await
    }

    /// Writes a small file atomically (temporary file, then rename), creating parents.
    async fn write_small_file(&self, path: &Path, data: &[u8]) -> Result<(), StorageError> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err("create directory", parent))?;
        }
        let tmp = self.temp_path();
        tokio::fs::write(&tmp, data)
            .await
            .map_err(io_err("write", &tmp))?;
        tokio::fs::rename(&tmp, path)
            .await
            .map_err(io_err("rename into", path))
    }

    /// Stores a manifest (already validated) and links it, and the tag when `reference` is one.
    pub async fn put_manifest(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
        tag: Option<&Tag>,
        media_type: &str,
        bytes: Bytes,
        expected: Option<&Digest>,
    ) -> Result<Digest, StorageError> {
        let digest = self.write_blob_bytes(bytes, expected).await?;
        let dir = self.repo_dir(ns, name).join("_manifests");
        self.write_small_file(
            &dir.join("revisions").join(digest.hex()),
            media_type.as_bytes(),
        )
        .await?;
        if let Some(tag) = tag {
            self.write_small_file(
                &dir.join("tags").join(tag.as_str()),
                digest.as_str().as_bytes(),
            )
            .await?;
        }
        Ok(digest)
    }

    /// Reads a manifest by tag or digest; `None` when the repository does not have it.
    pub async fn get_manifest(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StorageError> {
        let dir = self.repo_dir(ns, name).join("_manifests");
        let (digest, tag_written) = match reference {
            Reference::Digest(d) => (d.clone(), None),
            Reference::Tag(t) => {
                let path = dir.join("tags").join(t.as_str());
                let Some(text) = read_optional(&path).await? else {
                    return Ok(None);
                };
                let written = tokio::fs::metadata(&path)
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok());
                let Ok(digest) = String::from_utf8_lossy(&text).trim().parse::<Digest>() else {
                    return Ok(None);
                };
                (digest, written)
            }
        };
        let Some(media_type) = read_optional(&dir.join("revisions").join(digest.hex())).await?
        else {
            return Ok(None);
        };
        let Some(bytes) = read_optional(&self.blob_path(&digest)).await? else {
            return Ok(None);
        };
        Ok(Some(StoredManifest {
            digest,
            media_type: String::from_utf8_lossy(&media_type).into_owned(),
            bytes: Bytes::from(bytes),
            tag_written,
        }))
    }

    /// Whether repository `name` holds manifest `digest`.
    pub async fn manifest_linked(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
        digest: &Digest,
    ) -> bool {
        tokio::fs::try_exists(
            self.repo_dir(ns, name)
                .join("_manifests/revisions")
                .join(digest.hex()),
        )
        .await
        .unwrap_or(false)
    }

    /// Deletes a manifest by digest (and every tag pointing at it) or a tag alone.
    /// Returns false when there was nothing to delete.
    pub async fn delete_manifest(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<bool, StorageError> {
        let dir = self.repo_dir(ns, name).join("_manifests");
        match reference {
            Reference::Tag(t) => remove_if_exists(&dir.join("tags").join(t.as_str())).await,
            Reference::Digest(d) => {
                let found = remove_if_exists(&dir.join("revisions").join(d.hex())).await?;
                for tag in self.tags(ns, name).await?.unwrap_or_default() {
                    let path = dir.join("tags").join(&tag);
                    if let Some(text) = read_optional(&path).await?
                        && String::from_utf8_lossy(&text).trim() == d.as_str()
                    {
                        remove_if_exists(&path).await?;
                    }
                }
                Ok(found)
            }
        }
    }

    /// The tags of a repository, sorted; `None` when the repository does not exist.
    pub async fn tags(
        &self,
        ns: Namespace<'_>,
        name: &RepoName,
    ) -> Result<Option<Vec<String>>, StorageError> {
        let repo = self.repo_dir(ns, name);
        if !tokio::fs::try_exists(&repo).await.unwrap_or(false) {
            return Ok(None);
        }
        let dir = repo.join("_manifests/tags");
        let mut tags = Vec::new();
        match tokio::fs::read_dir(&dir).await {
            Ok(mut rd) => {
                while let Some(e) = rd.next_entry().await.map_err(io_err("list", &dir))? {
                    tags.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("list", &dir)(e)),
        }
        tags.sort();
        Ok(Some(tags))
    }

    /// The names of all pushed repositories, sorted.
    pub async fn catalog(&self) -> Result<Vec<String>, StorageError> {
        let root = self.root.join("repos");
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let rd = std::fs::read_dir(&dir).map_err(io_err("list", &dir))?;
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name == "_manifests" || name == "_layers" {
                        if let Ok(rel) = dir.strip_prefix(&root) {
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
        .map_err(|e| StorageError::Stream {
            received: 0,
            reason: e.to_string(),
        })?
    }

    // ----- upload sessions -----

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    /// Starts an upload session for repository `name`; returns its id.
    pub async fn start_upload(&self, name: &RepoName) -> Result<String, StorageError> {
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.upload_dir(&id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err("create directory", &dir))?;
        let data = dir.join("data");
        tokio::fs::write(&data, b"")
            .await
            .map_err(io_err("create", &data))?;
        let n = dir.join("name");
        tokio::fs::write(&n, name.as_str())
            .await
            .map_err(io_err("write", &n))?;
        Ok(id)
    }

    /// Checks that session `id` exists and belongs to `name`; returns its data file and length.
    async fn session(&self, name: &RepoName, id: &str) -> Result<(PathBuf, u64), StorageError> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(StorageError::UploadUnknown(id.to_owned()));
        }
        let dir = self.upload_dir(id);
        match read_optional(&dir.join("name")).await? {
            Some(owner) if owner == name.as_str().as_bytes() => {}
            _ => return Err(StorageError::UploadUnknown(id.to_owned())),
        }
        let data = dir.join("data");
        let len = tokio::fs::metadata(&data)
            .await
            .map_err(|_| StorageError::UploadUnknown(id.to_owned()))?
            .len();
        Ok((data, len))
    }

    fn session_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.upload_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_owned()).or_default().clone()
    }

    /// The number of bytes session `id` holds.
    pub async fn upload_offset(&self, name: &RepoName, id: &str) -> Result<u64, StorageError> {
        Ok(self.session(name, id).await?.1)
    }

    /// Appends a chunk to session `id`. When `start` is given the chunk must begin at the
    /// session's current end. If the stream breaks off, the partial chunk is cut away again so
    /// the session can resume from its previous end.
    pub async fn append_upload<S, E>(
        &self,
        name: &RepoName,
        id: &str,
        start: Option<u64>,
        stream: S,
    ) -> Result<u64, StorageError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let lock = self.session_lock(id);
        let _guard = lock.lock().await;
        let (data, offset) = self.session(name, id).await?;
        if let Some(start) = start.filter(|&s| s != offset) {
            return Err(StorageError::UploadRange { offset, start });
        }
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&data)
            .await
            .map_err(io_err("open", &data))?;
        let mut out = BufWriter::with_capacity(IO_BUF, file);
        let mut len = offset;
        let mut stream = std::pin::pin!(stream);
        let result: Result<(), StorageError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| StorageError::Stream {
                    received: len - offset,
                    reason: e.to_string(),
                })?;
                out.write_all(&chunk)
                    .await
                    .map_err(io_err("write", &data))?;
                len += chunk.len() as u64;
            }
            out.flush().await.map_err(io_err("write", &data))
        }
        .await;
        if let Err(e) = result {
            // Cut the partial chunk away: the session stays at its previous, consistent end.
            let _ = out.flush().await;
            let file = out.into_inner();
            let _ = file.set_len(offset).await;
            return Err(e);
        }
        Ok(len)
    }

    /// Finishes session `id`: hashes its content, and if it matches `digest` moves it into
    /// place and links it into `name`. On a mismatch the session is removed and nothing is
    /// stored.
    pub async fn finish_upload(
        &self,
        name: &RepoName,
        id: &str,
        digest: &Digest,
    ) -> Result<u64, StorageError> {
        let lock = self.session_lock(id);
        let _guard = lock.lock().await;
        let (data, len) = self.session(name, id).await?;
        let path = data.clone();
        let actual = tokio::task::spawn_blocking(move || -> io::Result<Digest> {
            let mut f = std::fs::File::open(&path)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; IO_BUF];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            f.sync_data()?;
            Ok(Digest::from_sha256(hasher.finalize().into()))
        })
        .await
        .map_err(|e| io_err("hash", &data)(io::Error::other(e)))?
        .map_err(io_err("hash", &data))?;
        if actual != *digest {
            self.remove_session(id).await;
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        if self.blob_size(digest).await.is_none() {
            self.commit_blob(&data, digest).await?;
        }
        self.remove_session(id).await;
        self.link_blob(Namespace::Local, name, digest).await?;
        Ok(len)
    }

    /// Cancels session `id`.
    pub async fn cancel_upload(&self, name: &RepoName, id: &str) -> Result<(), StorageError> {
        self.session(name, id).await?;
        self.remove_session(id).await;
        Ok(())
    }

    async fn remove_session(&self, id: &str) {
        let _ = tokio::fs::remove_dir_all(self.upload_dir(id)).await;
    }

    /// Removes upload sessions untouched for longer than `max_age`; returns how many.
    pub async fn purge_stale_uploads(&self, max_age: Duration) -> Result<usize, StorageError> {
        let dir = self.root.join("uploads");
        let mut rd = tokio::fs::read_dir(&dir)
            .await
            .map_err(io_err("list", &dir))?;
        let now = SystemTime::now();
        let mut removed = 0;
        while let Some(e) = rd.next_entry().await.map_err(io_err("list", &dir))? {
            let touched = tokio::fs::metadata(e.path().join("data"))
                .await
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if now.duration_since(touched).unwrap_or_default() >= max_age {
                let id = e.file_name().to_string_lossy().into_owned();
                let lock = self.session_lock(&id);
                let _guard = lock.lock().await;
                self.remove_session(&id).await;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

async fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

async fn remove_if_exists(path: &Path) -> Result<bool, StorageError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn blob_with_wrong_digest_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let st = Storage::open(dir.path()).unwrap();
        let wrong = Digest::of(b"other");
        let err = st
            .write_blob_bytes(Bytes::from_static(b"data"), Some(&wrong))
            .await;
        assert!(matches!(err, Err(StorageError::DigestMismatch { .. })));
        assert_eq!(st.blob_size(&wrong).await, None);
        assert_eq!(st.blob_size(&Digest::of(b"data")).await, None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let d = st
            .write_blob_bytes(Bytes::from_static(b"data"), None)
            .await
            .unwrap();
        assert_eq!(d, Digest::of(b"data"));
        assert_eq!(st.blob_size(&d).await, Some(4));
    }

    #[tokio::test]
    async fn broken_chunk_is_cut_and_session_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let st = Storage::open(dir.path()).unwrap();
        let n = name("app");
        let id = st.start_upload(&n).await.unwrap();
        let ok = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from_static(b"hello "))]);
        assert_eq!(st.append_upload(&n, &id, Some(0), ok).await.unwrap(), 6);
        let broken = futures_util::stream::iter([
            Ok(Bytes::from_static(b"wor")),
            Err(io::Error::other("connection reset")),
        ]);
        assert!(st.append_upload(&n, &id, None, broken).await.is_err());
        assert_eq!(st.upload_offset(&n, &id).await.unwrap(), 6);
        let wrong_start =
            futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from_static(b"x"))]);
        assert!(matches!(
            st.append_upload(&n, &id, Some(9), wrong_start).await,
            Err(StorageError::UploadRange {
                offset: 6,
                start: 9
            })
        ));
        let rest = futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from_static(b"world"))]);
        st.append_upload(&n, &id, Some(6), rest).await.unwrap();
        // Another repository cannot use the session.
        assert!(st.upload_offset(&name("other"), &id).await.is_err());
        let d = Digest::of(b"hello world");
        st.finish_upload(&n, &id, &d).await.unwrap();
        assert!(st.blob_linked(Namespace::Local, &n, &d).await);
        assert!(st.upload_offset(&n, &id).await.is_err());
    }

    #[tokio::test]
    async fn manifests_tags_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let st = Storage::open(dir.path()).unwrap();
        let n = name("a/b");
        let tag: Tag = "v1".parse().unwrap();
        let d = st
            .put_manifest(
                Namespace::Local,
                &n,
                Some(&tag),
                "application/x",
                Bytes::from_static(b"{}"),
                None,
            )
            .await
            .unwrap();
        let m = st
            .get_manifest(Namespace::Local, &n, &Reference::Tag(tag.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.digest, d);
        assert_eq!(m.media_type, "application/x");
        assert!(m.tag_written.is_some());
        assert_eq!(
            st.tags(Namespace::Local, &n).await.unwrap().unwrap(),
            vec!["v1"]
        );
        assert_eq!(st.catalog().await.unwrap(), vec!["a/b"]);
        // The mirror namespace is separate.
        assert!(
            st.get_manifest(
                Namespace::Mirror("up:5000"),
                &n,
                &Reference::Tag(tag.clone())
            )
            .await
            .unwrap()
            .is_none()
        );
        assert!(
            st.delete_manifest(Namespace::Local, &n, &Reference::Digest(d.clone()))
                .await
                .unwrap()
        );
        assert!(
            st.tags(Namespace::Local, &n)
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );
        assert!(
            st.get_manifest(Namespace::Local, &n, &Reference::Digest(d))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn stale_uploads_are_purged() {
        let dir = tempfile::tempdir().unwrap();
        let st = Storage::open(dir.path()).unwrap();
        let n = name("app");
        let id = st.start_upload(&n).await.unwrap();
        assert_eq!(
            st.purge_stale_uploads(Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(st.purge_stale_uploads(Duration::ZERO).await.unwrap(), 1);
        assert!(st.upload_offset(&n, &id).await.is_err());
    }
}
