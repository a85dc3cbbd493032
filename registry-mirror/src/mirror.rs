//! The pull-through mirror: one upstream registry per host name, a cache of what was pulled
//! through it, tag refresh after a TTL, and single-flight blob fetches that stream to every
//! waiting client while the blob is being stored.
//!
//! A blob fetch runs in its own task. Each chunk from the upstream is hashed, handed to every
//! client at once from memory, and queued for a blocking writer that appends it to a temporary
//! file; chunks stay in memory until they are on disk and [`KEEP_IN_MEMORY`] bytes behind the
//! newest, so a client that joins late or reads slowly catches up from the file and then from
//! memory. The upstream is asked once however many clients wait, and a client that goes away
//! does not stop the fetch. Clients' bodies end as soon as the last byte arrived and the digest
//! matched; the `fsync` and the rename into the store follow, and the fetch stays joinable
//! until then. When the bytes do not match, the clients' bodies end with an error and nothing
//! is stored.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Phase timings of every blob fetch that was stored, oldest first.
    pub fetch_timings: Mutex<Vec<FetchTiming>>,
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

/// Received bytes kept in memory behind the newest one, so that clients reading close behind
/// the fetch are served from memory; older bytes are read back from the temporary file.
const KEEP_IN_MEMORY: u64 = 8 << 20;
/// Received bytes not yet written to disk at most; the fetch waits for the disk beyond this.
const MAX_UNWRITTEN_CHUNKS: usize = 1024;
/// Largest read from the temporary file for a client behind the in-memory window.
const FILE_READ: u64 = 1 << 18;

/// How long each phase of one upstream blob fetch took (for the benchmark's profile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTiming {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub bytes: u64,
    /// Until the upstream's response headers arrived.
    pub headers: Duration,
    /// Until the first body byte was available to clients.
    pub first_byte: Duration,
    /// Until the last byte arrived and the digest was checked: clients' bodies end here.
    pub verified: Duration,
    /// Until every byte was in the temporary file.
    pub on_disk: Duration,
    /// The `fsync` of the temporary file.
    pub sync: Duration,
    /// Renaming it into the store and linking it.
    pub commit: Duration,
    /// How many chunks the upstream's body came in (each is one publication to the clients,
    /// one hand-over to the disk writer and one hash update).
    pub chunks: u64,
}

#[derive(Debug, Default)]
struct FetchState {
    /// Received chunks still held in memory, oldest first, each with its offset.
    chunks: VecDeque<(u64, Bytes)>,
    /// Bytes received from the upstream so far.
    received: u64,
    /// Bytes written to the temporary file so far (readable there).
    written: u64,
    /// The upstream's Content-Length, once its headers arrived.
    total: Option<u64>,
    /// Whether the upstream's headers arrived and the temporary file exists.
    started: bool,
    /// `Some` when the body is complete: `Ok` every byte arrived and matches the digest, `Err`
    /// why the fetch failed. Clients' bodies end here.
    outcome: Option<Result<(), FetchFailure>>,
    /// Whether the blob is in the store (or the fetch ended for good).
    settled: bool,
}

impl FetchState {
    /// Drops chunks that are on disk and far enough behind the newest byte.
    fn evict(&mut self) {
        while let Some((offset, chunk)) = self.chunks.front() {
            let end = offset + chunk.len() as u64;
            if end <= self.written && end + KEEP_IN_MEMORY <= self.received {
                self.chunks.pop_front();
            } else {
                break;
            }
        }
    }

    /// What a client at `pos` reads next.
    fn next_for(&self, pos: u64) -> Next {
        if pos < self.received {
            match self.chunks.front() {
                Some((first, _)) if *first <= pos => {
                    let i = self.chunks.partition_point(|(o, _)| *o <= pos) - 1;
                    let (offset, chunk) = &self.chunks[i];
                    Next::Memory(chunk.slice((pos - offset) as usize..))
                }
                // Evicted chunks are on disk.
                first => {
                    let end = first.map_or(self.written, |(o, _)| *o).min(self.written);
                    Next::File((end - pos).min(FILE_READ))
                }
            }
        } else {
            match &self.outcome {
                Some(Ok(())) => Next::End,
                Some(Err(reason)) => Next::Failed(reason.clone()),
                None => Next::Wait,
            }
        }
    }
}

enum Next {
    Memory(Bytes),
    File(u64),
    End,
    Failed(FetchFailure),
    Wait,
}

#[derive(Debug)]
struct InflightFetch {
    temp: PathBuf,
    state: Mutex<FetchState>,
    changed: watch::Sender<()>,
}

impl InflightFetch {
    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut FetchState)) {
        f(&mut self.lock());
        self.changed.send_replace(());
    }
}

/// Why a fetch failed, shared by every client waiting on it.
#[derive(Debug, Clone)]
enum FetchFailure {
    /// The upstream does not have the blob (404).
    NotFound,
    /// Anything else, with the reason.
    Failed(Arc<str>),
}

impl FetchFailure {
    fn failed(reason: impl std::fmt::Display) -> Self {
        Self::Failed(Arc::from(reason.to_string()))
    }

    fn reason(&self) -> String {
        match self {
            Self::NotFound => "the upstream does not have it".to_owned(),
            Self::Failed(r) => r.to_string(),
        }
    }
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

/// (upstream host, repository, tag or digest).
type ManifestKey = (String, String, String);

/// The mirror: upstreams by host, the default upstream, and fetches in flight.
#[derive(Debug)]
pub struct Mirror {
    upstreams: HashMap<String, Arc<Upstream>>,
    default: Option<String>,
    tag_ttl: Duration,
    inflight: Mutex<HashMap<Digest, Arc<InflightFetch>>>,
    /// Manifests fetched from an upstream whose store is still running, by (host, repository,
    /// tag or digest), with the time they arrived: served as if stored then.
    storing_manifests: Mutex<HashMap<ManifestKey, StoredManifest>>,
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
            storing_manifests: Mutex::new(HashMap::new()),
            stats: MirrorStats::default(),
        })
    }

    /// The upstream for a request: `ns=<host>` when given, else the default.
    pub fn select(&self, ns: Option<&str>) -> Option<Arc<Upstream>> {
        let host = ns.or(self.default.as_deref())?;
        self.upstreams.get(host).cloned()
    }

    /// A manifest through upstream `up`: from the cache when it is a digest or a fresh tag,
    /// else from the upstream; a stale cached tag is served when the upstream fails. A manifest
    /// from the upstream is answered at once and stored beside; until it is stored, requests
    /// for it are served from memory as if it had been stored when it arrived.
    pub async fn manifest(
        self: &Arc<Self>,
        storage: &Arc<Storage>,
        up: &Upstream,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<(StoredManifest, PullSource), MirrorError> {
        let ns = Namespace::Mirror(up.host());
        let key = |r: &dyn std::fmt::Display| {
            (
                up.host().to_owned(),
                name.as_str().to_owned(),
                r.to_string(),
            )
        };
        let storing = self
            .storing_manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key(reference))
            .cloned();
        let cached = match storing {
            Some(m) => Some(m),
            None => storage.get_manifest(ns, name, reference).await?,
        };
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
                let fetched = StoredManifest {
                    digest: digest.clone(),
                    media_type: media_type.clone(),
                    bytes: bytes.clone(),
                    tag_written: None,
                };
                let keys = [key(reference), key(&digest)];
                {
                    let mut storing = self
                        .storing_manifests
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    for k in &keys {
                        let tag_written = (k.2 != digest.as_str()).then(std::time::SystemTime::now);
                        storing.insert(
                            k.clone(),
                            StoredManifest {
                                tag_written,
                                ..fetched.clone()
                            },
                        );
                    }
                }
                let (mirror, storage, host, name, tag) = (
                    self.clone(),
                    storage.clone(),
                    up.host().to_owned(),
                    name.clone(),
                    tag.cloned(),
                );
                tokio::spawn(async move {
                    let ns = Namespace::Mirror(&host);
                    if let Err(e) = storage
                        .put_manifest(ns, &name, tag.as_ref(), &media_type, bytes, Some(&digest))
                        .await
                    {
                        tracing::warn!(upstream = %host, %name, %digest, error = %e, "could not store the manifest");
                    }
                    let mut storing = mirror
                        .storing_manifests
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    for k in &keys {
                        // A newer fetch of the same tag may have replaced the entry.
                        if storing.get(k).is_some_and(|m| m.digest == digest) {
                            storing.remove(k);
                        }
                    }
                });
                Ok((fetched, PullSource::Upstream))
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
            let running = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(digest)
                .cloned();
            let (fetch, source) = match running {
                Some(f) => (f, PullSource::UpstreamShared),
                None => {
                    // A fetch leaves the map only after its blob is stored: if one finished
                    // since the check above, the blob is there now.
                    if let Some(size) = storage.blob_size(digest).await {
                        return Ok(MirrorBlob::Stored { size });
                    }
                    let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                    match inflight.get(digest) {
                        Some(f) => (f.clone(), PullSource::UpstreamShared),
                        None => {
                            let f = self.start_fetch(storage, up, name, digest);
                            inflight.insert(digest.clone(), f.clone());
                            (f, PullSource::Upstream)
                        }
                    }
                }
            };
            let mut rx = fetch.changed.subscribe();
            let (started, outcome, total) = loop {
                rx.borrow_and_update();
                {
                    let st = fetch.lock();
                    if st.started || st.outcome.is_some() {
                        break (st.started, st.outcome.clone(), st.total);
                    }
                }
                if rx.changed().await.is_err() {
                    break (false, None, None);
                }
            };
            let source = match outcome {
                Some(Err(failure)) if !started => {
                    return Err(match failure {
                        FetchFailure::NotFound => MirrorError::NotFound {
                            host: up.host().to_owned(),
                            what: format!("blob {digest}"),
                        },
                        FetchFailure::Failed(reason) => MirrorError::Fetch {
                            host: up.host().to_owned(),
                            digest: digest.clone(),
                            reason: reason.to_string(),
                        },
                    });
                }
                // Joined a fetch that is complete and verified, only not yet renamed into the
                // store: a hit.
                Some(Ok(())) if source == PullSource::UpstreamShared => PullSource::Cache,
                _ => source,
            };
            if !started {
                continue;
            }
            // Open the temporary file; if the fetch finished and renamed it meanwhile, the
            // stored blob is served on the next round.
            let Ok(file) = std::fs::File::open(&fetch.temp) else {
                continue;
            };
            return Ok(MirrorBlob::Streaming {
                size: total,
                body: Box::pin(follow(Arc::new(file), fetch, rx)),
                source,
            });
        }
    }

    /// Waits until a fetch of `digest` that is running now has stored the blob (or failed);
    /// returns at once when none runs.
    pub async fn settled(&self, digest: &Digest) {
        let fetch = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned();
        let Some(fetch) = fetch else {
            return;
        };
        let mut rx = fetch.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if fetch.lock().settled || rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn start_fetch(
        self: &Arc<Self>,
        storage: &Arc<Storage>,
        up: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
    ) -> Arc<InflightFetch> {
        let fetch = Arc::new(InflightFetch {
            temp: storage.temp_path(),
            state: Mutex::new(FetchState::default()),
            changed: watch::channel(()).0,
        });
        self.stats
            .upstream_blob_fetches
            .fetch_add(1, Ordering::Relaxed);
        let (mirror, storage, up, name, digest, task_fetch) = (
            self.clone(),
            storage.clone(),
            up.clone(),
            name.clone(),
            digest.clone(),
            fetch.clone(),
        );
        tokio::spawn(async move {
            let fetch = task_fetch;
            match run_fetch(&storage, &up, &name, &digest, &fetch).await {
                Ok(timing) => {
                    mirror
                        .stats
                        .fetch_timings
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(timing);
                }
                Err(failure) => {
                    tracing::warn!(upstream = up.host(), %name, %digest, error = %failure.reason(), "blob fetch failed");
                    let _ = tokio::fs::remove_file(&fetch.temp).await;
                    fetch.update(|s| {
                        if s.outcome.is_none() {
                            s.outcome = Some(Err(failure));
                        }
                    });
                }
            }
            mirror
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
            fetch.update(|s| s.settled = true);
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

/// Fetches one blob: hands every chunk to the waiting clients and to the disk writer, ends the
/// clients' bodies once the digest matches, then syncs the temporary file and moves it into
/// the store. Returns how long each phase took.
async fn run_fetch(
    storage: &Storage,
    up: &Upstream,
    name: &RepoName,
    digest: &Digest,
    fetch: &Arc<InflightFetch>,
) -> Result<FetchTiming, FetchFailure> {
    let start = Instant::now();
    let resp = up
        .client
        .get_blob(name, digest)
        .await
        .map_err(|e| match e.status() {
            Some(s) if s == reqwest::StatusCode::NOT_FOUND => FetchFailure::NotFound,
            _ => FetchFailure::failed(e),
        })?;
    let headers = start.elapsed();
    let total = resp.content_length();
    let temp = fetch.temp.clone();
    let file = std::fs::File::create(&temp)
        .map_err(|e| FetchFailure::failed(format!("create {}: {e}", temp.display())))?;
    let (to_disk, from_fetch) = tokio::sync::mpsc::channel::<Bytes>(MAX_UNWRITTEN_CHUNKS);
    let writer = {
        let fetch = fetch.clone();
        tokio::task::spawn_blocking(move || write_chunks(file, from_fetch, &fetch))
    };
    fetch.update(|s| {
        s.total = total;
        s.started = true;
    });

    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut first_byte = None;
    let mut stream = resp.bytes_stream();
    let mut broke = None;
    let mut chunks = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                broke = Some(format!(
                    "upstream body broke off after {received} bytes: {e}"
                ));
                break;
            }
        };
        if chunk.is_empty() {
            continue;
        }
        received += chunk.len() as u64;
        chunks += 1;
        // Clients first, then the disk writer (another thread), then the hash: nothing on the
        // way to the clients waits for the disk or the digest.
        fetch.update(|s| {
            let at = s.received;
            s.received += chunk.len() as u64;
            s.chunks.push_back((at, chunk.clone()));
            s.evict();
        });
        first_byte.get_or_insert_with(|| start.elapsed());
        if to_disk.send(chunk.clone()).await.is_err() {
            break; // the writer failed: its error is below
        }
        hasher.update(&chunk);
    }
    drop(to_disk);
    let check = match broke {
        Some(reason) => Err(reason),
        None => match total.filter(|&t| t != received) {
            Some(t) => Err(format!("upstream sent {received} bytes, announced {t}")),
            None => {
                let actual = Digest::from_sha256(hasher.finalize().into());
                if actual == *digest {
                    Ok(())
                } else {
                    Err(format!("upstream content has digest {actual}"))
                }
            }
        },
    };
    // Every byte is in memory or on disk (a chunk leaves memory only once written): the
    // clients' bodies can end now, whether or not the disk writer has caught up.
    if check.is_ok() {
        fetch.update(|s| s.outcome = Some(Ok(())));
    }
    let verified = start.elapsed();
    let written = writer.await.map_err(FetchFailure::failed).and_then(|r| {
        r.map_err(|e| FetchFailure::failed(format!("write {}: {e}", temp.display())))
    });
    // A body error, a short body or a wrong digest is the clients' error; a disk error after a
    // good body is only the cache's.
    check.map_err(FetchFailure::failed)?;
    let file = written?;
    let on_disk = start.elapsed();
    let file = tokio::task::spawn_blocking(move || file.sync_data().map(|()| file))
        .await
        .map_err(FetchFailure::failed)?
        .map_err(|e| FetchFailure::failed(format!("sync {}: {e}", temp.display())))?;
    drop(file);
    let sync = start.elapsed() - on_disk;
    let committing = Instant::now();
    storage
        .commit_verified(&temp, digest)
        .await
        .map_err(FetchFailure::failed)?;
    let ns = Namespace::Mirror(up.host());
    if let Err(e) = storage.link_blob(ns, name, digest).await {
        tracing::warn!(%name, %digest, error = %e, "could not link cached blob");
    }
    Ok(FetchTiming {
        digest: digest.clone(),
        bytes: received,
        headers,
        first_byte: first_byte.unwrap_or(verified),
        verified,
        on_disk,
        sync,
        commit: committing.elapsed(),
        chunks,
    })
}

/// The disk writer of a fetch (a blocking task): appends the chunks as they come, several at a
/// time with one vectored write, and publishes how much is on disk.
fn write_chunks(
    mut file: std::fs::File,
    mut chunks: tokio::sync::mpsc::Receiver<Bytes>,
    fetch: &InflightFetch,
) -> std::io::Result<std::fs::File> {
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    while let Some(first) = chunks.blocking_recv() {
        batch.push(first);
        while batch.len() < 64 {
            match chunks.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let n: usize = batch.iter().map(Bytes::len).sum();
        write_all_vectored(&mut file, &mut batch)?;
        fetch.update(|s| {
            s.written += n as u64;
            s.evict();
        });
    }
    Ok(file)
}

/// Writes every buffer of `bufs` (emptying it), handling short writes.
fn write_all_vectored(file: &mut std::fs::File, bufs: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<std::io::IoSlice<'_>> = bufs[first..]
            .iter()
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut n = file.write_vectored(&slices)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = bufs[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                bufs[first] = bufs[first].slice(n..);
                n = 0;
            }
        }
    }
    bufs.clear();
    Ok(())
}

/// A client's body of a blob being fetched: from memory while it is close behind the fetch,
/// from the temporary file when it fell further behind, ending when the fetch verified the
/// digest.
fn follow(
    file: Arc<std::fs::File>,
    fetch: Arc<InflightFetch>,
    rx: watch::Receiver<()>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::unfold(
        (Some(file), fetch, rx, 0u64),
        |(file, fetch, mut rx, pos)| async move {
            let file = file?;
            loop {
                rx.borrow_and_update();
                let next = fetch.lock().next_for(pos);
                match next {
                    Next::Memory(bytes) => {
                        let n = bytes.len() as u64;
                        return Some((Ok(bytes), (Some(file), fetch, rx, pos + n)));
                    }
                    Next::File(want) => {
                        let reader = file.clone();
                        let read = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; want as usize];
                            reader.read_exact_at(&mut buf, pos)?;
                            Ok::<_, std::io::Error>(buf)
                        })
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r);
                        return Some(match read {
                            Ok(buf) => (Ok(Bytes::from(buf)), (Some(file), fetch, rx, pos + want)),
                            Err(e) => (Err(e), (None, fetch, rx, pos)),
                        });
                    }
                    Next::End => return None,
                    Next::Failed(failure) => {
                        return Some((
                            Err(std::io::Error::other(failure.reason())),
                            (None, fetch, rx, pos),
                        ));
                    }
                    Next::Wait => {
                        if rx.changed().await.is_err() {
                            return Some((
                                Err(std::io::Error::other("fetch task ended without an outcome")),
                                (None, fetch, rx, pos),
                            ));
                        }
                    }
                }
            }
        },
    )
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

    fn state_with(chunks: &[(u64, usize)], written: u64) -> FetchState {
        let mut s = FetchState::default();
        for (i, &(offset, len)) in chunks.iter().enumerate() {
            s.chunks
                .push_back((offset, Bytes::from(vec![i as u8; len])));
            s.received = offset + len as u64;
        }
        s.written = written;
        s
    }

    #[test]
    fn clients_read_from_memory_near_the_front_and_from_the_file_behind_it() {
        let mb = 1u64 << 20;
        // Four 4 MiB chunks received, three written.
        let mut s = state_with(
            &[
                (0, 4 << 20),
                (4 * mb, 4 << 20),
                (8 * mb, 4 << 20),
                (12 * mb, 4 << 20),
            ],
            12 * mb,
        );
        s.evict();
        // Chunks on disk and ending at least 8 MiB behind the newest byte go: the first two.
        assert_eq!(s.chunks.front().map(|c| c.0), Some(8 * mb));
        // A client at 1 MiB reads the file, at most FILE_READ at a time.
        assert!(matches!(s.next_for(mb), Next::File(n) if n == FILE_READ));
        // Just before the evicted boundary: only up to it.
        assert!(matches!(s.next_for(8 * mb - 10), Next::File(10)));
        // Inside a kept chunk: the rest of that chunk, from memory, without copying.
        match s.next_for(9 * mb) {
            Next::Memory(b) => {
                assert_eq!(b.len() as u64, 3 * mb);
                assert_eq!(b[0], 2, "the third chunk");
            }
            _ => panic!("expected memory"),
        }
        // At the front: wait; once verified: the end; on failure: the error.
        assert!(matches!(s.next_for(16 * mb), Next::Wait));
        s.outcome = Some(Ok(()));
        assert!(matches!(s.next_for(16 * mb), Next::End));
        s.outcome = Some(Err(FetchFailure::NotFound));
        assert!(matches!(
            s.next_for(16 * mb),
            Next::Failed(FetchFailure::NotFound)
        ));
    }

    #[test]
    fn nothing_leaves_memory_before_it_is_on_disk() {
        let mb = 1u64 << 20;
        let mut s = state_with(
            &[
                (0, 4 << 20),
                (4 * mb, 4 << 20),
                (8 * mb, 4 << 20),
                (12 * mb, 4 << 20),
            ],
            0,
        );
        s.evict();
        assert_eq!(s.chunks.len(), 4);
        assert!(matches!(s.next_for(0), Next::Memory(_)));
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
