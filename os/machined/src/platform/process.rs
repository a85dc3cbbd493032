//! The `process` platform: machined is a process started by a node launcher, in its own
//! network namespace when run as root (the launcher has set the address up) or on a 127.x
//! address otherwise. Volumes are directories under the node's root.

use std::net::IpAddr;
use std::path::PathBuf;

use kiln_config::Mode;
use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN};

use super::{Platform, Power};
use crate::volumes::Volumes;

/// A node that is a process.
#[derive(Debug)]
pub struct ProcessPlatform {
    volumes: Volumes,
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
            address,
            hostname,
        }
    }
}

impl Platform for ProcessPlatform {
    fn name(&self) -> &'static str {
        "process"
    }
    fn mode(&self) -> Mode {
        Mode::Process
    }
    fn volumes(&self) -> &Volumes {
        &self.volumes
    }
    fn address(&self) -> IpAddr {
        self.address
    }
    fn default_hostname(&self) -> String {
        self.hostname.clone()
    }
    fn configure_network(&self, _config: &kiln_config::MachineConfig) -> Vec<String> {
        // The launcher gave the address; interfaces in the configuration do not apply here
        // (validation warns about them in process mode).
        vec![self.address.to_string()]
    }
    fn exit_code(&self, power: Power) -> i32 {
        match power {
            Power::Reboot => EXIT_REBOOT,
            Power::Shutdown => EXIT_SHUTDOWN,
        }
    }
}
