//! One extension service under the supervisor: its dependencies become waits (services through
//! the supervisor, the rest as conditions), Preparing builds the container, and the process runs
//! in it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::container::ContainerSetup;
use kiln_config::ExtensionServiceConfig;
use oci_spec::runtime::MountBuilder;

use super::spec::{ContainerSpec, Dependency, ExtensionServiceSpec, NetworkCheck};
use crate::node::Node;
use crate::supervisor::{
    CommandSpec, Prepared, RestartPolicy, Service, ServiceContext, ServiceError,
};

/// An extension service.
#[derive(Debug)]
pub struct ExtensionService {
    node: Weak<Node>,
    id: &'static str,
    service_deps: Vec<&'static str>,
    spec: ExtensionServiceSpec,
    rootfs: PathBuf,
    setup: Mutex<Option<Arc<ContainerSetup>>>,
    /// The environment of the service's `ExtensionServiceConfig` when it was last prepared.
    config_env: Mutex<Vec<String>>,
}

impl ExtensionService {
    /// The service of `spec` on `node`, rooted at `rootfs`.
    pub fn new(node: &Arc<Node>, spec: ExtensionServiceSpec, rootfs: PathBuf) -> Self {
        // Service ids are `&'static str` in the supervisor; definitions are read once per boot,
        // so leaking their few names is bounded.
        let id: &'static str = Box::leak(spec.service_id().into_boxed_str());
        let service_deps = spec
            .depends
            .iter()
            .filter_map(|d| match d {
                Dependency::Service(s) => Some(&*Box::leak(s.clone().into_boxed_str())),
                _ => None,
            })
            .collect();
        Self {
            node: Arc::downgrade(node),
            id,
            service_deps,
            spec,
            rootfs,
            setup: Mutex::new(None),
            config_env: Mutex::new(Vec::new()),
        }
    }

    fn node(&self) -> Result<Arc<Node>, ServiceError> {
        self.node
            .upgrade()
            .ok_or_else(|| ServiceError::new("the node is shutting down"))
    }

    /// The service's `ExtensionServiceConfig` in the node's configuration, if any.
    fn service_config(&self) -> Option<ExtensionServiceConfig> {
        self.node
            .upgrade()?
            .config()?
            .extension_service_configs
            .iter()
            .find(|c| c.name == self.spec.name)
            .cloned()
    }

    /// Writes the files of `config` under the node's run directory (recreated at every boot)
    /// and returns the container with each one bind-mounted read-only at its `mountPath`.
    fn with_config_files(
        &self,
        node: &Node,
        config: &ExtensionServiceConfig,
    ) -> Result<ContainerSpec, ServiceError> {
        let mut container = self.spec.container.clone();
        let dir = node
            .platform
            .volumes()
            .run
            .join("extensions")
            .join(&self.spec.name);
        let fail = |what: &str, p: &std::path::Path, e: std::io::Error| {
            ServiceError::new(format!("{what} {}: {e}", p.display()))
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| fail("clearing", &dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| fail("creating", &dir, e))?;
        for (i, f) in config.config_files.iter().enumerate() {
            let source = dir.join(i.to_string());
            std::fs::write(&source, &f.content).map_err(|e| fail("writing", &source, e))?;
            let mount = MountBuilder::default()
                .source(&source)
                .destination(&f.mount_path)
                .typ("bind")
                .options(vec!["bind".to_owned(), "ro".to_owned()])
                .build()
                .map_err(|e| ServiceError::new(format!("mount {}: {e}", f.mount_path)))?;
            container.mounts.push(mount);
        }
        Ok(container)
    }

    fn path_exists(node: &Node, path: &str) -> bool {
        if let Ok(p) = crate::api::files::resolve(node.platform.volumes(), path) {
            return p.exists();
        }
        node.platform
            .image_root()
            .join(path.trim_start_matches('/'))
            .exists()
    }
}

#[async_trait]
impl Service for ExtensionService {
    fn id(&self) -> &'static str {
        self.id
    }

    fn dependencies(&self) -> Vec<&'static str> {
        self.service_deps.clone()
    }

    fn restart_policy(&self) -> RestartPolicy {
        self.spec.restart.into()
    }

    async fn unmet_condition(&self) -> Option<String> {
        let Ok(node) = self.node() else {
            return Some("the node".to_owned());
        };
        let mut missing = Vec::new();
        for d in &self.spec.depends {
            match d {
                Dependency::Service(_) | Dependency::Time(_) => {}
                Dependency::Path(p) => {
                    if !Self::path_exists(&node, p) {
                        missing.push(format!("path {p:?}"));
                    }
                }
                Dependency::Network(checks) => {
                    let unmet: Vec<&str> = checks
                        .iter()
                        .filter(|c| match c {
                            NetworkCheck::Addresses => node.addresses().is_empty(),
                            NetworkCheck::Hostname => node.hostname().is_empty(),
                            // Extension services start after the network is configured.
                            NetworkCheck::Connectivity | NetworkCheck::Etcfiles => false,
                        })
                        .map(|c| c.as_str())
                        .collect();
                    if !unmet.is_empty() {
                        missing.push(format!("network ({})", unmet.join(", ")));
                    }
                }
                Dependency::Configuration(true) => {
                    if self.service_config().is_none() {
                        missing.push(format!("ExtensionServiceConfig {:?}", self.spec.name));
                    }
                }
                Dependency::Configuration(false) => {}
            }
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    async fn pre_start(&self, ctx: &ServiceContext) -> Result<Prepared, ServiceError> {
        // The configuration as it is now: files and environment are read at every start, so a
        // changed ExtensionServiceConfig takes effect when the service is restarted.
        let config = self.service_config();
        let container = match &config {
            Some(c) => self.with_config_files(&*self.node()?, c)?,
            None => self.spec.container.clone(),
        };
        *self.config_env.lock().unwrap_or_else(|e| e.into_inner()) =
            config.map(|c| c.environment).unwrap_or_default();
        let setup = ContainerSetup::new(&self.spec.name, &self.rootfs, &container)
            .map_err(ServiceError::new)?;
        *self.setup.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(setup));
        ctx.progress("Creating service runner");
        Ok(Prepared::Run)
    }

    fn command(&self) -> Result<CommandSpec, ServiceError> {
        let c = &self.spec.container;
        // The ExtensionServiceConfig's entries come after the definition's: a name in both
        // takes the configuration's value.
        let config_env = self
            .config_env
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let env = c
            .environment
            .iter()
            .chain(&config_env)
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(CommandSpec {
            program: c.entrypoint.clone(),
            args: c.args.clone(),
            env,
        })
    }

    fn container(&self) -> Option<Arc<ContainerSetup>> {
        self.setup.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn started_message(&self, pid: u32) -> String {
        format!(
            "Started task {id} (PID {pid}) for container {id}",
            id = self.id
        )
    }

    fn stop_grace(&self) -> Duration {
        Duration::from_secs(5)
    }
}
