//! The boot disk of a qemu node and the launcher's part as its bootloader (direct kernel
//! boot). The disk is a FAT file system in `<state>/<node>/boot.img` with the layout of a
//! process node's boot directory ([`kiln_os_api::slots`]: `slots.json`, `a/`, `b/`, each slot
//! an unpacked installer), attached as a second virtio disk with serial
//! [`BOOT_DISK_SERIAL`]; machined mounts it at `/boot` when the kernel command line
//! names the booted slot (`kiln.slot=`), and upgrades write the inactive slot there.
//!
//! The launcher reads and writes it with mtools only while QEMU is off: at every power-on it
//! applies the slot rules ([`SlotRecord::choose`]) and boots the chosen slot's kernel and
//! initramfs (`usr/install/amd64/`), or the image's for the built-in release.
//!
//! The disk is made once, when the launcher first starts; a release `cluster create
//! --install-image` seeded into the node's boot directory on the host is copied into it then.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_os_api::slots::{BootChoice, SLOT_ARG, SlotRecord};

pub use kiln_os_api::slots::BOOT_DISK_SERIAL;

use crate::state::StateDir;

/// The size of the file system: two slots of a metal release (kernel, initramfs and the
/// binaries: about 110 MiB each) and the scratch space of a pull. Sparse on the host.
pub const SIZE_MIB: u64 = 512;
/// The kernel inside a slot.
pub const KERNEL: &str = "usr/install/amd64/vmlinuz";
/// The initramfs inside a slot.
pub const INITRAMFS: &str = "usr/install/amd64/initramfs.zst";

/// The boot disk of `node`.
pub fn path(dir: &StateDir, node: &str) -> PathBuf {
    dir.node_root(node).join("boot.img")
}

fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // A FAT file system without a partition table: no geometry checks.
    cmd.env("MTOOLS_SKIP_CHECK", "1");
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: running {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what}: {:?} failed: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Makes the boot disk of `node` if it has none yet, with what `seed` (the node's boot
/// directory on the host, filled by `--install-image`) holds.
pub fn ensure(image: &Path, seed: &Path) -> Result<(), String> {
    if image.exists() {
        return Ok(());
    }
    if let Some(parent) = image.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let tmp = image.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    run(
        tool("mkfs.vfat")
            .args(["-C", "-F", "32", "-n", "KILNBOOT"])
            .arg(&tmp)
            .arg((SIZE_MIB * 1024).to_string()),
        "making the boot disk (dosfstools)",
    )?;
    let entries: Vec<PathBuf> = std::fs::read_dir(seed)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if !entries.is_empty() {
        run(
            tool("mcopy")
                .args(["-s", "-Q", "-i"])
                .arg(&tmp)
                .args(&entries)
                .arg("::/"),
            "copying the installed release onto the boot disk (mtools)",
        )?;
    }
    std::fs::rename(&tmp, image).map_err(|e| format!("{}: {e}", image.display()))
}

/// Copies `inside` (a path in the file system) out to `dest`.
fn get(image: &Path, inside: &str, dest: &Path) -> Result<(), String> {
    run(
        tool("mcopy")
            .args(["-o", "-n", "-i"])
            .arg(image)
            .arg(format!("::/{inside}"))
            .arg(dest),
        &format!("reading {inside} from {}", image.display()),
    )
}

/// The slot record on the disk, `None` when there is none yet.
fn load(image: &Path, scratch: &Path) -> Result<Option<SlotRecord>, String> {
    let dest = scratch.join("slots.json");
    let _ = std::fs::remove_file(&dest);
    if get(image, kiln_os_api::slots::RECORD, &dest).is_err() {
        return Ok(None);
    }
    let bytes = std::fs::read(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("the slot record on {} is malformed: {e}", image.display()))
}

fn store(image: &Path, scratch: &Path, record: &SlotRecord) -> Result<(), String> {
    let file = scratch.join("slots.json");
    let json = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    std::fs::write(&file, json).map_err(|e| format!("{}: {e}", file.display()))?;
    run(
        tool("mcopy")
            .args(["-o", "-n", "-i"])
            .arg(image)
            .arg(&file)
            .arg(format!("::/{}", kiln_os_api::slots::RECORD)),
        &format!("writing the slot record to {}", image.display()),
    )
}

/// What the launcher boots: the slot, and the kernel and initramfs to load (`None`: the
/// image's, for the built-in release).
#[derive(Debug)]
pub struct Booted {
    /// The choice.
    pub choice: BootChoice,
    /// The slot's kernel and initramfs, copied out into the scratch directory.
    pub files: Option<(PathBuf, PathBuf)>,
}

impl Booted {
    /// The kernel argument naming the slot.
    pub fn cmdline_arg(&self) -> String {
        format!("{SLOT_ARG}={}", self.choice.slot.name())
    }
}

/// Applies the boot rules at power-on (`why`: how the previous boot ended) and copies the
/// chosen slot's kernel and initramfs out into `scratch`. A new release whose files cannot be
/// read counts as a failed boot: the default slot boots instead.
pub fn choose(image: &Path, scratch: &Path, why: &str) -> Result<Booted, String> {
    std::fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    kiln_os_api::slots::start_chosen(
        why,
        |why| {
            let mut record = load(image, scratch)?
                .unwrap_or_else(|| SlotRecord::fresh(crate::install::builtin_release()));
            let choice = record.choose(why, crate::install::now_millis());
            store(image, scratch, &record)?;
            Ok(choice)
        },
        |choice| {
            if choice.content.as_ref().is_none_or(|c| c.builtin) {
                return Ok(Booted {
                    choice: choice.clone(),
                    files: None,
                });
            }
            let slot = choice.slot;
            let copy = |inside: &str, name: &str| -> Result<PathBuf, String> {
                let dest = scratch.join(format!("{}-{name}", slot.name()));
                get(image, &format!("{}/{inside}", slot.name()), &dest)?;
                Ok(dest)
            };
            let kernel = copy(KERNEL, "vmlinuz")?;
            Ok(Booted {
                choice: choice.clone(),
                files: Some((kernel, copy(INITRAMFS, "initramfs.zst")?)),
            })
        },
        |e| {
            format!(
                "its kernel or initramfs cannot be read ({e}); an installer for metal nodes comes from `kiln image build --push`"
            )
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kiln_os_api::slots::{Slot, SlotContent};

    #[test]
    fn the_launcher_boots_a_new_release_once_from_the_disk_then_falls_back() {
        // dosfstools and mtools: a required tier never skips.
        kiln_test_tiers::skip_unless!(kiln_test_tiers::Tier::ImageTools);
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("boot.img");
        let seed = tmp.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        ensure(&image, &seed).unwrap();
        let scratch = tmp.path().join("scratch");

        let first = choose(&image, &scratch, "power-on").unwrap();
        assert_eq!(first.choice.slot, Slot::A);
        assert!(
            first.files.is_none(),
            "the built-in release boots the image's kernel"
        );
        assert_eq!(first.cmdline_arg(), "kiln.slot=a");

        // What machined does in the guest: a release in slot B, marked to boot once.
        let release = tmp.path().join("b");
        std::fs::create_dir_all(release.join("usr/install/amd64")).unwrap();
        std::fs::write(release.join(KERNEL), b"kernel").unwrap();
        std::fs::write(release.join(INITRAMFS), b"initramfs").unwrap();
        run(
            tool("mcopy")
                .args(["-s", "-Q", "-i"])
                .arg(&image)
                .arg(&release)
                .arg("::/"),
            "test",
        )
        .unwrap();
        let mut record = load(&image, &scratch).unwrap().unwrap();
        record.boot_once(
            Slot::B,
            SlotContent {
                version: "2".into(),
                source: "test".into(),
                builtin: false,
            },
        );
        store(&image, &scratch, &record).unwrap();

        let once = choose(&image, &scratch, "rebooted").unwrap();
        assert_eq!(once.choice.slot, Slot::B);
        let (kernel, initrd) = once.files.unwrap();
        assert_eq!(std::fs::read(kernel).unwrap(), b"kernel");
        assert_eq!(std::fs::read(initrd).unwrap(), b"initramfs");

        // Never confirmed: the next power-on falls back and records why.
        let back = choose(&image, &scratch, "rebooted (guest-panic)").unwrap();
        assert_eq!(back.choice.slot, Slot::A);
        let failed = back.choice.fell_back.unwrap();
        assert!(failed.reason.contains("guest-panic"), "{}", failed.reason);
        assert_eq!(back.choice.default, Slot::A);
    }

    #[test]
    fn a_release_without_a_kernel_counts_as_a_failed_boot() {
        // dosfstools and mtools: a required tier never skips.
        kiln_test_tiers::skip_unless!(kiln_test_tiers::Tier::ImageTools);
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("boot.img");
        let seed = tmp.path().join("seed");
        std::fs::create_dir_all(seed.join("b/usr/bin")).unwrap();
        std::fs::write(seed.join("b/usr/bin/machined"), b"x").unwrap();
        let mut record = SlotRecord::fresh(crate::install::builtin_release());
        record.boot_once(
            Slot::B,
            SlotContent {
                version: "2".into(),
                source: "kiln image installer".into(),
                builtin: false,
            },
        );
        record.store(&seed).unwrap();
        ensure(&image, &seed).unwrap();
        let booted = choose(&image, &tmp.path().join("scratch"), "power-on").unwrap();
        assert_eq!(booted.choice.slot, Slot::A);
        assert!(
            booted
                .choice
                .fell_back
                .unwrap()
                .reason
                .contains("kiln image build --push")
        );
    }
}
