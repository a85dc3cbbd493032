//! The raw disk image: a GPT with the Kiln OS partitions (EFI, BOOT-A, BOOT-B, META, STATE,
//! EPHEMERAL), FAT file systems written at their offsets (`mkfs.vfat --offset`, mtools), and
//! systemd-boot with one loader entry per populated slot using boot counting. No loop device,
//! no mount, no root needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Bytes per sector of the image.
pub const SECTOR: u64 = 512;
/// Partitions start on 1 MiB boundaries.
const ALIGN: u64 = 2048;
/// Sectors GPT keeps at the end of the disk (backup header and table).
const GPT_TAIL: u64 = 34;

/// What a partition holds, as far as the builder is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The EFI system partition (FAT32): systemd-boot, loader entries, slot kernels.
    Esp,
    /// A FAT file system holding a slot's record.
    SlotRecord,
    /// Left zeroed: machined formats it (STATE, EPHEMERAL on first boot) or writes it raw (META).
    Empty,
}

/// One partition of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// GPT partition name, which machined looks volumes up by.
    pub label: &'static str,
    /// sgdisk type code (`ef00` EFI system, `8300` Linux file system).
    pub type_code: &'static str,
    /// Size in MiB; `None` takes the rest of the disk.
    pub size_mib: Option<u64>,
    /// What the builder writes into it.
    pub content: Content,
}

/// A partition placed on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The partition.
    pub partition: Partition,
    /// 1-based GPT index.
    pub number: usize,
    /// First sector.
    pub start: u64,
    /// Last sector (inclusive).
    pub end: u64,
}

impl Placed {
    /// Offset in bytes.
    pub fn offset(&self) -> u64 {
        self.start * SECTOR
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        (self.end + 1 - self.start) * SECTOR
    }
}

/// The disk: its size and partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    /// Total size in MiB.
    pub size_mib: u64,
    /// Partitions in GPT order.
    pub partitions: Vec<Partition>,
}

/// Why the disk image could not be built.
#[derive(Debug, Error)]
pub enum DiskError {
    /// The partitions do not fit.
    #[error(
        "a {size_mib} MiB disk cannot hold the partitions ({needed_mib} MiB before EPHEMERAL): \
         pass a larger --disk-size"
    )]
    TooSmall {
        /// The disk size asked for.
        size_mib: u64,
        /// What the fixed partitions need.
        needed_mib: u64,
    },
    /// A tool is not installed.
    #[error("{tool} is not installed: install {package} (scripts/install-deps)")]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that ships it.
        package: &'static str,
    },
    /// A tool failed.
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Tool {
        /// The program.
        tool: String,
        /// Its arguments.
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl DiskLayout {
    /// The Kiln OS layout on a disk of `size_mib` MiB: EFI 256 MiB (two slots of kernel and
    /// initramfs), BOOT-A/BOOT-B 8 MiB, META 1 MiB, STATE 100 MiB, EPHEMERAL the rest.
    pub fn kiln(size_mib: u64) -> Self {
        let p = |label, type_code, size_mib, content| Partition {
            label,
            type_code,
            size_mib,
            content,
        };
        DiskLayout {
            size_mib,
            partitions: vec![
                p("EFI", "ef00", Some(256), Content::Esp),
                p("BOOT-A", "8300", Some(8), Content::SlotRecord),
                p("BOOT-B", "8300", Some(8), Content::SlotRecord),
                p("META", "8300", Some(1), Content::Empty),
                p("STATE", "8300", Some(100), Content::Empty),
                p("EPHEMERAL", "8300", None, Content::Empty),
            ],
        }
    }

    /// Where each partition goes; partitions start on MiB boundaries.
    pub fn place(&self) -> Result<Vec<Placed>, DiskError> {
        let total = self.size_mib * 1024 * 1024 / SECTOR;
        let last_usable = total.saturating_sub(GPT_TAIL + 1);
        let fixed: u64 = self.partitions.iter().filter_map(|p| p.size_mib).sum();
        let too_small = || DiskError::TooSmall {
            size_mib: self.size_mib,
            needed_mib: fixed + 2,
        };
        let mut start = ALIGN;
        let mut placed = Vec::new();
        for (i, partition) in self.partitions.iter().enumerate() {
            let end = match partition.size_mib {
                Some(mib) => start + mib * 1024 * 1024 / SECTOR - 1,
                None => last_usable / ALIGN * ALIGN - 1,
            };
            if end > last_usable || end < start {
                return Err(too_small());
            }
            placed.push(Placed {
                partition: partition.clone(),
                number: i + 1,
                start,
                end,
            });
            start = end + 1;
        }
        Ok(placed)
    }
}

/// The file name of a slot's loader entry: `kiln-a+3.conf` with `tries` boots left (systemd-boot
/// counts down and renames it), or `kiln-a.conf` once blessed (`tries == None`).
pub fn entry_file_name(slot: char, tries: Option<u32>) -> String {
    let slot = slot.to_ascii_lowercase();
    match tries {
        Some(n) => format!("kiln-{slot}+{n}.conf"),
        None => format!("kiln-{slot}.conf"),
    }
}

/// `loader.conf`. It names no `default`: systemd-boot matches `default` against the file name
/// *including* the boot counter, and a default naming a new entry keeps booting it after its
/// tries are used up. Without one, the order decides: entries with no tries left sort last,
/// then `sort-key`, then the higher `version` first, so an upgraded slot boots first and a
/// failed one falls back to the other slot.
pub fn loader_conf() -> String {
    "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n".to_owned()
}

/// A slot's loader entry: `title`, `sort-key kiln`, `version`, kernel, initramfs and options.
pub fn loader_entry(slot: char, version: &str, cmdline: &str) -> String {
    let s = slot.to_ascii_lowercase();
    format!(
        "title Kiln OS {version} (slot {upper})\nsort-key kiln\nversion {version}\n\
         linux /kiln/{s}/vmlinuz\ninitrd /kiln/{s}/initramfs.zst\noptions {cmdline} kiln.slot={upper}\n",
        upper = slot.to_ascii_uppercase(),
    )
}

/// What goes onto the disk.
#[derive(Debug, Clone)]
pub struct DiskInputs {
    /// `systemd-bootx64.efi`.
    pub systemd_boot: PathBuf,
    /// The kernel (bzImage with EFI stub) for slot A.
    pub kernel: PathBuf,
    /// The initramfs for slot A.
    pub initramfs: PathBuf,
    /// The OS version in slot A.
    pub version: String,
    /// Kernel command line of the entries (without `kiln.slot`).
    pub cmdline: String,
    /// Boot tries of a fresh entry.
    pub tries: u32,
}

/// Builds the raw disk image at `path` (a sparse file). Slot A carries `inputs`; slot B is
/// empty until an upgrade writes it.
pub fn build(path: &Path, layout: &DiskLayout, inputs: &DiskInputs) -> Result<(), DiskError> {
    let placed = layout.place()?;
    let io = |source| DiskError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    file.set_len(layout.size_mib * 1024 * 1024).map_err(io)?;
    drop(file);

    let mut sgdisk = Command::new("sgdisk");
    sgdisk.arg("--clear");
    for p in &placed {
        let n = p.number;
        sgdisk
            .arg(format!("--new={n}:{}:{}", p.start, p.end))
            .arg(format!("--typecode={n}:{}", p.partition.type_code))
            .arg(format!("--change-name={n}:{}", p.partition.label));
    }
    sgdisk.arg(path);
    run(&mut sgdisk, "gdisk")?;

    let staging = tempdir_in(path)?;
    for p in &placed {
        match p.partition.content {
            Content::Empty => {}
            Content::Esp => {
                mkfs_vfat(path, p, 32)?;
                let root = staging.join("esp");
                write_esp(&root, inputs)?;
                mcopy_tree(path, p, &root)?;
            }
            Content::SlotRecord => {
                mkfs_vfat(path, p, 16)?;
                let slot = p.partition.label.trim_start_matches("BOOT-");
                let root = staging.join(p.partition.label);
                let record = if slot == "A" {
                    format!("slot: A\nversion: {}\n", inputs.version)
                } else {
                    format!("slot: {slot}\n")
                };
                write(&root.join("slot.yaml"), record.as_bytes())?;
                mcopy_tree(path, p, &root)?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

fn write_esp(root: &Path, inputs: &DiskInputs) -> Result<(), DiskError> {
    let copy = |from: &Path, to: &Path| -> Result<(), DiskError> {
        if let Some(dir) = to.parent() {
            create_dir(dir)?;
        }
        std::fs::copy(from, to)
            .map(drop)
            .map_err(|source| DiskError::Io {
                path: from.to_owned(),
                source,
            })
    };
    copy(
        &inputs.systemd_boot,
        &root.join("EFI/systemd/systemd-bootx64.efi"),
    )?;
    // The removable-media path: firmware with empty boot variables (a fresh OVMF_VARS) runs it.
    copy(&inputs.systemd_boot, &root.join("EFI/BOOT/BOOTX64.EFI"))?;
    copy(&inputs.kernel, &root.join("kiln/a/vmlinuz"))?;
    copy(&inputs.initramfs, &root.join("kiln/a/initramfs.zst"))?;
    create_dir(&root.join("kiln/b"))?;
    write(&root.join("loader/loader.conf"), loader_conf().as_bytes())?;
    write(
        &root
            .join("loader/entries")
            .join(entry_file_name('a', Some(inputs.tries))),
        loader_entry('a', &inputs.version, &inputs.cmdline).as_bytes(),
    )?;
    Ok(())
}

fn mkfs_vfat(image: &Path, p: &Placed, fat_bits: u32) -> Result<(), DiskError> {
    let mut cmd = Command::new("mkfs.vfat");
    // mkfs.vfat sizes clusters for the whole file, not the partition, when given an offset:
    // choose them here. Readers (mtools, the spec) tell FAT12/16/32 apart by the cluster count
    // alone, so FAT32 needs at least 65525 clusters and FAT16 at most 65524.
    let sectors = p.size() / SECTOR;
    let mut per_cluster: u64 = 1;
    match fat_bits {
        32 => {
            per_cluster = 8;
            while per_cluster > 1 && sectors / per_cluster < 66_000 {
                per_cluster /= 2;
            }
        }
        _ => {
            while sectors / per_cluster > 65_000 {
                per_cluster *= 2;
            }
        }
    }
    cmd.arg("-F")
        .arg(fat_bits.to_string())
        .arg("-s")
        .arg(per_cluster.to_string());
    cmd.arg(format!("--offset={}", p.start))
        .arg("-n")
        .arg(p.partition.label)
        .arg(image)
        // mkfs.vfat takes the size in 1 KiB blocks.
        .arg((p.size() / 1024).to_string());
    run(&mut cmd, "dosfstools").map(drop)
}

/// Copies the contents of `root` into the FAT file system of partition `p` with mtools.
fn mcopy_tree(image: &Path, p: &Placed, root: &Path) -> Result<(), DiskError> {
    let target = format!("{}@@{}", image.display(), p.offset());
    let entries = std::fs::read_dir(root).map_err(|source| DiskError::Io {
        path: root.to_owned(),
        source,
    })?;
    let mut cmd = Command::new("mcopy");
    cmd.env("MTOOLS_SKIP_CHECK", "1")
        .arg("-s")
        .arg("-Q")
        .arg("-i")
        .arg(&target);
    let mut any = false;
    for e in entries {
        let e = e.map_err(|source| DiskError::Io {
            path: root.to_owned(),
            source,
        })?;
        cmd.arg(e.path());
        any = true;
    }
    if !any {
        return Ok(());
    }
    cmd.arg("::/");
    run(&mut cmd, "mtools").map(drop)
}

/// Runs `cmd`, turning a missing program or a failure into a [`DiskError`].
pub(crate) fn run(cmd: &mut Command, package: &'static str) -> Result<Vec<u8>, DiskError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let args = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%tool, %args, "running");
    let out = cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DiskError::MissingTool {
                tool: tool.clone(),
                package,
            }
        } else {
            DiskError::Io {
                path: PathBuf::from(&tool),
                source,
            }
        }
    })?;
    if !out.status.success() {
        return Err(DiskError::Tool {
            tool,
            args,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

fn create_dir(dir: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(dir).map_err(|source| DiskError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn write(path: &Path, data: &[u8]) -> Result<(), DiskError> {
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    std::fs::write(path, data).map_err(|source| DiskError::Io {
        path: path.to_owned(),
        source,
    })
}

/// A scratch directory beside `path` (same file system, removed by the caller).
fn tempdir_in(path: &Path) -> Result<PathBuf, DiskError> {
    let dir = path.with_extension(format!("staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    create_dir(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kiln_layout_is_aligned_and_fills_the_disk() {
        let placed = DiskLayout::kiln(1024).place().unwrap();
        let labels: Vec<_> = placed.iter().map(|p| p.partition.label).collect();
        assert_eq!(
            labels,
            ["EFI", "BOOT-A", "BOOT-B", "META", "STATE", "EPHEMERAL"]
        );
        for w in placed.windows(2) {
            assert_eq!(w[0].end + 1, w[1].start);
        }
        for p in &placed {
            assert_eq!(p.start % ALIGN, 0, "{}", p.partition.label);
        }
        assert_eq!(placed[0].size(), 256 << 20);
        let last = placed.last().unwrap();
        assert!(last.end < 1024 * 2048 - GPT_TAIL);
        assert_eq!(last.size(), (1024 - 1 - 256 - 8 - 8 - 1 - 100 - 1) << 20);
    }

    #[test]
    fn a_disk_too_small_says_what_it_needs() {
        let err = DiskLayout::kiln(300).place().unwrap_err();
        assert!(matches!(
            err,
            DiskError::TooSmall {
                needed_mib: 375,
                ..
            }
        ));
    }

    #[test]
    fn entries_carry_a_boot_counter_until_blessed() {
        assert_eq!(entry_file_name('A', Some(3)), "kiln-a+3.conf");
        assert_eq!(entry_file_name('b', None), "kiln-b.conf");
        let entry = loader_entry('a', "0.1.0-abc", "console=ttyS0");
        assert!(entry.contains("linux /kiln/a/vmlinuz\n"));
        assert!(entry.contains("options console=ttyS0 kiln.slot=A\n"));
        assert!(!loader_conf().contains("default"));
    }
}
