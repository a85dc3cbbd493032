//! A scripted platform for unit tests of the boot logic: volumes in a temporary directory, an
//! address that arrives when the test grants it (as a DHCP lease would), network steps that
//! fail a given number of times, and a record of every call.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use kiln_config::{MachineConfig, Mode};
use tokio::sync::watch;

use super::{
    NetworkApplied, Platform, PlatformError, PlatformKind, Power, prepare_directories,
    wipe_directory,
};
use crate::volumes::Volumes;

/// The fake.
#[derive(Debug)]
pub struct FakePlatform {
    _dir: tempfile::TempDir,
    volumes: Volumes,
    address: watch::Sender<Option<IpAddr>>,
    network_failures: AtomicU32,
    kernel_config_url: Option<String>,
    calls: Mutex<Vec<String>>,
}

impl Default for FakePlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl FakePlatform {
    /// A platform with no address yet and a network that comes up at the first try.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let volumes = Volumes::under(dir.path());
        Self {
            _dir: dir,
            volumes,
            address: watch::Sender::new(None),
            network_failures: AtomicU32::new(0),
            kernel_config_url: None,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// The first `n` attempts to bring the network up fail.
    pub fn failing_network(self, n: u32) -> Self {
        self.network_failures.store(n, Ordering::SeqCst);
        self
    }

    /// The kernel command line names this configuration URL.
    pub fn with_kernel_config_url(mut self, url: &str) -> Self {
        self.kernel_config_url = Some(url.to_owned());
        self
    }

    /// The address arrives (a DHCP lease).
    pub fn grant_address(&self, address: IpAddr) {
        self.address.send_replace(Some(address));
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, call: impl Into<String>) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call.into());
    }
}

#[async_trait]
impl Platform for FakePlatform {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Process
    }
    fn mode(&self) -> Mode {
        Mode::Process
    }
    fn volumes(&self) -> &Volumes {
        &self.volumes
    }
    fn default_hostname(&self) -> String {
        "fake".to_owned()
    }
    fn prepare_volumes(&self) -> Result<(), PlatformError> {
        self.record("prepare_volumes");
        prepare_directories(&self.volumes)
    }
    fn wipe(&self, label: &str) -> Result<(), PlatformError> {
        self.record(format!("wipe {label}"));
        wipe_directory(&self.volumes, label)
    }
    async fn bring_up_network(&self) -> Result<(), PlatformError> {
        self.record("bring_up_network");
        let left = self.network_failures.load(Ordering::SeqCst);
        if left > 0 {
            self.network_failures.store(left - 1, Ordering::SeqCst);
            return Err(PlatformError::Network {
                step: "link eth0 up".into(),
                reason: "no carrier".into(),
            });
        }
        Ok(())
    }
    async fn address(&self) -> Result<IpAddr, PlatformError> {
        self.record("address");
        let mut rx = self.address.subscribe();
        let got = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| PlatformError::NoAddress {
                reason: "the fake was dropped".into(),
            })?;
        (*got).ok_or_else(|| PlatformError::NoAddress {
            reason: "no lease".into(),
        })
    }
    async fn configure_network(
        &self,
        _config: &MachineConfig,
    ) -> Result<NetworkApplied, PlatformError> {
        self.record("configure_network");
        Ok(NetworkApplied {
            addresses: self.address.borrow().iter().copied().collect(),
            problems: vec![],
        })
    }
    fn kernel_config_url(&self) -> Option<String> {
        self.record("kernel_config_url");
        self.kernel_config_url.clone()
    }
    fn power(&self, power: Power) -> i32 {
        self.record(format!("power {power:?}"));
        match power {
            Power::Reboot => kiln_os_api::contract::EXIT_REBOOT,
            Power::Shutdown => kiln_os_api::contract::EXIT_SHUTDOWN,
        }
    }
}
