//! The load balancer's configuration: frontends with their upstreams, health-check settings and
//! connection limits, read from a YAML file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration file.
///
/// ```yaml
/// frontends:
///   - name: k8s
///     listen: 10.5.0.1:6443
///     upstreams: [10.5.0.2:6443, 10.5.0.3:6443, 10.5.0.4:6443]
///   - name: os-api
///     listen: 10.5.0.1:50000
///     upstreams: [10.5.0.2:50000, 10.5.0.3:50000, 10.5.0.4:50000]
/// health:            # every field optional; these are the defaults
///   intervalMs: 1000
///   timeoutMs: 500
///   rise: 2
///   fall: 2
/// connectTimeoutMs: 1000
/// drainTimeoutMs: 10000
/// maxConnections: 10000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The listening sockets and where each forwards to.
    pub frontends: Vec<FrontendConfig>,
    /// Active health-check settings, shared by every upstream.
    #[serde(default)]
    pub health: HealthConfig,
    /// How long one connect to one upstream may take for a client connection before the next
    /// upstream is tried, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// On shutdown, how long established connections may go on before they are closed, in
    /// milliseconds.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Most client connections open at once over all frontends; further clients wait in the
    /// listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

/// One listening socket and its upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendConfig {
    /// Name used in counters and control requests (`k8s`, `os-api`).
    pub name: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Servers to forward to; may be empty (clients are then refused until some are set).
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
}

/// Active health checks: a TCP connect to every upstream every `interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between the starts of two check rounds, in milliseconds.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// How long one check connect may take before it counts as failed, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successful checks that make an upstream healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures (checks or client connects) that make an upstream unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

impl HealthConfig {
    /// The interval as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// The check timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}
fn default_connect_timeout_ms() -> u64 {
    1000
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_max_connections() -> u32 {
    10_000
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read load balancer config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML for [`Config`].
    #[error("load balancer config {} is not valid: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_yaml::Error,
    },
    /// The values are inconsistent.
    #[error("load balancer config is not valid: {0}")]
    Invalid(String),
}

impl Config {
    /// A configuration with the given frontends and default settings.
    pub fn new(frontends: Vec<FrontendConfig>) -> Self {
        Self {
            frontends,
            health: HealthConfig::default(),
            connect_timeout_ms: default_connect_timeout_ms(),
            drain_timeout_ms: default_drain_timeout_ms(),
            max_connections: default_max_connections(),
        }
    }

    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Writes the configuration as YAML (what the provisioner hands to `kiln lb run`).
    pub fn to_yaml(&self) -> String {
        // A plain struct of strings, numbers and lists always serialises.
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Checks names, addresses and thresholds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.frontends.is_empty() {
            return invalid("no frontends: add at least one under `frontends`".into());
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        for f in &self.frontends {
            if f.name.is_empty() {
                return invalid(format!(
                    "the frontend listening on {} has no name",
                    f.listen
                ));
            }
            if !names.insert(f.name.as_str()) {
                return invalid(format!("frontend name {:?} is used twice", f.name));
            }
            if !listens.insert(f.listen) {
                return invalid(format!("listen address {} is used twice", f.listen));
            }
            let mut seen = HashSet::new();
            for u in &f.upstreams {
                if !seen.insert(u) {
                    return invalid(format!("frontend {:?} lists upstream {u} twice", f.name));
                }
            }
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.timeout_ms == 0 {
            return invalid("health intervalMs and timeoutMs must be at least 1".into());
        }
        if h.rise == 0 || h.fall == 0 {
            return invalid("health rise and fall must be at least 1".into());
        }
        if self.connect_timeout_ms == 0 {
            return invalid("connectTimeoutMs must be at least 1".into());
        }
        if self.max_connections == 0 {
            return invalid("maxConnections must be at least 1".into());
        }
        Ok(())
    }

    /// The connect timeout for client connections.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The drain deadline on shutdown.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields() {
        let c: Config = serde_yaml::from_str(
            "frontends:\n  - name: k8s\n    listen: 127.0.0.1:6443\n    upstreams: [127.0.0.2:6443]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.health, HealthConfig::default());
        assert_eq!(c.connect_timeout_ms, 1000);
        let back: Config = serde_yaml::from_str(&c.to_yaml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn rejects_duplicates_and_zero_thresholds() {
        let f = |name: &str, port| FrontendConfig {
            name: name.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            upstreams: vec![],
        };
        let dup = Config::new(vec![f("a", 1), f("a", 2)]);
        assert!(
            dup.validate()
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
        let mut zero = Config::new(vec![f("a", 1)]);
        zero.health.fall = 0;
        assert!(zero.validate().unwrap_err().to_string().contains("fall"));
        let unknown = serde_yaml::from_str::<Config>("frontends: []\nbogus: 1\n");
        assert!(unknown.is_err());
    }
}
