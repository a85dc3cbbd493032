//! The `qemu` provisioner: every node is a QEMU virtual machine that boots Kiln OS (the image
//! `kiln image build` made: kernel, initramfs with machined as `/init`, GPT disk) with machined
//! as PID 1 on the `metal` platform. Nodes sit on the cluster bridge through a tap device each,
//! with a fixed MAC that the lab's DHCP server (started here) leases the node's address to.
//! Each node has a launcher ([`launcher`]), its power switch: it serves the node's
//! configuration over HTTP (`kiln.config=` on the kernel command line), runs QEMU with a QMP
//! socket ([`qmp`]) and starts it again when the guest reboots.
//!
//! Building blocks: which accelerator works here ([`accel`]), the QEMU command line of a node
//! ([`launch`]), a QMP client ([`qmp`]).
//!
//! Ownership: the bridge and each tap carry the cluster's owner mark as their alias and are
//! deleted only while they do; QEMU processes are found by pid file and start time.

pub mod accel;
pub mod bootdisk;
pub mod launch;
pub mod launcher;
pub mod qmp;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use kiln_os_api::wait::{Poll, until};
use serde::{Deserialize, Serialize};

use super::process::launcher as protocol;
use super::{Capabilities, NodeStatus, PowerAction, ProvisionError, Provisioner, require_node};
use crate::daemon;
use crate::network::netlink;
use crate::progress::Progress;
use crate::state::{ClusterState, HelperState, NetworkMode, StateDir};

/// The provisioner's name, also the key of its section in each node's state.
pub const NAME: &str = "qemu";

/// How nodes are made: `kiln cluster create --provisioner qemu` flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuOptions {
    /// vCPUs per node.
    pub cpus: u32,
    /// Memory per node in MiB.
    pub memory_mib: u32,
    /// Disk size per node in MiB (the image's disk grows to it; 0: as built).
    pub disk_mib: u64,
    /// Boot through OVMF and the disk's systemd-boot instead of loading kernel and initramfs
    /// directly.
    pub uefi: bool,
    /// Kernel to boot directly (`vmlinux` or `vmlinuz`).
    pub kernel: PathBuf,
    /// Initramfs to boot directly. Read at every (re)boot: a rebuilt one is picked up.
    pub initrd: PathBuf,
    /// The image's disk; each node gets a copy-on-write overlay of it.
    pub disk_image: PathBuf,
    /// Extra kernel arguments.
    pub extra_cmdline: String,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Follow the newest image in this store (`~/.kiln/images`): the launcher boots its kernel
    /// and initramfs at every start, so a rebuilt image runs after a reboot. `None` when the
    /// image was pinned (`--image`, `--kernel`, `--initrd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_store: Option<PathBuf>,
    /// NICs per node besides the first (each a tap on the cluster bridge; only the first has
    /// a DHCP lease): for bonds and the guides' advanced networking.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub extra_nics: u8,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 1024,
            disk_mib: 0,
            uefi: false,
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            disk_image: PathBuf::new(),
            extra_cmdline: String::new(),
            qemu: "qemu-system-x86_64".into(),
            image_store: None,
            extra_nics: 0,
        }
    }
}

/// The kernel and initramfs of the newest image in `store` (by its manifest's `created`), as
/// `kiln image build` writes them (`kiln_image::builder::names`).
pub fn newest_image(store: &std::path::Path) -> Option<(PathBuf, PathBuf)> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(store).ok()?.flatten() {
        let Some(created) = std::fs::read(e.path().join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|m| m["created"].as_u64())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(c, _)| created >= *c) {
            best = Some((created, e.path()));
        }
    }
    best.map(|(_, dir)| (dir.join("vmlinux"), dir.join("initramfs.zst")))
}

/// The image store QEMU nodes boot from when no other is named: `$KILN_IMAGE_STORE`, else
/// `~/.kiln/images`.
pub fn image_store() -> Option<PathBuf> {
    std::env::var_os("KILN_IMAGE_STORE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kiln/images")))
}

impl QemuOptions {
    /// Defaults that boot the newest image in `store` and follow it across reboots.
    pub fn from_store(store: &std::path::Path) -> Result<Self, ProvisionError> {
        let (kernel, initrd) = newest_image(store).ok_or_else(|| {
            unavailable(format!(
                "no image in {}: build one with `kiln image build --out {}`",
                store.display(),
                store.display()
            ))
        })?;
        let disk_image = initrd.with_file_name("disk.raw");
        Ok(Self {
            kernel,
            initrd,
            disk_image,
            image_store: Some(store.to_path_buf()),
            ..Self::default()
        })
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct QemuProvisioner {
    /// For `create`; other operations read what `plan` recorded in the state.
    pub options: QemuOptions,
}

/// What the qemu provisioner makes for one node (its section in `state.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuNode {
    /// Tap device on the cluster bridge.
    pub tap: String,
    /// The NIC's MAC (the DHCP server's static lease).
    pub mac: String,
    /// The node's disk (an overlay over the image's disk).
    pub disk: PathBuf,
    /// How it is launched.
    pub options: QemuOptions,
    /// Its further NICs (`--nics`), in order after the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_nics: Vec<launch::Nic>,
}

impl QemuNode {
    /// All its NICs, the first (the one with the DHCP lease) first.
    pub fn nics(&self) -> Vec<launch::Nic> {
        std::iter::once(launch::Nic {
            tap: self.tap.clone(),
            mac: self.mac.clone(),
        })
        .chain(self.extra_nics.iter().cloned())
        .collect()
    }

    /// The tap devices of all its NICs.
    pub fn taps(&self) -> Vec<String> {
        self.nics().into_iter().map(|n| n.tap).collect()
    }
}

/// The launcher helper of `node`.
pub fn launcher_name(node: &str) -> String {
    format!("{node}-launcher")
}

/// Bridge name: `kiln` and 8 hex digits of the cluster identity.
pub fn bridge_name(dir: &StateDir) -> String {
    format!("kiln{}", dir.id())
}

/// Tap name of node `index`: `kt`, 6 hex digits of the cluster identity, `n`, index.
pub fn tap_name(dir: &StateDir, index: usize) -> String {
    format!("kt{}n{index}", &dir.id()[2..])
}

/// Tap name of NIC `nic` (from 1) of node `index`: its first tap's name, `x`, `nic`.
pub fn extra_tap_name(dir: &StateDir, index: usize, nic: u8) -> String {
    format!("{}x{nic}", tap_name(dir, index))
}

fn network_error(cluster: &str) -> impl FnOnce(netlink::NetlinkError) -> ProvisionError + '_ {
    move |source| ProvisionError::Network {
        cluster: cluster.to_owned(),
        source,
    }
}

fn unavailable(reason: String) -> ProvisionError {
    ProvisionError::Unavailable {
        provisioner: NAME.to_owned(),
        reason,
    }
}

fn run_tool(program: &str, args: &[&str]) -> Result<(), ProvisionError> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| {
            unavailable(format!(
                "running {program}: {e} (install it with scripts/install-deps)"
            ))
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(unavailable(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Where the accelerator probe's answer is kept until the host reboots (`/run` is a tmpfs):
/// a KVM that hangs costs the probe's whole deadline, once.
const ACCEL_CACHE: &str = "/run/kiln/accel.json";

/// KVM when a probe guest boots with it, TCG otherwise (see [`accel`]); cached per host boot.
pub async fn choose_accel(o: &QemuOptions, scratch: &std::path::Path) -> accel::AccelChoice {
    if let Some(c) = std::fs::read(ACCEL_CACHE)
        .ok()
        .and_then(|b| serde_json::from_slice::<accel::AccelChoice>(&b).ok())
    {
        return c;
    }
    let probe = accel::QemuProbe {
        qemu: o.qemu.clone(),
        kernel: o.kernel.clone(),
        scratch: scratch.to_path_buf(),
    };
    let choice = tokio::task::spawn_blocking(move || {
        accel::choose(
            std::path::Path::new("/dev/kvm"),
            &probe,
            Duration::from_secs(10),
        )
    })
    .await
    .unwrap_or_else(|e| accel::AccelChoice {
        accel: accel::Accel::Tcg,
        reason: format!("the probe failed: {e}"),
    });
    let _ = std::fs::create_dir_all("/run/kiln");
    let _ = std::fs::write(ACCEL_CACHE, serde_json::to_vec(&choice).unwrap_or_default());
    choice
}

#[async_trait]
impl Provisioner for QemuProvisioner {
    fn name(&self) -> &'static str {
        NAME
    }

    fn network_mode(&self) -> Result<NetworkMode, ProvisionError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(unavailable(
                "QEMU nodes need a bridge and tap devices, which need root: run as root, or use --provisioner process".into(),
            ));
        }
        Ok(NetworkMode::Bridge)
    }

    fn capabilities(&self, _mode: NetworkMode) -> Capabilities {
        Capabilities {
            link_faults: Ok(()),
            pause: Ok(()),
            slots: if self.options.uefi {
                Err(format!(
                    "{NAME} nodes booted through UEFI (--with-uefi) have no slots yet: the \
                     launcher is their bootloader only with direct kernel boot"
                ))
            } else {
                Ok(())
            },
            airgap: Ok(()),
        }
    }

    fn plan(&self, dir: &StateDir, state: &mut ClusterState) {
        state.network.bridge = Some(bridge_name(dir));
        let cluster = state.name.clone();
        for (i, n) in state.nodes.iter_mut().enumerate() {
            let node = QemuNode {
                tap: tap_name(dir, i),
                mac: crate::dhcpd_helper::node_mac(&cluster, &n.name).to_string(),
                disk: dir.dir.join(format!("{}.qcow2", n.name)),
                options: self.options.clone(),
                extra_nics: (1..=self.options.extra_nics)
                    .map(|k| launch::Nic {
                        tap: extra_tap_name(dir, i, k),
                        // Not a node name, so no lease: only the first NIC has one.
                        mac: crate::dhcpd_helper::node_mac(&cluster, &format!("{}/nic{k}", n.name))
                            .to_string(),
                    })
                    .collect(),
            };
            n.set_provider_state(NAME, &node);
        }
    }

    async fn create_network(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError> {
        let cluster = state.name.as_str();
        let o = &self.options;
        for (what, path) in [("kernel", &o.kernel), ("initramfs", &o.initrd)] {
            if !o.uefi && !path.is_file() {
                return Err(unavailable(format!(
                    "no {what} at {}: build the image with `kiln image build`, or pass --kernel and --initrd",
                    path.display()
                )));
            }
        }
        if !o.disk_image.is_file() {
            return Err(unavailable(format!(
                "no disk image at {}: build the image with `kiln image build`",
                o.disk_image.display()
            )));
        }
        let (Some(bridge), IpAddr::V4(gw)) = (&state.network.bridge, state.network.gateway) else {
            return Err(unavailable(
                "the cluster has no IPv4 bridge: use an IPv4 --cidr".into(),
            ));
        };
        let choice = choose_accel(o, &dir.dir).await;
        progress.note(format!("accelerator {}: {}", choice.accel, choice.reason));
        std::fs::write(
            launcher::accel_file(dir),
            serde_json::to_vec(&choice).unwrap_or_default(),
        )
        .map_err(|source| ProvisionError::Io {
            path: launcher::accel_file(dir),
            source,
        })?;
        let mark = dir.owner_mark();
        let handle = netlink::connect().map_err(network_error(cluster))?;
        let mut links = vec![bridge.clone()];
        for n in &state.nodes {
            if let Some(q) = n.provider_state::<QemuNode>(NAME) {
                links.extend(q.taps());
            }
        }
        for l in &links {
            if let Some(alias) = netlink::alias_of(&handle, l)
                .await
                .map_err(network_error(cluster))?
                && alias != mark
            {
                return Err(ProvisionError::Taken {
                    object: format!("link {l}"),
                    cluster: cluster.to_owned(),
                    found: if alias.is_empty() {
                        "no owner mark".to_owned()
                    } else {
                        format!("marked {alias:?}")
                    },
                    fix: format!("remove it with `ip link del {l}` if nothing uses it"),
                });
            }
        }
        let prefix = state
            .network
            .cidr
            .parse::<ipnetwork::Ipv4Network>()
            .map(|n| n.prefix())
            .unwrap_or(24);
        netlink::create_bridge(&handle, bridge, gw, prefix, state.network.mtu)
            .await
            .map_err(network_error(cluster))?;
        netlink::set_alias(&handle, bridge, &mark)
            .await
            .map_err(network_error(cluster))?;
        for n in &state.nodes {
            let Some(q) = n.provider_state::<QemuNode>(NAME) else {
                continue;
            };
            for tap in q.taps() {
                if netlink::alias_of(&handle, &tap)
                    .await
                    .map_err(network_error(cluster))?
                    .is_none()
                {
                    run_tool("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
                }
                netlink::set_alias(&handle, &tap, &mark)
                    .await
                    .map_err(network_error(cluster))?;
                netlink::attach(&handle, &tap, bridge, state.network.mtu)
                    .await
                    .map_err(network_error(cluster))?;
            }
            // A copy-on-write overlay: the image's disk stays as built.
            if !q.disk.exists() {
                let backing = q.options.disk_image.display().to_string();
                let disk = q.disk.display().to_string();
                let mut args = vec![
                    "create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing, &disk,
                ];
                let size = format!("{}M", q.options.disk_mib);
                if q.options.disk_mib > 0 {
                    args.push(&size);
                }
                run_tool("qemu-img", &args)?;
            }
        }
        progress.note(format!("bridge {bridge} with {} taps", state.nodes.len()));
        Ok(())
    }

    async fn start_node(
        &self,
        dir: &StateDir,
        state: &mut ClusterState,
        node: &str,
    ) -> Result<(), ProvisionError> {
        if !state
            .helpers
            .iter()
            .any(|h| h.name == crate::dhcpd_helper::NAME)
        {
            crate::dhcpd_helper::start(dir, state, &Progress::plain()).map_err(|e| {
                ProvisionError::Unavailable {
                    provisioner: NAME.to_owned(),
                    reason: format!("starting the DHCP server: {e:#}"),
                }
            })?;
        }
        let name = launcher_name(node);
        state.helpers.push(HelperState {
            name: name.clone(),
            kind: "node-launcher".into(),
        });
        dir.save(state)?;
        let args = vec![
            "cluster".to_owned(),
            "launch-node".to_owned(),
            "--state-dir".to_owned(),
            dir.dir.display().to_string(),
            "--node".to_owned(),
            node.to_owned(),
        ];
        daemon::spawn(&args, &dir.log(&name), &dir.pidfile(&name))?;
        let socket = dir.socket(node);
        until(
            format!("the launcher of {node}"),
            Poll::every(Duration::from_millis(50), Duration::from_secs(30)),
            || protocol::send(&socket, protocol::Command::Status),
        )
        .await
        .map_err(|t| ProvisionError::Launcher {
            node: node.to_owned(),
            source: protocol::LauncherError::NotStarted {
                log: dir.log(&name),
                last: t.last.map(|e| e.to_string()).unwrap_or_default(),
            },
        })?;
        Ok(())
    }

    async fn destroy(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        progress: &Progress,
    ) -> Result<(), ProvisionError> {
        progress.phase("stopping nodes");
        std::thread::scope(|s| {
            for n in &state.nodes {
                s.spawn(|| {
                    daemon::stop_pidfile(
                        &dir.pidfile(&launcher_name(&n.name)),
                        Duration::from_secs(10),
                    );
                    daemon::stop_pidfile(&dir.pidfile(&n.name), Duration::from_secs(5));
                });
            }
        });
        for n in &state.nodes {
            for f in [
                dir.socket(&n.name),
                launcher::qmp_socket(dir, &n.name),
                launcher::qmp_events_socket(dir, &n.name),
                launcher::monitor_socket(dir, &n.name),
            ] {
                let _ = std::fs::remove_file(f);
            }
        }
        progress.phase(format!("destroying network {}", state.name));
        let cluster = state.name.as_str();
        let mark = dir.owner_mark();
        let handle = netlink::connect().map_err(network_error(cluster))?;
        let mut links: Vec<String> = state
            .nodes
            .iter()
            .filter_map(|n| n.provider_state::<QemuNode>(NAME))
            .flat_map(|q| q.taps())
            .collect();
        links.extend(state.network.bridge.clone());
        for l in &links {
            if !netlink::delete_marked_link(&handle, l, &mark)
                .await
                .map_err(network_error(cluster))?
                && netlink::alias_of(&handle, l).await.ok().flatten().is_some()
            {
                progress.note(format!("left link {l} alone: it is not marked {mark}"));
            }
        }
        Ok(())
    }

    async fn power(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
        action: PowerAction,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        protocol::send(&dir.socket(node), protocol::Command::from(action))
            .await
            .map_err(|source| ProvisionError::Launcher {
                node: node.to_owned(),
                source,
            })
    }

    async fn nic_link(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
        nic: usize,
        up: bool,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        let c = launcher::NicCommand { nic, up };
        protocol::send_line(&dir.socket(node), c.word(), &c.line())
            .await
            .map_err(|source| ProvisionError::Launcher {
                node: node.to_owned(),
                source,
            })
    }

    async fn status(
        &self,
        dir: &StateDir,
        state: &ClusterState,
        node: &str,
    ) -> Result<NodeStatus, ProvisionError> {
        require_node(state, node)?;
        protocol::send(&dir.socket(node), protocol::Command::Status)
            .await
            .map_err(|source| ProvisionError::Launcher {
                node: node.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_the_kernel_limit_and_differ_per_cluster() {
        let a = StateDir::new(std::path::Path::new("/tmp/one"), "qemu-a");
        let b = StateDir::new(std::path::Path::new("/tmp/one"), "qemu-a-2");
        assert!(tap_name(&a, 29).len() <= 15);
        assert_ne!(tap_name(&a, 0), tap_name(&b, 0));
        assert!(extra_tap_name(&a, 29, 3).len() <= 15);
        assert_ne!(extra_tap_name(&a, 1, 1), tap_name(&a, 11));
    }

    #[test]
    fn extra_nics_get_their_own_taps_and_macs_after_the_first() {
        let dir = StateDir::new(std::path::Path::new("/tmp/one"), "qemu-nics");
        let mut state = ClusterState {
            name: "qemu-nics".into(),
            provisioner: NAME.into(),
            network: crate::state::NetworkState {
                mode: NetworkMode::Bridge,
                cidr: "10.5.0.0/24".into(),
                gateway: "10.5.0.1".parse().unwrap(),
                bridge: None,
                mtu: 1500,
                firewall: vec![],
                airgapped: false,
                lab_netns: None,
            },
            nodes: vec![crate::state::NodeState {
                name: "cp-1".into(),
                role: kiln_config::MachineType::Controlplane,
                address: "10.5.0.2".parse().unwrap(),
                config: PathBuf::from("/dev/null"),
                inject_config: true,
                provider: Default::default(),
                resources: None,
            }],
            helpers: vec![],
            endpoint: "https://10.5.0.1:6443".into(),
            created: String::new(),
        };
        let p = QemuProvisioner {
            options: QemuOptions {
                extra_nics: 1,
                ..QemuOptions::default()
            },
        };
        p.plan(&dir, &mut state);
        let q: QemuNode = state.nodes[0].provider_state(NAME).unwrap();
        let nics = q.nics();
        assert_eq!(nics.len(), 2);
        assert_eq!(nics[0].tap, tap_name(&dir, 0));
        assert_eq!(nics[1].tap, extra_tap_name(&dir, 0, 1));
        assert_ne!(nics[0].mac, nics[1].mac);
        assert_eq!(q.taps().len(), 2);
    }

    #[test]
    fn nic_commands_name_their_nic() {
        let c = launcher::NicCommand { nic: 1, up: false };
        assert_eq!(c.line(), "nic-down 1");
        assert_eq!(launcher::NicCommand::parse("nic-down 1\n"), Some(c));
        assert_eq!(
            launcher::NicCommand::parse("nic-up 0"),
            Some(launcher::NicCommand { nic: 0, up: true })
        );
        assert_eq!(launcher::NicCommand::parse("nic-up eth1"), None);
        assert_eq!(launcher::NicCommand::parse("link-down"), None);
    }
}
