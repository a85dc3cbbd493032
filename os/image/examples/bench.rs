//! Boot benchmark: the bare reference (kernel + etcd initramfs, no machined) from QEMU start to
//! etcd healthy, booting the bzImage and the extracted vmlinux (PVH) directly, and the disk
//! through OVMF and systemd-boot, under TCG. This is the reference Kiln OS's own node boot is
//! measured against.
//!
//! ```text
//! cargo build -p kiln-image --bin kiln-etcd-init --example image-bench
//! target/debug/examples/image-bench [--runs N]
//! ```

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_image::builder::names;
use kiln_image::reference_init::HEALTHY_MARKER;
use kiln_image::{BuildOptions, KernelSource, Quiet};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_provisioner::provision::qemu::accel::Accel;
use kiln_provisioner::provision::qemu::launch::{Boot, NodeLaunch, OVMF_CODE, OVMF_VARS};

/// One boot's measurements.
struct Sample {
    /// QEMU start to the healthy line on the console.
    host: Duration,
    /// The guest kernel's uptime when etcd was healthy.
    guest: f64,
    /// QEMU's resident memory then, in MiB.
    rss_mib: u64,
}

fn main() -> anyhow::Result<()> {
    let mut runs = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            other => bail!("unknown argument {other}: usage: bench [--runs N]"),
        }
    }
    let exe = std::env::current_exe()?;
    let init = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("kiln-etcd-init"))
        .filter(|p| p.is_file())
        .context("kiln-etcd-init not built: cargo build -p kiln-image --bin kiln-etcd-init --example image-bench")?;

    let root = tempfile::tempdir()?;
    let kernel = KernelSource::debian_cloud("/boot".as_ref(), "/usr/lib/modules".as_ref())?;
    let release = kernel.release.clone();
    let mut opts = BuildOptions::new(root.path().to_owned(), kernel, init);
    opts.disk_size_mib = 512;
    opts.installer = false;
    let started = Instant::now();
    let built = kiln_image::build(&opts, &Quiet)?;
    let build_time = started.elapsed();
    let initramfs_mib =
        std::fs::metadata(built.path(names::INITRAMFS))?.len() as f64 / f64::from(1 << 20);

    println!("kernel {release}, TCG (-accel tcg,tb-size=64), 1 vCPU, 512 MiB, {runs} runs each");
    println!(
        "reference initramfs (etcd-init, etcd, etcdctl, mke2fs, modules): {initramfs_mib:.1} MiB zstd, built in {:.1}s",
        build_time.as_secs_f64()
    );
    let mut rows = Vec::new();
    for (label, name) in [
        ("bzImage", Some(names::VMLINUZ)),
        ("vmlinux (PVH)", Some(names::VMLINUX)),
        ("UEFI + sd-boot", None),
    ] {
        let mut samples = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir()?;
            let (boot_from, disk) = match name {
                Some(kernel) => (
                    Boot::Direct {
                        kernel: built.path(kernel),
                        initrd: built.path(names::INITRAMFS),
                        extra_cmdline: "quiet".into(),
                    },
                    None,
                ),
                None => {
                    // A fresh variable store and disk per run: boot counting writes both.
                    let vars = dir.path().join("vars.fd");
                    std::fs::copy(OVMF_VARS, &vars)?;
                    let disk = dir.path().join("disk.raw");
                    let ok = std::process::Command::new("cp")
                        .arg("--sparse=always")
                        .arg(built.path(names::DISK))
                        .arg(&disk)
                        .status()?
                        .success();
                    anyhow::ensure!(ok, "copying the disk image failed");
                    (
                        Boot::Uefi {
                            code: OVMF_CODE.into(),
                            vars,
                        },
                        Some(disk),
                    )
                }
            };
            samples.push(boot(dir.path(), boot_from, disk)?);
        }
        rows.push((label, samples));
    }

    println!();
    println!(
        "{:<15} {:>8} {:>8} {:>8} {:>14} {:>10}",
        "KERNEL", "MIN", "MEDIAN", "MAX", "GUEST UPTIME", "QEMU RSS"
    );
    for (label, mut s) in rows {
        s.sort_by_key(|x| x.host);
        let mid = &s[s.len() / 2];
        println!(
            "{:<15} {:>7.2}s {:>7.2}s {:>7.2}s {:>13.2}s {:>6} MiB",
            label,
            s[0].host.as_secs_f64(),
            mid.host.as_secs_f64(),
            s[s.len() - 1].host.as_secs_f64(),
            mid.guest,
            mid.rss_mib,
        );
    }
    println!(
        "\n(QEMU start to `etcdctl endpoint health` passing in the guest; median row's uptime and RSS)"
    );
    Ok(())
}

/// Boots once and measures; QEMU is killed afterwards.
fn boot(dir: &std::path::Path, boot: Boot, disk: Option<PathBuf>) -> anyhow::Result<Sample> {
    let launch = NodeLaunch {
        qemu: "qemu-system-x86_64".into(),
        name: "bench".into(),
        memory_mib: 512,
        cpus: 1,
        accel: Accel::Tcg,
        boot,
        disk,
        boot_disk: None,
        nics: vec![],
        console_log: dir.join("console.log"),
        qmp_socket: dir.join("qmp.sock"),
        monitor_socket: dir.join("monitor.sock"),
    };
    let start = Instant::now();
    let mut child = launch
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let console: PathBuf = launch.console_log.clone();
    let pid = child.id();
    let waited = until_blocking(
        "etcd healthy in the guest",
        Poll::every(Duration::from_millis(20), Duration::from_secs(120)),
        || {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            match text.lines().find(|l| l.contains(HEALTHY_MARKER)) {
                Some(line) => Ok(line.to_owned()),
                None => Err(text.lines().last().unwrap_or("").to_owned()),
            }
        },
    );
    let host = start.elapsed();
    let rss_mib = rss_kib(pid) / 1024;
    let _ = child.kill();
    let _ = child.wait();
    let line = waited?;
    let guest = line
        .split_whitespace()
        .last()
        .and_then(|s| s.trim_end_matches('s').parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Sample {
        host,
        guest,
        rss_mib,
    })
}

/// VmRSS of a process, in KiB (0 when unreadable).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
