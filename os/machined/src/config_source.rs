//! Acquiring the machine configuration at boot, once the network is up: the persisted copy on
//! STATE (a staged copy first becomes it), then `--config FILE`, `KILN_CONFIG_DATA`, a path or
//! URL (`--config-url` / `KILN_CONFIG`), and the platform's own source (`kiln.config=` on the
//! kernel command line, through the OAuth2 device flow when `kiln.config.oauth.client_id` is
//! set there); with none, maintenance mode. URLs are fetched with reqwest (rustls,
//! the system's roots) with connect and total timeouts, retried for a bounded time.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use kiln_config::MachineConfig;
use kiln_os_api::wait::{Poll, until};

use crate::volumes::Volumes;

/// How long one connection attempt to a configuration server may take.
pub const FETCH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one fetch may take in all.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long fetching is retried before the boot gives up on the URL.
pub const FETCH_RETRY_FOR: Duration = Duration::from_secs(60);

/// Where the configuration can come from, in order of preference after STATE.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// `KILN_CONFIG_DATA` (base64 of the document).
    pub data_env: Option<String>,
    /// `--config-url` / `KILN_CONFIG` as a URL or path.
    pub location: Option<String>,
    /// The platform's source: `kiln.config=` on the kernel command line.
    pub kernel_url: Option<String>,
    /// The kernel command line: `kiln.config.oauth.*` make the download of `kernel_url` go
    /// through the OAuth2 device flow ([`crate::oauth`]).
    pub kernel_cmdline: Option<String>,
    /// Values of the variables `kiln.config.oauth.extra_variable` may name (`hostname`, `ip`,
    /// `uuid`).
    pub variables: std::collections::BTreeMap<String, String>,
}

/// Why a configuration could not be acquired.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Moving the staged configuration into place failed.
    #[error("moving the staged configuration {path} into place: {source}")]
    Unstage {
        /// The staged file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The environment variable is not base64.
    #[error("KILN_CONFIG_DATA is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The URL is not http(s).
    #[error("{url}: only http:// and https:// configuration URLs are supported")]
    Scheme {
        /// The URL.
        url: String,
    },
    /// Fetching a URL failed for the whole retry period.
    #[error("fetching {url}: {source}")]
    Fetch {
        /// The URL.
        url: String,
        /// The last failure, with the time allowed.
        source: kiln_os_api::wait::TimedOut<FetchError>,
    },
    /// The OAuth2 device flow did not give a token.
    #[error(transparent)]
    OAuth(#[from] crate::oauth::OAuthError),
    /// The document does not parse.
    #[error("the configuration from {source_name} does not parse: {error}")]
    Parse {
        /// Where it came from.
        source_name: String,
        /// The parser's message.
        error: kiln_config::ParseError,
    },
}

/// One failed fetch.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, sending or reading failed (including timeouts).
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error status.
    #[error("the server answered {status}")]
    Status {
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
}

/// A configuration and where it came from.
#[derive(Debug)]
pub struct Acquired {
    /// The document.
    pub config: MachineConfig,
    /// Its text, as given.
    pub text: String,
    /// Where it came from (for events).
    pub source: String,
}

fn parse(text: String, source: String) -> Result<Acquired, AcquireError> {
    let config = kiln_config::from_yaml(&text).map_err(|error| AcquireError::Parse {
        source_name: source.clone(),
        error,
    })?;
    Ok(Acquired {
        config,
        text,
        source,
    })
}

fn read(path: PathBuf) -> Result<String, AcquireError> {
    std::fs::read_to_string(&path).map_err(|source| AcquireError::Read { path, source })
}

/// Finds the configuration; `Ok(None)` means maintenance mode. `on_retry` hears every failed
/// fetch attempt (the boot makes each an event); `say` prints the device flow's console lines.
pub async fn acquire(
    volumes: &Volumes,
    sources: &ConfigSources,
    on_retry: &(dyn Fn(&str, &FetchError) + Send + Sync),
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<Option<Acquired>, AcquireError> {
    // A staged configuration becomes the persisted one at boot.
    let staged = volumes.staged_config_path();
    if staged.exists() {
        std::fs::rename(&staged, volumes.config_path()).map_err(|source| {
            AcquireError::Unstage {
                path: staged.clone(),
                source,
            }
        })?;
    }
    let persisted = volumes.config_path();
    if persisted.exists() {
        return parse(read(persisted)?, "STATE".to_owned()).map(Some);
    }
    if let Some(path) = &sources.file {
        return parse(read(path.clone())?, path.display().to_string()).map(Some);
    }
    if let Some(data) = &sources.data_env {
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim())?;
        return parse(
            String::from_utf8_lossy(&bytes).into_owned(),
            "KILN_CONFIG_DATA".to_owned(),
        )
        .map(Some);
    }
    let Some(loc) = sources.location.as_ref().or(sources.kernel_url.as_ref()) else {
        return Ok(None);
    };
    if loc.contains("://") {
        let oauth = match (&sources.location, &sources.kernel_cmdline) {
            (None, Some(cmdline)) => crate::oauth::OAuthSettings::from_cmdline(cmdline, loc)?,
            _ => None,
        };
        let token = match &oauth {
            Some(settings) => Some(
                crate::oauth::device_flow(
                    settings,
                    &sources.variables,
                    crate::oauth::Timing::default(),
                    say,
                )
                .await?,
            ),
            None => None,
        };
        if token.is_some() {
            say(format!("fetching machine config from: {loc:?}"));
        }
        let text = fetch_with(loc, token.as_deref(), on_retry).await?;
        return parse(text, loc.clone()).map(Some);
    }
    parse(read(PathBuf::from(loc))?, loc.clone()).map(Some)
}

/// The value of `kiln.config=` on a kernel command line.
pub fn kernel_config_url(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("kiln.config="))
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Fetches `url`, retrying failed attempts for [`FETCH_RETRY_FOR`].
pub async fn fetch(
    url: &str,
    on_retry: &(dyn Fn(&str, &FetchError) + Send + Sync),
) -> Result<String, AcquireError> {
    fetch_with(url, None, on_retry).await
}

/// Fetches `url` with an OAuth2 bearer token when given, retrying failed attempts for
/// [`FETCH_RETRY_FOR`].
pub async fn fetch_with(
    url: &str,
    bearer: Option<&str>,
    on_retry: &(dyn Fn(&str, &FetchError) + Send + Sync),
) -> Result<String, AcquireError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(AcquireError::Scheme {
            url: url.to_owned(),
        });
    }
    let client = reqwest::Client::builder()
        .connect_timeout(FETCH_CONNECT_TIMEOUT)
        .timeout(FETCH_TIMEOUT)
        .use_rustls_tls()
        .build()
        .map_err(|e| AcquireError::Fetch {
            url: url.to_owned(),
            source: kiln_os_api::wait::TimedOut {
                what: format!("building an HTTP client for {url}"),
                timeout: Duration::ZERO,
                attempts: 0,
                last: Some(FetchError::Http(e)),
            },
        })?;
    until(
        format!("the configuration at {url}"),
        Poll::backoff(
            Duration::from_millis(500),
            Duration::from_secs(5),
            FETCH_RETRY_FOR,
        ),
        || async {
            let result = fetch_once(&client, url, bearer).await;
            if let Err(e) = &result {
                on_retry(url, e);
            }
            result
        },
    )
    .await
    .map_err(|source| AcquireError::Fetch {
        url: url.to_owned(),
        source,
    })
}

async fn fetch_once(
    client: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
) -> Result<String, FetchError> {
    let mut request = client.get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status { status });
    }
    Ok(response.text().await?)
}

/// Persists the configuration text on STATE.
pub fn persist(volumes: &Volumes, text: &str) -> std::io::Result<()> {
    kiln_config::client::write_private(&volumes.config_path(), text.as_bytes())
}

/// Stages the configuration for the next boot.
pub fn stage(volumes: &Volumes, text: &str) -> std::io::Result<()> {
    kiln_config::client::write_private(&volumes.staged_config_path(), text.as_bytes())
}

/// Configurations of a one-node test cluster, for unit tests.
#[cfg(test)]
pub(crate) fn generated_configs() -> kiln_config::GeneratedConfigs {
    let secrets = kiln_pki::SecretsBundle::generate().expect("secrets");
    kiln_config::generate(&kiln_config::GenerateInput {
        cluster_name: "t",
        endpoint: "https://127.0.0.1:6443",
        secrets: &secrets,
        install_disk: "/dev/vda",
        install_image: "kiln/installer:v0.1.0",
        patches: &[],
        control_plane_patches: &[],
        worker_patches: &[],
    })
    .expect("configurations")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_names_the_url() {
        assert_eq!(
            kernel_config_url("console=ttyS0 kiln.config=http://10.5.0.1:8080/cp.yaml quiet"),
            Some("http://10.5.0.1:8080/cp.yaml".to_owned())
        );
        assert_eq!(kernel_config_url("console=ttyS0 kiln.config="), None);
        assert_eq!(kernel_config_url("console=ttyS0"), None);
    }

    /// A one-connection-at-a-time HTTP server answering each request with the next of
    /// `answers` (status line and body).
    async fn serve(answers: Vec<(&'static str, String)>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(response.as_bytes()).await.unwrap();
                conn.shutdown().await.unwrap();
            }
        });
        addr
    }

    /// A configuration URL is fetched over HTTP; an error answer is retried and reported.
    #[tokio::test]
    async fn a_configuration_is_fetched_from_a_local_http_server() {
        let text = kiln_config::to_yaml(&generated_configs().worker).unwrap();
        let addr = serve(vec![
            ("503 Service Unavailable", "not yet".to_owned()),
            ("200 OK", text.clone()),
        ])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::under(dir.path());
        volumes.prepare().unwrap();
        let url = format!("http://{addr}/worker.yaml");
        let retries = std::sync::Mutex::new(Vec::new());
        let acquired = acquire(
            &volumes,
            &ConfigSources {
                kernel_url: Some(url.clone()),
                ..ConfigSources::default()
            },
            &|u, e| retries.lock().unwrap().push(format!("{u}: {e}")),
            &|_| {},
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(acquired.source, url);
        assert_eq!(acquired.text, text);
        assert_eq!(
            acquired.config.machine.machine_type,
            kiln_config::MachineType::Worker
        );
        let retries = retries.into_inner().unwrap();
        assert_eq!(retries.len(), 1, "{retries:?}");
        assert!(retries[0].contains("503"), "{retries:?}");
    }

    #[tokio::test]
    async fn other_schemes_are_refused() {
        let err = fetch("ftp://example.invalid/c.yaml", &|_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, AcquireError::Scheme { .. }), "{err}");
    }
}
