//! The `container` platform: machined is the entrypoint (PID 1, see [`crate::pid1`]) of a
//! Docker container. Volumes are directories on Docker volumes mounted under the node's root;
//! the address is whatever IPv4 address Docker gave the container, on whatever its interface
//! is called; power is the exit code the container's restart policy acts on.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use kiln_config::{MachineConfig, Mode};
use kiln_os_api::contract::{EXIT_CONTAINER_SHUTDOWN, EXIT_REBOOT};
use kiln_os_api::wait::{Poll, until};

use super::{
    NetworkApplied, Platform, PlatformError, PlatformKind, Power, prepare_directories,
    wipe_directory,
};
use crate::volumes::Volumes;

/// How long [`Platform::address`] waits for Docker's address to show up.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// A node that is a container.
#[derive(Debug)]
pub struct ContainerPlatform {
    volumes: Volumes,
    hostname: String,
}

impl ContainerPlatform {
    /// A node whose volumes are mounted under `root`.
    pub fn new(root: PathBuf, hostname: Option<String>) -> Self {
        let hostname = hostname.unwrap_or_else(|| {
            // Docker writes the container's host name there.
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "kiln-container".to_owned())
        });
        Self {
            volumes: Volumes::under(&root),
            hostname,
        }
    }
}

/// The first global IPv4 address of any interface but loopback, as Docker assigned it.
fn container_address() -> Result<Ipv4Addr, PlatformError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| PlatformError::Network {
        step: "listing the container's interfaces".into(),
        reason: e.to_string(),
    })?;
    addrs
        .filter(|a| !a.interface_name.starts_with("lo"))
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip())))
        .find(|ip| !ip.is_loopback() && !ip.is_link_local())
        .ok_or_else(|| PlatformError::NoAddress {
            reason: "no interface of the container has an IPv4 address: start the container on a network (docker run --network)".into(),
        })
}

#[async_trait]
impl Platform for ContainerPlatform {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Container
    }
    fn mode(&self) -> Mode {
        Mode::Container
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
        // A Docker volume's mount point stays; its contents go.
        wipe_directory(&self.volumes, label)
    }
    async fn bring_up_network(&self) -> Result<(), PlatformError> {
        // Docker set the interface up with its address before starting the entrypoint.
        Ok(())
    }
    async fn address(&self) -> Result<IpAddr, PlatformError> {
        until(
            "the container's address",
            Poll::every(Duration::from_millis(100), ADDRESS_TIMEOUT),
            || async { container_address() },
        )
        .await
        .map(IpAddr::V4)
        .map_err(|t| {
            t.last.unwrap_or(PlatformError::NoAddress {
                reason: "no address within the deadline".into(),
            })
        })
    }
    async fn configure_network(
        &self,
        _config: &MachineConfig,
    ) -> Result<NetworkApplied, PlatformError> {
        // Docker owns the container's network; interfaces in the configuration do not apply.
        Ok(NetworkApplied {
            addresses: vec![self.address().await?],
            problems: vec![],
        })
    }
    fn kernel_config_url(&self) -> Option<String> {
        None
    }
    fn power(&self, power: Power) -> i32 {
        match power {
            Power::Reboot => EXIT_REBOOT,
            Power::Shutdown => EXIT_CONTAINER_SHUTDOWN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_off_leaves_an_on_failure_container_stopped_and_reboot_restarts_it() {
        let p = ContainerPlatform::new(PathBuf::from("/nonexistent"), Some("n".into()));
        assert_eq!(p.power(Power::Shutdown), 0);
        assert_ne!(p.power(Power::Reboot), 0);
    }

    #[test]
    fn volumes_are_directories_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = ContainerPlatform::new(dir.path().to_path_buf(), None);
        p.prepare_volumes().unwrap();
        std::fs::write(p.volumes().ephemeral.join("data"), b"x").unwrap();
        std::fs::write(p.volumes().meta.join("key"), b"x").unwrap();
        p.wipe("EPHEMERAL").unwrap();
        assert!(p.volumes().ephemeral.is_dir(), "the mount point stays");
        assert!(!p.volumes().ephemeral.join("data").exists());
        assert!(p.volumes().meta.join("key").exists(), "META survives");
    }
}
