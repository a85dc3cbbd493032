//! One extension service under the supervisor: its dependencies become waits (services through
//! the supervisor, the rest as conditions), Preparing builds the container, and the process runs
//! in it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;

use super::container::ContainerSetup;
use super::spec::{Dependency, ExtensionServiceSpec, NetworkCheck};
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
        }
    }

    fn node(&self) -> Result<Arc<Node>, ServiceError> {
        self.node
            .upgrade()
            .ok_or_else(|| ServiceError::new("the node is shutting down"))
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
                Dependency::Configuration(true) => missing.push(format!(
                    "ExtensionServiceConfig {:?} (Kiln has no such document yet)",
                    self.spec.name
                )),
                Dependency::Configuration(false) => {}
            }
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    async fn pre_start(&self, ctx: &ServiceContext) -> Result<Prepared, ServiceError> {
        let setup = ContainerSetup::new(&self.spec.name, &self.rootfs, &self.spec.container)
            .map_err(ServiceError::new)?;
        *self.setup.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(setup));
        ctx.progress("Creating service runner");
        Ok(Prepared::Run)
    }

    fn command(&self) -> Result<CommandSpec, ServiceError> {
        let c = &self.spec.container;
        let env = c
            .environment
            .iter()
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
