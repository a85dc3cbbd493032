//! The image builder end to end: a reference image (the bare etcd init at `/init`) is built
//! once, checked with independent tools (cpio, sgdisk, mtools), and booted under QEMU: directly
//! to etcd healthy with the node's QMP power switch, and through OVMF and systemd-boot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use kiln_image::builder::names;
use kiln_image::reference_init::HEALTHY_MARKER;
use kiln_image::{BuildOptions, Built, KernelSource, Quiet};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_provisioner::provision::qemu::accel::{self, Accel, ProbeGuest as _, QemuProbe};
use kiln_provisioner::provision::qemu::launch::{Boot, NodeLaunch, OVMF_CODE, OVMF_VARS};
use kiln_provisioner::provision::qemu::qmp::{Qmp, RunState};
use kiln_test_tiers::Tier;

/// One reference image for every test of this binary.
struct Shared {
    _root: tempfile::TempDir,
    built: Built,
}

fn options(root: &Path) -> anyhow::Result<BuildOptions> {
    let kernel = KernelSource::debian_cloud("/boot".as_ref(), "/usr/lib/modules".as_ref())?;
    let mut opts = BuildOptions::new(
        root.to_owned(),
        kernel,
        PathBuf::from(env!("CARGO_BIN_EXE_kiln-etcd-init")),
    );
    opts.disk_size_mib = 512;
    Ok(opts)
}

fn image() -> &'static Built {
    static IMAGE: OnceLock<Shared> = OnceLock::new();
    &IMAGE
        .get_or_init(|| {
            let root = tempfile::tempdir().expect("tempdir");
            let opts = options(root.path()).expect("kernel");
            let built = kiln_image::build(&opts, &Quiet).expect("build the reference image");
            Shared { _root: root, built }
        })
        .built
}

/// QEMU guests run one at a time (the machine has two shared cores).
fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    static GUEST: Mutex<()> = Mutex::new(());
    GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_image_is_well_formed_and_rebuilt_only_when_inputs_change() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Kernel, Tier::ImageTools);
    let built = image();
    assert!(!built.up_to_date);

    // The initramfs, listed by cpio(1) after zstd(1): no shell, everything the node needs.
    let listing = run(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | cpio -t --quiet",
        built.path(names::INITRAMFS).display()
    )))?;
    let files: Vec<&str> = listing.lines().collect();
    let release = &built.manifest.kernel_release;
    for want in [
        "init",
        "dev/console",
        "usr/bin/etcd",
        "usr/bin/etcdctl",
        "usr/sbin/mke2fs",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libext2fs.so.2",
        &format!("usr/lib/modules/{release}/modules.dep"),
        &format!("usr/lib/modules/{release}/kernel/drivers/net/virtio_net.ko"),
        &format!("usr/lib/modules/{release}/kernel/net/core/failover.ko"),
        &format!("usr/lib/modules/{release}/kernel/drivers/block/virtio_blk.ko"),
        &format!("usr/lib/modules/{release}/kernel/net/8021q/8021q.ko"),
        &format!("usr/lib/modules/{release}/kernel/net/802/mrp.ko"),
        &format!("usr/lib/modules/{release}/kernel/drivers/net/bonding/bonding.ko"),
        &format!("usr/lib/modules/{release}/kernel/net/tls/tls.ko"),
        &format!("usr/lib/modules/{release}/kernel/net/bridge/bridge.ko"),
    ] {
        assert!(
            files.contains(&want),
            "{want} missing from the initramfs: {files:?}"
        );
    }
    // Modules are packed decompressed (the kernel need not unpack them at every boot), and
    // modules.dep names them so.
    let extract = |path: &str| {
        run(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc '{}' | cpio -i --quiet --to-stdout '{path}' | head -c 4 | od -An -c",
            built.path(names::INITRAMFS).display()
        )))
    };
    let magic = extract(&format!(
        "usr/lib/modules/{release}/kernel/net/bridge/bridge.ko"
    ))?;
    assert!(
        magic.contains("E   L   F"),
        "bridge.ko is not an ELF file: {magic}"
    );
    let dep = run(Command::new("sh").arg("-c").arg(format!(
        "zstd -dc '{}' | cpio -i --quiet --to-stdout 'usr/lib/modules/{release}/modules.dep'",
        built.path(names::INITRAMFS).display()
    )))?;
    assert!(
        dep.contains("kernel/net/bridge/bridge.ko: ") && !dep.contains(".xz"),
        "modules.dep: {dep}"
    );
    assert!(
        !files.iter().any(|f| f.ends_with(".ko.xz")),
        "a compressed module in the initramfs: {files:?}"
    );
    for shell in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "usr/bin/bash",
        "bin/busybox",
    ] {
        assert!(
            !files.contains(&shell),
            "the initramfs has a shell: {shell}"
        );
    }
    assert!(
        built
            .manifest
            .modules
            .iter()
            .position(|m| m.ends_with("/llc.ko.xz"))
            < built
                .manifest
                .modules
                .iter()
                .position(|m| m.ends_with("/bridge.ko.xz")),
        "dependencies load first: {:?}",
        built.manifest.modules
    );

    // The vmlinux is the ELF inside the bzImage.
    let vmlinux = std::fs::read(built.path(names::VMLINUX))?;
    assert!(vmlinux.starts_with(b"\x7fELF"));
    assert!(vmlinux.len() as u64 > std::fs::metadata(built.path(names::VMLINUZ))?.len());

    // The GPT, as sgdisk prints it.
    let disk = built.path(names::DISK);
    let table = run(Command::new("sgdisk").arg("-p").arg(&disk))?;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("Number"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let names_codes: Vec<(&str, &str)> = rows.iter().map(|r| (r[6], r[5])).collect();
    assert_eq!(
        names_codes,
        [
            ("EFI", "EF00"),
            ("BOOT-A", "8300"),
            ("BOOT-B", "8300"),
            ("META", "8300"),
            ("STATE", "8300"),
            ("EPHEMERAL", "8300")
        ],
        "{table}"
    );

    // The EFI partition, read with mtools at its offset (first partition at 1 MiB).
    let esp = format!("{}@@1048576", disk.display());
    let tree = run(Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-/", "-b", "-i", &esp, "::/"]))?;
    for want in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/EFI/systemd/systemd-bootx64.efi",
        "::/loader/loader.conf",
        "::/loader/entries/kiln-a+3.conf",
        "::/kiln/a/vmlinuz",
        "::/kiln/a/initramfs.zst",
    ] {
        assert!(
            tree.lines().any(|l| l.eq_ignore_ascii_case(want)),
            "{want} missing from the EFI partition:\n{tree}"
        );
    }
    let entry = run(Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        &esp,
        "::/loader/entries/kiln-a+3.conf",
    ]))?;
    assert!(entry.contains("linux /kiln/a/vmlinuz"), "{entry}");
    assert!(
        entry.contains(&format!("version {}", built.manifest.version)),
        "{entry}"
    );
    assert!(entry.contains("kiln.slot=A"), "{entry}");
    let loader = run(Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        &esp,
        "::/loader/loader.conf",
    ]))?;
    assert!(!loader.contains("default"), "{loader}");
    let boot_a = format!("{}@@{}", disk.display(), (1 + 256) << 20);
    let record = run(Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        &boot_a,
        "::/slot.yaml",
    ]))?;
    assert!(record.contains(&built.manifest.version), "{record}");

    // The installer image layout.
    let index = std::fs::read_to_string(built.path(names::INSTALLER).join("index.json"))?;
    assert!(index.contains(&built.manifest.version), "{index}");

    // Same inputs: nothing is rebuilt. Another setting: a new version beside the first.
    let root = built.dir.parent().context("image root")?;
    let mut opts = options(root)?;
    let again = kiln_image::build(&opts, &Quiet)?;
    assert!(again.up_to_date);
    assert_eq!(again.manifest.version, built.manifest.version);
    opts.disk = false;
    opts.installer = false;
    let other = kiln_image::build(&opts, &Quiet)?;
    assert!(!other.up_to_date);
    assert_ne!(other.manifest.version, built.manifest.version);
    let listed: Vec<String> = kiln_image::list(root)?
        .into_iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&built.manifest.version));
    Ok(())
}

/// A QEMU process that is killed however the test ends.
struct Guest {
    child: Child,
    console: PathBuf,
    qmp: PathBuf,
    monitor: PathBuf,
    /// Scratch directory (sockets, console, disk copy), removed after QEMU is gone.
    dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn start(
        boot: impl FnOnce(&Path) -> anyhow::Result<(Boot, Option<PathBuf>)>,
        extra: &[&str],
    ) -> anyhow::Result<Guest> {
        let dir = tempfile::tempdir()?;
        let (boot, disk) = boot(dir.path())?;
        let launch = NodeLaunch {
            qemu: "qemu-system-x86_64".into(),
            name: "image-test".into(),
            memory_mib: 512,
            cpus: 1,
            accel: Accel::Tcg,
            boot,
            disk,
            boot_disk: None,
            nics: vec![],
            console_log: dir.path().join("console.log"),
            qmp_socket: dir.path().join("qmp.sock"),
            monitor_socket: dir.path().join("monitor.sock"),
        };
        let child = Command::new("nice")
            .arg("-n10")
            .arg(&launch.qemu)
            .args(launch.args())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Guest {
            child,
            console: launch.console_log,
            qmp: launch.qmp_socket,
            monitor: launch.monitor_socket,
            dir,
        })
    }

    fn wait_for_console(&mut self, what: &str, timeout: Duration) -> anyhow::Result<String> {
        let console = self.console.clone();
        let child = &mut self.child;
        until_blocking(
            format!("{what:?} on the console"),
            Poll::every(Duration::from_millis(100), timeout),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    return Ok(Err(format!("QEMU exited ({status})")));
                }
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                if text.contains(what) {
                    Ok(Ok(text))
                } else {
                    Err(text.lines().last().unwrap_or("").to_owned())
                }
            },
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}\n--- console ---\n{}",
                std::fs::read_to_string(&self.console).unwrap_or_default()
            )
        })?
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}\n--- console ---\n{}",
                std::fs::read_to_string(&self.console).unwrap_or_default()
            )
        })
    }
}

/// Sends one line to the human monitor and returns what it printed until the next prompt.
fn monitor(path: &Path, line: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_to_prompt =
        |s: &mut std::os::unix::net::UnixStream, out: &mut Vec<u8>| -> anyhow::Result<()> {
            while !String::from_utf8_lossy(out).trim_end().ends_with("(qemu)") {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    bail!("monitor closed");
                }
                out.extend_from_slice(&buf[..n]);
            }
            Ok(())
        };
    read_to_prompt(&mut s, &mut out)?;
    out.clear();
    writeln!(s, "{line}")?;
    read_to_prompt(&mut s, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn the_kernel_boots_to_etcd_healthy_and_obeys_the_power_switch() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Qemu, Tier::Kernel, Tier::ImageTools);
    let built = image();
    let _one = one_guest();
    let mut guest = Guest::start(
        |_| {
            Ok((
                Boot::Direct {
                    kernel: built.path(names::VMLINUX),
                    initrd: built.path(names::INITRAMFS),
                    extra_cmdline: "quiet".into(),
                },
                None,
            ))
        },
        // A NIC without a tap (no root needed) for set_link.
        &[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,id=nic0,netdev=net0",
        ],
    )?;
    let console = guest.wait_for_console(HEALTHY_MARKER, Duration::from_secs(60))?;
    println!(
        "{}",
        console
            .lines()
            .find(|l| l.contains(HEALTHY_MARKER))
            .unwrap_or("")
    );

    let mut qmp = Qmp::connect(&guest.qmp, Duration::from_secs(10))?;
    let status = qmp.status()?;
    assert!(
        status.running && status.state == RunState::running,
        "{status:?}"
    );
    qmp.pause()?;
    assert_eq!(qmp.status()?.state, RunState::paused);
    qmp.resume()?;
    assert_eq!(qmp.status()?.state, RunState::running);

    // QEMU takes the link change for the NIC it has and refuses one it has not.
    qmp.set_link("nic0", false)?;
    qmp.set_link("nic0", true)?;
    assert!(qmp.set_link("nic9", false).is_err());
    // The human monitor socket answers (the guides' `echo q` quick reboot goes there).
    let info = monitor(&guest.monitor, "info status")?;
    assert!(info.contains("VM status: running"), "{info}");

    qmp.quit()?;
    let child = &mut guest.child;
    let status = until_blocking(
        "QEMU to exit after quit",
        Poll::every(Duration::from_millis(50), Duration::from_secs(10)),
        || {
            child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_owned())
        },
    )?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn uefi_boots_the_slot_entry_through_systemd_boot() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Qemu, Tier::Kernel, Tier::ImageTools);
    let built = image();
    let _one = one_guest();
    let mut guest = Guest::start(
        |dir| {
            // Each node writes its own variable store and disk (boot counting renames entries).
            let vars = dir.join("vars.fd");
            std::fs::copy(OVMF_VARS, &vars)?;
            let disk = dir.join("disk.raw");
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(built.path(names::DISK))
                .arg(&disk))?;
            Ok((
                Boot::Uefi {
                    code: OVMF_CODE.into(),
                    vars,
                },
                Some(disk),
            ))
        },
        &[],
    )?;
    let console = guest.wait_for_console(HEALTHY_MARKER, Duration::from_secs(90))?;
    assert!(
        console.contains("kiln.slot=A"),
        "the kernel did not get slot A's entry:\n{console}"
    );
    let disk = guest.dir.path().join("disk.raw");
    guest.child.kill()?;
    guest.child.wait()?;
    // systemd-boot counted the boot: one try used, two left, until machined blesses it.
    let esp = format!("{}@@1048576", disk.display());
    let entries = run(Command::new("mdir").env("MTOOLS_SKIP_CHECK", "1").args([
        "-b",
        "-i",
        &esp,
        "::/loader/entries",
    ]))?;
    assert!(
        entries.to_lowercase().contains("kiln-a+2-1.conf"),
        "{entries}"
    );
    Ok(())
}

#[test]
fn the_accelerator_probe_boots_a_guest_with_tcg() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Qemu, Tier::Kernel, Tier::ImageTools);
    let built = image();
    let _one = one_guest();
    let scratch = tempfile::tempdir()?;
    let probe = QemuProbe {
        qemu: "qemu-system-x86_64".into(),
        kernel: built.path(names::VMLINUX),
        scratch: scratch.path().to_owned(),
    };
    let secs = probe
        .boot(Accel::Tcg, Duration::from_secs(30))
        .map_err(anyhow::Error::msg)?;
    println!("probe guest under TCG: {secs:.1}s");
    let choice = accel::choose("/dev/kvm".as_ref(), &probe, Duration::from_secs(10));
    println!("accelerator: {} ({})", choice.accel, choice.reason);
    assert!(!choice.reason.is_empty());
    Ok(())
}
