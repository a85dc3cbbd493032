//! The node: what every part of machined shares (platform, configuration, supervisor, events,
//! logs, credentials, stage) and the power requests that end a boot.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};

use kiln_config::{MachineConfig, MachineType};
use kiln_os_api::client::Credentials;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::etcd::EtcdState;
use crate::events::{EventBus, EventKind};
use crate::logbuf::LogBuffer;
use crate::meta::Meta;
use crate::platform::{Platform, Power};
use crate::supervisor::Supervisor;

/// The stage of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Going through the boot phases.
    Booting,
    /// No configuration: waiting for `apply-config --insecure`.
    Maintenance,
    /// Booted.
    Running,
    /// Resetting.
    Resetting,
    /// Stopping services to reboot.
    Rebooting,
    /// Stopping services to power off.
    ShuttingDown,
}

impl Stage {
    /// Name as the API shows it.
    pub fn as_str(self) -> &'static str {
        kiln_os_api::pb::Stage::from(self).name()
    }
}

impl From<Stage> for kiln_os_api::pb::Stage {
    fn from(s: Stage) -> Self {
        match s {
            Stage::Booting => Self::Booting,
            Stage::Maintenance => Self::Maintenance,
            Stage::Running => Self::Running,
            Stage::Resetting => Self::Resetting,
            Stage::Rebooting => Self::Rebooting,
            Stage::ShuttingDown => Self::ShuttingDown,
        }
    }
}

/// A request to end this boot.
#[derive(Debug, Clone)]
pub struct PowerRequest {
    /// Reboot or power off.
    pub power: Power,
    /// Volumes to wipe once services are stopped.
    pub wipe: Vec<String>,
    /// Why (for the console).
    pub reason: String,
}

/// Certificates the node uses as a server and as a forwarding client.
#[derive(Debug, Clone)]
pub struct NodeCredentials {
    /// API server certificate (PEM).
    pub server_cert: String,
    /// API server key (PEM).
    pub server_key: String,
    /// Client credentials with organisation `os:impersonator` (control-plane nodes only).
    pub forwarding: Option<Credentials>,
}

/// Shared state of the running node.
#[derive(Debug)]
pub struct Node {
    /// Where it runs.
    pub platform: Arc<dyn Platform>,
    /// Boot and service events.
    pub events: Arc<EventBus>,
    /// machined's own log (the console, `dmesg`).
    pub console: Arc<LogBuffer>,
    /// Services.
    pub supervisor: Arc<Supervisor>,
    /// META records.
    pub meta: Meta,
    /// etcd bootstrap/join state.
    pub etcd: EtcdState,
    /// Extra control-plane addresses to ask when joining etcd (besides the endpoint).
    pub join_peers: Vec<String>,
    /// etcd binary.
    pub etcd_bin: String,
    /// etcdctl binary.
    pub etcdctl_bin: String,
    config: RwLock<Option<Arc<MachineConfig>>>,
    config_generation: Mutex<u64>,
    stage: watch::Sender<Stage>,
    power: mpsc::Sender<PowerRequest>,
    credentials: RwLock<Option<NodeCredentials>>,
    clients: Mutex<HashMap<String, Channel>>,
    address: watch::Sender<Option<IpAddr>>,
    addresses: RwLock<Vec<IpAddr>>,
    /// A `try` apply waiting to be reverted.
    pub try_revert: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Signalled when a configuration arrives in maintenance mode.
    pub config_applied: tokio::sync::Notify,
}

/// Parameters of a node that do not come from its configuration.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Extra control-plane addresses to ask when joining etcd.
    pub join_peers: Vec<String>,
    /// etcd binary (name on PATH or path).
    pub etcd_bin: String,
    /// etcdctl binary.
    pub etcdctl_bin: String,
}

impl Node {
    /// A node on `platform`; power requests arrive on the returned receiver.
    pub fn new(
        platform: Arc<dyn Platform>,
        console: Arc<LogBuffer>,
        options: NodeOptions,
    ) -> (Arc<Self>, mpsc::Receiver<PowerRequest>) {
        let events = Arc::new(EventBus::new(2000));
        let supervisor = Supervisor::new(events.clone(), 1 << 20);
        let (power, power_rx) = mpsc::channel(4);
        let (stage, _) = watch::channel(Stage::Booting);
        let meta = Meta::new(platform.volumes().meta.clone());
        let node = Arc::new(Self {
            platform,
            events,
            console,
            supervisor,
            meta,
            etcd: EtcdState::default(),
            join_peers: options.join_peers,
            etcd_bin: options.etcd_bin,
            etcdctl_bin: options.etcdctl_bin,
            config: RwLock::new(None),
            config_generation: Mutex::new(0),
            stage,
            power,
            credentials: RwLock::new(None),
            clients: Mutex::new(HashMap::new()),
            address: watch::Sender::new(None),
            addresses: RwLock::new(Vec::new()),
            try_revert: Mutex::new(None),
            config_applied: tokio::sync::Notify::new(),
        });
        (node, power_rx)
    }

    /// The active configuration.
    pub fn config(&self) -> Option<Arc<MachineConfig>> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the active configuration (not its persisted copy). A running extension service
    /// whose `ExtensionServiceConfig` changed (or went away) is restarted, so that it starts
    /// with the new files and environment.
    pub fn set_config(&self, config: MachineConfig) {
        let previous = self.config();
        let changed: Vec<String> = previous
            .iter()
            .flat_map(|p| p.extension_service_configs.iter().map(|c| c.name.clone()))
            .chain(
                config
                    .extension_service_configs
                    .iter()
                    .map(|c| c.name.clone()),
            )
            .filter(|name| {
                let find = |c: Option<&MachineConfig>| {
                    c.and_then(|c| c.extension_service_configs.iter().find(|e| &e.name == name))
                        .cloned()
                };
                find(previous.as_deref()) != find(Some(&config))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(config));
        self.restart_extension_services(&changed);
        *self
            .config_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        self.events.publish(
            EventKind::Config,
            "machineconfig",
            "applied",
            "machine configuration applied",
        );
    }

    /// Restarts the running `ext-<name>` services of `names` (their configuration changed).
    fn restart_extension_services(&self, names: &[String]) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let running: Vec<String> = self
            .supervisor
            .list()
            .into_iter()
            .filter(|s| s.state == crate::supervisor::ServiceState::Running)
            .map(|s| s.id)
            .collect();
        for name in names {
            let id = format!("ext-{name}");
            if !running.contains(&id) {
                continue; // a waiting service reads the new configuration when it starts
            }
            self.events.publish(
                EventKind::Config,
                "machineconfig",
                "extension-config",
                format!("ExtensionServiceConfig {name:?} changed: restarting {id}"),
            );
            let supervisor = self.supervisor.clone();
            rt.spawn(async move {
                if let Err(e) = supervisor.restart(&id).await {
                    tracing::warn!(service = %id, error = %e, "restarting after a configuration change");
                }
            });
        }
    }

    /// How many times the configuration changed during this boot.
    pub fn config_generation(&self) -> u64 {
        *self
            .config_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Control-plane or worker (worker until configured).
    pub fn machine_type(&self) -> Option<MachineType> {
        self.config().map(|c| c.machine.machine_type)
    }

    /// The host name: configuration, else the platform's.
    pub fn hostname(&self) -> String {
        self.config()
            .and_then(|c| c.machine.network.as_ref().and_then(|n| n.hostname.clone()))
            .unwrap_or_else(|| self.platform.default_hostname())
    }

    /// The address the API and etcd bind and advertise, as the platform gave it at boot;
    /// the unspecified address until then (nothing binds before the boot sets it).
    pub fn address(&self) -> IpAddr {
        self.address
            .borrow()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Sets the node's address (the boot, once the platform has one).
    pub fn set_address(&self, address: IpAddr) {
        self.address.send_replace(Some(address));
    }

    /// The node's addresses after the network configuration (its address until then).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let list = self
            .addresses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if list.is_empty() {
            vec![self.address()]
        } else {
            list
        }
    }

    /// Records the addresses the network configuration gave.
    pub fn set_addresses(&self, addresses: Vec<IpAddr>) {
        *self.addresses.write().unwrap_or_else(|e| e.into_inner()) = addresses;
    }

    /// Current stage.
    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// Changes the stage (an event).
    pub fn set_stage(&self, stage: Stage) {
        self.events.set_stage(stage);
        if self.stage.send_replace(stage) != stage {
            self.events.publish(
                EventKind::Machine,
                "stage",
                stage.as_str(),
                format!("machine is {}", stage.as_str()),
            );
        }
    }

    /// Watches the stage.
    pub fn watch_stage(&self) -> watch::Receiver<Stage> {
        self.stage.subscribe()
    }

    /// Asks the main loop to end this boot.
    pub async fn request_power(&self, request: PowerRequest) {
        let _ = self.power.send(request).await;
    }

    /// The node's certificates.
    pub fn credentials(&self) -> Option<NodeCredentials> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the node's certificates.
    pub fn set_credentials(&self, creds: NodeCredentials) {
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some(creds);
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether `target` (an address or host name from a `nodes` list) is this node.
    pub fn is_self(&self, target: &str) -> bool {
        let (host, _) = kiln_os_api::client::host_port(target, kiln_os_api::contract::API_PORT);
        host == self.address().to_string() || host == self.hostname()
    }

    /// A channel to another node's API, authenticated as a forwarding node.
    pub async fn channel_to(&self, target: &str) -> Result<Channel, tonic::Status> {
        if let Some(ch) = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(target)
        {
            return Ok(ch.clone());
        }
        let creds = self
            .credentials()
            .and_then(|c| c.forwarding)
            .ok_or_else(|| {
                tonic::Status::failed_precondition(
                    "this node cannot reach other nodes (a worker holds no OS CA key); use a \
                 control-plane node as the endpoint",
                )
            })?;
        let ch = kiln_os_api::client::connect(target, &creds)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_owned(), ch.clone());
        Ok(ch)
    }

    /// Forgets a cached channel (after an error).
    pub fn forget_channel(&self, target: &str) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(target);
    }

    /// Addresses of the control-plane nodes to ask when joining: the control-plane endpoint's
    /// host and the configured peers, without this node.
    pub fn control_plane_candidates(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(cfg) = self.config()
            && let Some(host) =
                kiln_config::generate::endpoint_host(&cfg.cluster.control_plane.endpoint)
        {
            out.push(host);
        }
        out.extend(self.join_peers.iter().cloned());
        out.retain(|c| !self.is_self(c));
        out.dedup();
        out
    }
}
