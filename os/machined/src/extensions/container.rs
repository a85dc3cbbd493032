//! Runs an extension service's process as a container: its own mount, PID and UTS namespaces,
//! the root filesystem `/usr/local/lib/containers/<name>` (read-only unless
//! `writeableRootfs`), the OCI mounts of its definition, a fresh `/proc` and `/sys`, masked and
//! read-only paths.
//!
//! No crate sets up a container from inside a `Command`'s `pre_exec` (runtimes such as youki
//! are whole programs), so this is written by hand. Everything is computed before the fork
//! ([`ContainerSetup::new`]); the code after it only makes system calls.
//!
//! The forked child enters new mount and UTS namespaces and unshares the PID namespace, then
//! forks again: the grandchild is PID 1 of the new namespace, sets up the mounts, `chroot`s
//! and execs the entrypoint; the child stays as a small init outside it that forwards
//! SIGTERM/SIGINT/SIGHUP to the grandchild and exits with its status, so the supervisor's
//! pid, stop and exit code work as for any other service.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, chdir, chroot, fork};

use super::spec::{ContainerSpec, Propagation};

/// Paths masked by default (containerd's defaults).
const DEFAULT_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

/// Paths read-only by default (containerd's defaults).
const DEFAULT_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Why a container could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The root filesystem directory is missing.
    #[error(
        "the root filesystem {0} does not exist: put the service's files there in the node image"
    )]
    NoRootfs(PathBuf),
    /// A mount source or target could not be created.
    #[error("preparing mount {path}: {source}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A path holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(PathBuf),
    /// A mount option is not one this runtime knows.
    #[error(
        "mount {destination}: option {option:?} is not supported (use bind, rbind, ro, rw, rshared, rslave, rprivate, nosuid, nodev, noexec)"
    )]
    Option {
        /// The mount.
        destination: String,
        /// The option.
        option: String,
    },
}

#[derive(Debug)]
struct Mount {
    source: Option<CString>,
    target: CString,
    fstype: Option<CString>,
    flags: MsFlags,
    data: Option<CString>,
    /// Remount with these flags after (read-only binds).
    remount: Option<MsFlags>,
    propagation: Option<MsFlags>,
}

/// Everything the forked child needs, computed before the fork.
#[derive(Debug)]
pub struct ContainerSetup {
    hostname: CString,
    rootfs: CString,
    root_propagation: MsFlags,
    readonly_root: bool,
    mounts: Vec<Mount>,
    root: CString,
}

fn cstr(p: &Path) -> Result<CString, ContainerError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ContainerError::Nul(p.to_owned()))
}

fn inside(rootfs: &Path, dest: &str) -> PathBuf {
    rootfs.join(dest.trim_start_matches('/'))
}

fn mkdir(path: &Path) -> Result<(), ContainerError> {
    std::fs::create_dir_all(path).map_err(|source| ContainerError::Prepare {
        path: path.to_owned(),
        source,
    })
}

fn touch(path: &Path) -> Result<(), ContainerError> {
    if let Some(parent) = path.parent() {
        mkdir(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(drop)
        .map_err(|source| ContainerError::Prepare {
            path: path.to_owned(),
            source,
        })
}

impl ContainerSetup {
    /// Prepares the container `name` with root filesystem `rootfs`: creates missing mount
    /// sources and targets and computes every mount.
    pub fn new(name: &str, rootfs: &Path, spec: &ContainerSpec) -> Result<Self, ContainerError> {
        if !rootfs.is_dir() {
            return Err(ContainerError::NoRootfs(rootfs.to_owned()));
        }
        let mut mounts = Vec::new();
        let proc_dir = rootfs.join("proc");
        let sys_dir = rootfs.join("sys");
        let has_proc = proc_dir.is_dir();
        if has_proc {
            mounts.push(Mount {
                source: Some(c"proc".to_owned()),
                target: cstr(&proc_dir)?,
                fstype: Some(c"proc".to_owned()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                data: None,
                remount: None,
                propagation: None,
            });
        }
        // A `dev` directory gets the host's devices (extension services are privileged).
        let dev_dir = rootfs.join("dev");
        if dev_dir.is_dir() {
            mounts.push(Mount {
                source: Some(c"/dev".to_owned()),
                target: cstr(&dev_dir)?,
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                data: None,
                remount: None,
                propagation: None,
            });
        }
        if sys_dir.is_dir() {
            let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            if !spec.security.writeable_sysfs {
                flags |= MsFlags::MS_RDONLY;
            }
            mounts.push(Mount {
                source: Some(c"sysfs".to_owned()),
                target: cstr(&sys_dir)?,
                fstype: Some(c"sysfs".to_owned()),
                flags,
                data: None,
                remount: None,
                propagation: None,
            });
        }
        for m in &spec.mounts {
            let dest = m.destination().display().to_string();
            let target = inside(rootfs, &dest);
            let options = m.options().clone().unwrap_or_default();
            let typ = m.typ().clone().unwrap_or_else(|| "bind".to_owned());
            let is_bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
            let mut flags = MsFlags::empty();
            let mut readonly = false;
            let mut propagation = None;
            let mut data = Vec::new();
            for o in &options {
                match o.as_str() {
                    "bind" => flags |= MsFlags::MS_BIND,
                    "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                    "ro" => readonly = true,
                    "rw" => readonly = false,
                    "rshared" | "shared" => {
                        propagation = Some(MsFlags::MS_SHARED | MsFlags::MS_REC)
                    }
                    "rslave" | "slave" => propagation = Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
                    "rprivate" | "private" => {
                        propagation = Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC);
                    }
                    "nosuid" => flags |= MsFlags::MS_NOSUID,
                    "nodev" => flags |= MsFlags::MS_NODEV,
                    "noexec" => flags |= MsFlags::MS_NOEXEC,
                    other if !is_bind && !other.is_empty() => data.push(other.to_owned()),
                    other => {
                        return Err(ContainerError::Option {
                            destination: dest.clone(),
                            option: other.to_owned(),
                        });
                    }
                }
            }
            let source = m.source().clone();
            if is_bind {
                flags |= MsFlags::MS_BIND;
                let source = source.clone().unwrap_or_default();
                // A missing source directory is created, as the guides say.
                if !source.exists() {
                    mkdir(&source)?;
                }
                if source.is_dir() {
                    mkdir(&target)?;
                } else {
                    touch(&target)?;
                }
            } else {
                mkdir(&target)?;
                if readonly {
                    flags |= MsFlags::MS_RDONLY;
                }
            }
            mounts.push(Mount {
                source: source.as_deref().map(cstr).transpose()?,
                target: cstr(&target)?,
                fstype: if is_bind {
                    None
                } else {
                    Some(CString::new(typ).map_err(|_| ContainerError::Nul(target.clone()))?)
                },
                flags,
                data: if data.is_empty() {
                    None
                } else {
                    Some(
                        CString::new(data.join(","))
                            .map_err(|_| ContainerError::Nul(target.clone()))?,
                    )
                },
                remount: (is_bind && readonly).then_some(
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | (flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC)),
                ),
                propagation,
            });
        }
        // Masked and read-only paths (only those that exist in the container; /proc and
        // /sys ones need the fresh mounts above).
        let masked = spec
            .security
            .masked_paths
            .clone()
            .unwrap_or_else(|| DEFAULT_MASKED.iter().map(|s| (*s).to_owned()).collect());
        let readonly = spec
            .security
            .readonly_paths
            .clone()
            .unwrap_or_else(|| DEFAULT_READONLY.iter().map(|s| (*s).to_owned()).collect());
        let has_sys = sys_dir.is_dir();
        // A /proc or /sys path is masked or made read-only only when that file system is
        // mounted in the container and the path exists on this kernel; other paths only when
        // they exist in the root filesystem.
        let applies = |p: &str, target: &Path| {
            if p.starts_with("/proc/") {
                has_proc && Path::new(p).exists()
            } else if p.starts_with("/sys/") {
                has_sys && Path::new(p).exists()
            } else {
                target.exists()
            }
        };
        for p in masked {
            let target = inside(rootfs, &p);
            let pseudo = p.starts_with("/proc/") || p.starts_with("/sys/");
            if !applies(&p, &target) {
                continue;
            }
            // A directory gets an empty read-only tmpfs, anything else /dev/null.
            let is_dir = if pseudo {
                Path::new(&p).is_dir()
            } else {
                target.is_dir()
            };
            mounts.push(if is_dir {
                Mount {
                    source: Some(c"tmpfs".to_owned()),
                    target: cstr(&target)?,
                    fstype: Some(c"tmpfs".to_owned()),
                    flags: MsFlags::MS_RDONLY,
                    data: None,
                    remount: None,
                    propagation: None,
                }
            } else {
                Mount {
                    source: Some(c"/dev/null".to_owned()),
                    target: cstr(&target)?,
                    fstype: None,
                    flags: MsFlags::MS_BIND,
                    data: None,
                    remount: None,
                    propagation: None,
                }
            });
        }
        for p in readonly {
            let target = inside(rootfs, &p);
            if !applies(&p, &target) {
                continue;
            }
            let t = cstr(&target)?;
            mounts.push(Mount {
                source: Some(t.clone()),
                target: t,
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                data: None,
                remount: Some(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY),
                propagation: None,
            });
        }
        Ok(Self {
            hostname: CString::new(name).map_err(|_| ContainerError::Nul(PathBuf::from(name)))?,
            rootfs: cstr(rootfs)?,
            root_propagation: match spec.security.rootfs_propagation {
                Some(Propagation::Shared) => MsFlags::MS_SHARED,
                Some(Propagation::Slave) => MsFlags::MS_SLAVE,
                Some(Propagation::Private) | None => MsFlags::MS_PRIVATE,
            },
            readonly_root: !spec.security.writeable_rootfs,
            mounts,
            root: c"/".to_owned(),
        })
    }

    /// Makes `cmd` start in the container (after machined's own `pre_exec` steps).
    #[allow(unsafe_code)]
    pub fn install(self: &Arc<Self>, cmd: &mut tokio::process::Command) {
        let setup = self.clone();
        // SAFETY: the closure runs in the forked child before exec. It only makes system calls
        // (unshare, mount, sethostname, fork, waitpid, sigaction, kill, chroot, chdir, _exit)
        // on data computed before the fork.
        unsafe {
            cmd.pre_exec(move || setup.enter().map_err(std::io::Error::from));
        }
    }

    /// In the forked child: namespaces, the inner fork, mounts, chroot.
    fn enter(&self) -> Result<(), nix::Error> {
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWPID)?;
        mount(
            None::<&std::ffi::CStr>,
            self.root.as_c_str(),
            None::<&std::ffi::CStr>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&std::ffi::CStr>,
        )?;
        sethostname_raw(&self.hostname)?;
        // SAFETY: the child of this fork only makes system calls before exec (see install).
        #[allow(unsafe_code)]
        let forked = unsafe { fork() }?;
        match forked {
            ForkResult::Parent { child } => supervise(child),
            ForkResult::Child => {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                self.mount_all()?;
                chroot(self.rootfs.as_c_str())?;
                chdir(self.root.as_c_str())?;
                Ok(())
            }
        }
    }

    fn mount_all(&self) -> Result<(), nix::Error> {
        let none = None::<&std::ffi::CStr>;
        // The root filesystem becomes a mount point of its own, so it can be made read-only
        // and given its propagation.
        mount(
            Some(self.rootfs.as_c_str()),
            self.rootfs.as_c_str(),
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )?;
        mount(
            none,
            self.rootfs.as_c_str(),
            none,
            self.root_propagation,
            none,
        )?;
        for m in &self.mounts {
            mount(
                m.source.as_deref(),
                m.target.as_c_str(),
                m.fstype.as_deref(),
                m.flags,
                m.data.as_deref(),
            )?;
            if let Some(flags) = m.remount {
                mount(none, m.target.as_c_str(), none, flags, none)?;
            }
            if let Some(p) = m.propagation {
                mount(none, m.target.as_c_str(), none, p, none)?;
            }
        }
        if self.readonly_root {
            mount(
                none,
                self.rootfs.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            )?;
        }
        Ok(())
    }
}

fn sethostname_raw(name: &std::ffi::CStr) -> Result<(), nix::Error> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    #[allow(unsafe_code)]
    let r = unsafe { nix::libc::sethostname(name.as_ptr(), name.to_bytes().len()) };
    nix::errno::Errno::result(r).map(drop)
}

/// The container's PID 1, as seen from outside (set in the small init after the fork).
static CONTAINER_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: nix::libc::c_int) {
    let pid = CONTAINER_PID.load(Ordering::SeqCst);
    if pid > 0
        && let Ok(sig) = Signal::try_from(sig)
    {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// The small init outside the container: forwards stop signals, exits with the container's
/// status. Never returns.
fn supervise(child: Pid) -> ! {
    CONTAINER_PID.store(child.as_raw(), Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: `forward` only loads an atomic and calls kill(2), both async-signal-safe.
        #[allow(unsafe_code)]
        let _ = unsafe { sigaction(sig, &action) };
    }
    // Close every descriptor but stdio: the spawner's exec-error pipe must see EOF once the
    // container's entrypoint execs, not when this init exits.
    for fd in 3..4096 {
        // SAFETY: closing descriptors this forked process does not use.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::close(fd);
        }
    }
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // Die of the same signal, so the supervisor sees "killed by a signal".
                let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
                // SAFETY: restoring the default action.
                #[allow(unsafe_code)]
                let _ = unsafe { sigaction(sig, &default) };
                let _ = kill(Pid::this(), sig);
                break 128 + sig as i32;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break 1,
        }
    };
    // SAFETY: _exit(2) ends this forked process without running the parent's destructors.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::_exit(code)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::extensions::spec::ExtensionServiceSpec;
    use crate::logbuf::LogBuffer;
    use crate::supervisor::{CommandSpec, RunOutcome, run_process};

    /// As root: PID 1 and the host name in the container, a read-only root filesystem, a
    /// writable bind mount, the exit code passed through.
    #[tokio::test]
    async fn a_process_runs_as_pid_1_of_its_container() {
        kiln_test_tiers::skip_unless!(kiln_test_tiers::Tier::Root);
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let data = dir.path().join("data");
        std::fs::create_dir_all(rootfs.join("proc")).unwrap();
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(target, rootfs.join(link)).unwrap();
        }
        let spec = ExtensionServiceSpec::parse(&format!(
            "name: probe
container:
  entrypoint: /bin/sh
  mounts:
    - {{source: /usr, destination: /usr, type: bind, options: [rbind, ro]}}
    - {{source: {data}, destination: /data, type: bind, options: [bind, rw]}}
restart: never
",
            data = data.display()
        ))
        .unwrap();
        let setup = Arc::new(ContainerSetup::new("probe", &rootfs, &spec.container).unwrap());
        let log = LogBuffer::new(1 << 16);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let (started, _) = tokio::sync::oneshot::channel();
        let outcome = run_process(
            &CommandSpec {
                program: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    "echo pid=$$ host=$(uname -n); touch /x 2>/dev/null || echo ro; echo ok > /data/f; exit 7"
                        .into(),
                ],
                env: vec![],
            },
            Some(setup),
            &log,
            stop,
            Duration::from_secs(1),
            started,
        )
        .await;
        let out: String = log
            .tail(None)
            .0
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(
            matches!(outcome, RunOutcome::Exited(Some(7))),
            "{outcome:?}: {out}"
        );
        assert!(out.contains("pid=1 host=probe"), "{out}");
        assert!(out.contains("ro"), "{out}");
        assert_eq!(std::fs::read_to_string(data.join("f")).unwrap(), "ok\n");
        assert!(!rootfs.join("x").exists());
    }
}
