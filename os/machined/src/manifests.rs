//! `cluster.extraManifests`: a control-plane node downloads each URL once it is running and
//! keeps it under `/var/lib/kiln/manifests/` (EPHEMERAL, readable with `kiln read`), named by
//! its position and the URL's last path segment.
//!
//! The download honours the configuration as an air-gapped node must: the proxy from
//! `machine.env` (`https_proxy`, `http_proxy`, `no_proxy`, either case) and never the
//! environment machined itself was started with, names looked up with the configured
//! nameservers ([`crate::resolver`]), and the certificates appended to
//! `/etc/ssl/certs/ca-certificates` ([`crate::machine_files`]) on top of the platform's
//! trusted roots. A failed download is an event and is retried with backoff (up to 30 s
//! between attempts) for as long as the node runs; every manifest is fetched independently.
//!
//! Kiln OS runs no Kubernetes (see the crate's limitations), so a manifest is stored, not
//! applied: what the air-gapped rehearsal proves is the path the bytes took.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_os_api::wait::{Poll, until};

use crate::events::EventKind;
use crate::node::Node;
use crate::volumes::Volumes;

/// Where manifests are kept, under EPHEMERAL (`/var`).
pub const MANIFESTS_DIR: &str = "lib/kiln/manifests";
/// The event id of every manifest event.
pub const EVENT_ID: &str = "extraManifests";
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between attempts.
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// How long a manifest is retried (in practice: for as long as the node runs).
const RETRY_FOR: Duration = Duration::from_secs(365 * 24 * 3600);

/// The proxy settings of `machine.env`, lower-case keys first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    /// `http_proxy`.
    pub http: Option<String>,
    /// `https_proxy`.
    pub https: Option<String>,
    /// `no_proxy`.
    pub no_proxy: Option<String>,
}

impl ProxyEnv {
    /// Reads the proxy variables of `machine.env`.
    pub fn from_env(env: &BTreeMap<String, String>) -> Self {
        let get = |key: &str| {
            env.get(key)
                .or_else(|| env.get(&key.to_uppercase()))
                .filter(|v| !v.trim().is_empty())
                .cloned()
        };
        ProxyEnv {
            http: get("http_proxy"),
            https: get("https_proxy"),
            no_proxy: get("no_proxy"),
        }
    }

    /// The proxy a request to `url` goes through, for messages.
    pub fn describe(&self, url: &reqwest::Url) -> String {
        let proxy = match url.scheme() {
            "https" => self.https.as_deref(),
            _ => self.http.as_deref(),
        };
        let excluded = self
            .no_proxy
            .as_deref()
            .zip(url.host_str())
            .is_some_and(|(list, host)| no_proxy_matches(list, host));
        match proxy {
            Some(p) if !excluded => format!("through the proxy {p}"),
            _ => "directly".to_owned(),
        }
    }
}

/// Whether `host` is excluded by a `no_proxy` list, by the rules reqwest applies to the
/// request itself: `*`, an IP address or network, or a domain with its subdomains.
fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse::<std::net::IpAddr>().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            if let Some(ip) = ip {
                return match entry.parse::<ipnetwork::IpNetwork>() {
                    Ok(net) => net.contains(ip),
                    Err(_) => false,
                };
            }
            let domain = entry.trim_start_matches('.');
            host == domain || host.ends_with(&format!(".{domain}"))
        })
}

/// Why one download failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The client could not be built (a bad proxy URL or certificate).
    #[error("{0}")]
    Client(String),
    /// The request failed.
    #[error("{url}: {source}")]
    Http {
        /// The manifest.
        url: String,
        /// What failed, with its causes.
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{url}: the server answered {status}")]
    Status {
        /// The manifest.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
    },
    /// The manifest could not be stored.
    #[error("storing {path}: {source}")]
    Store {
        /// Where.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// An HTTP client that uses exactly the configuration's proxy and trusted roots.
pub fn client(
    proxy: &ProxyEnv,
    extra_roots: Option<&[u8]>,
    resolver: Option<Arc<crate::resolver::ConfiguredResolver>>,
) -> Result<reqwest::Client, ManifestError> {
    let bad = |what: &str, e: reqwest::Error| ManifestError::Client(format!("{what}: {e}"));
    // `no_proxy()` first: machined's own environment (a process node inherits the host's)
    // must not route a node's traffic.
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(FETCH_TIMEOUT);
    let no_proxy = || {
        proxy
            .no_proxy
            .as_deref()
            .and_then(reqwest::NoProxy::from_string)
    };
    if let Some(p) = &proxy.http {
        b = b.proxy(
            reqwest::Proxy::http(p)
                .map_err(|e| bad("http_proxy", e))?
                .no_proxy(no_proxy()),
        );
    }
    if let Some(p) = &proxy.https {
        b = b.proxy(
            reqwest::Proxy::https(p)
                .map_err(|e| bad("https_proxy", e))?
                .no_proxy(no_proxy()),
        );
    }
    if let Some(r) = resolver {
        b = b.dns_resolver(r);
    }
    if let Some(pem) = extra_roots {
        for cert in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| bad("the certificates appended to the trusted roots", e))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| bad("building the HTTP client", e))
}

/// The file a manifest is stored in: its position and the URL's last path segment.
pub fn file_name(index: usize, url: &str) -> String {
    let last = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next_back().map(str::to_owned))
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "manifest.yaml".to_owned());
    let safe: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{index:02}-{safe}")
}

/// Downloads `url` and stores it; returns where and how many bytes.
pub async fn fetch_one(
    client: &reqwest::Client,
    volumes: &Volumes,
    index: usize,
    url: &str,
) -> Result<(PathBuf, usize), ManifestError> {
    let http = |source| ManifestError::Http {
        url: url.to_owned(),
        source,
    };
    let resp = client.get(url).send().await.map_err(http)?;
    if !resp.status().is_success() {
        return Err(ManifestError::Status {
            url: url.to_owned(),
            status: resp.status(),
        });
    }
    let body = resp.bytes().await.map_err(http)?;
    let dir = volumes.ephemeral.join(MANIFESTS_DIR);
    let path = dir.join(file_name(index, url));
    let store = |source| ManifestError::Store {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(store)?;
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, &body).map_err(store)?;
    std::fs::rename(&tmp, &path).map_err(store)?;
    Ok((path, body.len()))
}

/// Starts the downloads of a control-plane node's extra manifests, one task per URL.
pub fn start(node: &Arc<Node>) {
    let Some(cfg) = node.config() else { return };
    if cfg.cluster.extra_manifests.is_empty() {
        return;
    }
    let volumes = node.platform.volumes().clone();
    let proxy = ProxyEnv::from_env(&cfg.machine.env);
    let roots = crate::machine_files::trusted_roots(&volumes);
    let resolver = crate::resolver::ConfiguredResolver::for_reqwest(Some(&cfg));
    let client = match client(&proxy, roots.as_deref(), resolver) {
        Ok(c) => c,
        Err(e) => {
            node.events.publish(
                EventKind::Machine,
                EVENT_ID,
                "failed",
                format!("extra manifests are not fetched: {e}"),
            );
            return;
        }
    };
    for (index, url) in cfg.cluster.extra_manifests.iter().cloned().enumerate() {
        let node = node.clone();
        let client = client.clone();
        let volumes = volumes.clone();
        let route = reqwest::Url::parse(&url)
            .map(|u| proxy.describe(&u))
            .unwrap_or_default();
        tokio::spawn(async move {
            node.events.publish(
                EventKind::Machine,
                EVENT_ID,
                "fetching",
                format!("fetching {url} {route}"),
            );
            let result = until(
                format!("the extra manifest {url}"),
                Poll::backoff(Duration::from_secs(1), MAX_PAUSE, RETRY_FOR),
                || async {
                    let r = fetch_one(&client, &volumes, index, &url).await;
                    if let Err(e) = &r {
                        node.events.publish(
                            EventKind::Machine,
                            EVENT_ID,
                            "retrying",
                            format!("fetching {url} failed: {}; retrying", chain(e)),
                        );
                    }
                    r
                },
            )
            .await;
            match result {
                Ok((path, bytes)) => {
                    let node_path = path
                        .strip_prefix(&volumes.ephemeral)
                        .map(|p| format!("/var/{}", p.display()))
                        .unwrap_or_else(|_| path.display().to_string());
                    node.events.publish(
                        EventKind::Machine,
                        EVENT_ID,
                        "fetched",
                        format!("fetched {url} {route}: {bytes} bytes in {node_path}"),
                    );
                }
                Err(e) => {
                    node.events
                        .publish(EventKind::Machine, EVENT_ID, "failed", e.to_string())
                }
            }
        });
    }
}

/// An error with its causes (reqwest hides the interesting part in `source()`).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_variables_are_read_in_either_case_and_no_proxy_is_honoured() {
        let env: BTreeMap<String, String> = [
            ("HTTPS_PROXY", "http://10.5.0.1:8888"),
            ("http_proxy", "http://10.5.0.1:8888"),
            ("no_proxy", "10.5.0.0/24,.cluster.local"),
            ("other", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let p = ProxyEnv::from_env(&env);
        assert_eq!(p.https.as_deref(), Some("http://10.5.0.1:8888"));
        assert_eq!(p.no_proxy.as_deref(), Some("10.5.0.0/24,.cluster.local"));
        let out = reqwest::Url::parse("https://example.org/m.yaml").unwrap();
        assert_eq!(p.describe(&out), "through the proxy http://10.5.0.1:8888");
        let lab = reqwest::Url::parse("https://10.5.0.7/m.yaml").unwrap();
        assert_eq!(p.describe(&lab), "directly");
        assert_eq!(
            ProxyEnv::from_env(&BTreeMap::new()).describe(&out),
            "directly"
        );
    }

    #[test]
    fn no_proxy_takes_networks_addresses_and_domains() {
        let list = "10.5.0.0/24, .cluster.local,registry.lab,fd00::1";
        for host in [
            "10.5.0.9",
            "a.cluster.local",
            "registry.lab",
            "x.registry.lab",
            "[fd00::1]",
        ] {
            assert!(no_proxy_matches(list, host), "{host}");
        }
        for host in ["10.6.0.1", "example.org", "notregistry.lab", "fd00::2"] {
            assert!(!no_proxy_matches(list, host), "{host}");
        }
        assert!(no_proxy_matches("*", "example.org"));
    }

    #[test]
    fn file_names_keep_order_and_never_leave_the_directory() {
        assert_eq!(file_name(0, "https://h:8/debug.yaml"), "00-debug.yaml");
        assert_eq!(file_name(3, "https://h/a/b%2F..%2Fx"), "03-b_2F.._2Fx");
        assert_eq!(file_name(12, "https://h/"), "12-manifest.yaml");
    }

    #[test]
    fn a_bad_proxy_or_certificate_is_a_client_error() {
        let bad_proxy = ProxyEnv {
            https: Some("::not a url".into()),
            ..Default::default()
        };
        assert!(matches!(
            client(&bad_proxy, None, None),
            Err(ManifestError::Client(m)) if m.contains("https_proxy")
        ));
        let bad_pem = b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n";
        assert!(client(&ProxyEnv::default(), Some(bad_pem), None).is_err());
    }
}
