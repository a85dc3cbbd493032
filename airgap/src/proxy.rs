//! The egress-auditing proxy: plain HTTP (absolute-form requests) and `CONNECT` tunnels, over
//! plain TCP or over TLS to the proxy itself, checked against an allow list. Every attempt,
//! allowed, denied or malformed, is one line in the audit log.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::allow::AllowList;
use crate::audit::{AuditEvent, AuditLog, Decision, Source};

/// Most header lines a request may carry.
const MAX_HEADERS: usize = 100;
/// The answer to a `CONNECT` that reached its destination.
const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
/// How long connections get to finish after shutdown before they are cut.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// The proxy helper's configuration (`proxy.yaml` in the state directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Plain HTTP proxy address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// HTTPS proxy address (TLS to the proxy, then the same protocol inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<SocketAddr>,
    /// Certificate (PEM) of the HTTPS proxy; without it a self-signed one is made for the
    /// `tlsListen` address and written beside the audit log as `proxy-ca.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Key (PEM) of `tlsCert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Destinations allowed (`HOST`, `*.DOMAIN`, `CIDR`, `*`, each optionally `:PORT,PORT`).
    #[serde(default)]
    pub allow: AllowList,
    /// Resolve a name that no name rule allows, to check its addresses against the network
    /// rules. Off in air-gapped labs: the host's resolver must not see outside names either.
    #[serde(default = "default_true")]
    pub resolve_for_networks: bool,
    /// Names the proxy resolves itself, before asking the host's resolver: the lab's zone
    /// (`registry.kiln.internal`), which the host's resolver does not know.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hosts: std::collections::BTreeMap<String, Vec<IpAddr>>,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
}

impl ProxyConfig {
    /// Reads a YAML configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, ProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyError::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| ProxyError::ParseConfig {
            path: path.to_owned(),
            source,
        })
    }

    /// The configuration as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

fn default_true() -> bool {
    true
}

/// Caps on what one client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Client connections served at once per listener; more wait in the backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Time a client gets to send its request head (and finish the TLS handshake), ms.
    pub header_timeout_ms: u64,
    /// Time to connect to a destination, ms.
    pub connect_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            header_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
        }
    }
}

/// Setting up the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration file could not be read.
    #[error("reading proxy config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The configuration file is not valid.
    #[error("proxy config {path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_yaml::Error,
    },
    /// A listener could not be bound.
    #[error("binding the proxy on {addr}: {source}; is another proxy using the port?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
}

/// A request head that could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head is larger than the limit (or has too many header lines).
    #[error("request head larger than {0} bytes or {MAX_HEADERS} header lines")]
    TooLarge(usize),
    /// The bytes are not an HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The client closed before a whole head arrived.
    #[error("client closed the connection before sending a whole request")]
    Closed,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Request target as sent.
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub version: u8,
    /// Header lines in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Length of the head in bytes.
    pub len: usize,
}

/// Parses the head at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8], max_bytes: usize) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if len > max_bytes {
                return Err(HeadError::TooLarge(max_bytes));
            }
            Ok(Some(Head {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                version: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect(),
                len,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => {
            Err(HeadError::TooLarge(max_bytes))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge(max_bytes)),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// Splits `host:port` (`[v6]:port` for IPv6) as in a `CONNECT` target.
pub fn parse_authority(target: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, p)
    } else {
        let (h, p) = target.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    let port: u16 = port.parse().ok()?;
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    (valid && port != 0).then(|| (host.to_ascii_lowercase(), port))
}

/// Where an absolute-form `http://` request goes: host, port, and the origin-form target.
pub fn parse_absolute(target: &str) -> Result<(String, u16, String), String> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err("https:// URLs go through CONNECT; set the proxy for https as well".into());
    }
    if !lower.starts_with("http://") {
        return Err(format!(
            "{target:?} is not an absolute http:// URL; this is a proxy: send GET http://host/path \
             or CONNECT host:port"
        ));
    }
    let url = url::Url::parse(target).map_err(|e| format!("bad URL {target:?}: {e}"))?;
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(format!("{target:?} names no host")),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let mut path = url.path().to_owned();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    Ok((host, port, path))
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The proxy: allow list, audit log and limits, shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    allow: AllowList,
    audit: AuditLog,
    limits: Limits,
    resolve_for_networks: bool,
    hosts: std::collections::BTreeMap<String, Vec<IpAddr>>,
}

/// Why a destination is refused or unreachable.
enum Refusal {
    Denied(String),
    Unreachable(String),
}

impl Proxy {
    /// A proxy with these rules (names only allowed by network rules are resolved; see
    /// [`Proxy::resolve_for_networks`]).
    pub fn new(allow: AllowList, audit: AuditLog, limits: Limits) -> Self {
        Self {
            allow,
            audit,
            limits,
            resolve_for_networks: true,
            hosts: std::collections::BTreeMap::new(),
        }
    }

    /// Names resolved from this table before the host's resolver is asked (lower case, no
    /// trailing dot).
    pub fn hosts(mut self, hosts: std::collections::BTreeMap<String, Vec<IpAddr>>) -> Self {
        self.hosts = hosts;
        self
    }

    /// Whether a name that no name rule allows is resolved to check it against the network
    /// rules (`false`: it is denied unresolved).
    pub fn resolve_for_networks(mut self, on: bool) -> Self {
        self.resolve_for_networks = on;
        self
    }

    /// Checks `host:port` against the allow list and connects. Names allowed only by network
    /// rules are resolved once, and the addresses checked are the ones connected to.
    async fn open(&self, host: &str, port: u16) -> Result<TcpStream, Refusal> {
        let by_name = self.allow.allows_name(host, port);
        let is_ip = host.parse::<IpAddr>().is_ok();
        if !by_name && (!self.allow.has_networks_for(port) || !is_ip && !self.resolve_for_networks)
        {
            return Err(Refusal::Denied(format!(
                "{} is not on the allow list",
                host_port(host, port)
            )));
        }
        let known = self
            .hosts
            .get(host.trim_end_matches('.').to_ascii_lowercase().as_str());
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) if known.is_some() => known
                .into_iter()
                .flatten()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect(),
            Err(_) => match tokio::net::lookup_host((host, port)).await {
                Ok(a) => a.collect(),
                Err(e) if by_name => {
                    return Err(Refusal::Unreachable(format!("resolving {host}: {e}")));
                }
                Err(e) => {
                    return Err(Refusal::Denied(format!(
                        "{host} is not on the allow list and does not resolve ({e})"
                    )));
                }
            },
        };
        if !by_name {
            let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
            if !self.allow.allows_addresses(&ips, port) {
                return Err(Refusal::Denied(format!(
                    "{} resolves to {ips:?}, outside the allowed networks",
                    host_port(host, port)
                )));
            }
        }
        let timeout = Duration::from_millis(self.limits.connect_timeout_ms);
        let mut last = String::from("no address");
        for addr in addrs {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("connecting to {addr}: {e}"),
                Err(_) => last = format!("connecting to {addr}: no answer within {timeout:?}"),
            }
        }
        Err(Refusal::Unreachable(last))
    }

    /// Serves one client connection (plain or TLS) to the end.
    pub async fn handle_connection<S>(&self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let counted = Counted::new(stream);
        let (sent, received) = (counted.read.clone(), counted.written.clone());
        let mut client = counted;
        let mut buf = Vec::with_capacity(4096);
        let timeout = Duration::from_millis(self.limits.header_timeout_ms);
        let head = tokio::time::timeout(timeout, read_head(&mut client, &mut buf, self.limits))
            .await
            .unwrap_or_else(|_| {
                Err(HeadError::Malformed(format!(
                    "no whole request head within {timeout:?}"
                )))
            });
        let head = match head {
            Ok(h) => h,
            Err(HeadError::Closed) if buf.is_empty() => {
                tracing::debug!(%peer, "client closed without a request");
                return;
            }
            Err(e) => {
                let (code, text) = match e {
                    HeadError::TooLarge(_) => (431, "Request Header Fields Too Large"),
                    _ => (400, "Bad Request"),
                };
                let _ = respond(&mut client, code, text, &e.to_string()).await;
                self.audit.record(
                    &AuditEvent::new(Source::Proxy, peer, "-", "", Decision::Malformed)
                        .with_reason(e.to_string()),
                );
                return;
            }
        };
        let rest = buf.split_off(head.len);
        let connect = head.method.eq_ignore_ascii_case("CONNECT");
        let dest = if connect {
            parse_authority(&head.target)
                .map(|(h, p)| (h, p, String::new()))
                .ok_or_else(|| format!("CONNECT target {:?} is not host:port", head.target))
        } else {
            parse_absolute(&head.target)
        };
        let (host, port, path) = match dest {
            Ok(d) => d,
            Err(reason) => {
                let _ = respond(&mut client, 400, "Bad Request", &reason).await;
                self.audit.record(
                    &AuditEvent::new(
                        Source::Proxy,
                        peer,
                        head.method.clone(),
                        head.target.chars().take(256).collect::<String>(),
                        Decision::Malformed,
                    )
                    .with_reason(reason),
                );
                return;
            }
        };
        let destination = host_port(&host, port);
        let mut event = AuditEvent::new(
            Source::Proxy,
            peer,
            head.method.clone(),
            destination.clone(),
            Decision::Allowed,
        );
        let upstream = match self.open(&host, port).await {
            Ok(u) => u,
            Err(Refusal::Denied(reason)) => {
                let body = format!("kiln airgap proxy: {reason}");
                let _ = respond(&mut client, 403, "Forbidden", &body).await;
                event.decision = Decision::Denied;
                event.allowed = false;
                self.audit.record(&event.with_reason(reason));
                return;
            }
            Err(Refusal::Unreachable(reason)) => {
                let body = format!("kiln airgap proxy: {reason}");
                let _ = respond(&mut client, 502, "Bad Gateway", &body).await;
                self.audit.record(&event.with_reason(reason));
                return;
            }
        };
        // Bytes so far were the head and the error pages: count only what crosses the proxy.
        let sent_before = sent.load(Ordering::Relaxed);
        let received_before = received.load(Ordering::Relaxed);
        // Counted: what reaches the destination (the rewritten head included) and what comes
        // back from it (the proxy's own `200 Connection established` excluded).
        let (result, head_sent, own_reply) = if connect {
            let r = tunnel(client, upstream, &rest).await;
            (r, 0, ESTABLISHED.len() as u64)
        } else {
            let request = rewrite_request(&head, &host, port, &path);
            let r = forward_http(client, upstream, &request, &rest).await;
            (r, request.len() as u64, 0)
        };
        event.bytes_sent =
            sent.load(Ordering::Relaxed) - sent_before + rest.len() as u64 + head_sent;
        event.bytes_received =
            (received.load(Ordering::Relaxed) - received_before).saturating_sub(own_reply);
        if let Err(e) = result {
            event.reason = Some(format!("connection ended with an error: {e}"));
        }
        self.audit.record(&event);
    }
}

async fn read_head<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut Vec<u8>,
    limits: Limits,
) -> Result<Head, HeadError> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| HeadError::Malformed(e.to_string()))?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_head(buf, limits.max_header_bytes)? {
            return Ok(head);
        }
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    client: &mut S,
    code: u16,
    text: &str,
    body: &str,
) -> io::Result<()> {
    let body = format!("{body}\n");
    let out = format!(
        "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(out.as_bytes()).await?;
    client.shutdown().await
}

/// The request as the origin gets it: origin-form target, hop-by-hop headers dropped,
/// `Connection: close`.
fn rewrite_request(head: &Head, host: &str, port: u16, path: &str) -> Vec<u8> {
    let path = if path.is_empty() { "/" } else { path };
    let mut out = format!("{} {path} HTTP/1.{}\r\n", head.method, head.version).into_bytes();
    let listed: Vec<String> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut has_host = false;
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if matches!(
            lower.as_str(),
            "connection"
                | "proxy-connection"
                | "keep-alive"
                | "proxy-authorization"
                | "proxy-authenticate"
                | "te"
                | "trailer"
                | "upgrade"
        ) || listed.contains(&lower)
        {
            continue;
        }
        has_host |= lower == "host";
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        let h = if port == 80 {
            host_port(host, port).trim_end_matches(":80").to_owned()
        } else {
            host_port(host, port)
        };
        out.extend_from_slice(format!("Host: {h}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

async fn tunnel<S>(mut client: S, mut upstream: TcpStream, early: &[u8]) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client.write_all(ESTABLISHED).await?;
    if !early.is_empty() {
        upstream.write_all(early).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map(|_| ())
}

/// Sends the request, then relays: the client's body up, the answer down. The exchange ends
/// when the origin has answered and closed (it was asked to), whatever the client does.
async fn forward_http<S>(
    client: S,
    mut upstream: TcpStream,
    request: &[u8],
    early: &[u8],
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    upstream.write_all(request).await?;
    if !early.is_empty() {
        upstream.write_all(early).await?;
    }
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut up_r, mut up_w) = upstream.into_split();
    let mut up = std::pin::pin!(async move {
        tokio::io::copy(&mut client_r, &mut up_w).await?;
        up_w.shutdown().await
    });
    let down = async move {
        tokio::io::copy(&mut up_r, &mut client_w).await?;
        client_w.shutdown().await
    };
    let mut down = std::pin::pin!(down);
    tokio::select! {
        r = &mut down => r,
        r = &mut up => {
            // The client finished sending (or failed); the answer may still be coming.
            r?;
            down.await
        }
    }
}

/// A stream that counts the bytes read from it and written to it.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            read: Arc::new(AtomicU64::new(0)),
            written: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the proxy on `listener` (TLS first when `tls` is given) until `shutdown` completes;
/// then stops accepting, gives open connections [`DRAIN_GRACE`] and cuts the rest. At most
/// `limits.max_connections` clients are served at once; more wait in the listen backlog.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(proxy.limits.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "accepting a proxy client failed");
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            let _permit = permit;
            match tls {
                None => proxy.handle_connection(stream, peer).await,
                Some(acceptor) => {
                    let timeout = Duration::from_millis(proxy.limits.header_timeout_ms);
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => proxy.handle_connection(s, peer).await,
                        Ok(Err(error)) => {
                            tracing::warn!(%peer, %error, "TLS handshake error from {peer}");
                        }
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(open = tasks.len(), "cutting proxy connections still open");
        tasks.abort_all();
    }
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_partial_complete_large_and_bad() {
        let max = 1024;
        assert_eq!(parse_head(b"GET http://a/ HTTP/1.1\r\nHo", max), Ok(None));
        let h = parse_head(
            b"CONNECT a.lab:443 HTTP/1.1\r\nHost: a.lab:443\r\n\r\nxx",
            max,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("CONNECT", "a.lab:443")
        );
        assert_eq!(h.len, 47);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(
            parse_head(big.as_bytes(), max),
            Err(HeadError::TooLarge(max))
        );
        let many: String = (0..150).map(|i| format!("H{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_head(many.as_bytes(), 1 << 20),
            Err(HeadError::TooLarge(1 << 20))
        );
        assert!(matches!(
            parse_head(b"GET / HTTP/9\r\n\r\n", max),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_authority("a.lab:443"), Some(("a.lab".into(), 443)));
        assert_eq!(parse_authority("[::1]:8443"), Some(("::1".into(), 8443)));
        for bad in [
            "a.lab", "a.lab:0", ":443", "a b:1", "::1:443", "[::1]", "a:99999",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
        assert_eq!(
            parse_absolute("http://Reg.Lab:5000/v2/?n=1").unwrap(),
            ("reg.lab".into(), 5000, "/v2/?n=1".into())
        );
        assert_eq!(
            parse_absolute("http://[::1]/x").unwrap(),
            ("::1".into(), 80, "/x".into())
        );
        assert!(parse_absolute("https://a/").is_err());
        assert!(parse_absolute("/relative").is_err());
    }

    #[test]
    fn rewritten_requests_drop_hop_by_hop_headers() {
        let head = parse_head(
            b"GET http://a.lab:8080/p?q HTTP/1.1\r\nHost: a.lab:8080\r\nProxy-Connection: keep-alive\r\nConnection: X-Trace\r\nX-Trace: 1\r\nAccept: */*\r\n\r\n",
            4096,
        )
        .unwrap()
        .unwrap();
        let out = String::from_utf8(rewrite_request(&head, "a.lab", 8080, "/p?q")).unwrap();
        assert_eq!(
            out,
            "GET /p?q HTTP/1.1\r\nHost: a.lab:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let head = parse_head(b"GET http://a.lab/ HTTP/1.0\r\n\r\n", 4096)
            .unwrap()
            .unwrap();
        let out = String::from_utf8(rewrite_request(&head, "a.lab", 80, "/")).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.0\r\nHost: a.lab\r\nConnection: close\r\n\r\n"
        );
    }
}
