//! The `metal` platform: machined is PID 1 of a (virtual) machine booted from the Kiln kernel
//! and initramfs ([`init`]). Volumes are the disk's GPT partitions found by name, formatted on
//! first boot ([`disks`]); the network is brought up through rtnetlink ([`net`]) with a DHCP
//! lease on the first Ethernet link ([`dhcp`]), then `machine.network` is applied as a plan
//! ([`links`]): bonds, bridges and VLANs, then MTU, static addresses, routes and DHCP per link
//! (the kernel modules for them are loaded by [`init`]); the configuration URL comes from
//! `kiln.config=` on the kernel command line; the ACPI power button powers the node off
//! cleanly ([`button`]). Power ends the node process with the launcher codes, and PID 1 turns
//! them into `reboot(2)`.
//!
//! # Limitations
//!
//! `machine.network` is applied once per boot (a new configuration's interfaces take a
//! reboot); `deviceSelector` knows `hardwareAddr`, `driver` and `physical`. The DHCP lease is
//! taken once per boot and not renewed: the lab's leases are static.

pub mod button;
pub mod dhcp;
pub mod disks;
pub mod init;
pub mod links;
pub mod net;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_config::{MachineConfig, Mode};
use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN, LABEL_EPHEMERAL, LABEL_META, LABEL_STATE};
use tokio::sync::watch;

use super::{NetworkApplied, Platform, PlatformError, PlatformKind, Power};
use crate::volumes::Volumes;

/// The kernel argument naming the configuration URL.
pub const CONFIG_ARG: &str = "kiln.config";

/// The kernel argument naming control-plane nodes to join through (comma-separated), as
/// `--join-peer` does elsewhere.
pub const PEERS_ARG: &str = "kiln.peers";

/// The join peers the kernel command line names.
pub fn kernel_join_peers() -> Vec<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    kernel_arg(&cmdline, PEERS_ARG)
        .map(|p| {
            p.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// How long one DHCP exchange may take before it starts over.
const DHCP_TIMEOUT: Duration = Duration::from_secs(20);

/// A machine.
#[derive(Debug)]
pub struct MetalPlatform {
    volumes: Volumes,
    sys_block: PathBuf,
    cmdline: String,
    devices: Mutex<Vec<(String, PathBuf)>>,
    lease_tx: watch::Sender<Option<dhcp::Lease>>,
    dhcp_link: Mutex<Option<String>>,
}

impl MetalPlatform {
    /// The machine this runs on (`/proc/cmdline`, `/sys/class/block`).
    pub fn new() -> Self {
        Self {
            volumes: Volumes {
                state: "/system/state".into(),
                ephemeral: "/var".into(),
                meta: "/system/meta".into(),
                run: "/run/kiln".into(),
                proc: Some("/proc".into()),
            },
            sys_block: "/sys/class/block".into(),
            cmdline: std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
            devices: Mutex::new(Vec::new()),
            lease_tx: watch::channel(None).0,
            dhcp_link: Mutex::new(None),
        }
    }

    fn device_of(&self, label: &str) -> Option<PathBuf> {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, d)| d.clone())
    }
}

impl Default for MetalPlatform {
    fn default() -> Self {
        Self::new()
    }
}

/// The value of `key=` on a kernel command line.
pub fn kernel_arg(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .map(str::to_owned)
}

/// Writes `/etc/resolv.conf` for `servers`.
fn write_resolvers(servers: &[String]) {
    if servers.is_empty() {
        return;
    }
    let text: String = servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    let _ = std::fs::create_dir_all("/etc");
    if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
        tracing::warn!(error = %e, "writing /etc/resolv.conf");
    }
}

/// What `deviceSelector`s match against: each link's name and address from netlink, its
/// driver and whether a device backs it from sysfs.
async fn link_facts(handle: &rtnetlink::Handle) -> Result<Vec<links::LinkFacts>, PlatformError> {
    Ok(net::links(handle)
        .await?
        .into_iter()
        .map(|l| {
            let device = std::path::Path::new("/sys/class/net")
                .join(&l.name)
                .join("device");
            links::LinkFacts {
                hardware_addr: l
                    .mac
                    .map(|m| {
                        m.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    })
                    .unwrap_or_default(),
                driver: std::fs::read_link(device.join("driver"))
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
                physical: device.exists(),
                name: l.name,
            }
        })
        .collect())
}

/// One DHCP exchange on `link` (a bond, bridge or VLAN with `dhcp: true`), applied.
async fn dhcp_on(handle: &rtnetlink::Handle, link: &str) -> Result<dhcp::Lease, PlatformError> {
    let mac = net::links(handle)
        .await?
        .into_iter()
        .find(|l| l.name == link)
        .and_then(|l| l.mac)
        .ok_or_else(|| PlatformError::Network {
            step: format!("DHCP on {link}"),
            reason: "the link has no hardware address".into(),
        })?;
    let lease =
        dhcp::acquire(link, mac, DHCP_TIMEOUT)
            .await
            .map_err(|e| PlatformError::Network {
                step: format!("DHCP on {link}"),
                reason: e.to_string(),
            })?;
    apply_lease(link, &lease).await?;
    tracing::info!(link, address = %lease.address, prefix = lease.prefix, "DHCP lease");
    Ok(lease)
}

async fn apply_lease(link: &str, lease: &dhcp::Lease) -> Result<(), PlatformError> {
    let handle = net::connect()?;
    let index = net::index_of(&handle, link).await?;
    if let Some(mtu) = lease.mtu {
        net::up(&handle, index, link, Some(u32::from(mtu))).await?;
    }
    net::add_address(
        &handle,
        index,
        link,
        IpAddr::V4(lease.address),
        lease.prefix,
    )
    .await?;
    if let Some(gw) = lease.router {
        net::add_route_v4(&handle, index, Ipv4Addr::UNSPECIFIED, 0, Some(gw), None).await?;
    }
    write_resolvers(
        &lease
            .dns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    );
    if let Some(h) = &lease.hostname {
        let _ = nix::unistd::sethostname(h);
    }
    Ok(())
}

#[async_trait]
impl Platform for MetalPlatform {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Metal
    }
    fn kernel_cmdline(&self) -> Option<String> {
        std::fs::read_to_string("/proc/cmdline")
            .ok()
            .map(|c| c.trim().to_owned())
    }
    fn mode(&self) -> Mode {
        Mode::Metal
    }
    fn volumes(&self) -> &Volumes {
        &self.volumes
    }
    fn default_hostname(&self) -> String {
        self.lease_tx
            .borrow()
            .as_ref()
            .and_then(|l| l.hostname.clone())
            .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
            .filter(|h| !h.is_empty() && h != "(none)")
            .unwrap_or_else(|| "kiln".to_owned())
    }
    fn prepare_volumes(&self) -> Result<(), PlatformError> {
        let mut devices = Vec::new();
        for (label, target) in [
            (LABEL_STATE, &self.volumes.state),
            (LABEL_EPHEMERAL, &self.volumes.ephemeral),
            (LABEL_META, &self.volumes.meta),
        ] {
            let already = std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().nth(1) == target.to_str());
            let device = match disks::find_partition(&self.sys_block, label) {
                Some(d) if already => d,
                _ => disks::prepare(&self.sys_block, label, target)?,
            };
            devices.push((label.to_owned(), device));
        }
        *self.devices.lock().unwrap_or_else(|e| e.into_inner()) = devices;
        super::prepare_directories(&self.volumes)
    }
    fn wipe(&self, label: &str) -> Result<(), PlatformError> {
        let target = self.volumes.by_label(label)?.to_path_buf();
        if let Some(device) = self.device_of(label)
            && disks::wipe(label, &device, &target)?
        {
            return Ok(());
        }
        super::wipe_directory(&self.volumes, label)
    }
    async fn bring_up_network(&self) -> Result<(), PlatformError> {
        let handle = net::connect()?;
        let links = net::links(&handle).await?;
        for l in &links {
            net::up(&handle, l.index, &l.name, None).await?;
        }
        let Some(first) = links.iter().find(|l| l.ethernet && l.mac.is_some()) else {
            return Err(PlatformError::Network {
                step: "finding an Ethernet link".into(),
                reason: format!(
                    "the machine has none (links: {}): give the VM a virtio-net NIC",
                    links
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        let link = first.name.clone();
        let mac = first.mac.unwrap_or_default();
        *self.dhcp_link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
        let tx = self.lease_tx.clone();
        // DHCP runs on: `address` waits for the lease with the caller's deadline.
        tokio::spawn(async move {
            loop {
                match dhcp::acquire(&link, mac, DHCP_TIMEOUT).await {
                    Ok(lease) => match apply_lease(&link, &lease).await {
                        Ok(()) => {
                            tracing::info!(link, address = %lease.address, prefix = lease.prefix, "DHCP lease");
                            let _ = tx.send(Some(lease));
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "applying the DHCP lease"),
                    },
                    Err(e) => tracing::warn!(error = %e, "DHCP"),
                }
                // Back off before the next DISCOVER (the lab's server answers at once; a
                // missing one must not be flooded).
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(())
    }
    async fn address(&self) -> Result<IpAddr, PlatformError> {
        let mut rx = self.lease_tx.subscribe();
        let lease = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| PlatformError::NoAddress {
                reason: "the DHCP client stopped".into(),
            })?
            .clone();
        lease
            .map(|l| IpAddr::V4(l.address))
            .ok_or_else(|| PlatformError::NoAddress {
                reason: "no DHCP lease".into(),
            })
    }
    async fn configure_network(
        &self,
        config: &MachineConfig,
    ) -> Result<NetworkApplied, PlatformError> {
        let lease = self.lease_tx.borrow().clone();
        let mut applied = NetworkApplied {
            addresses: lease.iter().map(|l| IpAddr::V4(l.address)).collect(),
            problems: Vec::new(),
        };
        let Some(network) = config.machine.network.as_ref() else {
            return Ok(applied);
        };
        if let Some(h) = &network.hostname {
            let _ = nix::unistd::sethostname(h);
        }
        write_resolvers(&network.nameservers);
        let handle = net::connect()?;
        let (network, mut problems) = if network.interfaces.iter().any(|d| {
            d.device_selector.is_some()
                || d.bond
                    .as_ref()
                    .is_some_and(|b| !b.device_selectors.is_empty())
        }) {
            links::resolve(network, &link_facts(&handle).await?)
        } else {
            (network.clone(), Vec::new())
        };
        let (steps, plan_problems) = links::plan(&network);
        problems.extend(plan_problems);
        for p in problems {
            applied.problems.push(PlatformError::Network {
                step: format!("machine.network.interfaces: {}", p.interface),
                reason: p.reason,
            });
        }
        if steps.is_empty() {
            return Ok(applied);
        }
        let failed = net::apply_plan(&handle, &steps).await;
        let failed_links: Vec<&str> = failed.iter().map(|(l, _)| l.as_str()).collect();
        let dhcp_link = self
            .dhcp_link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The boot's lease stays where it is unless its link became a port.
        let lease_moved = steps.iter().any(|s| {
            matches!(s, links::Step::Enslave { member, .. } if Some(member) == dhcp_link.as_ref())
        });
        if lease_moved {
            applied.addresses.clear();
        }
        for step in &steps {
            let links::Step::Configure(s) = step else {
                continue;
            };
            if failed_links.contains(&s.link.as_str()) {
                continue;
            }
            applied
                .addresses
                .extend(s.addresses.iter().map(|(ip, _)| *ip));
            if !s.dhcp {
                continue;
            }
            // The boot's lease already is on this link, or a new exchange (a bond has its
            // first port's MAC, so the lab's server leases it that port's address). Its
            // routes wait for the lease: a gateway must be reachable through the link.
            if Some(&s.link) != dhcp_link.as_ref() || lease.is_none() {
                match dhcp_on(&handle, &s.link).await {
                    Ok(l) => applied.addresses.push(IpAddr::V4(l.address)),
                    Err(e) => {
                        applied.problems.push(e);
                        continue;
                    }
                }
            }
            if let Err(e) = net::add_routes(&handle, s).await {
                applied.problems.push(e);
            }
        }
        applied.problems.extend(failed.into_iter().map(|(_, e)| e));
        applied.addresses.dedup();
        Ok(applied)
    }
    async fn link_status(&self) -> Result<Option<Vec<net::LinkStatus>>, PlatformError> {
        let handle = net::connect()?;
        net::link_status(&handle).await.map(Some)
    }
    async fn route_status(&self) -> Result<Option<Vec<net::RouteStatus>>, PlatformError> {
        let handle = net::connect()?;
        net::route_status(&handle).await.map(Some)
    }
    async fn address_status(&self) -> Result<Option<Vec<net::AddressStatus>>, PlatformError> {
        let handle = net::connect()?;
        net::address_status(&handle).await.map(Some)
    }
    fn kernel_config_url(&self) -> Option<String> {
        kernel_arg(&self.cmdline, CONFIG_ARG)
    }
    fn power(&self, power: Power) -> i32 {
        // PID 1 (see `init`) turns the node's exit code into reboot(2).
        match power {
            Power::Reboot => EXIT_REBOOT,
            Power::Shutdown => EXIT_SHUTDOWN,
        }
    }
}

/// Whether this process is the machine's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Exists for tests that point the platform at a fake sysfs.
#[cfg(test)]
pub fn with_sys_block(sys_block: &std::path::Path) -> MetalPlatform {
    MetalPlatform {
        sys_block: sys_block.to_path_buf(),
        ..MetalPlatform::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_url_comes_from_the_kernel_command_line() {
        let cmd = "console=ttyS0 panic=-1 kiln.config=http://10.5.0.1:4001/config.yaml quiet";
        assert_eq!(
            kernel_arg(cmd, CONFIG_ARG).as_deref(),
            Some("http://10.5.0.1:4001/config.yaml")
        );
        assert_eq!(kernel_arg("console=ttyS0 kiln.configx=1", CONFIG_ARG), None);
    }

    #[test]
    fn a_disk_without_a_state_partition_is_an_error_that_says_what_to_boot() {
        let dir = tempfile::tempdir().unwrap();
        let p = with_sys_block(dir.path());
        let e = p.prepare_volumes().unwrap_err().to_string();
        assert!(e.contains("no partition named STATE"), "{e}");
    }
}
