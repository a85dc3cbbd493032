//! Volumes on `metal`: GPT partitions found by their partition name (STATE, EPHEMERAL, META)
//! in sysfs, given an ext4 file system on first boot (`mke2fs`), mounted where the other
//! platforms keep their directories. `reset` wipes a volume by making a new file system.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MsFlags, mount, umount};

use crate::platform::PlatformError;

/// ext4's superblock magic, at byte 1080 of the partition.
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];
const EXT_MAGIC_OFFSET: u64 = 1080;

/// The block device whose GPT partition name is `label`, from `/sys/class/block/*/uevent`.
pub fn find_partition(sys_block: &Path, label: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    for e in entries.flatten() {
        let Ok(uevent) = std::fs::read_to_string(e.path().join("uevent")) else {
            continue;
        };
        let field = |k: &str| {
            uevent
                .lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .map(str::to_owned)
        };
        if field("PARTNAME").as_deref() == Some(label)
            && let Some(dev) = field("DEVNAME")
        {
            return Some(Path::new("/dev").join(dev));
        }
    }
    None
}

/// Whether `device` holds an ext2/3/4 file system.
pub fn has_filesystem(device: &Path) -> std::io::Result<bool> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::File::open(device)?;
    f.seek(SeekFrom::Start(EXT_MAGIC_OFFSET))?;
    let mut magic = [0u8; 2];
    f.read_exact(&mut magic)?;
    Ok(magic == EXT_MAGIC)
}

fn io_error(label: &str, device: &Path, what: String) -> PlatformError {
    PlatformError::PrepareVolumes {
        root: device.to_path_buf(),
        source: std::io::Error::other(format!("{label}: {what}")),
    }
}

/// Makes a fresh ext4 file system labelled `label` on `device`.
pub fn format(label: &str, device: &Path) -> Result<(), PlatformError> {
    let out = Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            label,
            "-E",
            "lazy_itable_init=1",
        ])
        .arg(device)
        .output()
        .map_err(|e| io_error(label, device, format!("running mke2fs: {e}")))?;
    if !out.status.success() {
        return Err(io_error(
            label,
            device,
            format!(
                "mke2fs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Mounts `device` (ext4) at `target`, creating the directory.
pub fn mount_ext4(label: &str, device: &Path, target: &Path) -> Result<(), PlatformError> {
    std::fs::create_dir_all(target).map_err(|source| PlatformError::PrepareVolumes {
        root: target.to_path_buf(),
        source,
    })?;
    mount(
        Some(device),
        target,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| {
        io_error(
            label,
            device,
            format!("mounting at {}: {e}", target.display()),
        )
    })
}

/// Finds, formats when empty, and mounts the volume `label` at `target`.
pub fn prepare(sys_block: &Path, label: &str, target: &Path) -> Result<PathBuf, PlatformError> {
    let device = find_partition(sys_block, label).ok_or_else(|| PlatformError::PrepareVolumes {
        root: sys_block.to_path_buf(),
        source: std::io::Error::other(format!(
            "no partition named {label}: boot the node with the Kiln disk image (kiln image build writes disk.raw) attached as a virtio disk"
        )),
    })?;
    let formatted = has_filesystem(&device).map_err(|source| PlatformError::PrepareVolumes {
        root: device.clone(),
        source,
    })?;
    if !formatted {
        tracing::info!(volume = label, device = %device.display(), "first boot: formatting");
        format(label, &device)?;
    }
    mount_ext4(label, &device, target)?;
    Ok(device)
}

/// Wipes the volume mounted at `target` from `device`: a new file system when it can be
/// unmounted, otherwise (something still holds it) by emptying it.
pub fn wipe(label: &str, device: &Path, target: &Path) -> Result<bool, PlatformError> {
    match umount(target) {
        Ok(()) => {
            format(label, device)?;
            mount_ext4(label, device, target)?;
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(volume = label, error = %e, "cannot unmount; emptying it instead");
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_found_by_name_not_by_device() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, name) in [("vda1", "EFI"), ("vda5", "STATE"), ("vda6", "EPHEMERAL")] {
            let d = sys.path().join(dev);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("uevent"),
                format!("MAJOR=254\nMINOR=5\nDEVNAME={dev}\nDEVTYPE=partition\nPARTN=5\nPARTNAME={name}\n"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(sys.path().join("vda")).unwrap();
        std::fs::write(sys.path().join("vda/uevent"), "DEVNAME=vda\nDEVTYPE=disk\n").unwrap();
        assert_eq!(
            find_partition(sys.path(), "STATE"),
            Some(PathBuf::from("/dev/vda5"))
        );
        assert_eq!(find_partition(sys.path(), "META"), None);
    }

    #[test]
    fn a_zeroed_partition_has_no_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(!has_filesystem(&img).unwrap());
        let mut bytes = vec![0u8; 4096];
        bytes[1080] = 0x53;
        bytes[1081] = 0xef;
        std::fs::write(&img, bytes).unwrap();
        assert!(has_filesystem(&img).unwrap());
    }
}
