//! The `container` platform: machined is the entrypoint (PID 1, see [`crate::pid1`]) of a
//! Docker container. Volumes are directories on Docker volumes mounted under the node's root;
//! the address is whatever IPv4 address Docker gave the container, on whatever its interface
//! is called; power is the exit code the container's restart policy acts on.
//!
//! A container has no bootloader, so its entrypoint plays one ([`bootloader`]): when the
//! provisioner gives the node a boot directory (a Docker volume, named by `KILN_BOOT_DIR`),
//! machined applies the A/B slot rules of [`kiln_os_api::slots`] at every start of the
//! container and either goes on as the node image's own release or `exec`s the chosen slot's
//! machined (still PID 1).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use kiln_config::{MachineConfig, Mode};
use kiln_os_api::contract::{EXIT_CONTAINER_SHUTDOWN, EXIT_REBOOT, NO_DEFAULT_ROUTE_ENV};
use kiln_os_api::slots::{
    BOOT_DIR_ENV, BOOT_SLOT_ENV, ETCD, ETCDCTL, LAST_END, MACHINED, SlotContent, SlotRecord,
};
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
        // Docker set the interface up with its address before starting the entrypoint. An
        // air-gapped node has no route out: Docker 20.10 gives a container a default route
        // even on an `--internal` network, and sets it again at every start.
        if std::env::var_os(NO_DEFAULT_ROUTE_ENV).is_some_and(|v| v == "1") {
            let handle = super::metal::net::connect()?;
            let removed = super::metal::net::delete_default_routes_v4(&handle).await?;
            tracing::info!(removed, "air-gapped: removed the default route");
        }
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
            Power::Reboot => {
                // The next start's bootloader reads how this boot ended.
                if let Some(dir) = std::env::var_os(BOOT_DIR_ENV) {
                    let _ = std::fs::write(Path::new(&dir).join(LAST_END), "rebooted");
                }
                EXIT_REBOOT
            }
            Power::Shutdown => EXIT_CONTAINER_SHUTDOWN,
        }
    }
}

/// The release the node image carries (`/usr/bin/machined` and its etcd): what slot A holds
/// on a node created without an installer.
fn image_release() -> SlotContent {
    SlotContent {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        source: "builtin".to_owned(),
        builtin: true,
    }
}

/// `args` (without the program) for a slot's machined: its own etcd and etcdctl instead of
/// the node image's.
fn slot_args(args: &[String], slot: &Path) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 4);
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match a.as_str() {
            "--etcd-bin" | "--etcdctl-bin" => skip_value = true,
            _ if a.starts_with("--etcd-bin=") || a.starts_with("--etcdctl-bin=") => {}
            _ => out.push(a.clone()),
        }
    }
    for (flag, file) in [("--etcd-bin", ETCD), ("--etcdctl-bin", ETCDCTL)] {
        out.push(flag.to_owned());
        out.push(slot.join(file).display().to_string());
    }
    out
}

/// PID 1 of the lab's gateway container on a Docker Swarm overlay network: not a node, it
/// only holds the network namespace where the lab's helpers run (the `kiln` binary on the
/// engine's host enters it). Reaps whatever ends up as its child and exits 0 on SIGTERM or
/// SIGINT (as PID 1 it has no default action for them). Never returns.
pub fn hold() -> ! {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("machined --hold: blocking signals: {e}");
        std::process::exit(1);
    }
    eprintln!("machined --hold: holding the lab's network namespace");
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(e) => {
                eprintln!("machined --hold: waiting for signals: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// The entrypoint's bootloader (see the module documentation): called first thing in `main`
/// with the command line (program first), while the process has one thread. Does nothing
/// when the node has no boot directory, or when the slot was already chosen (this is the
/// chosen slot's machined). Otherwise chooses the slot and either returns (the node image's
/// release boots: this process goes on) or replaces this process with the slot's machined.
pub fn bootloader(args: &[String]) {
    let Some(dir) = std::env::var_os(BOOT_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    if std::env::var_os(BOOT_SLOT_ENV).is_some() {
        return;
    }
    let why = match std::fs::read_to_string(dir.join(LAST_END)) {
        Ok(text) => {
            let _ = std::fs::remove_file(dir.join(LAST_END));
            text.trim().to_owned()
        }
        Err(_) => "the container stopped without a reboot: machined exited, crashed or was killed"
            .to_owned(),
    };
    let booted = kiln_os_api::slots::start_chosen(
        &why,
        |why| {
            let mut record = SlotRecord::load(&dir)
                .map_err(|e| e.to_string())?
                .unwrap_or_else(|| SlotRecord::fresh(image_release()));
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let choice = record.choose(why, now);
            record.store(&dir).map_err(|e| e.to_string())?;
            Ok(choice)
        },
        |choice| {
            if let Some(failed) = &choice.fell_back {
                eprintln!("bootloader: {}", failed.reason);
            }
            eprintln!(
                "bootloader: booting slot {} ({})",
                choice.slot,
                choice
                    .content
                    .as_ref()
                    .map_or("empty", |c| c.version.as_str())
            );
            if choice.content.as_ref().is_none_or(|c| c.builtin) {
                #[allow(unsafe_code)]
                // SAFETY: called at the start of main, before any thread exists.
                unsafe {
                    std::env::set_var(BOOT_SLOT_ENV, choice.slot.name());
                }
                return Ok(());
            }
            let slot = dir.join(choice.slot.name());
            let program = slot.join(MACHINED);
            use std::os::unix::process::CommandExt as _;
            // Returns only when it failed.
            let err = std::process::Command::new(&program)
                .args(slot_args(args.get(1..).unwrap_or_default(), &slot))
                .env(BOOT_SLOT_ENV, choice.slot.name())
                .exec();
            Err(format!("starting {} failed ({err})", program.display()))
        },
        |e| format!("starting its machined failed: {e}"),
    );
    if let Err(e) = booted {
        eprintln!("bootloader: {e}; booting the node image's release without slots");
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
    fn a_slot_machined_gets_the_slot_etcd_whatever_form_the_flags_had() {
        let args: Vec<String> = [
            "--platform",
            "container",
            "--etcd-bin",
            "/usr/bin/etcd",
            "--etcdctl-bin=/usr/bin/etcdctl",
            "--hostname",
            "cp-1",
        ]
        .map(str::to_owned)
        .into();
        let out = slot_args(&args, Path::new("/var/lib/kiln/boot/b"));
        assert_eq!(
            out,
            [
                "--platform",
                "container",
                "--hostname",
                "cp-1",
                "--etcd-bin",
                "/var/lib/kiln/boot/b/usr/bin/etcd",
                "--etcdctl-bin",
                "/var/lib/kiln/boot/b/usr/bin/etcdctl"
            ]
        );
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
