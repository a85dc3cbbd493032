//! `kiln debug air-gapped`: an HTTP proxy and an HTTPS server with a self-signed certificate
//! for the advertised address, and the machine configuration patch that trusts the
//! certificate and sends the node's traffic through the proxy (in-cluster traffic excluded).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::allow::{AllowList, Rule, Target};
use crate::audit::AuditLog;
use crate::proxy::{self, Limits, Proxy};
use crate::tls::{self, PemPair, TlsError};

/// The guide's default proxy port.
pub const DEFAULT_PROXY_PORT: u16 = 8002;
/// The guide's default HTTPS server port.
pub const DEFAULT_HTTPS_PORT: u16 = 8001;
/// The patch file name the guide uses.
pub const PATCH_FILE: &str = "air-gapped-patch.yaml";
/// The trusted-roots file the patch appends to (`kiln_config::types::TRUSTED_ROOTS_PATH`, the one
/// file outside `/var` a configuration may change).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates";
/// The manifest the HTTPS server serves.
pub const MANIFEST_PATH: &str = "/debug.yaml";

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// The address nodes reach this host at (the lab bridge address).
    pub advertised_address: IpAddr,
    /// Address to bind both servers on (the guide binds every address).
    pub bind_address: IpAddr,
    /// Proxy port (0: any free port, written into the patch).
    pub proxy_port: u16,
    /// HTTPS server port (0: any free port).
    pub https_port: u16,
    /// Networks kept off the proxy besides the advertised address's /24 and loopback.
    pub no_proxy: Vec<String>,
    /// Where to write the patch.
    pub patch_path: PathBuf,
}

/// Starting the debug servers failed.
#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    /// A port could not be bound.
    #[error("binding {what} on {addr}: {source}; pick another port")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate could not be made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The patch could not be written.
    #[error("writing the config patch {path}: {source}")]
    WritePatch {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

#[derive(Serialize)]
struct PatchDoc {
    machine: PatchMachine,
    cluster: PatchCluster,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PatchCluster {
    extra_manifests: Vec<String>,
}

#[derive(Serialize)]
struct PatchMachine {
    files: Vec<PatchFile>,
    env: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct PatchFile {
    content: String,
    permissions: u32,
    path: String,
    op: String,
}

/// The `no_proxy` list: loopback, the advertised address's /24 (the cluster network), and
/// `extra`.
pub fn no_proxy(advertised: IpAddr, extra: &[String]) -> String {
    let prefix = if advertised.is_ipv4() { 24 } else { 64 };
    let net = IpNetwork::new(advertised, prefix)
        .map(|n| format!("{}/{}", n.network(), n.prefix()))
        .unwrap_or_else(|_| advertised.to_string());
    let mut list = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        net,
    ];
    list.extend(extra.iter().cloned());
    list.join(",")
}

/// The machine configuration patch (strategic merge): append `cert_pem` to the trusted roots,
/// set the proxy environment and add `manifest_url` to `cluster.extraManifests`, the guide's
/// three sections.
pub fn patch_yaml(cert_pem: &str, proxy_url: &str, no_proxy: &str, manifest_url: &str) -> String {
    let mut env = std::collections::BTreeMap::new();
    for key in ["http_proxy", "https_proxy"] {
        env.insert(key.to_owned(), proxy_url.to_owned());
    }
    env.insert("no_proxy".to_owned(), no_proxy.to_owned());
    let doc = PatchDoc {
        machine: PatchMachine {
            files: vec![PatchFile {
                content: cert_pem.to_owned(),
                permissions: 0o644,
                path: CA_BUNDLE.to_owned(),
                op: "append".to_owned(),
            }],
            env,
        },
        cluster: PatchCluster {
            extra_manifests: vec![manifest_url.to_owned()],
        },
    };
    serde_yaml::to_string(&doc).unwrap_or_default()
}

/// A tiny Kubernetes manifest for the node to fetch.
pub fn manifest() -> String {
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kiln-air-gapped-debug\n  namespace: \
     default\ndata:\n  fetched: \"through the air-gapped proxy\"\n"
        .to_owned()
}

/// Bound servers, ready to run.
pub struct AirGapped {
    proxy_listener: TcpListener,
    https_listener: TcpListener,
    tls: TlsAcceptor,
    proxy: Arc<Proxy>,
    /// The certificate of the HTTPS server.
    pub cert: PemPair,
    /// The proxy's bound address.
    pub proxy_addr: SocketAddr,
    /// The HTTPS server's bound address.
    pub https_addr: SocketAddr,
    /// Where the patch was written.
    pub patch_path: PathBuf,
}

/// A line in the guide's log format (`2022/08/04 16:43:14 message`) on stdout.
pub fn log_line(message: &str) {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year]/[month]/[day] [hour]:[minute]:[second]");
    let stamp = now.format(&fmt).unwrap_or_default();
    println!("{stamp} {message}");
}

impl std::fmt::Debug for AirGapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AirGapped")
            .field("proxy_addr", &self.proxy_addr)
            .field("https_addr", &self.https_addr)
            .field("patch_path", &self.patch_path)
            .finish_non_exhaustive()
    }
}

impl AirGapped {
    /// Makes the certificate, binds both servers and writes the patch. The proxy lets every
    /// destination through (this is a debugging aid) and records each in `audit`.
    pub async fn start(opts: &Options, audit: AuditLog) -> Result<Self, DebugError> {
        let bind = |what: &'static str, port: u16| {
            let addr = SocketAddr::new(opts.bind_address, port);
            async move {
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| DebugError::Bind { what, addr, source })
            }
        };
        let proxy_listener = bind("the HTTP proxy", opts.proxy_port).await?;
        let https_listener = bind("the HTTPS server", opts.https_port).await?;
        let local = |l: &TcpListener, what: &'static str, port: u16| {
            l.local_addr().map_err(|source| DebugError::Bind {
                what,
                addr: SocketAddr::new(opts.bind_address, port),
                source,
            })
        };
        let proxy_addr = local(&proxy_listener, "the HTTP proxy", opts.proxy_port)?;
        let https_addr = local(&https_listener, "the HTTPS server", opts.https_port)?;
        let cert = tls::self_signed(&[opts.advertised_address.to_string()])?;
        let tls = tls::acceptor_from_pem(&cert)?;
        let proxy_url = format!(
            "http://{}",
            SocketAddr::new(opts.advertised_address, proxy_addr.port())
        );
        let manifest_url = format!(
            "https://{}{MANIFEST_PATH}",
            SocketAddr::new(opts.advertised_address, https_addr.port())
        );
        let patch = patch_yaml(
            &cert.cert_pem,
            &proxy_url,
            &no_proxy(opts.advertised_address, &opts.no_proxy),
            &manifest_url,
        );
        log_line(&format!(
            "writing config patch to {}",
            opts.patch_path.display()
        ));
        std::fs::write(&opts.patch_path, patch).map_err(|source| DebugError::WritePatch {
            path: opts.patch_path.clone(),
            source,
        })?;
        let allow = AllowList(vec![Rule {
            target: Target::Any,
            ports: Vec::new(),
        }]);
        Ok(Self {
            proxy_listener,
            https_listener,
            tls,
            proxy: Arc::new(Proxy::new(allow, audit, Limits::default())),
            cert,
            proxy_addr,
            https_addr,
            patch_path: opts.patch_path.clone(),
        })
    }

    /// Runs both servers until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        log_line(&format!(
            "starting HTTP proxy on :{}",
            self.proxy_addr.port()
        ));
        log_line(&format!(
            "starting HTTPS server with self-signed cert on :{}",
            self.https_addr.port()
        ));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let proxy = proxy::serve(self.proxy_listener, None, self.proxy, stop(rx.clone()));
        let https = serve_https(self.https_listener, self.tls, stop(rx));
        let signal = async move {
            shutdown.await;
            let _ = tx.send(true);
        };
        tokio::join!(proxy, https, signal);
    }
}

/// Serves [`manifest`] at [`MANIFEST_PATH`] over TLS, one request per connection, printing
/// each request and each failed handshake in the guide's log format.
pub async fn serve_https(
    listener: TcpListener,
    tls: TlsAcceptor,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(256));
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        while tasks.try_join_next().is_some() {}
        let tls = tls.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let timeout = Duration::from_secs(10);
            let mut stream = match tokio::time::timeout(timeout, tls.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    log_line(&format!("http: TLS handshake error from {peer}: {e}"));
                    return;
                }
                Err(_) => {
                    log_line(&format!("http: TLS handshake error from {peer}: timeout"));
                    return;
                }
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            let head = loop {
                let n = match tokio::time::timeout(timeout, stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => return,
                };
                buf.extend_from_slice(&chunk[..n]);
                match proxy::parse_head(&buf, 16 * 1024) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(_) => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                }
            };
            log_line(&format!("{} {}", head.method, head.target));
            let (status, body) = if head.method == "GET" && head.target == MANIFEST_PATH {
                ("200 OK", manifest())
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let out = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(out.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
    tasks.abort_all();
}

/// The default patch path: the guide's file name in the current directory.
pub fn default_patch_path() -> PathBuf {
    Path::new(PATCH_FILE).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_appends_the_certificate_and_sets_the_proxy() {
        let cert = tls::self_signed(&["10.5.0.1".into()]).unwrap();
        let np = no_proxy("10.5.0.1".parse().unwrap(), &[".kiln.internal".into()]);
        assert_eq!(np, "localhost,127.0.0.1,::1,10.5.0.0/24,.kiln.internal");
        let text = patch_yaml(
            &cert.cert_pem,
            "http://10.5.0.1:8002",
            &np,
            "https://10.5.0.1:8001/debug.yaml",
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let f = &v["machine"]["files"][0];
        assert_eq!(f["path"].as_str(), Some(CA_BUNDLE));
        assert_eq!(f["op"].as_str(), Some("append"));
        assert_eq!(f["permissions"].as_u64(), Some(0o644));
        assert_eq!(f["content"].as_str(), Some(cert.cert_pem.as_str()));
        assert_eq!(
            v["machine"]["env"]["https_proxy"].as_str(),
            Some("http://10.5.0.1:8002")
        );
        assert_eq!(v["machine"]["env"]["no_proxy"].as_str(), Some(np.as_str()));
        assert_eq!(
            v["cluster"]["extraManifests"][0].as_str(),
            Some("https://10.5.0.1:8001/debug.yaml")
        );
    }
}
