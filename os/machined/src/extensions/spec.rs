//! The extension service definition (`/usr/local/etc/containers/<name>.yaml`), as the guides
//! give it: name, container (entrypoint, args, environment, OCI mounts, security), depends and
//! restart. Unknown fields are errors, so a typo is reported instead of silently ignored.

use std::path::{Component, Path};

use serde::Deserialize;

use crate::supervisor::RestartPolicy;

/// One extension service definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionServiceSpec {
    /// The service name (`[a-z0-9-_]+`); it runs as `ext-<name>`.
    pub name: String,
    /// The container.
    pub container: ContainerSpec,
    /// Start dependencies.
    #[serde(default)]
    pub depends: Vec<Dependency>,
    /// Restart policy.
    pub restart: Restart,
}

/// The `container` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerSpec {
    /// The entrypoint, relative to the container's root filesystem.
    pub entrypoint: String,
    /// Extra arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=value` environment variables.
    #[serde(default)]
    pub environment: Vec<String>,
    /// OCI mounts into the container.
    #[serde(default)]
    pub mounts: Vec<oci_spec::runtime::Mount>,
    /// Security settings.
    #[serde(default)]
    pub security: Security,
}

/// The `security` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Security {
    /// Paths hidden (bind-mounted over with `/dev/null` or an empty read-only tmpfs); `None`
    /// means containerd's defaults.
    pub masked_paths: Option<Vec<String>>,
    /// Paths made read-only; `None` means containerd's defaults.
    pub readonly_paths: Option<Vec<String>>,
    /// The root filesystem is writable.
    #[serde(default)]
    pub writeable_rootfs: bool,
    /// `/sys` is writable.
    #[serde(default)]
    pub writeable_sysfs: bool,
    /// Mount propagation of the root filesystem (`shared`, `slave`, `private`); private when
    /// unset.
    pub rootfs_propagation: Option<Propagation>,
}

/// Mount propagation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Propagation {
    /// Mounts propagate both ways.
    Shared,
    /// Mounts propagate from the host into the container.
    Slave,
    /// No propagation.
    Private,
}

/// One `depends` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DependencyEntry")]
pub enum Dependency {
    /// Wait for the service to be running and healthy.
    Service(String),
    /// Wait for the path to exist.
    Path(String),
    /// Wait for these network checks.
    Network(Vec<NetworkCheck>),
    /// Wait for time synchronisation.
    Time(bool),
    /// Wait for the service's configuration (an `ExtensionServiceConfig`).
    Configuration(bool),
}

/// A `depends` entry as written: a map with exactly one of these keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DependencyEntry {
    service: Option<String>,
    path: Option<String>,
    network: Option<Vec<NetworkCheck>>,
    time: Option<bool>,
    configuration: Option<bool>,
}

impl TryFrom<DependencyEntry> for Dependency {
    type Error = String;
    fn try_from(e: DependencyEntry) -> Result<Self, String> {
        let mut found = Vec::new();
        if let Some(s) = e.service {
            found.push(Self::Service(s));
        }
        if let Some(p) = e.path {
            found.push(Self::Path(p));
        }
        if let Some(n) = e.network {
            found.push(Self::Network(n));
        }
        if let Some(t) = e.time {
            found.push(Self::Time(t));
        }
        if let Some(c) = e.configuration {
            found.push(Self::Configuration(c));
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err("a depends entry needs one of service, path, network, time, configuration".into()),
            _ => Err("a depends entry has more than one of service, path, network, time, configuration: write one per entry".into()),
        }
    }
}

/// Network readiness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkCheck {
    /// The node has its addresses.
    Addresses,
    /// The node can reach its network.
    Connectivity,
    /// The host name is set.
    Hostname,
    /// `/etc/hosts` and `/etc/resolv.conf` are written.
    Etcfiles,
}

impl NetworkCheck {
    /// Name as written in the definition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Addresses => "addresses",
            Self::Connectivity => "connectivity",
            Self::Hostname => "hostname",
            Self::Etcfiles => "etcfiles",
        }
    }
}

/// The `restart` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Restart {
    /// Restart after every exit.
    Always,
    /// Start once.
    Never,
    /// Restart after failures until one run succeeds.
    UntilSuccess,
}

impl From<Restart> for RestartPolicy {
    fn from(r: Restart) -> Self {
        match r {
            Restart::Always => Self::Always,
            Restart::Never => Self::Never,
            Restart::UntilSuccess => Self::UntilSuccess,
        }
    }
}

/// What is wrong with a definition.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The YAML does not parse or has unknown fields.
    #[error("{0}")]
    Parse(#[from] serde_yaml::Error),
    /// The name has characters outside `[a-z0-9-_]`.
    #[error("name {0:?} is not valid: use only a-z, 0-9, '-' and '_'")]
    Name(String),
    /// The entrypoint is empty.
    #[error(
        "container.entrypoint is empty: give the program to run, relative to the container root filesystem"
    )]
    NoEntrypoint,
    /// An environment entry lacks `=`.
    #[error("container.environment entry {0:?} is not KEY=value")]
    Environment(String),
    /// A mount destination is not absolute or escapes the root filesystem.
    #[error("mount destination {0:?} must be an absolute path without '..'")]
    MountDestination(String),
    /// A path is not absolute.
    #[error("{field} {path:?} must be an absolute path without '..'")]
    Path {
        /// Where it appears.
        field: &'static str,
        /// The path.
        path: String,
    },
    /// `time: false` or `configuration: false` is meaningless but harmless; a service
    /// dependency on itself never starts.
    #[error("depends on its own service {0:?}: it would never start")]
    SelfDependency(String),
}

fn clean_absolute(p: &str) -> bool {
    let p = Path::new(p);
    p.is_absolute() && !p.components().any(|c| matches!(c, Component::ParentDir))
}

impl ExtensionServiceSpec {
    /// Parses and checks a definition.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let spec: Self = serde_yaml::from_str(text)?;
        spec.check()?;
        Ok(spec)
    }

    /// The supervisor id: `ext-<name>`.
    pub fn service_id(&self) -> String {
        format!("ext-{}", self.name)
    }

    fn check(&self) -> Result<(), SpecError> {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(SpecError::Name(self.name.clone()));
        }
        if self.container.entrypoint.trim().is_empty() {
            return Err(SpecError::NoEntrypoint);
        }
        if let Some(e) = self.container.environment.iter().find(|e| !e.contains('=')) {
            return Err(SpecError::Environment(e.clone()));
        }
        for m in &self.container.mounts {
            let dest = m.destination().display().to_string();
            if !clean_absolute(&dest) {
                return Err(SpecError::MountDestination(dest));
            }
        }
        for d in &self.depends {
            match d {
                Dependency::Path(p) if !clean_absolute(p) => {
                    return Err(SpecError::Path {
                        field: "depends.path",
                        path: p.clone(),
                    });
                }
                Dependency::Service(s) if *s == self.service_id() => {
                    return Err(SpecError::SelfDependency(s.clone()));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUIDE_EXAMPLE: &str = "name: hello-world
container:
  entrypoint: ./hello
  args:
    - --config
    - config.ini
depends:
  - network:
    - addresses
restart: always
";

    #[test]
    fn the_guides_example_parses() {
        let s = ExtensionServiceSpec::parse(GUIDE_EXAMPLE).unwrap();
        assert_eq!(s.service_id(), "ext-hello-world");
        assert_eq!(s.container.args, ["--config", "config.ini"]);
        assert_eq!(
            s.depends,
            [Dependency::Network(vec![NetworkCheck::Addresses])]
        );
        assert_eq!(s.restart, Restart::Always);
        assert!(!s.container.security.writeable_rootfs);
    }

    #[test]
    fn every_field_of_the_format_parses() {
        let s = ExtensionServiceSpec::parse(
            "name: full_1
container:
  entrypoint: ./run
  environment:
    - XDG_RUNTIME_DIR=/run
  args: [-f]
  mounts:
    - source: /var/log/audit
      destination: /var/log/audit
      type: bind
      options: [rshared, bind, ro]
  security:
    maskedPaths: []
    readonlyPaths: [/etc]
    writeableRootfs: true
    writeableSysfs: true
    rootfsPropagation: shared
depends:
  - configuration: true
  - service: etcd
  - path: /var/run/x.sock
  - network: [addresses, connectivity, hostname, etcfiles]
  - time: true
restart: untilSuccess
",
        )
        .unwrap();
        assert_eq!(s.restart, Restart::UntilSuccess);
        assert_eq!(s.container.mounts.len(), 1);
        assert_eq!(s.container.security.masked_paths, Some(vec![]));
        assert_eq!(
            s.container.security.rootfs_propagation,
            Some(Propagation::Shared)
        );
        assert_eq!(s.depends.len(), 5);
        assert_eq!(s.depends[1], Dependency::Service("etcd".into()));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| ExtensionServiceSpec::parse(text).unwrap_err().to_string();
        let e = err("name: Bad!\ncontainer: {entrypoint: ./x}\nrestart: never\n");
        assert!(e.contains("\"Bad!\" is not valid"), "{e}");
        let e = err("name: x\ncontainer: {entrypoint: ./x}\nrestart: sometimes\n");
        assert!(e.contains("unknown variant `sometimes`"), "{e}");
        let e = err("name: x\ncontainer: {entrypoint: ./x, entrypont: y}\nrestart: never\n");
        assert!(e.contains("unknown field `entrypont`"), "{e}");
        let e = err("name: x\ncontainer: {entrypoint: ./x, environment: [FOO]}\nrestart: never\n");
        assert!(e.contains("not KEY=value"), "{e}");
        let e = err("name: x\ncontainer: {entrypoint: ./x}\n");
        assert!(e.contains("missing field `restart`"), "{e}");
        let e =
            err("name: x\ncontainer: {entrypoint: ./x}\ndepends: [{path: rel}]\nrestart: never\n");
        assert!(e.contains("absolute path"), "{e}");
    }
}
