//! PID 1 on `metal`: mounts the kernel file systems, loads the node's kernel modules, then
//! forks the node (the rest of machined, in its first child) and stays behind as the reaper
//! and power switch. It reaps every orphan, and when the node ends it stops what is left,
//! unmounts the volumes, syncs and calls `reboot(2)` (power off on the power-off code, reboot
//! otherwise). It never exits: a node that crashes is logged, and the machine reboots after a
//! pause.
//!
//! Why a fork: tokio reaps its own children by pid; a PID 1 that also reaps orphans with
//! `wait(-1)` would steal their exit statuses. Splitting the reaper from the node keeps both
//! simple, and `/proc/1` is still machined (same binary, `machined --platform metal`).

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// The name PID 1 runs under (`/proc/1/cmdline`).
pub const ARGV0: &str = "machined";

/// How long a crashed node waits before the machine reboots.
const CRASH_PAUSE: Duration = Duration::from_secs(5);

/// Where a module tree lives in the initramfs.
const MODULES_ROOT: &str = "/usr/lib/modules";
/// The modules PID 1 loads before it starts the node: its NIC and disks, the power button
/// (read through evdev) and the boot disk's file system. The others of the initramfs (bridge,
/// bonding, 8021q, sch_netem and what they need) load when they are needed: the network
/// configuration loads what it makes before it makes it ([`ensure_module`]). Loading all 20 at
/// boot took 0.9 s under TCG; loading the rest in the background made the boot slower (one
/// vCPU: 1.4 s beside the node's boot), so they are not loaded unless used.
const BOOT_MODULES: &[&str] = &[
    "virtio_net",
    "virtio_blk",
    "button",
    "evdev",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
];

fn say(line: &str) {
    // The console is PID 1's stderr (the kernel opened /dev/console for /init).
    eprintln!("machined: {line}");
}

/// Runs as PID 1 when the kernel started `/init`. Re-executes itself as
/// `machined --platform metal` (so `/proc/1/cmdline` names machined), prepares the machine,
/// and returns only in the forked node process, with the arguments the node runs with.
pub fn pid1() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    if args.first().map(String::as_str) != Some(ARGV0) {
        let exe = CString::new("/proc/self/exe").unwrap_or_default();
        let argv = [
            CString::new(ARGV0).unwrap_or_default(),
            CString::new("--platform").unwrap_or_default(),
            CString::new("metal").unwrap_or_default(),
        ];
        // Only returns on failure; then carry on under the kernel's name.
        let _ = mount_kernel_fs();
        let Err(e) = nix::unistd::execv(&exe, &argv);
        say(&format!(
            "re-executing as {ARGV0}: {e}; going on as {:?}",
            args.first()
        ));
    }
    if let Err(e) = mount_kernel_fs() {
        say(&format!("mounting the kernel file systems: {e}"));
    }
    set_env();
    let started = Instant::now();
    match load_modules(Path::new(MODULES_ROOT), Some(BOOT_MODULES)) {
        Ok(n) => say(&format!(
            "loaded {n} kernel modules in {:?}",
            started.elapsed()
        )),
        Err(e) => say(&format!("loading kernel modules: {e}")),
    }
    mount_boot_slots();
    loop {
        // SAFETY (fork): PID 1 has started no thread at this point (no runtime, no logging
        // thread), so the child may do anything.
        #[allow(unsafe_code)]
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => return args,
            Ok(ForkResult::Parent { child }) => {
                let code = reap_until(child);
                end_boot(code);
            }
            Err(e) => {
                say(&format!("starting the node: fork: {e}; retrying"));
                std::thread::sleep(CRASH_PAUSE);
            }
        }
    }
}

/// With `kiln.slot=` on the kernel command line (the launcher played the bootloader), mounts
/// the boot disk (the virtio disk with serial [`BOOT_DISK_SERIAL`]) at [`BOOT_MOUNT`] and tells
/// machined where its slots are and which one booted (`KILN_BOOT_DIR`, `KILN_BOOT_SLOT`).
/// Without a boot disk the node runs without slots: upgrades are refused and say why.
fn mount_boot_slots() {
    use kiln_os_api::slots::{
        BOOT_DIR_ENV, BOOT_DISK_SERIAL, BOOT_MOUNT, BOOT_SLOT_ENV, SLOT_ARG, Slot,
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(slot) = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix(SLOT_ARG)?.strip_prefix('='))
        .and_then(Slot::parse)
    else {
        return;
    };
    // The disk shows up once virtio_blk has probed it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let device = loop {
        let found = std::fs::read_dir("/sys/block").ok().and_then(|dir| {
            dir.flatten().find_map(|e| {
                let serial = std::fs::read_to_string(e.path().join("serial")).ok()?;
                (serial.trim() == BOOT_DISK_SERIAL)
                    .then(|| format!("/dev/{}", e.file_name().to_string_lossy()))
            })
        });
        match found {
            Some(d) if Path::new(&d).exists() => break Some(d),
            _ if Instant::now() >= deadline => break None,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let Some(device) = device else {
        say(&format!(
            "{SLOT_ARG}={} but no disk with serial {BOOT_DISK_SERIAL}: running without slots",
            slot.name()
        ));
        return;
    };
    let _ = std::fs::create_dir_all(BOOT_MOUNT);
    // `quiet`: the installer's file modes cannot be kept on FAT, and that is no error.
    if let Err(e) = mount(
        Some(device.as_str()),
        BOOT_MOUNT,
        Some("vfat"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("quiet"),
    ) {
        say(&format!(
            "mounting the boot disk {device} at {BOOT_MOUNT}: {e}; running without slots"
        ));
        return;
    }
    say(&format!(
        "boot slots on {device} at {BOOT_MOUNT}; booted slot {slot}"
    ));
    // SAFETY: single-threaded here (see `pid1`), so no concurrent reader of the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var(BOOT_DIR_ENV, BOOT_MOUNT);
        std::env::set_var(BOOT_SLOT_ENV, slot.name());
    }
}

fn set_env() {
    // The environment is read by the children machined starts (etcd, mke2fs) through PATH.
    // SAFETY: single-threaded here (see `pid1`), so no concurrent reader of the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        std::env::set_var("HOME", "/run");
    }
}

/// Mounts `/proc`, `/sys`, `/dev`, `/run` and `/tmp` (each once; already mounted is fine).
pub fn mount_kernel_fs() -> nix::Result<()> {
    for (source, target, fstype, flags) in [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        ),
    ] {
        let _ = std::fs::create_dir_all(target);
        if is_mountpoint(target) {
            continue;
        }
        mount(Some(source), target, Some(fstype), flags, None::<&str>)?;
    }
    Ok(())
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

/// Why loading modules failed.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// No module tree for the running kernel.
    #[error("reading {path}: {source} (is this the initramfs of the running kernel?)")]
    Tree {
        /// `modules.dep`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A module did not load.
    #[error("loading {module}: {source}")]
    Load {
        /// The module file.
        module: String,
        /// The kernel's answer.
        source: nix::Error,
    },
}

/// Loads the module `name` (a file name without `.ko...`) and what it needs, unless loaded:
/// before the network configuration makes a bond, bridge or VLAN, in case the background load
/// has not got there yet. Returns how many loaded.
pub fn ensure_module(name: &str) -> Result<usize, ModuleError> {
    load_modules(Path::new(MODULES_ROOT), Some(&[name]))
}

/// Loads the modules of the initramfs' `modules.dep` (those named in `only`, by file name
/// without `.ko...`, or all), dependencies first (the kernel decompresses `.ko.xz` itself).
/// A module already loaded counts as done. Returns how many loaded.
pub fn load_modules(root: &Path, only: Option<&[&str]>) -> Result<usize, ModuleError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let tree = root.join(&release);
    let dep_path = tree.join("modules.dep");
    let dep = std::fs::read_to_string(&dep_path).map_err(|source| ModuleError::Tree {
        path: dep_path.clone(),
        source,
    })?;
    let deps = parse_dep(&dep);
    let mut loaded = std::collections::BTreeSet::new();
    let mut count = 0;
    for (module, _) in &deps {
        if only.is_some_and(|names| !names.contains(&module_name(module))) {
            continue;
        }
        count += load_with_deps(&tree, module, &deps, &mut loaded)?;
    }
    Ok(count)
}

/// A module's name: its file name up to the first `.` (`kernel/net/8021q/8021q.ko` → `8021q`).
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file)
}

/// `modules.dep` as (module, its dependencies) in file order.
pub fn parse_dep(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((
                m.trim().to_owned(),
                d.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect()
}

/// Parameters a module loads with: `bonding` makes no `bond0` of its own (its default), so
/// the bonds are the configuration's, with its mode, made by `configure_network`.
fn module_params(module: &str) -> &'static std::ffi::CStr {
    let file = module.rsplit('/').next().unwrap_or(module);
    if file.split('.').next() == Some("bonding") {
        c"max_bonds=0"
    } else {
        c""
    }
}

fn load_with_deps(
    tree: &Path,
    module: &str,
    deps: &[(String, Vec<String>)],
    loaded: &mut std::collections::BTreeSet<String>,
) -> Result<usize, ModuleError> {
    if !loaded.insert(module.to_owned()) {
        return Ok(0);
    }
    let mut count = 0;
    // modules.dep lists a module's dependencies so that the last must load first.
    if let Some((_, d)) = deps.iter().find(|(m, _)| m == module) {
        for dep in d.iter().rev() {
            count += load_with_deps(tree, dep, deps, loaded)?;
        }
    }
    let path = tree.join(module);
    let file = std::fs::File::open(&path).map_err(|e| ModuleError::Load {
        module: module.to_owned(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let flags = if module.ends_with(".xz") || module.ends_with(".zst") || module.ends_with(".gz") {
        // MODULE_INIT_COMPRESSED_FILE: nix has no name for it yet.
        nix::kmod::ModuleInitFlags::from_bits_retain(4)
    } else {
        nix::kmod::ModuleInitFlags::empty()
    };
    match nix::kmod::finit_module(&file, module_params(module), flags) {
        Ok(()) => count += 1,
        Err(nix::Error::EEXIST) => {}
        Err(source) => {
            return Err(ModuleError::Load {
                module: module.to_owned(),
                source,
            });
        }
    }
    Ok(count)
}

/// Reaps every child until `node` ends; returns the node's exit code (`None`: killed).
fn reap_until(node: Pid) -> Option<i32> {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == node => return Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == node => {
                say(&format!("the node was killed by {sig}"));
                return None;
            }
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(e) => {
                say(&format!("waiting for children: {e}"));
                // PID 1 must not spin on a failing waitpid(2): retry once a second.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Stops what is left, unmounts, syncs and powers off or reboots. Never returns.
fn end_boot(code: Option<i32>) -> ! {
    let mode = match code {
        Some(EXIT_SHUTDOWN) => {
            say("powering off");
            RebootMode::RB_POWER_OFF
        }
        Some(EXIT_REBOOT) => {
            say("rebooting");
            RebootMode::RB_AUTOBOOT
        }
        other => {
            say(&format!(
                "the node stopped unexpectedly (exit {other:?}); rebooting in {CRASH_PAUSE:?}"
            ));
            std::thread::sleep(CRASH_PAUSE);
            RebootMode::RB_AUTOBOOT
        }
    };
    stop_everything();
    unmount_volumes();
    nix::unistd::sync();
    loop {
        let Err(e) = reboot(mode);
        say(&format!("reboot(2): {e}"));
        // PID 1 may never exit: keep trying, without flooding the console.
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// SIGTERM to every process, up to 5 s to end, then SIGKILL; reaping all the while.
fn stop_everything() {
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Err(nix::Error::ECHILD) => return,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(50)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while !matches!(waitpid(None::<Pid>, None), Err(nix::Error::ECHILD)) {}
}

/// Unmounts the volumes (everything on a block device), innermost first.
fn unmount_volumes() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter(|l| l.starts_with("/dev/"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        if let Err(e) = nix::mount::umount(t) {
            say(&format!("unmounting {t}: {e}; remounting it read-only"));
            let _ = mount(
                None::<&str>,
                t,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_is_named_by_its_file_without_extensions() {
        assert_eq!(module_name("kernel/net/8021q/8021q.ko"), "8021q");
        assert_eq!(module_name("kernel/fs/nls/nls_cp437.ko.xz"), "nls_cp437");
        assert_eq!(module_name("virtio_net.ko"), "virtio_net");
    }

    #[test]
    fn bonding_loads_without_a_bond_of_its_own() {
        assert_eq!(
            module_params("kernel/drivers/net/bonding/bonding.ko.xz"),
            c"max_bonds=0"
        );
        assert_eq!(module_params("kernel/net/bridge/bridge.ko.xz"), c"");
    }

    #[test]
    fn dependencies_load_before_the_module_that_needs_them() {
        let dep = parse_dep(
            "kernel/net/8021q/8021q.ko.xz: kernel/net/802/garp.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz\n\
             kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz\n\
             kernel/net/llc/llc.ko.xz:\n",
        );
        assert_eq!(dep.len(), 3);
        assert_eq!(dep[0].1.len(), 3);
        assert!(dep[2].1.is_empty());
    }
}
