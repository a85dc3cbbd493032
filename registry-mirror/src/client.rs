//! A small client for the distribution API, used by the mirror to fetch from upstreams and by
//! the archive commands to push and export images. It answers `401` challenges itself: HTTP
//! basic with the configured credentials, or the bearer-token flow (`WWW-Authenticate: Bearer
//! realm=...,service=...,scope=...`), caching tokens per scope until they expire.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use url::Url;

use crate::manifest::ACCEPT_ALL;
use crate::reference::{Digest, Reference, RepoName};

/// A request to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The registry could not be reached or the transfer broke.
    #[error("request to {url} failed: {}", causes(source))]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("{method} {url} answered {status}: {body}")]
    Status {
        /// Request method.
        method: Method,
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The start of the response body.
        body: String,
    },
    /// The token endpoint did not give a token.
    #[error("token request to {realm} failed: {reason}")]
    Token {
        /// Token endpoint.
        realm: String,
        /// Why.
        reason: String,
    },
    /// The TLS settings could not be loaded.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The content fetched does not match its digest.
    #[error("content of {digest} from {url} has digest {actual}")]
    DigestMismatch {
        /// Requested.
        digest: Digest,
        /// Source.
        url: String,
        /// What arrived.
        actual: Digest,
    },
}

impl ClientError {
    /// The HTTP status, when the registry answered with one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL, for example `https://registry.example:5000`.
    pub url: Url,
    /// User name and password for basic auth or the token endpoint.
    pub credentials: Option<(String, String)>,
    /// Extra CA certificate (PEM) to trust.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Skip TLS verification (lab use only).
    pub insecure_skip_verify: bool,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Resolve host names with this instead of the system resolver (machined: the node's
    /// configured nameservers).
    pub resolver: Option<DnsResolver>,
}

/// An error with its causes: reqwest's own text (`error sending request for url`) leaves out
/// what went wrong (refused, DNS, TLS), which is in its sources.
fn causes(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// A name resolver for the client (`reqwest`'s), printable.
#[derive(Clone)]
pub struct DnsResolver(pub std::sync::Arc<dyn reqwest::dns::Resolve>);

impl reqwest::dns::Resolve for DnsResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.0.resolve(name)
    }
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver")
    }
}

impl ClientConfig {
    /// A configuration with no credentials and default timeouts.
    pub fn new(url: Url) -> Self {
        Self {
            url,
            credentials: None,
            ca_cert: None,
            insecure_skip_verify: false,
            connect_timeout: Duration::from_secs(10),
            resolver: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Challenge {
    realm: String,
    service: Option<String>,
}

/// A distribution API client for one registry.
#[derive(Debug)]
pub struct RegistryClient {
    config: ClientConfig,
    http: reqwest::Client,
    /// Bearer tokens by scope, with their expiry.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// The bearer challenge seen last, so later requests can fetch tokens without a 401 first.
    challenge: Mutex<Option<Challenge>>,
}

impl RegistryClient {
    /// Builds a client (rustls with the ring provider; the system's roots plus `ca_cert`).
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(32)
            .danger_accept_invalid_certs(config.insecure_skip_verify);
        if let Some(ca) = &config.ca_cert {
            builder = builder.add_root_certificate(load_ca(ca)?);
        }
        if let Some(r) = &config.resolver {
            builder = builder.dns_resolver(std::sync::Arc::new(r.clone()));
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Self {
            config,
            http,
            tokens: Mutex::new(HashMap::new()),
            challenge: Mutex::new(None),
        })
    }

    /// The registry's base URL.
    pub fn base(&self) -> &Url {
        &self.config.url
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.url.as_str().trim_end_matches('/'), path)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(scope)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(t, _)| t.clone())
    }

    fn basic_header(&self) -> Option<String> {
        self.config.credentials.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    async fn fetch_token(&self, ch: &Challenge, scope: &str) -> Result<String, ClientError> {
        let mut url = Url::parse(&ch.realm).map_err(|e| ClientError::Token {
            realm: ch.realm.clone(),
            reason: e.to_string(),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &ch.service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.http.get(url.as_str());
        if let Some(b) = self.basic_header() {
            req = req.header(header::AUTHORIZATION, b);
        }
        let token_err = |reason: String| ClientError::Token {
            realm: ch.realm.clone(),
            reason,
        };
        let resp = req.send().await.map_err(|e| token_err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(token_err(format!("status {}", resp.status())));
        }
        let body = resp.bytes().await.map_err(|e| token_err(e.to_string()))?;
        let body: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| token_err(e.to_string()))?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| token_err("no token in the answer".to_owned()))?
            .to_owned();
        let expires_in = body
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .unwrap_or(60)
            .max(10);
        // Renew a little early so a token never expires in flight.
        let expiry = Instant::now() + Duration::from_secs(expires_in - 5);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.to_owned(), (token.clone(), expiry));
        Ok(token)
    }

    /// Sends a request built by `build`, answering one auth challenge. `scope` is the token
    /// scope the request needs (`repository:NAME:pull` or `...:pull,push`).
    pub async fn send(
        &self,
        scope: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, ClientError> {
        let auth = match self.cached_token(scope) {
            Some(t) => Some(format!("Bearer {t}")),
            None => {
                let ch = self
                    .challenge
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                match ch {
                    Some(ch) => Some(format!("Bearer {}", self.fetch_token(&ch, scope).await?)),
                    None => None,
                }
            }
        };
        let resp = self.dispatch(&build, auth).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let www = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let auth = if let Some(params) = strip_scheme(&www, "bearer") {
            let params = parse_challenge(params);
            let realm = params
                .get("realm")
                .cloned()
                .ok_or_else(|| ClientError::Token {
                    realm: String::new(),
                    reason: format!("bearer challenge without realm: {www}"),
                })?;
            let ch = Challenge {
                realm,
                service: params.get("service").cloned(),
            };
            let scope = params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| scope.to_owned());
            let token = self.fetch_token(&ch, &scope).await?;
            *self.challenge.lock().unwrap_or_else(|p| p.into_inner()) = Some(ch);
            format!("Bearer {token}")
        } else if let Some(basic) = self.basic_header() {
            basic
        } else {
            return Ok(resp);
        };
        self.dispatch(&build, Some(auth)).await
    }

    async fn dispatch(
        &self,
        build: &impl Fn(&reqwest::Client) -> RequestBuilder,
        auth: Option<String>,
    ) -> Result<Response, ClientError> {
        let mut req = build(&self.http);
        if let Some(a) = auth.or_else(|| self.basic_header()) {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req.build().map_err(|e| ClientError::Http {
            url: String::new(),
            source: e,
        })?;
        let url = req.url().to_string();
        self.http
            .execute(req)
            .await
            .map_err(|source| ClientError::Http { url, source })
    }

    /// Sends a request and fails unless the status is a success.
    async fn send_ok(
        &self,
        scope: &str,
        method: Method,
        url: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, ClientError> {
        let resp = self.send(scope, build).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(ClientError::Status {
            method,
            url: url.to_owned(),
            status,
            body: body.chars().take(300).collect(),
        })
    }

    /// Fetches a manifest; returns its media type, bytes and digest (verified when the
    /// reference is a digest).
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
    ) -> Result<(String, Bytes, Digest), ClientError> {
        let url = self.url(&format!("/v2/{name}/manifests/{reference}"));
        let scope = pull_scope(name);
        let resp = self
            .send_ok(&scope, Method::GET, &url, |c| {
                c.get(&url).header(header::ACCEPT, ACCEPT_ALL)
            })
            .await?;
        let media_type = content_type(resp.headers());
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        let actual = Digest::of(&bytes);
        if let Reference::Digest(d) = reference
            && *d != actual
        {
            return Err(ClientError::DigestMismatch {
                digest: d.clone(),
                url,
                actual,
            });
        }
        Ok((media_type, bytes, actual))
    }

    /// Starts fetching a blob; the caller streams the body.
    pub async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Response, ClientError> {
        let url = self.url(&format!("/v2/{name}/blobs/{digest}"));
        self.send_ok(&pull_scope(name), Method::GET, &url, |c| c.get(&url))
            .await
    }

    /// The size of a blob, or `None` when the registry does not have it.
    pub async fn head_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, ClientError> {
        let url = self.url(&format!("/v2/{name}/blobs/{digest}"));
        let resp = self.send(&pull_scope(name), |c| c.head(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(resp.content_length().or_else(|| {
                resp.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
            })),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(ClientError::Status {
                method: Method::HEAD,
                url,
                status,
                body: String::new(),
            }),
        }
    }

    /// Uploads a blob from a file (POST then a monolithic PUT), unless the registry has it.
    pub async fn push_blob_file(
        &self,
        name: &RepoName,
        digest: &Digest,
        path: &Path,
    ) -> Result<bool, ClientError> {
        if self.head_blob(name, digest).await?.is_some() {
            return Ok(false);
        }
        let scope = push_scope(name);
        let start = self.url(&format!("/v2/{name}/blobs/uploads/"));
        let resp = self
            .send_ok(&scope, Method::POST, &start, |c| {
                c.post(&start).header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ClientError::Status {
                method: Method::POST,
                url: start.clone(),
                status: resp.status(),
                body: "no Location header".to_owned(),
            })?;
        let mut put_url = Url::parse(&start)
            .and_then(|u| u.join(location))
            .map_err(|e| ClientError::Tls(format!("bad Location {location:?}: {e}")))?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", digest.as_str());
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let put = put_url.to_string();
        self.send_ok(&scope, Method::PUT, &put, |c| {
            let body = match std::fs::File::open(path) {
                Ok(f) => reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(f),
                    1 << 20,
                )),
                Err(_) => reqwest::Body::from(Bytes::new()),
            };
            c.put(&put)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .body(body)
        })
        .await?;
        Ok(true)
    }

    /// Pushes a manifest under a tag or digest; returns the digest the registry reports.
    pub async fn put_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), ClientError> {
        let url = self.url(&format!("/v2/{name}/manifests/{reference}"));
        self.send_ok(&push_scope(name), Method::PUT, &url, |c| {
            c.put(&url)
                .header(header::CONTENT_TYPE, media_type)
                .body(bytes.clone())
        })
        .await?;
        Ok(())
    }
}

fn load_ca(path: &Path) -> Result<reqwest::Certificate, ClientError> {
    let pem = std::fs::read(path)
        .map_err(|e| ClientError::Tls(format!("read {}: {e}", path.display())))?;
    reqwest::Certificate::from_pem(&pem)
        .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))
}

/// The token scope for pulling from `name`.
pub fn pull_scope(name: &RepoName) -> String {
    format!("repository:{name}:pull")
}

fn push_scope(name: &RepoName) -> String {
    format!("repository:{name}:pull,push")
}

fn content_type(h: &HeaderMap) -> String {
    h.get(header::CONTENT_TYPE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        .unwrap_or_default()
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// Parses `key="value",key2="value2"` challenge parameters (values may contain commas).
pub fn parse_challenge(params: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let h = r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#;
        let p = parse_challenge(strip_scheme(h, "bearer").unwrap());
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert!(strip_scheme(r#"Basic realm="x""#, "bearer").is_none());
        let p = parse_challenge("realm=plain, service=s");
        assert_eq!(p["realm"], "plain");
        assert_eq!(p["service"], "s");
    }
}
