//! The client config (`~/.kiln/config`, `kilnconfig`): named contexts, each with the endpoints
//! to connect to, the default target nodes, the OS CA and a client certificate.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Where the client connects (`-e`): host or host:port.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Default targets (`-n`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// base64 PEM of the OS CA certificate.
    pub ca: String,
    /// base64 PEM of the client certificate.
    pub crt: String,
    /// base64 PEM of the client key.
    pub key: String,
    /// The lab state directory of a cluster that `kiln cluster create` made (so `kiln health`
    /// finds its nodes wherever `--state` put it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<PathBuf>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Name of the current context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Why the client config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a client config.
    #[error("{path}: not a kiln client config: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: serde_yaml::Error,
    },
    /// Rendering failed.
    #[error("rendering the client config: {0}")]
    Render(#[from] serde_yaml::Error),
    /// No such context.
    #[error("context {name:?} is not defined in {path}; defined: {known}")]
    UnknownContext {
        /// The name asked for.
        name: String,
        /// The file.
        path: PathBuf,
        /// Defined names, comma-separated.
        known: String,
    },
    /// No context chosen.
    #[error(
        "{path} has no current context; pick one with `kiln config use-context NAME` or pass \
         --context"
    )]
    NoContext {
        /// The file.
        path: PathBuf,
    },
}

impl ClientConfig {
    /// Reads `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, ClientConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => Ok(Self::default()),
            Ok(text) => serde_yaml::from_str(&text).map_err(|source| ClientConfigError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ClientConfigError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes `path` atomically with mode 0600 (it holds a private key).
    pub fn save(&self, path: &Path) -> Result<(), ClientConfigError> {
        let text = serde_yaml::to_string(self)?;
        write_private(path, text.as_bytes()).map_err(|source| ClientConfigError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Merges `other`'s contexts into this one. A name that exists already gets a numeric
    /// suffix (`name-1`); the merged file's current context becomes `other`'s. Returns the
    /// names the contexts were stored under.
    pub fn merge(&mut self, other: &ClientConfig) -> Vec<(String, String)> {
        let mut renamed = Vec::new();
        let mut current = None;
        for (name, ctx) in &other.contexts {
            let mut target = name.clone();
            let mut n = 1;
            while self
                .contexts
                .get(&target)
                .is_some_and(|existing| existing != ctx)
            {
                target = format!("{name}-{n}");
                n += 1;
            }
            self.contexts.insert(target.clone(), ctx.clone());
            if other.context.as_deref() == Some(name.as_str()) {
                current = Some(target.clone());
            }
            renamed.push((name.clone(), target));
        }
        if current.is_some() {
            self.context = current;
        }
        renamed
    }

    /// The context called `name`, or the current one.
    pub fn context(
        &self,
        name: Option<&str>,
        path: &Path,
    ) -> Result<(&str, &Context), ClientConfigError> {
        let name =
            name.or(self.context.as_deref())
                .ok_or_else(|| ClientConfigError::NoContext {
                    path: path.to_owned(),
                })?;
        self.contexts
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| self.unknown(name, path))
    }

    /// Mutable access to the context called `name`, or the current one.
    pub fn context_mut(
        &mut self,
        name: Option<&str>,
        path: &Path,
    ) -> Result<&mut Context, ClientConfigError> {
        let name = name
            .map(str::to_owned)
            .or_else(|| self.context.clone())
            .ok_or_else(|| ClientConfigError::NoContext {
                path: path.to_owned(),
            })?;
        if !self.contexts.contains_key(&name) {
            return Err(self.unknown(&name, path));
        }
        Ok(self.contexts.get_mut(&name).expect("checked above"))
    }

    /// Makes `name` the current context.
    pub fn use_context(&mut self, name: &str, path: &Path) -> Result<(), ClientConfigError> {
        if !self.contexts.contains_key(name) {
            return Err(self.unknown(name, path));
        }
        self.context = Some(name.to_owned());
        Ok(())
    }

    /// Removes the context `name`.
    pub fn remove_context(&mut self, name: &str, path: &Path) -> Result<(), ClientConfigError> {
        if self.contexts.remove(name).is_none() {
            return Err(self.unknown(name, path));
        }
        if self.context.as_deref() == Some(name) {
            self.context = None;
        }
        Ok(())
    }

    fn unknown(&self, name: &str, path: &Path) -> ClientConfigError {
        let known: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
        ClientConfigError::UnknownContext {
            name: name.to_owned(),
            path: path.to_owned(),
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(ep: &str) -> Context {
        Context {
            endpoints: vec![ep.to_owned()],
            ca: "a".into(),
            crt: "b".into(),
            key: "c".into(),
            ..Default::default()
        }
    }

    #[test]
    fn merge_renames_conflicts_and_switches_context() {
        let mut mine = ClientConfig {
            context: Some("a".into()),
            contexts: BTreeMap::from([("a".into(), ctx("1")), ("b".into(), ctx("2"))]),
        };
        let theirs = ClientConfig {
            context: Some("b".into()),
            contexts: BTreeMap::from([("a".into(), ctx("1")), ("b".into(), ctx("3"))]),
        };
        let renamed = mine.merge(&theirs);
        assert_eq!(
            renamed,
            vec![("a".into(), "a".into()), ("b".into(), "b-1".into())]
        );
        assert_eq!(mine.context.as_deref(), Some("b-1"));
        assert_eq!(mine.contexts.len(), 3);
    }

    #[test]
    fn unknown_context_lists_known_ones() {
        let cfg = ClientConfig {
            context: None,
            contexts: BTreeMap::from([("x".into(), ctx("1"))]),
        };
        let err = cfg
            .context(Some("y"), Path::new("/c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("defined: x"), "{err}");
        let err = cfg.context(None, Path::new("/c")).unwrap_err().to_string();
        assert!(err.contains("use-context"), "{err}");
    }

    #[test]
    fn save_and_load_round_trip_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config");
        let cfg = ClientConfig {
            context: Some("x".into()),
            contexts: BTreeMap::from([("x".into(), ctx("1"))]),
        };
        cfg.save(&path).unwrap();
        assert_eq!(ClientConfig::load(&path).unwrap(), cfg);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            ClientConfig::load(&dir.path().join("missing")).unwrap(),
            ClientConfig::default()
        );
    }
}
