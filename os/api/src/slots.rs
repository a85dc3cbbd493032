//! The A/B boot slots of nodes whose "bootloader" is their node launcher (`process` and
//! `container`, and `metal` with `--with-bootloader=false`): the slot record both sides read
//! and write, and the rules the launcher follows at every power-on.
//!
//! A node's boot directory holds two slot directories, `a` and `b`, each an unpacked
//! installer (`usr/bin/machined`, `usr/bin/etcd`, `usr/bin/etcdctl`, `etc/os-release`), and
//! `slots.json`, the record. The rules are systemd-boot's boot counting, with one try:
//!
//! - a slot marked to boot once (`next`, tries left > 0) is booted and its try is used up;
//! - a slot marked to boot once whose try is used up was booted and never confirmed (machined
//!   confirms after the node reaches Running): the launcher records the failed attempt and
//!   boots the default slot again;
//! - otherwise the default slot boots.
//!
//! machined (the running release) marks the inactive slot to boot once after writing it
//! ([`SlotRecord::boot_once`]), confirms it once Running ([`SlotRecord::confirm`]), and swaps
//! the default for `rollback` ([`SlotRecord::rollback`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable the launcher sets for machined: the node's boot directory.
pub const BOOT_DIR_ENV: &str = "KILN_BOOT_DIR";
/// Environment variable the launcher sets for machined: the slot this boot came from.
pub const BOOT_SLOT_ENV: &str = "KILN_BOOT_SLOT";
/// The record's file name inside the boot directory.
pub const RECORD: &str = "slots.json";
/// machined inside a slot.
pub const MACHINED: &str = "usr/bin/machined";
/// etcd inside a slot.
pub const ETCD: &str = "usr/bin/etcd";
/// etcdctl inside a slot.
pub const ETCDCTL: &str = "usr/bin/etcdctl";
/// The release description inside a slot (`VERSION_ID=...`).
pub const OS_RELEASE: &str = "etc/os-release";
/// Kernel argument a metal node's launcher adds with the slot it booted (`kiln.slot=b`).
pub const SLOT_ARG: &str = "kiln.slot";
/// The serial of the virtio disk holding a metal node's slots (the qemu launcher's boot disk:
/// a FAT file system with the layout of a boot directory).
pub const BOOT_DISK_SERIAL: &str = "kiln-boot";
/// Where machined mounts that disk (not under `/run/kiln`, which every boot empties).
pub const BOOT_MOUNT: &str = "/boot";

/// How long a new release has to reach Running (and etcd health) before its machined reboots
/// back to the old slot.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);
/// How long a launcher waits for a new release to confirm before it resets the node itself
/// (a release that hangs before its machined's own timer can act): [`CONFIRM_TIMEOUT`] and a
/// minute, unless this environment variable of the launcher says otherwise (seconds).
pub const WATCHDOG_ENV: &str = "KILN_BOOT_WATCHDOG_SECS";

/// The launcher's watchdog (see [`WATCHDOG_ENV`]).
pub fn watchdog() -> std::time::Duration {
    std::env::var(WATCHDOG_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(
            CONFIRM_TIMEOUT + std::time::Duration::from_secs(60),
            std::time::Duration::from_secs,
        )
}

/// A note machined leaves in the boot directory when it ends a boot on purpose (`rebooted`),
/// for a bootloader that cannot see how the previous boot ended (a container's entrypoint).
pub const LAST_END: &str = "last-end";

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a` or `b` (the directory name).
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// Parses `a` or `b` (any case).
    pub fn parse(s: &str) -> Option<Slot> {
        match s.to_ascii_lowercase().as_str() {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotContent {
    /// The OS version.
    pub version: String,
    /// The installer it came from (reference and digest), or `builtin`.
    pub source: String,
    /// The release is the `kiln` binary's own machined (`kiln machined`), not files in the
    /// slot: a cluster created without `--install-image`.
    #[serde(default)]
    pub builtin: bool,
}

/// A slot marked to boot once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextBoot {
    /// The slot.
    pub slot: Slot,
    /// Boots left before it counts as failed.
    pub tries_left: u32,
    /// Staged without `--preserve`: when machined reboots the node into this slot it first
    /// leaves etcd (a control-plane node) and wipes EPHEMERAL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leave_at_reboot: bool,
}

/// A boot of a new release that never confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedBoot {
    /// The slot.
    pub slot: Slot,
    /// Its version.
    pub version: String,
    /// Why it counts as failed.
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub unix_millis: u64,
    /// machined has put it into its events.
    #[serde(default)]
    pub reported: bool,
}

/// The slot record (`slots.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// The slot that boots when nothing else is marked.
    pub default: Slot,
    /// Slot A's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a: Option<SlotContent>,
    /// Slot B's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<SlotContent>,
    /// A slot to boot once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<NextBoot>,
    /// The slot the launcher booted last.
    pub booted: Slot,
    /// The last failed boot of a new release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailedBoot>,
}

/// Why the slot record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The record is not valid JSON of the expected shape.
    #[error("{path} is not a slot record ({source}); remove it to start over from slot A")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The other slot holds no release (nothing to roll back to).
    #[error(
        "slot {slot} holds no release, so there is nothing to roll back to (a node rolls back only after an upgrade)"
    )]
    EmptySlot {
        /// The empty slot.
        slot: Slot,
    },
}

/// What the launcher boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootChoice {
    /// The slot.
    pub slot: Slot,
    /// Its content.
    pub content: Option<SlotContent>,
    /// Set when this power-on gave up on a new release.
    pub fell_back: Option<FailedBoot>,
    /// The record's default slot (what a fallback boots).
    pub default: Slot,
}

/// The rule every launcher follows after [`SlotRecord::choose`]: `choose` applies it to the
/// stored record with the reason the previous boot ended (and stores the record back);
/// `start` starts the choice. A new release that cannot even start counts as a failed boot:
/// `failed_why` describes the error, and the choice is made again with that reason, which
/// falls back to the default slot. A failure of the default slot (or of `choose`) is returned.
pub fn start_chosen<T, E>(
    why: &str,
    mut choose: impl FnMut(&str) -> Result<BootChoice, E>,
    mut start: impl FnMut(&BootChoice) -> Result<T, E>,
    failed_why: impl Fn(&E) -> String,
) -> Result<T, E> {
    let mut why = why.to_owned();
    loop {
        let choice = choose(&why)?;
        match start(&choice) {
            Err(e) if choice.slot != choice.default => why = failed_why(&e),
            result => return result,
        }
    }
}

impl SlotRecord {
    /// A fresh record: slot A holds `content` and boots.
    pub fn fresh(content: SlotContent) -> Self {
        SlotRecord {
            default: Slot::A,
            a: Some(content),
            b: None,
            next: None,
            booted: Slot::A,
            last_failure: None,
        }
    }

    /// The content of `slot`.
    pub fn content(&self, slot: Slot) -> Option<&SlotContent> {
        match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }

    /// Sets the content of `slot`.
    pub fn set_content(&mut self, slot: Slot, content: Option<SlotContent>) {
        match slot {
            Slot::A => self.a = content,
            Slot::B => self.b = content,
        }
    }

    /// The launcher's rules at power-on (see the module documentation). `why` describes how the
    /// previous boot ended, for the failure record.
    pub fn choose(&mut self, why: &str, unix_millis: u64) -> BootChoice {
        let mut fell_back = None;
        match self.next.clone() {
            Some(next) if next.tries_left > 0 && self.content(next.slot).is_some() => {
                self.next = Some(NextBoot {
                    slot: next.slot,
                    tries_left: next.tries_left - 1,
                    leave_at_reboot: next.leave_at_reboot,
                });
                self.booted = next.slot;
            }
            Some(next) => {
                let failure = FailedBoot {
                    slot: next.slot,
                    version: self
                        .content(next.slot)
                        .map(|c| c.version.clone())
                        .unwrap_or_default(),
                    reason: format!(
                        "slot {} was booted once and did not reach Running ({why}); booted slot {} again",
                        next.slot, self.default
                    ),
                    unix_millis,
                    reported: false,
                };
                self.last_failure = Some(failure.clone());
                fell_back = Some(failure);
                self.next = None;
                // A release that failed to boot is nothing to roll back to.
                if next.slot != self.default {
                    self.set_content(next.slot, None);
                }
                self.booted = self.default;
            }
            None => self.booted = self.default,
        }
        BootChoice {
            slot: self.booted,
            content: self.content(self.booted).cloned(),
            fell_back,
            default: self.default,
        }
    }

    /// The slot an upgrade writes: the one that is not the default.
    pub fn inactive(&self) -> Slot {
        self.default.other()
    }

    /// Marks `slot` (just written with `content`) to boot once.
    pub fn boot_once(&mut self, slot: Slot, content: SlotContent) {
        self.set_content(slot, Some(content));
        self.next = Some(NextBoot {
            slot,
            tries_left: 1,
            leave_at_reboot: false,
        });
    }

    /// The staged slot whose reboot must first leave etcd and wipe EPHEMERAL, if one is
    /// waiting for its boot.
    pub fn leave_at_reboot(&self) -> Option<Slot> {
        self.next
            .as_ref()
            .filter(|n| n.leave_at_reboot && n.tries_left > 0)
            .map(|n| n.slot)
    }

    /// Whether this boot is the one try of a new release, not yet confirmed.
    pub fn pending_confirmation(&self) -> bool {
        self.next
            .as_ref()
            .is_some_and(|n| n.slot == self.booted && n.tries_left == 0)
    }

    /// Makes the booted slot the default (after the new release reached Running).
    pub fn confirm(&mut self) {
        self.default = self.booted;
        self.next = None;
    }

    /// Makes the other slot the default for the next power-on (`rollback`).
    pub fn rollback(&mut self) -> Result<Slot, SlotError> {
        let target = self.booted.other();
        if self.content(target).is_none() {
            return Err(SlotError::EmptySlot { slot: target });
        }
        self.default = target;
        self.next = None;
        Ok(target)
    }

    /// The record in `boot_dir`, `None` when there is none yet.
    pub fn load(boot_dir: &Path) -> Result<Option<SlotRecord>, SlotError> {
        let path = boot_dir.join(RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| SlotError::Malformed { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SlotError::Io { path, source }),
        }
    }

    /// Writes the record into `boot_dir` atomically (a temporary file renamed over it).
    pub fn store(&self, boot_dir: &Path) -> Result<(), SlotError> {
        let path = boot_dir.join(RECORD);
        let tmp = boot_dir.join(format!(".{RECORD}.tmp"));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| SlotError::Io { path: p, source }
        };
        // Serializing plain fields cannot fail.
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::create_dir_all(boot_dir).map_err(io(boot_dir))?;
        std::fs::write(&tmp, json).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }
}

/// The `VERSION_ID` of an os-release text.
pub fn os_release_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix("VERSION_ID=")
            .map(|v| v.trim().trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(v: &str) -> SlotContent {
        SlotContent {
            version: v.into(),
            source: format!("reg/installer:{v}"),
            builtin: false,
        }
    }

    #[test]
    fn a_new_release_boots_once_then_is_confirmed() {
        let mut r = SlotRecord::fresh(content("1"));
        assert_eq!(r.choose("power-on", 0).slot, Slot::A);
        let target = r.inactive();
        assert_eq!(target, Slot::B);
        r.boot_once(target, content("2"));
        let c = r.choose("reboot", 0);
        assert_eq!((c.slot, c.fell_back), (Slot::B, None));
        assert!(r.pending_confirmation());
        r.confirm();
        assert!(!r.pending_confirmation());
        assert_eq!(r.choose("reboot", 0).slot, Slot::B);
        assert_eq!(r.inactive(), Slot::A);
    }

    #[test]
    fn an_unconfirmed_boot_falls_back_and_is_recorded() {
        let mut r = SlotRecord::fresh(content("1"));
        r.boot_once(Slot::B, content("2"));
        assert_eq!(r.choose("reboot", 0).slot, Slot::B);
        let c = r.choose("exit status 1", 42);
        assert_eq!(c.slot, Slot::A);
        let failure = c.fell_back.unwrap();
        assert_eq!((failure.slot, failure.version.as_str()), (Slot::B, "2"));
        assert!(
            failure.reason.contains("exit status 1"),
            "{}",
            failure.reason
        );
        assert_eq!(r.last_failure.as_ref().unwrap().unix_millis, 42);
        // And it stays on A afterwards, with nothing to roll back to.
        assert_eq!(r.choose("reboot", 0).slot, Slot::A);
        assert!(r.next.is_none());
        assert!(r.content(Slot::B).is_none());
        assert!(matches!(r.rollback(), Err(SlotError::EmptySlot { .. })));
    }

    #[test]
    fn rollback_swaps_the_default_and_needs_a_release_there() {
        let mut r = SlotRecord::fresh(content("1"));
        r.choose("power-on", 0);
        assert!(matches!(
            r.rollback(),
            Err(SlotError::EmptySlot { slot: Slot::B })
        ));
        r.boot_once(Slot::B, content("2"));
        r.choose("reboot", 0);
        r.confirm();
        assert_eq!(r.rollback().unwrap(), Slot::A);
        assert_eq!(r.choose("reboot", 0).slot, Slot::A);
        assert_eq!(r.content(Slot::A).unwrap().version, "1");
    }

    #[test]
    fn the_record_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("kiln-slots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(SlotRecord::load(&dir).unwrap(), None);
        let mut r = SlotRecord::fresh(content("1"));
        r.boot_once(Slot::B, content("2"));
        r.store(&dir).unwrap();
        assert_eq!(SlotRecord::load(&dir).unwrap(), Some(r));
        std::fs::write(dir.join(RECORD), "{").unwrap();
        assert!(matches!(
            SlotRecord::load(&dir),
            Err(SlotError::Malformed { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn os_release_gives_the_version() {
        let text = "NAME=\"Kiln OS\"\nID=kiln\nVERSION_ID=\"0.2.0\"\n";
        assert_eq!(os_release_version(text).as_deref(), Some("0.2.0"));
        assert_eq!(os_release_version("ID=kiln\n"), None);
    }

    #[test]
    fn a_slot_staged_without_preserve_asks_to_leave_only_before_its_boot() {
        let mut r = SlotRecord::fresh(content("1"));
        r.boot_once(Slot::B, content("2"));
        assert_eq!(
            r.leave_at_reboot(),
            None,
            "an unstaged boot-once leaves nothing"
        );
        r.next.as_mut().unwrap().leave_at_reboot = true;
        assert_eq!(r.leave_at_reboot(), Some(Slot::B));
        let back = serde_json::from_slice::<SlotRecord>(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r, "the mark survives the record file");
        let choice = r.choose("rebooted", 0);
        assert_eq!(choice.slot, Slot::B);
        assert_eq!(
            r.leave_at_reboot(),
            None,
            "booted: nothing is left to do before it"
        );
        assert!(
            r.next.as_ref().unwrap().leave_at_reboot,
            "machined still sees the mark"
        );
    }

    #[test]
    fn a_new_release_that_cannot_start_falls_back_and_a_default_that_cannot_start_is_an_error() {
        let mut r = SlotRecord::fresh(content("v1"));
        r.boot_once(Slot::B, content("v2"));
        let mut tried = Vec::new();
        let booted = start_chosen(
            "reboot",
            |why| Ok::<_, String>(r.choose(why, 7)),
            |c| {
                tried.push(c.slot);
                if c.slot == Slot::B {
                    Err("no machined".to_owned())
                } else {
                    Ok(c.clone())
                }
            },
            |e| format!("starting its machined failed: {e}"),
        )
        .unwrap();
        assert_eq!(tried, [Slot::B, Slot::A]);
        assert_eq!(booted.slot, Slot::A);
        let failure = booted.fell_back.expect("the fallback is recorded");
        assert_eq!(failure.slot, Slot::B);
        assert!(failure.reason.contains("no machined"), "{}", failure.reason);
        assert_eq!(
            r.content(Slot::B),
            None,
            "a release that failed is not kept"
        );

        let err = start_chosen(
            "power-on",
            |why| Ok::<_, String>(r.choose(why, 8)),
            |_| Err::<(), _>("broken".to_owned()),
            |e| e.clone(),
        )
        .unwrap_err();
        assert_eq!(err, "broken");
    }
}
