//! PID 1 of a container. The kernel hands every orphan of the container to PID 1 and sends
//! PID 1 only the signals it handles, so machined as a container's entrypoint splits in two
//! (the pattern of `tini`): this small init re-executes machined as its one child, reaps every
//! process that ends in the container, forwards SIGTERM, SIGINT and SIGHUP to machined
//! (SIGTERM = graceful shutdown), and exits with machined's exit code, which the container's
//! restart policy acts on (see `platform::container`). machined itself then waits only for its
//! own children, as tokio expects.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Set in the environment of the machined that this init starts, so it does not split again.
pub const CHILD_ENV: &str = "KILN_MACHINED_CHILD";

/// Exit code when machined could not be started at all (the container restarts).
const EXIT_SPAWN_FAILED: i32 = 127;

/// Whether this process is a container's PID 1 that has not split yet.
pub fn is_container_init() -> bool {
    nix::unistd::getpid().as_raw() == 1 && std::env::var_os(CHILD_ENV).is_none()
}

/// The signals the init takes with sigwait (blocked in it).
fn init_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals
}

/// In the machined that the init started: unblocks the signals the init blocked (a child
/// inherits the mask across exec), so SIGTERM reaches machined's handler.
pub fn unblock_inherited_signals() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let _ = init_signals().thread_unblock();
    }
}

/// Runs machined (this binary, same arguments) as the only child, reaps every process, and
/// returns machined's exit code (128 + signal when it was killed).
pub fn supervise() -> i32 {
    let signals = init_signals();
    // Blocked here and taken with sigwait below; the child inherits the mask and unblocks
    // them first thing ([`unblock_inherited_signals`]).
    if let Err(e) = signals.thread_block() {
        eprintln!("machined (pid 1): blocking signals: {e}");
        return EXIT_SPAWN_FAILED;
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "machined".into());
    // The resolved path, so the child is called `machined` in `ps`, not `exe`.
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let child = match Command::new(&exe)
        .arg0(argv0)
        .args(args)
        .env(CHILD_ENV, "1")
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "machined (pid 1): starting machined from {}: {e}",
                exe.display()
            );
            return EXIT_SPAWN_FAILED;
        }
    };
    let machined = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // Reaped by waitpid below, never through `child`.
    drop(child);
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap(machined) {
                    return code;
                }
            }
            Ok(sig) => {
                let _ = kill(machined, sig);
            }
            Err(_) => {}
        }
    }
}

/// Reaps every child that has ended; machined's exit code once it is among them.
fn reap(machined: Pid) -> Option<i32> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == machined => return Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == machined => {
                return Some(128 + sig as i32);
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("machined (pid 1): waitpid: {e}");
                return None;
            }
        }
    }
}
