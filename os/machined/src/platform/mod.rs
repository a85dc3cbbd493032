//! Where machined runs. Everything above this trait (configuration, API, services, etcd) is the
//! same code on every platform; what differs (volumes, network, what reboot means) is here.
//!
//! # What a platform provides
//!
//! - **Volumes**: where STATE, EPHEMERAL and META live ([`Platform::volumes`]), how they are
//!   made ready at boot ([`Platform::prepare_volumes`]) and how one is wiped by `reset`
//!   ([`Platform::wipe`]). `process` and `container` use directories; `metal` will find its
//!   GPT partitions by label, create file systems on first boot and mount them, and wipe a
//!   partition by making a new file system on it.
//! - **Network, in two steps.** [`Platform::bring_up_network`] runs before any configuration is
//!   known, so a configuration URL can be fetched (`metal`: links up, DHCP client;
//!   `container`: the interface Docker gave). [`Platform::address`] then resolves to the
//!   address the API and etcd bind and advertise; it may be learned late (a DHCP lease), and
//!   the API binds only after it. [`Platform::configure_network`] applies the configuration's
//!   `machine.network` once one is known (`metal`: bonds, bridges, VLANs, static addresses,
//!   routes, hostname through netlink; one interface's failure is reported, not fatal). Both are async and fail with a [`PlatformError`] that says what went wrong.
//! - **Configuration sources** the platform adds: [`Platform::kernel_config_url`]
//!   (`kiln.config=` on the kernel command line, `metal`).
//! - **Power**: [`Platform::power`] ends this boot. `process` returns the exit code the node
//!   launcher acts on; `metal` returns the same codes to its PID 1 half, which stops what is
//!   left, unmounts, syncs and calls `reboot(2)` (`RB_AUTOBOOT` or `RB_POWER_OFF`);
//!   `container` must exit with a code the container's restart policy maps to restart or stop.
//!
//! Unit tests of the boot logic use [`fake::FakePlatform`].

pub mod container;
#[cfg(test)]
pub mod fake;
pub mod metal;
mod process;

use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use kiln_config::{MachineConfig, Mode};

pub use container::ContainerPlatform;
pub use metal::MetalPlatform;
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

/// The platforms Kiln OS knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlatformKind {
    /// PID 1 of a (virtual) machine.
    Metal,
    /// The entrypoint of a container.
    Container,
    /// A process started by a node launcher.
    Process,
}

impl PlatformKind {
    /// The name the API and `--platform` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Metal => "metal",
            Self::Container => "container",
            Self::Process => "process",
        }
    }
}

/// Why a platform operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A volume could not be made ready.
    #[error("preparing the volumes under {root}: {source}")]
    PrepareVolumes {
        /// The directory (or device) the volumes live in.
        root: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `reset` named a volume that cannot be wiped.
    #[error(transparent)]
    UnknownLabel(#[from] crate::volumes::UnknownLabel),
    /// Wiping a volume failed.
    #[error("wiping {label} at {path}: {source}")]
    Wipe {
        /// The volume's label.
        label: String,
        /// Where it lives.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The network could not be brought up or configured.
    #[error("configuring the network ({step}): {reason}")]
    Network {
        /// What was being done (e.g. `link eth0 up`, `DHCP on eth0`).
        step: String,
        /// What went wrong.
        reason: String,
    },
    /// No address was learned.
    #[error("the node has no address yet: {reason}")]
    NoAddress {
        /// Why (e.g. no DHCP lease).
        reason: String,
    },
}

/// A platform Kiln OS runs on. See the module documentation for what each must provide.
/// What [`Platform::configure_network`] did.
#[derive(Debug, Default)]
pub struct NetworkApplied {
    /// The node's addresses.
    pub addresses: Vec<IpAddr>,
    /// Parts of `machine.network` that could not be applied, each said once.
    pub problems: Vec<PlatformError>,
}

#[async_trait]
pub trait Platform: Send + Sync + std::fmt::Debug + 'static {
    /// Which platform this is.
    fn kind(&self) -> PlatformKind;
    /// `metal`, `container` or `process`.
    fn name(&self) -> &'static str {
        self.kind().name()
    }
    /// The validation mode of configurations on this platform.
    fn mode(&self) -> Mode;
    /// The node's volumes.
    fn volumes(&self) -> &Volumes;
    /// Host name when the configuration gives none.
    fn default_hostname(&self) -> String;
    /// Makes the volumes ready (directories on `process`; mounts on `metal`).
    fn prepare_volumes(&self) -> Result<(), PlatformError>;
    /// Empties the volume labelled `label` (`STATE` or `EPHEMERAL`), for `reset`.
    fn wipe(&self, label: &str) -> Result<(), PlatformError>;
    /// Brings the network up far enough to fetch a configuration, before one is known.
    async fn bring_up_network(&self) -> Result<(), PlatformError>;
    /// The address the node's API and etcd listen on and advertise, once the network has
    /// one. May wait (a DHCP lease); the caller bounds the wait and reports it.
    async fn address(&self) -> Result<IpAddr, PlatformError>;
    /// Applies the network part of `config`; returns the node's addresses and what could not
    /// be applied (one interface's error does not stop the others).
    async fn configure_network(
        &self,
        config: &MachineConfig,
    ) -> Result<NetworkApplied, PlatformError>;
    /// The kernel's links, for `kiln get links`; `None` where the node has no links of its own
    /// (`process`, `container`).
    async fn link_status(&self) -> Result<Option<Vec<metal::net::LinkStatus>>, PlatformError> {
        Ok(None)
    }
    /// The kernel's routes, for `kiln get routes`; `None` where the node has no links of its
    /// own.
    async fn route_status(&self) -> Result<Option<Vec<metal::net::RouteStatus>>, PlatformError> {
        Ok(None)
    }
    /// The addresses on the kernel's links, for `kiln get addresses`; `None` where the node
    /// has no links of its own.
    async fn address_status(
        &self,
    ) -> Result<Option<Vec<metal::net::AddressStatus>>, PlatformError> {
        Ok(None)
    }
    /// A configuration URL the platform itself provides (`kiln.config=` on the kernel command
    /// line on `metal`); `None` where there is no such source.
    fn kernel_config_url(&self) -> Option<String>;
    /// The kernel command line (`/proc/cmdline` on `metal`; given by the node launcher on
    /// `process`); `None` where there is none. The configuration download reads its
    /// `kiln.config.oauth.*` arguments from it.
    fn kernel_cmdline(&self) -> Option<String> {
        None
    }
    /// The root of the node image: `/` where machined is the OS; the node's image directory on
    /// `process`. Extension services are found under it.
    fn image_root(&self) -> PathBuf {
        PathBuf::from("/")
    }
    /// Ends this boot as `power` asks. Returns the exit code machined ends with where ending
    /// the process is how the platform reboots or powers off (`process`, `container`); a
    /// platform that reboots the machine itself (`metal`) does not return.
    fn power(&self, power: Power) -> i32;
}

/// Creates directory volumes: the shared implementation of [`Platform::prepare_volumes`] for
/// platforms whose volumes are directories.
pub fn prepare_directories(volumes: &Volumes) -> Result<(), PlatformError> {
    volumes
        .prepare()
        .map_err(|source| PlatformError::PrepareVolumes {
            root: volumes
                .state
                .parent()
                .map_or_else(|| volumes.state.clone(), std::path::Path::to_path_buf),
            source,
        })
}

/// Wipes a directory volume: the shared implementation of [`Platform::wipe`] for platforms
/// whose volumes are directories.
pub fn wipe_directory(volumes: &Volumes, label: &str) -> Result<(), PlatformError> {
    let path = volumes.by_label(label)?.to_path_buf();
    volumes.wipe(label).map_err(|source| PlatformError::Wipe {
        label: label.to_owned(),
        path,
        source,
    })
}
