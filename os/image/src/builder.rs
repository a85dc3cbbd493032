//! `kiln image build`: gathers the inputs (kernel, modules, init, etcd, tools and the libraries
//! they link), digests them, and — unless an image with the same inputs exists — writes the
//! kernel, `vmlinux`, initramfs, disk image and installer into a new store directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tracing::instrument;

use crate::disk::{self, DiskError, DiskInputs, DiskLayout};
use crate::elf::{self, ElfError};
use crate::initramfs::{Entry, Initramfs, InitramfsError};
use crate::kernel::{self, KernelError, KernelSource};
use crate::modules::{self, ModulesError};
use crate::oci::{self, InstallerInputs, OciError};
use crate::store::{self, ImageManifest, Output, StoreError};

/// Kernel arguments of the disk's loader entries: the serial console, and a panic that resets
/// at once (QEMU runs with `-no-reboot`, so the launcher sees the guest stop).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Bumped when the builder changes what it writes for the same inputs.
const FORMAT: &str = "kiln-image/2";

/// Output names inside an image directory.
pub mod names {
    /// The kernel (bzImage, EFI stub).
    pub const VMLINUZ: &str = "vmlinuz";
    /// The uncompressed kernel (PVH boot).
    pub const VMLINUX: &str = "vmlinux";
    /// The initramfs.
    pub const INITRAMFS: &str = "initramfs.zst";
    /// The raw GPT disk image.
    pub const DISK: &str = "disk.raw";
    /// The installer OCI image layout.
    pub const INSTALLER: &str = "installer";
}

/// Reports the steps of a build (a spinner on a terminal, plain lines otherwise: the caller's
/// choice).
pub trait Progress {
    /// A long step starts.
    fn step(&self, what: &str);
    /// A detail under the current step.
    fn note(&self, line: &str);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn step(&self, _: &str) {}
    fn note(&self, _: &str) {}
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The store root (`~/.kiln/images`); the image goes into `<root>/<version>/`.
    pub root: PathBuf,
    /// The version; default `<crate version>-<first 12 hex digits of the inputs digest>`.
    pub version: Option<String>,
    /// Kernel and module tree.
    pub kernel: KernelSource,
    /// The program at `/init` (machined, or the reference init).
    pub init: PathBuf,
    /// Strip debug information from the init (`objcopy --strip-debug`) to keep the initramfs
    /// small; the digest is of the unstripped file.
    pub strip_init: bool,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `etcdctl`.
    pub etcdctl: PathBuf,
    /// `mke2fs` (machined formats STATE and EPHEMERAL with it).
    pub mke2fs: PathBuf,
    /// Modules to pack (with their dependencies).
    pub modules: Vec<String>,
    /// Build the disk image.
    pub disk: bool,
    /// Disk size in MiB.
    pub disk_size_mib: u64,
    /// `systemd-bootx64.efi`.
    pub systemd_boot: PathBuf,
    /// Kernel arguments of the disk's loader entries.
    pub cmdline: String,
    /// Boot tries of a fresh loader entry.
    pub boot_tries: u32,
    /// Build the installer image.
    pub installer: bool,
    /// Rebuild even when an image with the same inputs exists.
    pub force: bool,
    /// zstd level of the initramfs.
    pub zstd_level: i32,
}

impl BuildOptions {
    /// Defaults for Debian: `/usr/bin/etcd`, `/usr/bin/etcdctl`, `/usr/sbin/mke2fs`,
    /// systemd-boot from systemd-boot-efi, the node modules, a 2 GiB disk, an installer.
    pub fn new(root: PathBuf, kernel: KernelSource, init: PathBuf) -> Self {
        BuildOptions {
            root,
            version: None,
            kernel,
            init,
            strip_init: true,
            etcd: "/usr/bin/etcd".into(),
            etcdctl: "/usr/bin/etcdctl".into(),
            mke2fs: "/usr/sbin/mke2fs".into(),
            modules: modules::NODE_MODULES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            disk: true,
            disk_size_mib: 2048,
            systemd_boot: "/usr/lib/systemd/boot/efi/systemd-bootx64.efi".into(),
            cmdline: DEFAULT_CMDLINE.to_owned(),
            boot_tries: 3,
            installer: true,
            force: false,
            zstd_level: 3,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: ImageManifest,
    /// `true` when an image with the same inputs already existed and nothing was written.
    pub up_to_date: bool,
}

impl Built {
    /// Path of an output (see [`names`]).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Why a build failed.
#[derive(Debug, Error)]
pub enum BuildError {
    /// An input file is missing or unreadable.
    #[error("input {name} ({path}): {source}")]
    Input {
        /// Which input.
        name: String,
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The kernel.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The modules.
    #[error(transparent)]
    Modules(#[from] ModulesError),
    /// The shared libraries.
    #[error(transparent)]
    Libraries(#[from] ElfError),
    /// The initramfs.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// The disk image.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The installer.
    #[error(transparent)]
    Installer(#[from] OciError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing into the store.
    #[error("writing {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Builds (or finds up to date) the image `opts` describes.
#[instrument(skip_all, fields(root = %opts.root.display()))]
pub fn build(opts: &BuildOptions, progress: &dyn Progress) -> Result<Built, BuildError> {
    progress.step("Resolving inputs");
    let wanted: Vec<&str> = opts.modules.iter().map(String::as_str).collect();
    let module_set = modules::resolve(&opts.kernel.modules, &wanted)?;
    let bins = [
        opts.init.as_path(),
        opts.etcd.as_path(),
        opts.etcdctl.as_path(),
        opts.mke2fs.as_path(),
    ];
    let libraries = elf::needed_libraries(&bins, &elf::default_dirs())?;

    // name → path of every file whose content goes into the image.
    let mut inputs: BTreeMap<String, PathBuf> = BTreeMap::new();
    inputs.insert("kernel".into(), opts.kernel.vmlinuz.clone());
    inputs.insert("init".into(), opts.init.clone());
    inputs.insert("etcd".into(), opts.etcd.clone());
    inputs.insert("etcdctl".into(), opts.etcdctl.clone());
    inputs.insert("mke2fs".into(), opts.mke2fs.clone());
    if opts.disk {
        inputs.insert("systemd-boot".into(), opts.systemd_boot.clone());
    }
    for lib in &libraries {
        inputs.insert(format!("lib:{}", lib.display()), lib.clone());
    }
    for m in &module_set.files {
        inputs.insert(format!("module:{m}"), opts.kernel.modules.join(m));
    }
    let mut digests = BTreeMap::new();
    for (name, path) in &inputs {
        let d = store::digest_file(path).map_err(|source| BuildError::Input {
            name: name.clone(),
            path: path.clone(),
            source,
        })?;
        digests.insert(name.clone(), d);
    }
    let settings = format!(
        "{FORMAT}\nrelease={}\nmodules={}\nstrip={}\ndisk={}:{}\ncmdline={}\ntries={}\ninstaller={}\nzstd={}\n",
        opts.kernel.release,
        module_set.dep_lines.join(";"),
        opts.strip_init,
        opts.disk,
        opts.disk_size_mib,
        opts.cmdline,
        opts.boot_tries,
        opts.installer,
        opts.zstd_level,
    );
    let mut summary = settings.clone();
    for (name, d) in &digests {
        summary.push_str(&format!("{name}\t{d}\n"));
    }
    let inputs_digest = store::digest_bytes(summary.as_bytes());
    digests.insert("settings".into(), store::digest_bytes(settings.as_bytes()));
    let version = opts.version.clone().unwrap_or_else(|| {
        let hex = inputs_digest.trim_start_matches("sha256:");
        format!("{}-{}", env!("CARGO_PKG_VERSION"), &hex[..12])
    });
    let dir = opts.root.join(&version);

    if !opts.force
        && let Some(existing) = store::read_manifest(&dir)?
        && existing.inputs_digest == inputs_digest
        && store::outputs_present(&dir, &existing)
    {
        progress.note(&format!("{version} is up to date in {}", dir.display()));
        return Ok(Built {
            dir,
            manifest: existing,
            up_to_date: true,
        });
    }

    let work = opts
        .root
        .join(format!(".build-{version}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Write { path, source }
    };
    std::fs::create_dir_all(&work).map_err(write_err(&work))?;
    let result = build_into(&work, opts, &version, &module_set, &libraries, progress);
    let (outputs, installer_digest) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    let manifest = ImageManifest {
        version: version.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kernel_release: opts.kernel.release.clone(),
        inputs_digest,
        inputs: digests,
        outputs,
        modules: module_set.files.clone(),
        libraries: libraries.iter().map(|p| p.display().to_string()).collect(),
        installer_digest,
    };
    let manifest_path = work.join(store::MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BuildError::Write {
        path: manifest_path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&manifest_path, json).map_err(write_err(&manifest_path))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(write_err(&dir))?;
    }
    std::fs::rename(&work, &dir).map_err(write_err(&dir))?;
    progress.note(&format!("built {version} in {}", dir.display()));
    Ok(Built {
        dir,
        manifest,
        up_to_date: false,
    })
}

type Outputs = (Vec<Output>, Option<String>);

fn build_into(
    work: &Path,
    opts: &BuildOptions,
    version: &str,
    module_set: &modules::ModuleSet,
    libraries: &std::collections::BTreeSet<PathBuf>,
    progress: &dyn Progress,
) -> Result<Outputs, BuildError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Write { path, source }
    };
    let mut outputs = Vec::new();
    let mut record = |name: &str, digest: bool| -> Result<(), BuildError> {
        let path = work.join(name);
        let size = std::fs::metadata(&path).map_err(write_err(&path))?.len();
        let digest = if digest {
            Some(store::digest_file(&path).map_err(write_err(&path))?)
        } else {
            None
        };
        outputs.push(Output {
            name: name.to_owned(),
            size,
            digest,
        });
        Ok(())
    };

    progress.step("Extracting the kernel");
    let vmlinuz = work.join(names::VMLINUZ);
    std::fs::copy(&opts.kernel.vmlinuz, &vmlinuz).map_err(|source| BuildError::Input {
        name: "kernel".into(),
        path: opts.kernel.vmlinuz.clone(),
        source,
    })?;
    let bz = std::fs::read(&vmlinuz).map_err(write_err(&vmlinuz))?;
    match kernel::extract_vmlinux(&opts.kernel.vmlinuz, &bz) {
        Ok(vmlinux) => {
            let path = work.join(names::VMLINUX);
            std::fs::write(&path, vmlinux).map_err(write_err(&path))?;
            record(names::VMLINUX, true)?;
        }
        // A custom kernel compressed otherwise still boots as a bzImage.
        Err(e @ KernelError::NotZstd { .. }) => progress.note(&format!("no vmlinux: {e}")),
        Err(e) => return Err(e.into()),
    }
    record(names::VMLINUZ, true)?;

    progress.step("Packing the initramfs");
    let mut fs = Initramfs::new();
    let init = if opts.strip_init {
        strip(&opts.init, &work.join(".init"), progress)
    } else {
        opts.init.clone()
    };
    fs.add(
        "init",
        Entry::File {
            source: init,
            mode: 0o755,
        },
    );
    fs.add(
        "usr/bin/etcd",
        Entry::File {
            source: opts.etcd.clone(),
            mode: 0o755,
        },
    );
    fs.add(
        "usr/bin/etcdctl",
        Entry::File {
            source: opts.etcdctl.clone(),
            mode: 0o755,
        },
    );
    fs.add(
        "usr/sbin/mke2fs",
        Entry::File {
            source: opts.mke2fs.clone(),
            mode: 0o755,
        },
    );
    for lib in libraries {
        fs.add(
            &lib.to_string_lossy(),
            Entry::File {
                source: lib.clone(),
                mode: 0o755,
            },
        );
    }
    let mod_root = format!("usr/lib/modules/{}", opts.kernel.release);
    // Unpacked here, once, rather than by the kernel at every boot (about 3.5 s for these
    // modules under TCG); the initramfs' zstd compresses them instead.
    for m in &module_set.files {
        let source = opts.kernel.modules.join(m);
        let data = modules::unpacked(&source).map_err(|source| BuildError::Input {
            name: format!("module {m}"),
            path: opts.kernel.modules.join(m),
            source,
        })?;
        fs.add(
            &format!("{mod_root}/{}", modules::unpacked_name(m)),
            Entry::Bytes { data, mode: 0o644 },
        );
    }
    let mut dep = module_set
        .dep_lines
        .iter()
        .map(|l| modules::unpacked_dep_line(l))
        .collect::<Vec<_>>()
        .join("\n");
    dep.push('\n');
    fs.add(
        &format!("{mod_root}/modules.dep"),
        Entry::Bytes {
            data: dep.into_bytes(),
            mode: 0o644,
        },
    );
    let builtin = opts.kernel.modules.join("modules.builtin");
    if builtin.is_file() {
        fs.add(
            &format!("{mod_root}/modules.builtin"),
            Entry::File {
                source: builtin,
                mode: 0o644,
            },
        );
    }
    fs.add(
        "etc/os-release",
        Entry::Bytes {
            data: oci::os_release(version).into_bytes(),
            mode: 0o644,
        },
    );
    let initramfs = work.join(names::INITRAMFS);
    let file = std::fs::File::create(&initramfs).map_err(write_err(&initramfs))?;
    let file = fs.write_zstd(std::io::BufWriter::new(file), opts.zstd_level)?;
    file.into_inner()
        .map_err(|e| BuildError::Write {
            path: initramfs.clone(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(write_err(&initramfs))?;
    let _ = std::fs::remove_file(work.join(".init"));
    record(names::INITRAMFS, true)?;

    if opts.disk {
        progress.step("Writing the disk image");
        disk::build(
            &work.join(names::DISK),
            &DiskLayout::kiln(opts.disk_size_mib),
            &DiskInputs {
                systemd_boot: opts.systemd_boot.clone(),
                kernel: vmlinuz.clone(),
                initramfs: initramfs.clone(),
                version: version.to_owned(),
                cmdline: opts.cmdline.clone(),
                tries: opts.boot_tries,
            },
        )?;
        record(names::DISK, false)?;
    }

    let mut installer_digest = None;
    if opts.installer {
        progress.step("Writing the installer image");
        let dir = work.join(names::INSTALLER);
        installer_digest = Some(oci::write_installer(
            &dir,
            &InstallerInputs {
                version,
                machined: &opts.init,
                etcd: &opts.etcd,
                etcdctl: &opts.etcdctl,
                boot: Some((&vmlinuz, &initramfs)),
            },
        )?);
        outputs.push(Output {
            name: names::INSTALLER.to_owned(),
            size: 0,
            digest: installer_digest.clone(),
        });
    }
    Ok((outputs, installer_digest))
}

/// A copy of `bin` without debug information at `to`, or `bin` itself when `objcopy` is
/// missing or fails (the image still works, only larger).
pub(crate) fn strip(bin: &Path, to: &Path, progress: &dyn Progress) -> PathBuf {
    let out = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(to)
        .output();
    match out {
        Ok(o) if o.status.success() => to.to_owned(),
        Ok(o) => {
            progress.note(&format!(
                "not stripping {}: objcopy: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            bin.to_owned()
        }
        Err(e) => {
            progress.note(&format!("not stripping {}: objcopy: {e}", bin.display()));
            bin.to_owned()
        }
    }
}
