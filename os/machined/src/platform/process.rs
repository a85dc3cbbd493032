//! The `process` platform: machined is a process started by a node launcher, in its own
//! network namespace when run as root (the launcher has set the address up) or on a 127.x
//! address otherwise. Volumes are directories under the node's root, and so is the node image
//! (`image/`, where extension services are found); the kernel command line is an argument
//! from the launcher; power is the exit code.

use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use kiln_config::{MachineConfig, Mode};
use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN};

use super::{
    NetworkApplied, Platform, PlatformError, PlatformKind, Power, prepare_directories,
    wipe_directory,
};
use crate::volumes::Volumes;

/// A node that is a process.
#[derive(Debug)]
pub struct ProcessPlatform {
    volumes: Volumes,
    image: PathBuf,
    cmdline: Option<String>,
    address: IpAddr,
    hostname: String,
}

impl ProcessPlatform {
    /// A node rooted at `root`, listening on `address`.
    pub fn new(root: PathBuf, address: IpAddr, hostname: Option<String>) -> Self {
        let hostname = hostname
            .unwrap_or_else(|| format!("kiln-{}", address.to_string().replace(['.', ':'], "-")));
        Self {
            volumes: Volumes::under(&root),
            image: root.join("image"),
            cmdline: None,
            address,
            hostname,
        }
    }

    /// Sets the kernel command line the node launcher gives (`kiln.config=` and the
    /// `kiln.config.oauth.*` arguments are read from it).
    #[must_use]
    pub fn with_kernel_cmdline(mut self, cmdline: Option<String>) -> Self {
        self.cmdline = cmdline.filter(|c| !c.trim().is_empty());
        self
    }

    /// Sets the node image directory (default: `image` under the node's root).
    #[must_use]
    pub fn with_image_root(mut self, image: PathBuf) -> Self {
        self.image = image;
        self
    }
}

#[async_trait]
impl Platform for ProcessPlatform {
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
        self.hostname.clone()
    }
    fn prepare_volumes(&self) -> Result<(), PlatformError> {
        prepare_directories(&self.volumes)
    }
    fn wipe(&self, label: &str) -> Result<(), PlatformError> {
        wipe_directory(&self.volumes, label)
    }
    async fn bring_up_network(&self) -> Result<(), PlatformError> {
        // The launcher set the address up before starting machined.
        Ok(())
    }
    async fn address(&self) -> Result<IpAddr, PlatformError> {
        Ok(self.address)
    }
    async fn configure_network(
        &self,
        _config: &MachineConfig,
    ) -> Result<NetworkApplied, PlatformError> {
        // The launcher gave the address; interfaces in the configuration do not apply here
        // (validation warns about them in process mode).
        Ok(NetworkApplied {
            addresses: vec![self.address],
            problems: vec![],
        })
    }
    fn kernel_config_url(&self) -> Option<String> {
        self.cmdline
            .as_deref()
            .and_then(crate::config_source::kernel_config_url)
    }
    fn kernel_cmdline(&self) -> Option<String> {
        self.cmdline.clone()
    }
    fn image_root(&self) -> PathBuf {
        self.image.clone()
    }
    fn power(&self, power: Power) -> i32 {
        match power {
            Power::Reboot => EXIT_REBOOT,
            Power::Shutdown => EXIT_SHUTDOWN,
        }
    }
}
