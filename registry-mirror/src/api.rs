//! The distribution API's HTTP routes (`/v2/...`): request parsing, auth and read-only checks,
//! and the mapping of storage and mirror errors onto the standard error codes.
//!
//! Repository names contain slashes, so routes are not matched by axum's router but by
//! [`parse_route`], which splits a path on the last `/manifests/`, `/blobs/` or `/tags/list`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::api_error::{ApiError, ErrorCode};
use crate::manifest::ParsedManifest;
use crate::mirror::{Mirror, MirrorBlob, MirrorError, PullSource};
use crate::reference::{Digest, Reference, RepoName};
use crate::storage::{Namespace, Storage, StorageError, StoredManifest};

/// The largest manifest accepted.
const MAX_MANIFEST: usize = 4 << 20;
/// Read buffer for serving blobs.
const SERVE_BUF: usize = 256 << 10;

/// Settings of the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// Refuse pushes and deletes (pulls through the mirror still fill the cache).
    pub read_only: bool,
    /// Require HTTP basic auth with this user name and password.
    pub basic_auth: Option<(String, String)>,
}

/// Everything a request needs: storage, mirror and settings.
#[derive(Debug)]
pub struct Registry {
    /// Content on disk.
    pub storage: Arc<Storage>,
    /// Upstreams, if any.
    pub mirror: Option<Arc<Mirror>>,
    /// Settings.
    pub config: ApiConfig,
}

/// The router serving the distribution API for `registry`.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v2", any(base))
        .route("/v2/", any(base))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(registry)
        .layer(axum::middleware::map_response(add_api_version))
}

async fn add_api_version(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

type ApiResult = Result<Response, ApiError>;

async fn base(State(reg): State<Arc<Registry>>, headers: HeaderMap) -> ApiResult {
    reg.authorize(&headers)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response())
}

/// A parsed API path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(String),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(String, String),
    /// `/v2/<name>/blobs/<digest>`
    Blob(String, String),
    /// `/v2/<name>/blobs/uploads/[<id>]`
    Upload(String, String),
}

/// Splits the path after `/v2/` into a route (names are validated later).
pub fn parse_route(rest: &str) -> Option<Route> {
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name.to_owned()));
    }
    let upload_base = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"));
    if let Some(name) = upload_base {
        return Some(Route::Upload(name.to_owned(), String::new()));
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        return Some(Route::Upload(name.to_owned(), id.to_owned()));
    }
    if let Some((name, r)) = rest.rsplit_once("/manifests/") {
        return Some(Route::Manifest(name.to_owned(), r.to_owned()));
    }
    if let Some((name, d)) = rest.rsplit_once("/blobs/") {
        return Some(Route::Blob(name.to_owned(), d.to_owned()));
    }
    None
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn name_of(s: &str) -> Result<RepoName, ApiError> {
    s.parse().map_err(|e: crate::reference::InvalidName| {
        ApiError::new(ErrorCode::NameInvalid, e.to_string())
    })
}

fn digest_of(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|e: crate::reference::InvalidReference| {
        ApiError::new(ErrorCode::DigestInvalid, e.to_string())
    })
}

async fn dispatch(State(reg): State<Arc<Registry>>, req: Request) -> Response {
    match reg.handle(req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn storage_error(e: StorageError) -> ApiError {
    match e {
        StorageError::Io { .. } => {
            tracing::error!(error = %e, "storage failure");
            ApiError::new(ErrorCode::Unavailable, e.to_string())
                .with_status(StatusCode::INTERNAL_SERVER_ERROR)
        }
        StorageError::DigestMismatch { .. } => {
            ApiError::new(ErrorCode::DigestInvalid, e.to_string())
        }
        StorageError::SizeMismatch { .. } => ApiError::new(ErrorCode::SizeInvalid, e.to_string()),
        StorageError::Stream { .. } => ApiError::new(ErrorCode::BlobUploadInvalid, e.to_string()),
        StorageError::UploadUnknown(_) => {
            ApiError::new(ErrorCode::BlobUploadUnknown, e.to_string())
        }
        StorageError::UploadRange { .. } => {
            ApiError::new(ErrorCode::BlobUploadInvalid, e.to_string())
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
        }
    }
}

fn mirror_error(e: MirrorError, unknown: ErrorCode) -> ApiError {
    match e {
        MirrorError::NotFound { .. } => ApiError::new(unknown, e.to_string()),
        MirrorError::Upstream { .. } | MirrorError::Fetch { .. } => {
            ApiError::new(ErrorCode::Unavailable, e.to_string())
                .with_status(StatusCode::BAD_GATEWAY)
        }
        MirrorError::Storage(e) => storage_error(e),
    }
}

fn log_pull(
    kind: &str,
    name: &RepoName,
    reference: &str,
    source: PullSource,
    upstream: Option<&str>,
) {
    tracing::info!(
        target: "kiln_registry_mirror::access",
        kind,
        repo = %name,
        reference,
        source = source.as_str(),
        upstream = upstream.unwrap_or("-"),
        "pull {kind} {name}{}{reference} {}",
        if reference.starts_with("sha256:") { '@' } else { ':' },
        source.as_str()
    );
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn location(value: String) -> (header::HeaderName, String) {
    (header::LOCATION, value)
}

fn range_header(offset: u64) -> (header::HeaderName, String) {
    (header::RANGE, format!("0-{}", offset.saturating_sub(1)))
}

impl Registry {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some((user, pass)) = &self.config.basic_auth else {
            return Ok(());
        };
        let given = header_str(headers, header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            });
        let expected = format!("{user}:{pass}");
        match given {
            Some(g) if constant_time_eq(&g, expected.as_bytes()) => Ok(()),
            _ => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "authentication required",
            )),
        }
    }

    fn writable(&self) -> Result<(), ApiError> {
        if self.config.read_only {
            Err(ApiError::new(
                ErrorCode::Unsupported,
                "the registry is in read-only mode: pushes and deletes are refused",
            ))
        } else {
            Ok(())
        }
    }

    async fn handle(self: &Arc<Self>, req: Request) -> ApiResult {
        self.authorize(req.headers())?;
        let path = req.uri().path().to_owned();
        let query = Query(
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        );
        let rest = path.strip_prefix("/v2/").unwrap_or("");
        let route = parse_route(rest).ok_or_else(|| {
            ApiError::new(ErrorCode::NameInvalid, format!("no API route for {path}"))
        })?;
        let method = req.method().clone();
        match (route, method) {
            (Route::Catalog, Method::GET) => self.catalog(&query).await,
            (Route::Tags(n), Method::GET) => self.tags(&name_of(&n)?, &query).await,
            (Route::Manifest(n, r), m @ (Method::GET | Method::HEAD)) => {
                self.get_manifest(&name_of(&n)?, &r, &query, m == Method::HEAD)
                    .await
            }
            (Route::Manifest(n, r), Method::PUT) => {
                self.writable()?;
                self.put_manifest(&name_of(&n)?, &r, req).await
            }
            (Route::Manifest(n, r), Method::DELETE) => {
                self.writable()?;
                self.delete_manifest(&name_of(&n)?, &r).await
            }
            (Route::Blob(n, d), m @ (Method::GET | Method::HEAD)) => {
                let range = header_str(req.headers(), header::RANGE).map(str::to_owned);
                self.get_blob(
                    &name_of(&n)?,
                    &digest_of(&d)?,
                    &query,
                    m == Method::HEAD,
                    range,
                )
                .await
            }
            (Route::Blob(n, d), Method::DELETE) => {
                self.writable()?;
                let (name, digest) = (name_of(&n)?, digest_of(&d)?);
                let found = self
                    .storage
                    .unlink_blob(Namespace::Local, &name, &digest)
                    .await
                    .map_err(storage_error)?;
                if !found {
                    return Err(ApiError::new(
                        ErrorCode::BlobUnknown,
                        format!("{name} has no blob {digest}"),
                    ));
                }
                Ok(StatusCode::ACCEPTED.into_response())
            }
            (Route::Upload(n, id), m) => {
                let name = name_of(&n)?;
                match (id.is_empty(), m) {
                    (true, Method::POST) => {
                        self.writable()?;
                        self.start_upload(&name, &query, req).await
                    }
                    (false, Method::GET) => {
                        let offset = self
                            .storage
                            .upload_offset(&name, &id)
                            .await
                            .map_err(storage_error)?;
                        Ok(upload_response(StatusCode::NO_CONTENT, &name, &id, offset))
                    }
                    (false, Method::PATCH) => {
                        self.writable()?;
                        self.patch_upload(&name, &id, req).await
                    }
                    (false, Method::PUT) => {
                        self.writable()?;
                        self.finish_upload(&name, &id, &query, req).await
                    }
                    (false, Method::DELETE) => {
                        self.storage
                            .cancel_upload(&name, &id)
                            .await
                            .map_err(storage_error)?;
                        Ok(StatusCode::NO_CONTENT.into_response())
                    }
                    _ => Err(unsupported()),
                }
            }
            _ => Err(unsupported()),
        }
    }

    async fn catalog(&self, query: &Query) -> ApiResult {
        let all = self.storage.catalog().await.map_err(storage_error)?;
        Ok(paginate(all, query, "repositories", "/v2/_catalog", None))
    }

    async fn tags(&self, name: &RepoName, query: &Query) -> ApiResult {
        let mut tags = self
            .storage
            .tags(Namespace::Local, name)
            .await
            .map_err(storage_error)?;
        if tags.is_none()
            && let Some(up) = self.mirror.as_ref().and_then(|m| m.select(query.get("ns")))
        {
            tags = self
                .storage
                .tags(Namespace::Mirror(up.host()), name)
                .await
                .map_err(storage_error)?;
        }
        let tags = tags.ok_or_else(|| {
            ApiError::new(
                ErrorCode::NameUnknown,
                format!("repository {name} is not known"),
            )
        })?;
        Ok(paginate(
            tags,
            query,
            "tags",
            &format!("/v2/{name}/tags/list"),
            Some(name),
        ))
    }

    async fn get_manifest(&self, name: &RepoName, r: &str, query: &Query, head: bool) -> ApiResult {
        let reference: Reference =
            r.parse()
                .map_err(|e: crate::reference::InvalidReference| match e {
                    crate::reference::InvalidReference::Digest(_) => {
                        ApiError::new(ErrorCode::DigestInvalid, e.to_string())
                    }
                    crate::reference::InvalidReference::Tag(_) => {
                        ApiError::new(ErrorCode::ManifestInvalid, e.to_string())
                    }
                })?;
        let local = self
            .storage
            .get_manifest(Namespace::Local, name, &reference)
            .await
            .map_err(storage_error)?;
        let (m, source, upstream) = match local {
            Some(m) => (m, PullSource::Local, None),
            None => {
                let mirror = self.mirror.as_ref();
                let Some(up) = mirror.and_then(|m| m.select(query.get("ns"))) else {
                    return Err(ApiError::new(
                        ErrorCode::ManifestUnknown,
                        format!("manifest {name}:{reference} is not known"),
                    ));
                };
                let mirror = mirror.ok_or_else(unsupported)?;
                let (m, source) = mirror
                    .manifest(&self.storage, &up, name, &reference)
                    .await
                    .map_err(|e| mirror_error(e, ErrorCode::ManifestUnknown))?;
                (m, source, Some(up.host().to_owned()))
            }
        };
        log_pull("manifest", name, r, source, upstream.as_deref());
        Ok(manifest_response(m, head))
    }

    async fn put_manifest(&self, name: &RepoName, r: &str, req: Request) -> ApiResult {
        let reference: Reference = r.parse().map_err(|e: crate::reference::InvalidReference| {
            ApiError::new(ErrorCode::ManifestInvalid, e.to_string())
        })?;
        let content_type = header_str(req.headers(), header::CONTENT_TYPE).map(str::to_owned);
        let body = http_body_util::Limited::new(req.into_body(), MAX_MANIFEST)
            .collect()
            .await
            .map_err(|e| {
                ApiError::new(ErrorCode::ManifestInvalid, format!("reading manifest: {e}"))
            })?
            .to_bytes();
        let parsed = ParsedManifest::parse(&body, content_type.as_deref())
            .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
        let ns = Namespace::Local;
        for d in &parsed.blobs {
            let digest = d
                .digest()
                .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
            if !self.storage.blob_linked(ns, name, &digest).await {
                // Content-addressed: a blob stored for another repository may be linked here.
                if self.storage.blob_size(&digest).await.is_none() {
                    return Err(ApiError::new(
                        ErrorCode::ManifestBlobUnknown,
                        format!("manifest refers to blob {digest}, which was not pushed"),
                    ));
                }
                self.storage
                    .link_blob(ns, name, &digest)
                    .await
                    .map_err(storage_error)?;
            }
        }
        for d in &parsed.manifests {
            let digest = d
                .digest()
                .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
            if !self.storage.manifest_linked(ns, name, &digest).await {
                return Err(ApiError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("index refers to manifest {digest}, which is not in {name}"),
                ));
            }
        }
        let (tag, expected) = match &reference {
            Reference::Tag(t) => (Some(t), None),
            Reference::Digest(d) => (None, Some(d)),
        };
        let digest = self
            .storage
            .put_manifest(ns, name, tag, &parsed.media_type, body, expected)
            .await
            .map_err(storage_error)?;
        tracing::info!(target: "kiln_registry_mirror::access", repo = %name, reference = r, %digest, "push manifest {name}:{r}");
        Ok((
            StatusCode::CREATED,
            [
                location(format!("/v2/{name}/manifests/{digest}")),
                (
                    header::HeaderName::from_static("docker-content-digest"),
                    digest.to_string(),
                ),
            ],
        )
            .into_response())
    }

    async fn delete_manifest(&self, name: &RepoName, r: &str) -> ApiResult {
        let reference: Reference = r.parse().map_err(|e: crate::reference::InvalidReference| {
            ApiError::new(ErrorCode::ManifestInvalid, e.to_string())
        })?;
        let found = self
            .storage
            .delete_manifest(Namespace::Local, name, &reference)
            .await
            .map_err(storage_error)?;
        if !found {
            return Err(ApiError::new(
                ErrorCode::ManifestUnknown,
                format!("manifest {name}:{r} is not known"),
            ));
        }
        Ok(StatusCode::ACCEPTED.into_response())
    }

    async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        query: &Query,
        head: bool,
        range: Option<String>,
    ) -> ApiResult {
        if self
            .storage
            .blob_linked(Namespace::Local, name, digest)
            .await
            && let Some(size) = self.storage.blob_size(digest).await
        {
            log_pull("blob", name, digest.as_str(), PullSource::Local, None);
            return self.serve_file(digest, size, head, range.as_deref()).await;
        }
        let unknown = || {
            ApiError::new(
                ErrorCode::BlobUnknown,
                format!("{name} has no blob {digest}"),
            )
        };
        let Some(mirror) = self.mirror.as_ref() else {
            return Err(unknown());
        };
        let Some(up) = mirror.select(query.get("ns")) else {
            return Err(unknown());
        };
        let ns = Namespace::Mirror(up.host());
        if let Some(size) = self.storage.blob_size(digest).await {
            // Digests are immutable: a stored blob serves any upstream's request for it.
            if !self.storage.blob_linked(ns, name, digest).await {
                self.storage
                    .link_blob(ns, name, digest)
                    .await
                    .map_err(storage_error)?;
            }
            log_pull(
                "blob",
                name,
                digest.as_str(),
                PullSource::Cache,
                Some(up.host()),
            );
            return self.serve_file(digest, size, head, range.as_deref()).await;
        }
        if head {
            let size = mirror
                .head_blob(&up, name, digest)
                .await
                .map_err(|e| mirror_error(e, ErrorCode::BlobUnknown))?
                .ok_or_else(unknown)?;
            log_pull(
                "blob",
                name,
                digest.as_str(),
                PullSource::Upstream,
                Some(up.host()),
            );
            return Ok(blob_headers(StatusCode::OK, digest, size)
                .body(Body::empty())
                .unwrap_or_default());
        }
        match mirror
            .blob(&self.storage, &up, name, digest)
            .await
            .map_err(|e| mirror_error(e, ErrorCode::BlobUnknown))?
        {
            MirrorBlob::Stored { size } => {
                log_pull(
                    "blob",
                    name,
                    digest.as_str(),
                    PullSource::Cache,
                    Some(up.host()),
                );
                self.serve_file(digest, size, false, range.as_deref()).await
            }
            MirrorBlob::Streaming { size, body, source } => {
                log_pull("blob", name, digest.as_str(), source, Some(up.host()));
                let mut b = axum::http::Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header("Docker-Content-Digest", digest.as_str());
                if let Some(size) = size {
                    b = b.header(header::CONTENT_LENGTH, size);
                }
                Ok(b.body(Body::from_stream(body)).unwrap_or_default())
            }
        }
    }

    async fn serve_file(
        &self,
        digest: &Digest,
        size: u64,
        head: bool,
        range: Option<&str>,
    ) -> ApiResult {
        let (status, start, len) = match range {
            None => (StatusCode::OK, 0, size),
            Some(r) => match parse_range(r, size) {
                Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
                None => {
                    return Ok((
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                    )
                        .into_response());
                }
            },
        };
        let mut builder = blob_headers(status, digest, len).header(header::ACCEPT_RANGES, "bytes");
        if status == StatusCode::PARTIAL_CONTENT {
            builder = builder.header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", start + len - 1),
            );
        }
        if head {
            return Ok(builder.body(Body::empty()).unwrap_or_default());
        }
        let path = self.storage.blob_path(digest);
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
            storage_error(StorageError::Io {
                op: "open",
                path: path.clone(),
                source: e,
            })
        })?;
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| {
                    storage_error(StorageError::Io {
                        op: "seek",
                        path,
                        source: e,
                    })
                })?;
        }
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), SERVE_BUF);
        Ok(builder.body(Body::from_stream(stream)).unwrap_or_default())
    }

    async fn start_upload(&self, name: &RepoName, query: &Query, req: Request) -> ApiResult {
        if let (Some(mount), Some(from)) = (query.get("mount"), query.get("from")) {
            let digest = digest_of(mount)?;
            let from = name_of(from)?;
            if self
                .storage
                .blob_linked(Namespace::Local, &from, &digest)
                .await
            {
                self.storage
                    .link_blob(Namespace::Local, name, &digest)
                    .await
                    .map_err(storage_error)?;
                return Ok(blob_created(name, &digest));
            }
            // Not mountable: fall through to an ordinary upload session, as the spec says.
        }
        if let Some(d) = query.get("digest") {
            let digest = digest_of(d)?;
            let stream = req.into_body().into_data_stream();
            self.storage
                .write_blob_stream(stream, Some(&digest), None)
                .await
                .map_err(storage_error)?;
            self.storage
                .link_blob(Namespace::Local, name, &digest)
                .await
                .map_err(storage_error)?;
            return Ok(blob_created(name, &digest));
        }
        let id = self
            .storage
            .start_upload(name)
            .await
            .map_err(storage_error)?;
        Ok(upload_response(StatusCode::ACCEPTED, name, &id, 0))
    }

    async fn patch_upload(&self, name: &RepoName, id: &str, req: Request) -> ApiResult {
        let start = match header_str(req.headers(), header::CONTENT_RANGE) {
            Some(r) => Some(
                r.trim_start_matches("bytes ")
                    .split('-')
                    .next()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::BlobUploadInvalid,
                            format!("bad Content-Range {r:?}"),
                        )
                    })?,
            ),
            None => None,
        };
        let stream = req.into_body().into_data_stream();
        match self.storage.append_upload(name, id, start, stream).await {
            Ok(offset) => Ok(upload_response(StatusCode::ACCEPTED, name, id, offset)),
            Err(StorageError::UploadRange { offset, start }) => Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [
                    range_header(offset),
                    location(format!("/v2/{name}/blobs/uploads/{id}")),
                ],
                ApiError::new(
                    ErrorCode::BlobUploadInvalid,
                    format!("chunk starts at {start}, session holds {offset} bytes"),
                )
                .into_response()
                .into_body(),
            )
                .into_response()),
            Err(e) => {
                tracing::info!(repo = %name, upload = id, error = %e, "chunk upload failed; partial chunk discarded");
                Err(storage_error(e))
            }
        }
    }

    async fn finish_upload(
        &self,
        name: &RepoName,
        id: &str,
        query: &Query,
        req: Request,
    ) -> ApiResult {
        let digest = digest_of(
            query
                .get("digest")
                .ok_or_else(|| ApiError::new(ErrorCode::DigestInvalid, "PUT needs ?digest="))?,
        )?;
        let stream =
            TryStreamExt::map_err(req.into_body().into_data_stream(), std::io::Error::other);
        self.storage
            .append_upload(name, id, None, stream)
            .await
            .map_err(storage_error)?;
        self.storage
            .finish_upload(name, id, &digest)
            .await
            .map_err(storage_error)?;
        Ok(blob_created(name, &digest))
    }
}

fn unsupported() -> ApiError {
    ApiError::new(
        ErrorCode::Unsupported,
        "this method is not supported on this path",
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn blob_headers(status: StatusCode, digest: &Digest, len: u64) -> axum::http::response::Builder {
    axum::http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header("Docker-Content-Digest", digest.as_str())
        .header(header::ETAG, format!("\"{digest}\""))
}

fn blob_created(name: &RepoName, digest: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            location(format!("/v2/{name}/blobs/{digest}")),
            (
                header::HeaderName::from_static("docker-content-digest"),
                digest.to_string(),
            ),
        ],
    )
        .into_response()
}

fn upload_response(status: StatusCode, name: &RepoName, id: &str, offset: u64) -> Response {
    (
        status,
        [
            location(format!("/v2/{name}/blobs/uploads/{id}")),
            range_header(offset),
            (
                header::HeaderName::from_static("docker-upload-uuid"),
                id.to_owned(),
            ),
            (header::CONTENT_LENGTH, "0".to_owned()),
        ],
    )
        .into_response()
}

fn manifest_response(m: StoredManifest, head: bool) -> Response {
    let len = m.bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.bytes)
    };
    axum::http::Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type)
        .header(header::CONTENT_LENGTH, len)
        .header("Docker-Content-Digest", m.digest.as_str())
        .header(header::ETAG, format!("\"{}\"", m.digest))
        .body(body)
        .unwrap_or_default()
}

/// Parses a single `bytes=` range against `size`; returns inclusive `(start, end)`.
pub fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size - 1
        } else {
            b.parse::<u64>().ok()?.min(size - 1)
        };
        (start, end)
    };
    (start <= end && start < size).then_some((start, end))
}

fn paginate(
    all: Vec<String>,
    query: &Query,
    key: &str,
    path: &str,
    name: Option<&RepoName>,
) -> Response {
    let after: Vec<String> = match query.get("last") {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last).collect(),
        None => all,
    };
    let n = query.get("n").and_then(|n| n.parse::<usize>().ok());
    let (page, more) = match n {
        Some(n) if after.len() > n => (after[..n].to_vec(), true),
        _ => (after, false),
    };
    let mut body = serde_json::Map::new();
    if let Some(name) = name {
        body.insert("name".into(), name.as_str().into());
    }
    body.insert(key.into(), page.clone().into());
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Object(body).to_string(),
    )
        .into_response();
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        let link: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("n", &n.to_string())
            .append_pair("last", last)
            .finish();
        if let Ok(v) = HeaderValue::from_str(&format!("<{path}?{link}>; rel=\"next\"")) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

/// Reads a whole request body into memory (small bodies only).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::new(ErrorCode::SizeInvalid, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse_route("_catalog"), Some(Route::Catalog));
        assert_eq!(
            parse_route("a/b/tags/list"),
            Some(Route::Tags("a/b".into()))
        );
        assert_eq!(
            parse_route("a/b/manifests/v1"),
            Some(Route::Manifest("a/b".into(), "v1".into()))
        );
        assert_eq!(
            parse_route("a/blobs/sha256:x"),
            Some(Route::Blob("a".into(), "sha256:x".into()))
        );
        assert_eq!(
            parse_route("a/blobs/uploads/"),
            Some(Route::Upload("a".into(), String::new()))
        );
        assert_eq!(
            parse_route("a/blobs/uploads/u1"),
            Some(Route::Upload("a".into(), "u1".into()))
        );
        assert_eq!(parse_route("nothing"), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
