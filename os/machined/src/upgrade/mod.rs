//! Upgrades and rollback (the A/B scheme of the guide "Upgrading").
//!
//! `upgrade` pulls the installer through the node's registry mirrors (an invalid reference or
//! a failed pull aborts before anything changes), checks etcd quorum on a control-plane node,
//! takes the upgrade lease in etcd so that one control-plane node upgrades at a time, leaves
//! etcd and wipes EPHEMERAL unless `preserve`, writes the release into the inactive slot, marks
//! it to boot once and reboots (or, with `stage`, stops there: the next reboot applies it).
//! At every boot [`after_boot`] reports a failed attempt that fell back, and confirms a slot on
//! its one try once the node is Running (and etcd healthy on a control-plane node): the slot
//! becomes permanent and the lease is released. A release that does not get there within
//! [`CONFIRM_TIMEOUT`] reboots, and the launcher boots the old slot.
//!
//! Every step is a machine event with id `upgrade`, so `kiln upgrade` (and `kiln events`)
//! follow it.
//!
//! # Design
//!
//! The slots are behind [`BootSlots`]: [`DirectorySlots`] serves every platform (slot
//! directories and a record the node launcher reads, see [`kiln_os_api::slots`]; on `metal`
//! the directory is the qemu launcher's boot disk, mounted by PID 1); a BOOT-A/BOOT-B
//! implementation for systemd-boot would plug in beside it. The lease and quorum rules are in [`lease`].
//!
//! `stage` without `preserve` marks the staged slot so that the reboot machined performs into
//! it ([`before_reboot`]) first leaves etcd and wipes EPHEMERAL, as an unstaged upgrade does
//! before its own reboot.
//!
//! # Limitations
//!
//! - A node staged without `preserve` that does not reboot through machined (a reset, a
//!   crash, a power cut) boots the new release keeping its etcd membership and EPHEMERAL, and
//!   says so in its events.
//! - Kubernetes cordon and drain are not done (Kiln runs no Kubernetes workloads).

pub mod lease;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_config::MachineType;
use kiln_os_api::slots::{
    BOOT_DIR_ENV, BOOT_SLOT_ENV, OS_RELEASE, Slot, SlotContent, SlotError, SlotRecord,
};
use kiln_os_api::wait::{Poll, until};
use kiln_registry_mirror::client::{ClientConfig, RegistryClient};
use kiln_registry_mirror::installer::PulledInstaller;
use kiln_registry_mirror::reference::ImageRef;

use crate::events::EventKind;
use crate::node::{Node, PowerRequest, Stage};
use crate::platform::Power;

/// How long a new release has to reach Running (and etcd health) before it reboots back.
pub use kiln_os_api::slots::CONFIRM_TIMEOUT;

/// The event id of upgrade steps (the client side follows it).
pub use kiln_os_api::upgrade::EVENT_ID;

/// Why an upgrade or rollback was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// This node has no boot slots (its launcher does not play the bootloader).
    #[error(
        "this node has no A/B boot slots ({BOOT_DIR_ENV} is not set by its launcher); it cannot be upgraded"
    )]
    NoSlots,
    /// The image reference does not parse.
    #[error("invalid installer reference {image:?}: {reason}")]
    InvalidReference {
        /// The reference.
        image: String,
        /// Why.
        reason: String,
    },
    /// The installer could not be pulled from any endpoint.
    #[error("pulling the installer {image} failed: {reason}; nothing was changed")]
    Pull {
        /// The reference.
        image: String,
        /// What each endpoint answered.
        reason: String,
    },
    /// Another upgrade runs on this node.
    #[error("an upgrade is already in progress on this node; follow it with `kiln events`")]
    InProgress,
    /// The node is not Running.
    #[error("the node is {stage}, not running; upgrade it once it runs")]
    NotRunning {
        /// Its stage.
        stage: &'static str,
    },
    /// Upgrading would lose etcd quorum.
    #[error(
        "upgrading {node} would lose etcd quorum: {detail}; members: {members}. Bring the members back first, upgrade with --preserve, or pass --force"
    )]
    Quorum {
        /// This node.
        node: String,
        /// The numbers.
        detail: String,
        /// Every member and its health.
        members: String,
    },
    /// etcd could not be used for the lease or the quorum check.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The slots.
    #[error(transparent)]
    Slots(#[from] SlotError),
    /// Writing the release into its slot failed.
    #[error("writing the release into {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where a node's releases live, and their record.
pub trait BootSlots: Send + Sync + std::fmt::Debug {
    /// The record.
    fn record(&self) -> Result<SlotRecord, UpgradeError>;
    /// Writes the record.
    fn store(&self, record: &SlotRecord) -> Result<(), UpgradeError>;
    /// A new, empty directory to pull a release into.
    fn scratch(&self) -> Result<PathBuf, UpgradeError>;
    /// Moves the release pulled into `scratch` into `slot` (replacing what was there).
    fn install(&self, scratch: &Path, slot: Slot) -> Result<(), UpgradeError>;
    /// The slot this boot came from.
    fn booted(&self) -> Slot;
    /// The version of the booted release.
    fn version(&self) -> Option<String>;
}

/// Slot directories under a boot directory the node launcher reads (`process`, `container`).
#[derive(Debug, Clone)]
pub struct DirectorySlots {
    /// The boot directory.
    pub dir: PathBuf,
    /// The slot the launcher booted.
    pub booted: Slot,
}

impl BootSlots for DirectorySlots {
    fn record(&self) -> Result<SlotRecord, UpgradeError> {
        SlotRecord::load(&self.dir)?.ok_or(UpgradeError::NoSlots)
    }
    fn store(&self, record: &SlotRecord) -> Result<(), UpgradeError> {
        Ok(record.store(&self.dir)?)
    }
    fn scratch(&self) -> Result<PathBuf, UpgradeError> {
        let path = self.dir.join(".pull");
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|source| UpgradeError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
    fn install(&self, scratch: &Path, slot: Slot) -> Result<(), UpgradeError> {
        let target = self.dir.join(slot.name());
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| UpgradeError::Io { path, source }
        };
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        std::fs::rename(scratch, &target).map_err(io(&target))
    }
    fn booted(&self) -> Slot {
        self.booted
    }
    fn version(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join(self.booted.name()).join(OS_RELEASE))
            .ok()
            .or_else(|| {
                // The built-in release (`kiln machined`) has no files in its slot.
                let record = SlotRecord::load(&self.dir).ok()??;
                let c = record.content(self.booted)?;
                Some(format!("VERSION_ID={}", c.version))
            })?;
        kiln_os_api::slots::os_release_version(&text)
    }
}

static SLOTS: OnceLock<Option<Arc<dyn BootSlots>>> = OnceLock::new();

/// The node's boot slots, from the launcher's environment (`None` when it sets none). Kept in
/// a process-wide cell: the environment is read once and is the same for the whole boot.
pub fn slots() -> Option<Arc<dyn BootSlots>> {
    SLOTS
        .get_or_init(|| {
            let dir = std::env::var_os(BOOT_DIR_ENV)?;
            let booted = Slot::parse(&std::env::var(BOOT_SLOT_ENV).ok()?)?;
            Some(Arc::new(DirectorySlots {
                dir: dir.into(),
                booted,
            }) as Arc<dyn BootSlots>)
        })
        .clone()
}

/// The OS version this node runs: the booted release's, else machined's own.
pub fn os_version() -> String {
    slots()
        .and_then(|s| s.version())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// An upgrade request.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// The installer reference.
    pub image: String,
    /// Keep etcd membership and EPHEMERAL.
    pub preserve: bool,
    /// Write the release; apply it at the next reboot.
    pub stage: bool,
    /// Skip the quorum check.
    pub force: bool,
}

static IN_PROGRESS: AtomicBool = AtomicBool::new(false);

struct Busy;
impl Drop for Busy {
    fn drop(&mut self) {
        IN_PROGRESS.store(false, Ordering::SeqCst);
    }
}

fn event(node: &Node, state: &str, message: impl Into<String>) {
    let message = message.into();
    tracing::info!(state, "upgrade: {message}");
    node.events
        .publish(EventKind::Machine, EVENT_ID, state, message);
}

/// Starts an upgrade: pulls and checks now (the answer says why it was refused), goes on in
/// the background. Returns the version pulled.
pub async fn start(node: Arc<Node>, req: UpgradeRequest) -> Result<String, UpgradeError> {
    let slots = slots().ok_or(UpgradeError::NoSlots)?;
    let stage = node.stage();
    if stage != Stage::Running {
        return Err(UpgradeError::NotRunning {
            stage: stage.as_str(),
        });
    }
    if IN_PROGRESS.swap(true, Ordering::SeqCst) {
        return Err(UpgradeError::InProgress);
    }
    let busy = Busy;
    let result = prepare(&node, &*slots, &req).await;
    let (scratch, pulled) = match result {
        Ok(v) => v,
        Err(e) => {
            event(&node, "aborted", format!("upgrade aborted: {e}"));
            return Err(e);
        }
    };
    let version = pulled.version.clone();
    tokio::spawn(async move {
        let _busy = busy;
        if let Err(e) = proceed(&node, &*slots, &req, &scratch, pulled).await {
            event(&node, "aborted", format!("upgrade aborted: {e}"));
            let _ = std::fs::remove_dir_all(&scratch);
            if is_control_plane(&node) {
                let _ = lease::release(&node).await;
            }
        }
    });
    Ok(version)
}

fn is_control_plane(node: &Node) -> bool {
    node.machine_type() == Some(MachineType::Controlplane)
}

async fn prepare(
    node: &Arc<Node>,
    slots: &dyn BootSlots,
    req: &UpgradeRequest,
) -> Result<(PathBuf, PulledInstaller), UpgradeError> {
    // As container runtimes read it: `kiln/installer:v1` is `docker.io/kiln/installer:v1`, so
    // the node's mirrors for `docker.io` (or `*`) serve it.
    let image = ImageRef::normalized(&req.image).map_err(|e| UpgradeError::InvalidReference {
        image: req.image.clone(),
        reason: e.to_string(),
    })?;
    event(
        node,
        "pulling",
        format!("pulling the installer {}", req.image),
    );
    let scratch = slots.scratch()?;
    let pulled = match pull(node, &image, &req.image, &scratch).await {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    event(
        node,
        "pulled",
        format!(
            "pulled {} ({}): release {}",
            req.image, pulled.digest, pulled.version
        ),
    );
    if is_control_plane(node) && !req.force {
        // While another control-plane node holds the lease it is away on purpose: this one
        // waits for the lease (and for quorum) instead of being refused. The holder is read
        // after the quorum check, not before: a node that upgrades at the same moment takes
        // the lease before it leaves, so a member that went away in between is found here.
        if let Err(e) = lease::check_quorum(node, req.preserve).await {
            match lease::holder(node).await {
                Ok(Some(holder)) if holder != node.hostname() => event(
                    node,
                    "waiting",
                    format!("{holder} is upgrading; waiting for the upgrade lease"),
                ),
                _ => {
                    let _ = std::fs::remove_dir_all(&scratch);
                    return Err(e);
                }
            }
        }
    }
    Ok((scratch, pulled))
}

/// The endpoints to pull `image` from: the configured mirrors of its host (or of `*`), then
/// the host itself over HTTPS.
pub fn endpoints(config: Option<&kiln_config::MachineConfig>, host: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(reg) = config.and_then(|c| c.machine.registries.as_ref()) {
        for key in [host, "*"] {
            if let Some(m) = reg.mirrors.get(key) {
                out.extend(m.endpoints.iter().cloned());
            }
        }
    }
    out.push(format!("https://{host}"));
    out
}

async fn pull(
    node: &Node,
    image: &ImageRef,
    text: &str,
    dest: &Path,
) -> Result<PulledInstaller, UpgradeError> {
    let mut reasons = Vec::new();
    for endpoint in endpoints(node.config().as_deref(), &image.host) {
        let url = match url::Url::parse(&endpoint) {
            Ok(u) => u,
            Err(e) => {
                reasons.push(format!("{endpoint}: {e}"));
                continue;
            }
        };
        // An endpoint that cannot be reached should not hold the upgrade call for long: the
        // next one (or the error) comes after a few seconds.
        let config = ClientConfig {
            connect_timeout: Duration::from_secs(3),
            resolver: crate::resolver::ConfiguredResolver::for_reqwest(node.config().as_deref())
                .map(|r| kiln_registry_mirror::client::DnsResolver(r)),
            ..ClientConfig::new(url)
        };
        let client = match RegistryClient::new(config) {
            Ok(c) => c,
            Err(e) => {
                reasons.push(format!("{endpoint}: {e}"));
                continue;
            }
        };
        match kiln_registry_mirror::installer::pull(&client, &image.name, &image.reference, dest)
            .await
        {
            Ok(p) => return Ok(p),
            Err(e) => {
                reasons.push(format!("{endpoint}: {e}"));
                let _ = std::fs::remove_dir_all(dest);
                let _ = std::fs::create_dir_all(dest);
            }
        }
    }
    Err(UpgradeError::Pull {
        image: text.to_owned(),
        reason: reasons.join("; "),
    })
}

async fn proceed(
    node: &Arc<Node>,
    slots: &dyn BootSlots,
    req: &UpgradeRequest,
    scratch: &Path,
    pulled: PulledInstaller,
) -> Result<(), UpgradeError> {
    let cp = is_control_plane(node);
    if cp {
        lease::acquire(node, req.preserve, req.force).await?;
    }
    let mut record = slots.record()?;
    let target = record.inactive();
    event(
        node,
        "installing",
        format!("writing release {} into slot {target}", pulled.version),
    );
    slots.install(scratch, target)?;
    record.boot_once(
        target,
        SlotContent {
            version: pulled.version.clone(),
            source: format!("{}@{}", req.image, pulled.digest),
            builtin: false,
        },
    );
    if req.stage
        && !req.preserve
        && let Some(next) = record.next.as_mut()
    {
        next.leave_at_reboot = true;
    }
    slots.store(&record)?;
    if req.stage {
        event(
            node,
            "staged",
            format!(
                "release {} is staged in slot {target}: it boots once at the next reboot{}",
                pulled.version,
                if req.preserve {
                    ""
                } else if cp {
                    ", which first leaves etcd and wipes EPHEMERAL"
                } else {
                    ", which first wipes EPHEMERAL"
                }
            ),
        );
        if cp {
            lease::release(node).await?;
        }
        return Ok(());
    }
    let mut wipe = Vec::new();
    if !req.preserve {
        if cp {
            event(node, "leaving", "leaving the etcd cluster (no --preserve)");
            lease::leave_etcd(node).await?;
        }
        wipe.push(kiln_os_api::contract::LABEL_EPHEMERAL.to_owned());
    }
    event(
        node,
        "rebooting",
        format!(
            "stopping services{} and rebooting into slot {target} ({}) once",
            if wipe.is_empty() {
                ""
            } else {
                ", wiping EPHEMERAL,"
            },
            pulled.version
        ),
    );
    node.request_power(PowerRequest {
        power: Power::Reboot,
        wipe,
        reason: format!("upgrade to {}", pulled.version),
    })
    .await;
    Ok(())
}

/// Called when machined ends a boot on purpose (reboot or power-off), with etcd still
/// running: a release staged without `--preserve` leaves etcd now (a control-plane node whose
/// leaving keeps quorum) and has EPHEMERAL wiped, as an unstaged upgrade does before its
/// reboot. Returns the volumes to wipe. The mark is cleared first, so this happens once.
pub async fn before_reboot(node: &Node) -> Vec<String> {
    let Some(slots) = slots() else {
        return Vec::new();
    };
    let Ok(mut record) = slots.record() else {
        return Vec::new();
    };
    let Some(target) = record.leave_at_reboot() else {
        return Vec::new();
    };
    if let Some(next) = record.next.as_mut() {
        next.leave_at_reboot = false;
    }
    if let Err(e) = slots.store(&record) {
        event(node, "failed", format!("updating the slot record: {e}"));
        return Vec::new();
    }
    let keep = |why: String| {
        event(
            node,
            "leaving",
            format!(
                "the release staged in slot {target} boots keeping the etcd membership and EPHEMERAL: {why}"
            ),
        );
        Vec::new()
    };
    if is_control_plane(node) && crate::etcd::has_data(node) {
        if let Err(e) = lease::check_quorum(node, false).await {
            return keep(e.to_string());
        }
        event(
            node,
            "leaving",
            "leaving the etcd cluster before booting the staged release (staged without --preserve)",
        );
        if let Err(e) = lease::leave_etcd(node).await {
            return keep(format!("leaving etcd failed: {e}"));
        }
    }
    event(
        node,
        "rebooting",
        format!("wiping EPHEMERAL before booting the staged release in slot {target}"),
    );
    vec![kiln_os_api::contract::LABEL_EPHEMERAL.to_owned()]
}

/// `rollback`: makes the other slot the default and reboots.
pub async fn rollback(node: Arc<Node>) -> Result<String, UpgradeError> {
    let slots = slots().ok_or(UpgradeError::NoSlots)?;
    if IN_PROGRESS.swap(true, Ordering::SeqCst) {
        return Err(UpgradeError::InProgress);
    }
    let busy = Busy;
    let mut record = slots.record()?;
    let target = record.rollback()?;
    slots.store(&record)?;
    let version = record
        .content(target)
        .map(|c| c.version.clone())
        .unwrap_or_default();
    event(
        node.as_ref(),
        "rollback",
        format!("rolling back: slot {target} ({version}) is the default; rebooting"),
    );
    tokio::spawn(async move {
        let _busy = busy;
        // Let the answer reach the caller first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        node.request_power(PowerRequest {
            power: Power::Reboot,
            wipe: vec![],
            reason: "rollback".into(),
        })
        .await;
    });
    Ok(version)
}

/// Runs once per boot: reports a failed attempt the launcher fell back from, and confirms (or
/// gives up on) a release on its one try.
pub async fn after_boot(node: Arc<Node>) {
    let Some(slots) = slots() else { return };
    let Ok(mut record) = slots.record() else {
        return;
    };
    if let Some(f) = record.last_failure.as_mut().filter(|f| !f.reported) {
        event(
            &node,
            "failed",
            format!(
                "the upgrade to {} failed: {}; running {} from slot {}",
                f.version,
                f.reason,
                os_version(),
                slots.booted()
            ),
        );
        f.reported = true;
        let _ = slots.store(&record);
    }
    let pending = record.pending_confirmation();
    if pending && record.next.as_ref().is_some_and(|n| n.leave_at_reboot) {
        event(
            &node,
            "booted",
            "this release was staged without --preserve, but the node did not reboot through \
             machined (a reset, crash or power cut): it kept its etcd membership and EPHEMERAL",
        );
    }
    if pending {
        event(
            &node,
            "booted",
            format!(
                "booted release {} from slot {} once; confirming once it runs{}",
                os_version(),
                slots.booted(),
                if is_control_plane_soon(&node) {
                    " and etcd is healthy"
                } else {
                    ""
                }
            ),
        );
    }
    let healthy = until(
        "the node running (and etcd healthy on a control-plane node)",
        Poll::every(Duration::from_secs(1), CONFIRM_TIMEOUT),
        || async {
            if node.stage() != Stage::Running {
                return Err(format!("the node is {}", node.stage().as_str()));
            }
            if is_control_plane(&node) {
                lease::local_etcd_healthy(&node).await?;
            }
            Ok(())
        },
    )
    .await;
    match healthy {
        Ok(()) => {
            if pending {
                let mut record = match slots.record() {
                    Ok(r) => r,
                    Err(e) => {
                        event(&node, "failed", format!("reading the slot record: {e}"));
                        return;
                    }
                };
                record.confirm();
                if let Err(e) = slots.store(&record) {
                    event(&node, "failed", format!("confirming the slot: {e}"));
                    return;
                }
                event(
                    &node,
                    "confirmed",
                    format!(
                        "release {} in slot {} is now permanent",
                        os_version(),
                        slots.booted()
                    ),
                );
            }
            if is_control_plane(&node)
                && let Ok(true) = lease::release(&node).await
            {
                event(&node, "leaseReleased", "released the upgrade lease");
            }
        }
        Err(e) if pending => {
            event(
                &node,
                "failed",
                format!(
                    "release {} did not come up: {e}; rebooting into the previous slot",
                    os_version()
                ),
            );
            node.request_power(PowerRequest {
                power: Power::Reboot,
                wipe: vec![],
                reason: "upgrade failed to come up".into(),
            })
            .await;
        }
        Err(_) => {}
    }
}

fn is_control_plane_soon(node: &Node) -> bool {
    is_control_plane(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_first_then_the_host() {
        let cfg: kiln_config::MachineConfig = serde_yaml::from_str(
            "version: v1alpha1\nmachine:\n  type: worker\n  registries:\n    mirrors:\n      reg.lab:\n        endpoints: [\"http://10.5.0.1:5000\"]\n      \"*\":\n        endpoints: [\"http://10.5.0.1:5001\"]\ncluster:\n  controlPlane:\n    endpoint: https://10.5.0.1:6443\n",
        )
        .unwrap();
        assert_eq!(
            endpoints(Some(&cfg), "reg.lab"),
            [
                "http://10.5.0.1:5000",
                "http://10.5.0.1:5001",
                "https://reg.lab"
            ]
        );
        assert_eq!(endpoints(None, "reg.lab"), ["https://reg.lab"]);
    }

    #[test]
    fn directory_slots_install_and_report_the_version() {
        let tmp = tempfile::tempdir().unwrap();
        let slots = DirectorySlots {
            dir: tmp.path().to_owned(),
            booted: Slot::A,
        };
        SlotRecord::fresh(SlotContent {
            version: "1.0".into(),
            source: "builtin".into(),
            builtin: true,
        })
        .store(tmp.path())
        .unwrap();
        assert_eq!(slots.version().as_deref(), Some("1.0"));
        let scratch = slots.scratch().unwrap();
        std::fs::create_dir_all(scratch.join("etc")).unwrap();
        std::fs::write(scratch.join(OS_RELEASE), "VERSION_ID=2.0\n").unwrap();
        slots.install(&scratch, Slot::B).unwrap();
        let b = DirectorySlots {
            dir: tmp.path().to_owned(),
            booted: Slot::B,
        };
        assert_eq!(b.version().as_deref(), Some("2.0"));
        assert!(!scratch.exists());
    }
}
