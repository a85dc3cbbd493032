//! Background helpers (node launchers, the load balancer): the `kiln` binary started again
//! with a hidden subcommand, in its own process group, with its log and pid file in the state
//! directory; and stopping them again by identity.
//!
//! A pid file holds the pid and the process's start time (field 22 of `/proc/<pid>/stat`, in
//! clock ticks since boot). A process is ours only when both match, so a recycled pid, or a
//! process of another cluster whose paths share a prefix with ours, is never signalled.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_os_api::wait::{Poll, until_blocking};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Why a helper could not be started or recorded.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The `kiln` binary to start could not be located.
    #[error("locating the kiln binary (set KILN_BIN to its path): {0}")]
    Binary(#[source] std::io::Error),
    /// A file (log, pid file) could not be written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process did not start.
    #[error("starting kiln {args}: {source}")]
    Spawn {
        /// Its arguments.
        args: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The `kiln` binary helpers are started from: `$KILN_BIN`, or the running binary (test
/// harnesses that are not `kiln` themselves set `KILN_BIN`).
pub fn kiln_binary() -> Result<PathBuf, DaemonError> {
    match std::env::var_os("KILN_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe().map_err(DaemonError::Binary),
    }
}

/// A process, known by pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Its pid.
    pub pid: i32,
    /// Its start time in clock ticks since boot.
    pub start: u64,
}

impl Identity {
    /// The identity of the running process `pid`, or `None` when there is none (or it is a
    /// zombie).
    pub fn of(pid: i32) -> Option<Identity> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: split after it.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); field 22 (starttime) is at index 19.
        if fields.first() == Some(&"Z") {
            return None;
        }
        Some(Identity {
            pid,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Whether this exact process still runs.
    pub fn alive(&self) -> bool {
        Identity::of(self.pid) == Some(*self)
    }

    fn line(&self) -> String {
        format!("{} {}\n", self.pid, self.start)
    }
}

/// Writes `pidfile` for the running process `pid` (pid and start time).
pub fn write_pidfile(pidfile: &Path, pid: u32) -> Result<Identity, DaemonError> {
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    // A process that already exited has no start time; 0 never matches a live one.
    let id = Identity::of(pid).unwrap_or(Identity { pid, start: 0 });
    std::fs::write(pidfile, id.line()).map_err(|source| DaemonError::File {
        path: pidfile.to_path_buf(),
        source,
    })?;
    Ok(id)
}

/// Starts `kiln ARGS...` in the background; stdout and stderr go to `log`, its identity to
/// `pidfile`.
pub fn spawn(args: &[String], log: &Path, pidfile: &Path) -> Result<Identity, DaemonError> {
    spawn_in(None, args, log, pidfile)
}

/// [`spawn`] in the named network namespace (`/var/run/netns/<netns>`) when one is given: the
/// lab's helpers of a cluster whose network the host is not on (a Docker Swarm overlay) run in
/// its gateway container's namespace.
pub fn spawn_in(
    netns: Option<&str>,
    args: &[String],
    log: &Path,
    pidfile: &Path,
) -> Result<Identity, DaemonError> {
    use std::os::unix::process::CommandExt as _;
    let exe = kiln_binary()?;
    let ns = match netns {
        Some(name) => {
            let path = PathBuf::from(format!("/var/run/netns/{name}"));
            Some(std::fs::File::open(&path).map_err(|source| DaemonError::File { path, source })?)
        }
        None => None,
    };
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DaemonError::File { path, source }
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(file_err(log))?;
    let err = out.try_clone().map_err(file_err(log))?;
    let mut cmd = Command::new(exe);
    if let Some(ns) = ns {
        enter_netns(&mut cmd, ns);
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: it outlives this command and a terminal hang-up.
        .process_group(0)
        .spawn()
        .map_err(|source| DaemonError::Spawn {
            args: args.join(" "),
            source,
        })?;
    write_pidfile(pidfile, child.id())
}

/// Makes the child enter the network namespace `ns` before it runs.
#[allow(unsafe_code)]
fn enter_netns(cmd: &mut Command, ns: std::fs::File) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2) on a
    // file descriptor opened before the fork; it allocates nothing and touches no parent state.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}

/// A helper that did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// It exited before listening.
    #[error("it exited before listening on {addrs}; its log {log} says why")]
    Exited {
        /// Where it should have listened.
        addrs: String,
        /// Its log.
        log: PathBuf,
    },
    /// It runs but does not accept connections.
    #[error("it does not accept connections on {addrs} after {waited:?}; see its log {log}")]
    NotListening {
        /// Where it should have listened.
        addrs: String,
        /// How long it was given.
        waited: Duration,
        /// Its log.
        log: PathBuf,
    },
}

/// Waits until the helper `id` accepts TCP connections on every address of `addrs`, or fails
/// at once when it exits, naming its log.
pub fn wait_listening(
    id: Identity,
    addrs: &[std::net::SocketAddr],
    log: &Path,
    timeout: Duration,
) -> Result<(), ReadyError> {
    let text = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let exited = std::cell::Cell::new(false);
    let ready = until_blocking(
        format!("a helper listening on {text}"),
        Poll::every(Duration::from_millis(25), timeout),
        || {
            if !id.alive() {
                exited.set(true);
                return Ok(());
            }
            let all = addrs.iter().all(|a| {
                std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
            });
            if all { Ok(()) } else { Err(()) }
        },
    );
    match ready {
        Ok(()) if !exited.get() => Ok(()),
        Ok(()) => Err(ReadyError::Exited {
            addrs: text,
            log: log.to_path_buf(),
        }),
        Err(_) => Err(ReadyError::NotListening {
            addrs: text,
            waited: timeout,
            log: log.to_path_buf(),
        }),
    }
}

/// The process recorded in `pidfile`, if that exact process (pid and start time) still runs.
pub fn running(pidfile: &Path) -> Option<Identity> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let mut it = text.split_whitespace();
    let id = Identity {
        pid: it.next()?.parse().ok()?,
        start: it.next()?.parse().ok()?,
    };
    id.alive().then_some(id)
}

/// Stops the process: SIGTERM, up to `grace` to exit, then SIGKILL to it and its process
/// group. Signals only that exact process (and its group once it is known to be ours).
pub fn stop(id: Identity, grace: Duration) {
    if !id.alive() {
        return;
    }
    let _ = kill(Pid::from_raw(id.pid), Signal::SIGTERM);
    let gone = until_blocking(
        "the process to exit",
        Poll::every(Duration::from_millis(50), grace),
        || if id.alive() { Err(()) } else { Ok(()) },
    );
    if gone.is_err() && id.alive() {
        // Its group was made by us (process_group(0) at spawn), so the group id is its pid.
        match kill(Pid::from_raw(-id.pid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(_) => {
                let _ = kill(Pid::from_raw(id.pid), Signal::SIGKILL);
            }
        }
    }
}

/// Stops the process recorded in `pidfile` (if it still is that process) and removes the file.
pub fn stop_pidfile(pidfile: &Path, grace: Duration) {
    if let Some(id) = running(pidfile) {
        stop(id, grace);
    }
    let _ = std::fs::remove_file(pidfile);
}

/// Processes with an argument that is `dir` or a path inside it, compared by path components
/// (so `/s/a` never matches `/s/a-2/x`), zombies left out. For leak checks in tests and crash
/// dumps; `destroy` itself goes by pid file.
pub fn processes_under(dir: &Path) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me || Identity::of(pid).is_none() {
                return None;
            }
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let names_dir = args.iter().any(|a| {
                let value = a.split_once('=').map_or(a.as_str(), |(_, v)| v);
                Path::new(value).starts_with(dir) || Path::new(a).starts_with(dir)
            });
            names_dir.then(|| (pid, args.join(" ")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_tells_a_process_from_a_recycled_pid() {
        let me = Identity::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let other = Identity {
            start: me.start + 1,
            ..me
        };
        assert!(!other.alive(), "a different start time is another process");
    }

    #[test]
    fn processes_under_compares_path_components() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let a2 = dir.path().join("a-2");
        // `sh -c SCRIPT NAME`: the shell keeps the path among its arguments while it sleeps.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; true"])
            .arg(a2.join("x"))
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until the child has exec'd, its /proc cmdline is the forked copy of this test's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !processes_under(&a2).iter().any(|(p, _)| *p == pid)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            processes_under(&a).iter().all(|(p, _)| *p != pid),
            "a-2 is not under a"
        );
        assert!(processes_under(&a2).iter().any(|(p, _)| *p == pid));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn pidfiles_record_and_find_exactly_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfile = dir.path().join("x.pid");
        let id = write_pidfile(&pidfile, child.id()).unwrap();
        assert_eq!(running(&pidfile), Some(id));
        // A pid file written for another start time does not name this process.
        std::fs::write(&pidfile, format!("{} {}\n", id.pid, id.start + 7)).unwrap();
        assert_eq!(running(&pidfile), None);
        std::fs::write(&pidfile, format!("{} {}\n", id.pid, id.start)).unwrap();
        stop(id, Duration::from_secs(5));
        let _ = child.wait();
        assert!(!id.alive());
        assert_eq!(running(&pidfile), None);
    }
}
