//! The kernel: where Debian's cloud kernel and its modules live, and the uncompressed `vmlinux`
//! cut out of a bzImage (QEMU boots it through PVH, skipping the in-guest decompression that
//! costs seconds under TCG).

use std::path::{Path, PathBuf};

use thiserror::Error;

/// A kernel image and the module tree built with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    /// The bzImage (`vmlinuz`).
    pub vmlinuz: PathBuf,
    /// The module tree (`/usr/lib/modules/<release>`), holding `modules.dep`.
    pub modules: PathBuf,
    /// The kernel release (the module tree's directory name).
    pub release: String,
}

/// Why no kernel could be found or read.
#[derive(Debug, Error)]
pub enum KernelError {
    /// No cloud kernel is installed.
    #[error(
        "no Debian cloud kernel found (looked for {boot}/vmlinuz-*-cloud-amd64 with a module tree \
         in {modules}): install linux-image-cloud-amd64 from bookworm-backports \
         (scripts/install-deps), or pass --kernel and --modules"
    )]
    NotInstalled {
        /// Where kernels were looked for.
        boot: PathBuf,
        /// Where module trees were looked for.
        modules: PathBuf,
    },
    /// The module tree has no `modules.dep`.
    #[error(
        "{path} has no modules.dep: pass the module tree of the kernel (/usr/lib/modules/<release>) with --modules, after running depmod for it"
    )]
    NoModulesDep {
        /// The module tree.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a bzImage this code understands.
    #[error("{path} is not a bzImage with boot protocol 2.08 or later: {reason}")]
    NotBzImage {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: &'static str,
    },
    /// The payload is not zstd (the kernel was built with another compression).
    #[error(
        "the payload of {path} is not zstd-compressed (magic {magic}): only zstd payloads can be \
         extracted to a vmlinux; boot the bzImage instead"
    )]
    NotZstd {
        /// The file.
        path: PathBuf,
        /// The payload's first bytes, in hex.
        magic: String,
    },
    /// The payload could not be decompressed.
    #[error("decompressing the payload of {path}: {source}")]
    Decompress {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl KernelSource {
    /// The newest Debian cloud kernel under `boot` whose module tree is under `modules_root`
    /// (normally `/boot` and `/usr/lib/modules`).
    pub fn debian_cloud(boot: &Path, modules_root: &Path) -> Result<Self, KernelError> {
        let not_installed = || KernelError::NotInstalled {
            boot: boot.to_owned(),
            modules: modules_root.to_owned(),
        };
        let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(boot)
            .map_err(|_| not_installed())?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let release = name.strip_prefix("vmlinuz-")?.to_owned();
                release
                    .ends_with("-cloud-amd64")
                    .then(|| (release, e.path()))
            })
            .filter(|(release, _)| modules_root.join(release).join("modules.dep").is_file())
            .collect();
        found.sort_by(|a, b| compare_versions(&a.0, &b.0));
        let (release, vmlinuz) = found.pop().ok_or_else(not_installed)?;
        Ok(KernelSource {
            vmlinuz,
            modules: modules_root.join(&release),
            release,
        })
    }

    /// A custom kernel (`--kernel`) with its module tree (`--modules`).
    pub fn custom(vmlinuz: PathBuf, modules: PathBuf) -> Result<Self, KernelError> {
        if !modules.join("modules.dep").is_file() {
            return Err(KernelError::NoModulesDep { path: modules });
        }
        let release = modules
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(KernelSource {
            vmlinuz,
            modules,
            release,
        })
    }
}

/// Orders kernel releases like `6.1.0-37-cloud-amd64` < `6.12.95+deb12-cloud-amd64`: numbers
/// compare as numbers, everything else as text.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, &str>> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .map(|p| p.parse::<u64>().map_err(|_| p))
            .collect()
    }
    parts(a).cmp(&parts(b))
}

/// The uncompressed kernel (`vmlinux`, an ELF with a PVH entry point) inside the bzImage `data`
/// read from `path`. Reads the payload's place from the boot protocol header
/// (`setup_sects` at 0x1f1, `payload_offset`/`payload_length` at 0x248/0x24c).
pub fn extract_vmlinux(path: &Path, data: &[u8]) -> Result<Vec<u8>, KernelError> {
    let bad = |reason| KernelError::NotBzImage {
        path: path.to_owned(),
        reason,
    };
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?))
    };
    if data.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad("no HdrS signature at 0x202"));
    }
    let version = data
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(bad("truncated header"))?;
    if version < 0x0208 {
        return Err(bad("boot protocol older than 2.08 has no payload fields"));
    }
    let setup_sects = match data.get(0x1f1).copied().ok_or(bad("truncated header"))? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512;
    let offset = u32_at(0x248).ok_or(bad("truncated header"))? as usize;
    let length = u32_at(0x24c).ok_or(bad("truncated header"))? as usize;
    let payload = data
        .get(start + offset..start + offset + length)
        .ok_or(bad("payload lies outside the file"))?;
    if !payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(KernelError::NotZstd {
            path: path.to_owned(),
            magic: hex::encode(&payload[..payload.len().min(4)]),
        });
    }
    // The kernel appends the uncompressed size (4 bytes) after the frame: read one frame only.
    let mut out = Vec::with_capacity(length * 4);
    let mut decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(|source| KernelError::Decompress {
            path: path.to_owned(),
            source,
        })?
        .single_frame();
    std::io::copy(&mut decoder, &mut out).map_err(|source| KernelError::Decompress {
        path: path.to_owned(),
        source,
    })?;
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF file"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_sort_numerically() {
        let mut v = vec![
            "6.12.95+deb12-cloud-amd64",
            "6.1.0-37-cloud-amd64",
            "6.12.9+deb12-cloud-amd64",
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            [
                "6.1.0-37-cloud-amd64",
                "6.12.9+deb12-cloud-amd64",
                "6.12.95+deb12-cloud-amd64"
            ]
        );
    }

    #[test]
    fn a_file_without_a_boot_header_is_refused() {
        let err = extract_vmlinux(Path::new("x"), &[0u8; 4096]).unwrap_err();
        assert!(matches!(err, KernelError::NotBzImage { .. }));
    }

    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; 0x600];
        d[0x1f1] = 1; // one setup sector: protected-mode code at 0x400
        d[0x202..0x206].copy_from_slice(b"HdrS");
        d[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        d[0x248..0x24c].copy_from_slice(&0x200u32.to_le_bytes());
        d[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        d.extend(payload);
        d.extend(&[1, 2, 3, 4]); // the size trailer the kernel appends
        d
    }

    #[test]
    fn the_zstd_payload_is_extracted_from_its_header_offsets() {
        let elf = b"\x7fELF and then the kernel".repeat(10);
        let payload = zstd::encode_all(&elf[..], 3).unwrap();
        let image = fake_bzimage(&payload);
        assert_eq!(extract_vmlinux(Path::new("x"), &image).unwrap(), elf);
    }

    #[test]
    fn a_gzip_payload_is_named_as_such() {
        let image = fake_bzimage(&[0x1f, 0x8b, 8, 0, 0, 0]);
        let err = extract_vmlinux(Path::new("x"), &image).unwrap_err();
        assert!(matches!(err, KernelError::NotZstd { ref magic, .. } if magic == "1f8b0800"));
    }
}
