//! The pull-through mirror: one upstream registry per host name, a cache of what was pulled
//! through it, tag refresh after a TTL, and single-flight blob fetches that stream to every
//! waiting client while the blob is being stored.
//!
//! A blob fetch runs in its own task, writing the upstream's bytes to a temporary file and
//! publishing how far it got on a `watch` channel. Every client asking for that digest while
//! the fetch runs reads the same temporary file up to the published length, so the upstream is
//! asked once however many clients wait, and a client that goes away does not stop the fetch.
//! When the upstream's bytes match the digest the file is renamed into the store; when they do
//! not, the waiting clients' bodies end with an error and nothing is stored.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use url::Url;

use crate::client::{ClientConfig, ClientError, RegistryClient};
use crate::reference::{Digest, Reference, RepoName};
use crate::storage::{Namespace, Storage, StorageError, StoredManifest};

/// One upstream registry to mirror.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The registry host clients name (`docker.io`, `ghcr.io`, `10.5.0.1:5000`): matched against
    /// containerd's `ns=` parameter.
    pub host: String,
    /// Where to fetch from (`https://...` or `http://...`).
    pub url: Url,
    /// Credentials for basic auth or the token flow.
    pub credentials: Option<(String, String)>,
    /// Extra CA certificate (PEM) for the upstream.
    pub ca_cert: Option<PathBuf>,
    /// Skip TLS verification of the upstream.
    pub insecure_skip_verify: bool,
}

/// A mirror setting was not valid.
#[derive(Debug, thiserror::Error)]
pub enum MirrorConfigError {
    /// Not `HOST=URL`.
    #[error("mirror {0:?} is not HOST=URL (for example docker.io=https://registry-1.docker.io)")]
    Syntax(String),
    /// Host name with characters that cannot be a registry host.
    #[error("mirror host {0:?} is not a registry host name (letters, digits, '.', '-', ':')")]
    Host(String),
    /// URL not http(s).
    #[error("mirror URL {0:?} is not an http:// or https:// URL")]
    Url(String),
    /// Two mirrors for one host.
    #[error("mirror host {0:?} is given twice")]
    Duplicate(String),
    /// The default names no mirror.
    #[error("default mirror {0:?} is not one of the --mirror hosts")]
    Default(String),
    /// The client for an upstream could not be built.
    #[error("upstream {host}: {source}")]
    Client {
        /// The host.
        host: String,
        /// The cause.
        source: ClientError,
    },
}

impl UpstreamConfig {
    /// Parses `HOST=URL`.
    pub fn parse(spec: &str) -> Result<Self, MirrorConfigError> {
        let (host, url) = spec
            .split_once('=')
            .ok_or_else(|| MirrorConfigError::Syntax(spec.to_owned()))?;
        let valid_host = !host.is_empty()
            && host != "."
            && host != ".."
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'));
        if !valid_host {
            return Err(MirrorConfigError::Host(host.to_owned()));
        }
        let url = Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| MirrorConfigError::Url(url.to_owned()))?;
        Ok(Self {
            host: host.to_owned(),
            url,
            credentials: None,
            ca_cert: None,
            insecure_skip_verify: false,
        })
    }
}

/// Where a pull was served from, for the request log and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullSource {
    /// Pushed directly to this registry.
    Local,
    /// From the mirror cache.
    Cache,
    /// From the mirror cache, after the upstream failed to refresh a stale tag.
    StaleCache,
    /// Fetched from the upstream now.
    Upstream,
    /// Joined a fetch from the upstream already running for another client.
    UpstreamShared,
}

impl PullSource {
    /// The word in the request log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cache => "hit",
            Self::StaleCache => "hit-stale",
            Self::Upstream => "upstream",
            Self::UpstreamShared => "upstream-shared",
        }
    }
}

/// Counters of blob and manifest fetches from upstreams (for tests and benchmarks).
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Blob fetches started against an upstream.
    pub upstream_blob_fetches: AtomicU64,
    /// Manifest fetches against an upstream.
    pub upstream_manifest_fetches: AtomicU64,
}

/// An upstream with its client.
#[derive(Debug)]
pub struct Upstream {
    /// Its configuration.
    pub config: UpstreamConfig,
    client: RegistryClient,
}

impl Upstream {
    /// The host name.
    pub fn host(&self) -> &str {
        &self.config.host
    }
}

/// A failure fetching through the mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The upstream does not have it (404).
    #[error("{what} not found at upstream {host}")]
    NotFound {
        /// The upstream.
        host: String,
        /// What was asked.
        what: String,
    },
    /// The upstream failed or could not be reached.
    #[error("upstream {host}: {source}")]
    Upstream {
        /// The upstream.
        host: String,
        /// The cause.
        source: ClientError,
    },
    /// Storing failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A shared fetch failed.
    #[error("fetch of {digest} from upstream {host} failed: {reason}")]
    Fetch {
        /// The upstream.
        host: String,
        /// The blob.
        digest: Digest,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Clone, Default)]
struct FetchProgress {
    /// Bytes written to the temporary file and readable.
    written: u64,
    /// The upstream's Content-Length, once its headers arrived.
    total: Option<u64>,
    /// Whether the upstream's headers arrived (the body can start).
    started: bool,
    /// `Some` when done: `Ok` stored, `Err` why it failed.
    outcome: Option<Result<(), Arc<str>>>,
}

#[derive(Debug)]
struct InflightFetch {
    temp: PathBuf,
    progress: watch::Receiver<FetchProgress>,
}

/// A blob being served through the mirror.
pub enum MirrorBlob {
    /// Already stored: serve the file.
    Stored {
        /// Its size.
        size: u64,
    },
    /// Being fetched: stream it as it arrives.
    Streaming {
        /// The length, when the upstream said.
        size: Option<u64>,
        /// The bytes.
        body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
        /// Whether this request started the fetch or joined one.
        source: PullSource,
    },
}

impl std::fmt::Debug for MirrorBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stored { size } => f.debug_struct("Stored").field("size", size).finish(),
            Self::Streaming { size, source, .. } => f
                .debug_struct("Streaming")
                .field("size", size)
                .field("source", source)
                .finish_non_exhaustive(),
        }
    }
}

/// The mirror: upstreams by host, the default upstream, and fetches in flight.
#[derive(Debug)]
pub struct Mirror {
    upstreams: HashMap<String, Arc<Upstream>>,
    default: Option<String>,
    tag_ttl: Duration,
    inflight: Mutex<HashMap<Digest, Arc<InflightFetch>>>,
    /// Fetch counters.
    pub stats: MirrorStats,
}

impl Mirror {
    /// Builds the mirror. The default upstream (for requests without `ns=`) is `default`, else
    /// `docker.io` when configured, else the first upstream.
    pub fn new(
        upstreams: Vec<UpstreamConfig>,
        default: Option<String>,
        tag_ttl: Duration,
    ) -> Result<Self, MirrorConfigError> {
        let mut map = HashMap::new();
        let first = upstreams.first().map(|u| u.host.clone());
        for cfg in upstreams {
            let client = RegistryClient::new(ClientConfig {
                credentials: cfg.credentials.clone(),
                ca_cert: cfg.ca_cert.clone(),
                insecure_skip_verify: cfg.insecure_skip_verify,
                ..ClientConfig::new(cfg.url.clone())
            })
            .map_err(|source| MirrorConfigError::Client {
                host: cfg.host.clone(),
                source,
            })?;
            let host = cfg.host.clone();
            if map
                .insert(
                    host.clone(),
                    Arc::new(Upstream {
                        config: cfg,
                        client,
                    }),
                )
                .is_some()
            {
                return Err(MirrorConfigError::Duplicate(host));
            }
        }
        let default = match default {
            Some(d) if !map.contains_key(&d) => return Err(MirrorConfigError::Default(d)),
            Some(d) => Some(d),
            None if map.contains_key("docker.io") => Some("docker.io".to_owned()),
            None => first,
        };
        Ok(Self {
            upstreams: map,
            default,
            tag_ttl,
            inflight: Mutex::new(HashMap::new()),
            stats: MirrorStats::default(),
        })
    }

    /// The upstream for a request: `ns=<host>` when given, else the default.
    pub fn select(&self, ns: Option<&str>) -> Option<Arc<Upstream>> {
        let host = ns.or(self.default.as_deref())?;
        self.upstreams.get(host).cloned()
    }

    /// A manifest through upstream `up`: from the cache when it is a digest or a fresh tag,
    /// else from the upstream (stored on the way); a stale cached tag is served when the
    /// upstream fails.
    pub async fn manifest(
        &self,
        storage: &Storage,
        up: &Upstream,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<(StoredManifest, PullSource), MirrorError> {
        let ns = Namespace::Mirror(up.host());
        let cached = storage.get_manifest(ns, name, reference).await?;
        if let Some(m) = &cached {
            let fresh = match m.tag_written {
                None => true, // by digest: immutable
                Some(t) => t.elapsed().is_ok_and(|age| age < self.tag_ttl),
            };
            if fresh {
                return Ok((m.clone(), PullSource::Cache));
            }
        }
        self.stats
            .upstream_manifest_fetches
            .fetch_add(1, Ordering::Relaxed);
        match up.client.get_manifest(name, reference).await {
            Ok((media_type, bytes, digest)) => {
                let tag = match reference {
                    Reference::Tag(t) => Some(t),
                    Reference::Digest(_) => None,
                };
                let media_type = if media_type.is_empty() {
                    crate::manifest::ParsedManifest::parse(&bytes, None)
                        .map(|m| m.media_type)
                        .unwrap_or_default()
                } else {
                    media_type
                };
                storage
                    .put_manifest(ns, name, tag, &media_type, bytes.clone(), Some(&digest))
                    .await?;
                Ok((
                    StoredManifest {
                        digest,
                        media_type,
                        bytes,
                        tag_written: None,
                    },
                    PullSource::Upstream,
                ))
            }
            Err(e) => match cached {
                Some(m) => {
                    tracing::warn!(upstream = up.host(), %name, %reference, error = %e,
                        "tag refresh failed; serving the cached manifest");
                    Ok((m, PullSource::StaleCache))
                }
                None if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {
                    Err(MirrorError::NotFound {
                        host: up.host().to_owned(),
                        what: format!("manifest {name}:{reference}"),
                    })
                }
                None => Err(MirrorError::Upstream {
                    host: up.host().to_owned(),
                    source: e,
                }),
            },
        }
    }

    /// The size of a blob at the upstream, without fetching it (for `HEAD`).
    pub async fn head_blob(
        &self,
        up: &Upstream,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, MirrorError> {
        up.client
            .head_blob(name, digest)
            .await
            .map_err(|source| MirrorError::Upstream {
                host: up.host().to_owned(),
                source,
            })
    }

    /// A blob through upstream `up`: stored already, or fetched once and streamed.
    pub async fn blob(
        self: &Arc<Self>,
        storage: &Arc<Storage>,
        up: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<MirrorBlob, MirrorError> {
        loop {
            if let Some(size) = storage.blob_size(digest).await {
                return Ok(MirrorBlob::Stored { size });
            }
            let (fetch, source) = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                match inflight.get(digest) {
                    Some(f) => (f.clone(), PullSource::UpstreamShared),
                    None => {
                        let f = self.start_fetch(storage, up, name, digest);
                        inflight.insert(digest.clone(), f.clone());
                        (f, PullSource::Upstream)
                    }
                }
            };
            let mut rx = fetch.progress.clone();
            let progress = rx
                .wait_for(|p| p.started || p.outcome.is_some())
                .await
                .map(|p| p.clone())
                .unwrap_or_default();
            match &progress.outcome {
                Some(Err(reason)) if !progress.started => {
                    return Err(if reason.starts_with("404") {
                        MirrorError::NotFound {
                            host: up.host().to_owned(),
                            what: format!("blob {digest}"),
                        }
                    } else {
                        MirrorError::Fetch {
                            host: up.host().to_owned(),
                            digest: digest.clone(),
                            reason: reason.to_string(),
                        }
                    });
                }
                Some(Ok(())) => continue, // already stored: serve the file
                _ => {}
            }
            // Open the temporary file; if the fetch finished and renamed it meanwhile, the
            // stored blob is served on the next round.
            let Ok(file) = std::fs::File::open(&fetch.temp) else {
                continue;
            };
            return Ok(MirrorBlob::Streaming {
                size: progress.total,
                body: Box::pin(follow(file, rx)),
                source,
            });
        }
    }

    fn start_fetch(
        self: &Arc<Self>,
        storage: &Arc<Storage>,
        up: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
    ) -> Arc<InflightFetch> {
        let temp = storage.temp_path();
        let (tx, rx) = watch::channel(FetchProgress::default());
        let fetch = Arc::new(InflightFetch {
            temp: temp.clone(),
            progress: rx,
        });
        self.stats
            .upstream_blob_fetches
            .fetch_add(1, Ordering::Relaxed);
        let (mirror, storage, up, name, digest) = (
            self.clone(),
            storage.clone(),
            up.clone(),
            name.clone(),
            digest.clone(),
        );
        tokio::spawn(async move {
            let result = run_fetch(&storage, &up, &name, &digest, &temp, &tx).await;
            if let Err(e) = &result {
                tracing::warn!(upstream = up.host(), %name, %digest, error = %e, "blob fetch failed");
                let _ = tokio::fs::remove_file(&temp).await;
            } else {
                let ns = Namespace::Mirror(up.host());
                if let Err(e) = storage.link_blob(ns, &name, &digest).await {
                    tracing::warn!(%name, %digest, error = %e, "could not link cached blob");
                }
            }
            mirror
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
            tx.send_modify(|p| p.outcome = Some(result.map_err(|e| Arc::from(e.as_str()))));
        });
        fetch
    }

    /// How many blob fetches are running.
    pub fn fetches_in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Fetches one blob into `temp`, publishing progress, and moves it into the store when its
/// digest matches. Errors are strings because they are shared by every waiting client; a
/// `404` error starts with "404".
async fn run_fetch(
    storage: &Storage,
    up: &Upstream,
    name: &RepoName,
    digest: &Digest,
    temp: &std::path::Path,
    tx: &watch::Sender<FetchProgress>,
) -> Result<(), String> {
    let resp = up
        .client
        .get_blob(name, digest)
        .await
        .map_err(|e| match e.status() {
            Some(s) if s == reqwest::StatusCode::NOT_FOUND => format!("404 {e}"),
            _ => e.to_string(),
        })?;
    let total = resp.content_length();
    let mut file =
        std::fs::File::create(temp).map_err(|e| format!("create {}: {e}", temp.display()))?;
    tx.send_modify(|p| {
        p.total = total;
        p.started = true;
    });
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut stream = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::with_capacity(1 << 18);
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(chunk) = next {
            let chunk =
                chunk.map_err(|e| format!("upstream body broke off after {written} bytes: {e}"))?;
            hasher.update(&chunk);
            pending.extend_from_slice(&chunk);
        }
        // Batch small network chunks into larger disk writes.
        if pending.len() >= (1 << 18) || (done && !pending.is_empty()) {
            let data = std::mem::take(&mut pending);
            let n = data.len() as u64;
            file = tokio::task::spawn_blocking(move || file.write_all(&data).map(|()| file))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("write {}: {e}", temp.display()))?;
            written += n;
            tx.send_modify(|p| p.written = written);
        }
        if done {
            break;
        }
    }
    if let Some(t) = total.filter(|&t| t != written) {
        return Err(format!("upstream sent {written} bytes, announced {t}"));
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
    if actual != *digest {
        return Err(format!("upstream content has digest {actual}"));
    }
    file = tokio::task::spawn_blocking(move || file.sync_data().map(|()| file))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("sync {}: {e}", temp.display()))?;
    drop(file);
    storage
        .commit_verified(temp, digest)
        .await
        .map_err(|e| e.to_string())
}

/// Streams a file that another task is writing, following its published length.
fn follow(
    file: std::fs::File,
    rx: watch::Receiver<FetchProgress>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::unfold((Some(file), rx, 0u64), |(file, mut rx, pos)| async move {
        let mut file = file?;
        loop {
            let progress = rx.borrow_and_update().clone();
            if progress.written > pos {
                let want = (progress.written - pos).min(1 << 18) as usize;
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; want];
                    file.seek(SeekFrom::Start(pos))?;
                    file.read_exact(&mut buf)?;
                    Ok::<_, std::io::Error>((file, buf))
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                return Some(match read {
                    Ok((file, buf)) => {
                        let n = buf.len() as u64;
                        (Ok(Bytes::from(buf)), (Some(file), rx, pos + n))
                    }
                    Err(e) => (Err(e), (None, rx, pos)),
                });
            }
            match progress.outcome {
                Some(Ok(())) => return None,
                Some(Err(reason)) => {
                    return Some((
                        Err(std::io::Error::other(reason.to_string())),
                        (None, rx, pos),
                    ));
                }
                None => {}
            }
            if rx.changed().await.is_err() {
                return Some((
                    Err(std::io::Error::other("fetch task ended without an outcome")),
                    (None, rx, pos),
                ));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_specs() {
        let u = UpstreamConfig::parse("docker.io=https://registry-1.docker.io").unwrap();
        assert_eq!(u.host, "docker.io");
        assert!(UpstreamConfig::parse("10.5.0.1:5000=http://10.5.0.1:5000").is_ok());
        assert!(UpstreamConfig::parse("docker.io").is_err());
        assert!(UpstreamConfig::parse("../x=http://a").is_err());
        assert!(UpstreamConfig::parse("a/b=http://a").is_err());
        assert!(UpstreamConfig::parse("a=ftp://a").is_err());
    }

    #[test]
    fn default_upstream_selection() {
        let ups = vec![
            UpstreamConfig::parse("ghcr.io=http://127.0.0.1:1").unwrap(),
            UpstreamConfig::parse("docker.io=http://127.0.0.1:2").unwrap(),
        ];
        let m = Mirror::new(ups.clone(), None, Duration::ZERO).unwrap();
        assert_eq!(m.select(None).unwrap().host(), "docker.io");
        assert_eq!(m.select(Some("ghcr.io")).unwrap().host(), "ghcr.io");
        assert!(m.select(Some("quay.io")).is_none());
        let m = Mirror::new(ups[..1].to_vec(), None, Duration::ZERO).unwrap();
        assert_eq!(m.select(None).unwrap().host(), "ghcr.io");
        assert!(Mirror::new(ups.clone(), Some("quay.io".into()), Duration::ZERO).is_err());
        let dup = vec![ups[0].clone(), ups[0].clone()];
        assert!(Mirror::new(dup, None, Duration::ZERO).is_err());
    }
}
