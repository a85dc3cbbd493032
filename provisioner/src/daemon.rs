//! Background helpers (node launchers, the load balancer): the `kiln` binary started again
//! with a hidden subcommand, in its own session, with its log and pid file in the state
//! directory; and stopping them again by pid file, checking the pid still is ours.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `kiln` binary helpers are started from: `$KILN_BIN`, or the running binary (test
/// harnesses that are not `kiln` themselves set `KILN_BIN`).
pub fn kiln_binary() -> anyhow::Result<PathBuf> {
    match std::env::var_os("KILN_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe().context("locating the kiln binary"),
    }
}

/// Starts `kiln ARGS...` in the background; stdout and stderr go to `log`, its pid to `pidfile`.
pub fn spawn(args: &[String], log: &Path, pidfile: &Path) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt as _;
    let exe = kiln_binary()?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own session: it outlives this command and a terminal hang-up.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting kiln {}", args.join(" ")))?;
    let pid = child.id();
    std::fs::write(pidfile, format!("{pid}\n"))
        .with_context(|| format!("writing {}", pidfile.display()))?;
    Ok(pid)
}

/// The pid in `pidfile`, if the process still runs and its command line mentions `marker`
/// (so a recycled pid is never killed).
pub fn running_pid(pidfile: &Path, marker: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(marker).then_some(pid)
}

/// Sends SIGTERM to the process (and its group), waits up to `grace`, then SIGKILL.
pub fn stop(pid: i32, grace: Duration) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if kill(Pid::from_raw(pid), None).is_err() || is_zombie(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// Every process whose command line contains `marker` (leak checks, cleanup after a crash).
pub fn processes_mentioning(marker: &str) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me || is_zombie(pid) {
                return None;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(marker).then_some((pid, cmd))
        })
        .collect()
}

/// The path as a string for markers.
pub fn marker(path: &Path) -> String {
    path.display().to_string()
}

/// A pid file path helper for tests.
pub fn pidfile_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pid"))
}
