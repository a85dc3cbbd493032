//! Acquiring the machine configuration at boot: the persisted copy on STATE, a staged copy,
//! a file, an environment variable, or a URL; with none, maintenance mode.

use std::path::PathBuf;

use base64::Engine as _;
use kiln_config::MachineConfig;

use crate::volumes::Volumes;

/// Where the configuration can come from, in order of preference after STATE.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// `KILN_CONFIG_DATA` (base64 of the document).
    pub data_env: Option<String>,
    /// `--config-url` / `KILN_CONFIG` as a URL or path.
    pub location: Option<String>,
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
    /// The environment variable is not base64.
    #[error("KILN_CONFIG_DATA is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// Fetching a URL failed.
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The document does not parse.
    #[error("the configuration from {source_name} does not parse: {error}")]
    Parse {
        /// Where it came from.
        source_name: String,
        /// The parser's message.
        error: kiln_config::ParseError,
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

/// Finds the configuration; `Ok(None)` means maintenance mode.
pub fn acquire(
    volumes: &Volumes,
    sources: &ConfigSources,
) -> Result<Option<Acquired>, AcquireError> {
    // A staged configuration becomes the persisted one at boot.
    let staged = volumes.staged_config_path();
    if staged.exists() {
        std::fs::rename(&staged, volumes.config_path()).map_err(|source| AcquireError::Read {
            path: staged.clone(),
            source,
        })?;
    }
    let persisted = volumes.config_path();
    if persisted.exists() {
        let text = std::fs::read_to_string(&persisted).map_err(|source| AcquireError::Read {
            path: persisted.clone(),
            source,
        })?;
        return parse(text, "STATE".to_owned()).map(Some);
    }
    if let Some(path) = &sources.file {
        let text = std::fs::read_to_string(path).map_err(|source| AcquireError::Read {
            path: path.clone(),
            source,
        })?;
        return parse(text, path.display().to_string()).map(Some);
    }
    if let Some(data) = &sources.data_env {
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim())?;
        return parse(
            String::from_utf8_lossy(&bytes).into_owned(),
            "KILN_CONFIG_DATA".to_owned(),
        )
        .map(Some);
    }
    if let Some(loc) = &sources.location {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            return fetch(loc).and_then(|t| parse(t, loc.clone())).map(Some);
        }
        let path = PathBuf::from(loc);
        let text =
            std::fs::read_to_string(&path).map_err(|source| AcquireError::Read { path, source })?;
        return parse(text, loc.clone()).map(Some);
    }
    Ok(None)
}

fn fetch(url: &str) -> Result<String, AcquireError> {
    // Blocking fetch: this runs once, in the boot sequence, before any service starts.
    let mut last = String::new();
    for attempt in 0..5 {
        match ureq_get(url) {
            Ok(text) => return Ok(text),
            Err(e) => last = e,
        }
        std::thread::sleep(std::time::Duration::from_millis(500 * (attempt + 1)));
    }
    Err(AcquireError::Fetch {
        url: url.to_owned(),
        reason: last,
    })
}

/// A minimal HTTP/1.1 GET over plain TCP (config URLs in the lab are plain HTTP on the
/// bridge); https is refused with a clear message rather than silently unverified.
fn ureq_get(url: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// configuration URLs are supported on this platform")?;
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let mut stream = std::net::TcpStream::connect(&addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("server answered {status:?}"));
    }
    Ok(body.to_owned())
}

/// Persists the configuration text on STATE.
pub fn persist(volumes: &Volumes, text: &str) -> std::io::Result<()> {
    kiln_config::client::write_private(&volumes.config_path(), text.as_bytes())
}

/// Stages the configuration for the next boot.
pub fn stage(volumes: &Volumes, text: &str) -> std::io::Result<()> {
    kiln_config::client::write_private(&volumes.staged_config_path(), text.as_bytes())
}
