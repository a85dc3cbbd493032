//! Where machined runs. Everything above this trait (configuration, API, services, etcd) is the
//! same code on every platform; what differs (volumes, network, what reboot means) is here.

mod process;

use std::net::IpAddr;

use kiln_config::Mode;

pub use process::ProcessPlatform;

use crate::volumes::Volumes;

/// What the node asks the platform for when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Start again.
    Reboot,
    /// Stay off.
    Shutdown,
}

/// A platform Kiln OS runs on.
pub trait Platform: Send + Sync + std::fmt::Debug + 'static {
    /// `metal`, `container` or `process`.
    fn name(&self) -> &'static str;
    /// The validation mode of configurations on this platform.
    fn mode(&self) -> Mode;
    /// The node's volumes.
    fn volumes(&self) -> &Volumes;
    /// The address the node's API and etcd listen on and advertise.
    fn address(&self) -> IpAddr;
    /// Host name when the configuration gives none.
    fn default_hostname(&self) -> String;
    /// Prepares the volumes (directories on `process`).
    fn prepare_volumes(&self) -> std::io::Result<()> {
        self.volumes().prepare()
    }
    /// Applies the network part of the configuration and returns the node's addresses.
    fn configure_network(&self, config: &kiln_config::MachineConfig) -> Vec<String>;
    /// The exit code with which machined ends for `power` (the launcher acts on it).
    fn exit_code(&self, power: Power) -> i32;
}
