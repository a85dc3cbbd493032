//! Runs a service's process: output into the service log, SIGTERM then SIGKILL on stop, and the
//! child bound to machined's life (it dies if machined dies, even by SIGKILL).

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{oneshot, watch};

use crate::logbuf::LogBuffer;

/// The process of a service.
#[derive(Debug, Clone, Default)]
pub struct CommandSpec {
    /// Program path or name on PATH.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// Exited by itself; the code, or `None` when killed by a signal.
    Exited(Option<i32>),
    /// Stopped because the supervisor asked.
    Stopped,
    /// Could not be started.
    SpawnFailed(std::io::Error),
}

async fn pump(mut r: impl tokio::io::AsyncRead + Unpin, log: &LogBuffer) {
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.write(&buf[..n]),
        }
    }
}

/// Runs `spec` (in `container` when given) until it exits or `stop` becomes true; `started`
/// gets its pid once it runs.
pub async fn run_process(
    spec: &CommandSpec,
    container: Option<std::sync::Arc<crate::extensions::container::ContainerSetup>>,
    log: &LogBuffer,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    started: oneshot::Sender<u32>,
) -> RunOutcome {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    bind_to_parent(&mut cmd);
    if let Some(c) = &container {
        c.install(&mut cmd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return RunOutcome::SpawnFailed(e),
    };
    let _ = started.send(child.id().unwrap_or_default());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let output = async {
        tokio::join!(
            async {
                if let Some(o) = stdout {
                    pump(o, log).await;
                }
            },
            async {
                if let Some(e) = stderr {
                    pump(e, log).await;
                }
            }
        );
    };
    tokio::pin!(output);
    let mut output_done = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                if !output_done {
                    // Drain what is left, but never hang on a grandchild holding the pipe.
                    let _ = tokio::time::timeout(Duration::from_millis(200), &mut output).await;
                }
                return match status {
                    Ok(s) => RunOutcome::Exited(s.code()),
                    Err(_) => RunOutcome::Exited(None),
                };
            }
            () = &mut output, if !output_done => output_done = true,
            () = stopped(&mut stop) => {
                terminate(&mut child, grace).await;
                // What it printed while stopping belongs in its log too.
                if !output_done {
                    let _ = tokio::time::timeout(Duration::from_millis(200), &mut output).await;
                }
                return RunOutcome::Stopped;
            }
        }
    }
}

/// Resolves once `stop` is raised.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Makes the kernel send SIGKILL to the child when machined dies.
#[allow(unsafe_code)]
fn bind_to_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
