//! The node launcher of the process provisioner: each node's power switch and firmware. It
//! starts machined (as `kiln machined`, in the node's network namespace when there is one, in
//! its own process group, dying with the launcher), starts it again when it exits with the
//! reboot code or crashes, stays off on the power-off code, and takes one-line commands on a
//! Unix socket: `status`, `poweroff` (hard), `poweron`, `reset` (hard restart), `pause` /
//! `resume` (SIGSTOP / SIGCONT of the node's processes), `link-down` / `link-up` (the host
//! side of its veth, bridge mode only). Each answer is one JSON line.
//!
//! It is also the node's bootloader: at every power-on it picks the boot slot from the node's
//! slot record ([`crate::install::choose_slot`]: a new release boots once, then is permanent
//! or falls back) and starts that slot's machined. A new release that neither confirms nor
//! exits within the watchdog ([`kiln_os_api::slots::watchdog`]) is reset, so the next
//! power-on falls back: a release that hangs cannot keep a node away.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{NAME, ProcessNode};
use crate::provision::{NodeStatus, PowerAction, PowerState};
use crate::state::{NodeState, StateDir};

/// A launcher command (one word on the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    /// Report the status.
    Status,
    /// Hard power-off.
    Poweroff,
    /// Power on.
    Poweron,
    /// Hard restart.
    Reset,
    /// SIGSTOP the node's processes.
    Pause,
    /// SIGCONT them.
    Resume,
    /// Set the host side of the veth down.
    LinkDown,
    /// And up.
    LinkUp,
}

impl From<PowerAction> for Command {
    fn from(a: PowerAction) -> Self {
        match a {
            PowerAction::Stop => Command::Poweroff,
            PowerAction::Start => Command::Poweron,
            PowerAction::Reset => Command::Reset,
            PowerAction::Pause => Command::Pause,
            PowerAction::Resume => Command::Resume,
            PowerAction::LinkDown => Command::LinkDown,
            PowerAction::LinkUp => Command::LinkUp,
        }
    }
}

impl Command {
    fn word(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Poweroff => "poweroff",
            Command::Poweron => "poweron",
            Command::Reset => "reset",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::LinkDown => "link-down",
            Command::LinkUp => "link-up",
        }
    }

    /// The command a word names.
    pub fn parse(word: &str) -> Option<Command> {
        [
            Command::Status,
            Command::Poweroff,
            Command::Poweron,
            Command::Reset,
            Command::Pause,
            Command::Resume,
            Command::LinkDown,
            Command::LinkUp,
        ]
        .into_iter()
        .find(|c| c.word() == word)
    }
}

/// Why a launcher command failed.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// Nobody listens on the socket.
    #[error(
        "{socket}: the node launcher is not running (is the cluster up? `kiln cluster show`): {source}"
    )]
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// It did not answer in time.
    #[error("{socket}: no answer to {command} within {timeout:?}")]
    NoAnswer {
        /// The socket.
        socket: PathBuf,
        /// The command.
        command: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The connection broke or the answer was not a launcher's.
    #[error("{socket}: {reason}")]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The launcher refused the command.
    #[error("{command}: {reason}")]
    Refused {
        /// The command.
        command: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The launcher did not come up after it was started.
    #[error("the node launcher did not start (see {log}): {last}")]
    NotStarted {
        /// Its log.
        log: PathBuf,
        /// The last error talking to it.
        last: String,
    },
}

/// A launcher's answer (one JSON line); the qemu launcher speaks the same protocol.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<NodeStatus>,
}

impl Reply {
    /// The command worked; the node is now `status`.
    pub fn status(status: NodeStatus) -> Self {
        Self {
            ok: true,
            error: String::new(),
            status: Some(status),
        }
    }
    /// The command failed.
    pub fn error(error: String) -> Self {
        Self {
            ok: false,
            error,
            status: None,
        }
    }
    /// The JSON line to send.
    pub fn line(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_else(|_| "{\"ok\":false}".to_owned());
        format!("{text}\n")
    }
}

/// Sends a command to the launcher listening on `socket`.
pub async fn send(socket: &Path, command: Command) -> Result<NodeStatus, LauncherError> {
    send_line(socket, command.word(), command.word()).await
}

/// Sends `request`, a command with its arguments (the qemu launcher's `nic-down 1`), to the
/// launcher listening on `socket`; `word` names the command in errors.
pub async fn send_line(
    socket: &Path,
    word: &'static str,
    request: &str,
) -> Result<NodeStatus, LauncherError> {
    let proto = |reason: String| LauncherError::Protocol {
        socket: socket.to_path_buf(),
        reason,
    };
    let connect = Duration::from_secs(5);
    let stream = tokio::time::timeout(connect, UnixStream::connect(socket))
        .await
        .map_err(|_| LauncherError::NoAnswer {
            socket: socket.to_path_buf(),
            command: word,
            timeout: connect,
        })?
        .map_err(|source| LauncherError::NotRunning {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(|e| proto(format!("sending {word}: {e}")))?;
    let mut line = String::new();
    let answer = Duration::from_secs(30);
    tokio::time::timeout(answer, BufReader::new(r).read_line(&mut line))
        .await
        .map_err(|_| LauncherError::NoAnswer {
            socket: socket.to_path_buf(),
            command: word,
            timeout: answer,
        })?
        .map_err(|e| proto(format!("reading the answer to {word}: {e}")))?;
    let reply: Reply = serde_json::from_str(&line)
        .map_err(|e| proto(format!("malformed answer {line:?}: {e}")))?;
    if !reply.ok {
        return Err(LauncherError::Refused {
            command: word,
            reason: reply.error,
        });
    }
    reply
        .status
        .ok_or_else(|| proto("the launcher sent no status".to_owned()))
}

/// Why the launcher itself failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The cluster state could not be read.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The node is not in the state.
    #[error("node {node:?} is not in {path}")]
    NoSuchNode {
        /// The node.
        node: String,
        /// The state file.
        path: PathBuf,
    },
    /// A system call or file operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The error.
        source: std::io::Error,
    },
    /// Locating the binary failed.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] crate::network::netlink::NetlinkError),
    /// The boot slots could not be read or written.
    #[error(transparent)]
    Slots(#[from] crate::install::InstallError),
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let action = action.into();
    move |source| LaunchError::Io { action, source }
}

struct Launcher {
    dir: StateDir,
    node: NodeState,
    process: ProcessNode,
    peers: Vec<String>,
    child: Option<tokio::process::Child>,
    paused: bool,
    /// Powered off on purpose (power-off code or `poweroff`).
    off: bool,
    boots: u32,
    link_up: bool,
    /// How the last boot ended (for the slot record when a new release never confirmed).
    last_end: String,
    /// When this boot, the one try of a new release, counts as hung if not confirmed.
    watchdog: Option<tokio::time::Instant>,
}

impl Launcher {
    fn spawn(&mut self) -> Result<(), LaunchError> {
        let exe = crate::daemon::kiln_binary()?;
        let log_path = self.dir.log(&self.node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let boot = crate::install::boot_dir(&self.dir, &self.node.name);
        let child = kiln_os_api::slots::start_chosen(
            &self.last_end,
            |why| Ok(crate::install::choose_slot(&boot, why)?),
            |choice| self.start_machined(&boot, choice, &exe, &log),
            |e| format!("starting its machined failed: {e}"),
        )?;
        if let Some(pid) = child.id() {
            crate::daemon::write_pidfile(&self.dir.pidfile(&self.node.name), pid)?;
        }
        self.watchdog = pending_confirmation(&boot)
            .then(|| tokio::time::Instant::now() + kiln_os_api::slots::watchdog());
        self.child = Some(child);
        self.boots += 1;
        self.paused = false;
        self.off = false;
        Ok(())
    }

    /// Starts machined for `choice` (one try of [`kiln_os_api::slots::start_chosen`]).
    fn start_machined(
        &self,
        boot: &std::path::Path,
        choice: &kiln_os_api::slots::BootChoice,
        exe: &std::path::Path,
        log: &std::fs::File,
    ) -> Result<tokio::process::Child, LaunchError> {
        use std::os::unix::process::CommandExt as _;
        if let Some(failed) = &choice.fell_back {
            eprintln!("launcher: {}: {}", self.node.name, failed.reason);
        }
        let (program, slot_args) = crate::install::machined_command(boot, choice, exe);
        eprintln!(
            "launcher: {} boots slot {} ({})",
            self.node.name,
            choice.slot,
            choice
                .content
                .as_ref()
                .map_or("empty", |c| c.version.as_str())
        );
        let mut cmd = std::process::Command::new(program);
        cmd.args(slot_args)
            .env(kiln_os_api::slots::BOOT_DIR_ENV, boot)
            .env(kiln_os_api::slots::BOOT_SLOT_ENV, choice.slot.name())
            .arg("--root")
            .arg(self.dir.node_root(&self.node.name))
            .arg("--address")
            .arg(self.node.address.to_string())
            .arg("--hostname")
            .arg(&self.node.name);
        let cmdline = crate::node_image::cmdline(&self.dir, &self.node.name);
        // A node booted with `kiln.config=` fetches its configuration from that URL.
        let from_url = cmdline
            .as_deref()
            .is_some_and(|c| c.split_whitespace().any(|a| a.starts_with("kiln.config=")));
        if self.node.inject_config && !from_url {
            cmd.arg("--config").arg(&self.node.config);
        }
        for p in &self.peers {
            cmd.arg("--join-peer").arg(p);
        }
        if let Some(cmdline) = cmdline {
            cmd.arg(format!("--kernel-cmdline={cmdline}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("duplicating the log"))?)
            .stderr(log.try_clone().map_err(io("duplicating the log"))?)
            .process_group(0);
        let netns = match &self.process.netns {
            Some(ns) => Some(
                std::fs::File::open(format!("/var/run/netns/{ns}"))
                    .map_err(io(format!("opening network namespace {ns}")))?,
            ),
            None => None,
        };
        prepare_child(&mut cmd, netns);
        tokio::process::Command::from(cmd)
            .spawn()
            .map_err(io("starting machined"))
    }

    /// The watchdog fired: resets the node if its new release still has not confirmed.
    async fn watchdog_fired(&mut self) -> Result<(), LaunchError> {
        self.watchdog = None;
        let boot = crate::install::boot_dir(&self.dir, &self.node.name);
        if self.child.is_none() || !pending_confirmation(&boot) {
            return Ok(());
        }
        let secs = kiln_os_api::slots::watchdog().as_secs();
        eprintln!(
            "launcher: {}: the new release did not confirm within {secs} s; resetting the node",
            self.node.name
        );
        self.hard_off().await;
        self.last_end =
            format!("it did not confirm within {secs} s: the launcher's watchdog reset it");
        self.spawn()
    }

    fn signal_group(&self, sig: Signal) {
        if let Some(pid) = self.child.as_ref().and_then(tokio::process::Child::id) {
            let _ = kill(Pid::from_raw(-(pid as i32)), sig);
        }
    }

    async fn hard_off(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.signal_group(Signal::SIGCONT);
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
        let _ = std::fs::remove_file(self.dir.pidfile(&self.node.name));
        self.paused = false;
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            power: if self.child.is_none() {
                PowerState::Off
            } else if self.paused {
                PowerState::Paused
            } else {
                PowerState::Running
            },
            pid: self.child.as_ref().and_then(tokio::process::Child::id),
            boots: self.boots,
            link_up: self.link_up,
        }
    }

    async fn command(&mut self, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::Status => {}
            Command::Poweroff => {
                self.hard_off().await;
                self.off = true;
            }
            Command::Poweron => {
                if self.child.is_none() {
                    self.spawn().map_err(|e| e.to_string())?;
                }
            }
            Command::Reset => {
                self.hard_off().await;
                self.last_end = "reset".into();
                self.spawn().map_err(|e| e.to_string())?;
            }
            Command::Pause => {
                if self.child.is_none() {
                    return Err("the node is off".to_owned());
                }
                self.signal_group(Signal::SIGSTOP);
                self.paused = true;
            }
            Command::Resume => {
                self.signal_group(Signal::SIGCONT);
                self.paused = false;
            }
            Command::LinkDown | Command::LinkUp => {
                let up = cmd == Command::LinkUp;
                let veth = self.process.veth.clone().ok_or_else(|| {
                    "cutting a node's link needs the bridge network (run as root)".to_owned()
                })?;
                let handle = crate::network::netlink::connect().map_err(|e| e.to_string())?;
                crate::network::netlink::set_link(&handle, &veth, up)
                    .await
                    .map_err(|e| e.to_string())?;
                self.link_up = up;
            }
        }
        Ok(())
    }
}

/// Whether the boot directory's record says the booted slot is a new release on its one try.
fn pending_confirmation(boot: &Path) -> bool {
    kiln_os_api::slots::SlotRecord::load(boot)
        .ok()
        .flatten()
        .is_some_and(|r| r.pending_confirmation())
}

/// Makes the child enter the network namespace `ns` (if any) and die with the launcher.
#[allow(unsafe_code)]
fn prepare_child(cmd: &mut std::process::Command, ns: Option<std::fs::File>) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // setns(2) on a file descriptor opened before the fork; it allocates nothing and touches no
    // parent state.
    unsafe {
        cmd.pre_exec(move || {
            // The node is powered by its launcher: a launcher that dies takes its node with it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if let Some(ns) = &ns {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// Runs the launcher of `node` in the cluster whose state is in `dir` until SIGTERM.
pub async fn run(dir: PathBuf, node: String) -> Result<(), LaunchError> {
    let sd = StateDir { dir };
    let state = sd.load()?;
    let me = state
        .node(&node)
        .cloned()
        .ok_or_else(|| LaunchError::NoSuchNode {
            node: node.clone(),
            path: sd.state_file(),
        })?;
    let peers = state
        .control_plane()
        .map(|n| n.address.to_string())
        .collect();
    let socket = sd.socket(&node);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(io(format!("binding {}", socket.display())))?;
    let mut l = Launcher {
        dir: sd,
        process: me.provider_state(NAME).unwrap_or_default(),
        node: me,
        peers,
        child: None,
        paused: false,
        off: false,
        boots: 0,
        link_up: true,
        last_end: "power-on".into(),
        watchdog: None,
    };
    l.spawn()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("handling SIGTERM"))?;
    loop {
        let exited = async {
            match l.child.as_mut() {
                Some(c) => c.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = exited => {
                l.child = None;
                let code = status.and_then(|s| s.code());
                l.last_end = match code {
                    Some(EXIT_REBOOT) => "rebooted".to_owned(),
                    Some(c) => format!("machined exited with code {c}"),
                    None => "machined was killed".to_owned(),
                };
                match code {
                    Some(EXIT_SHUTDOWN) => {
                        eprintln!("launcher: {} powered off", l.node.name);
                        l.off = true;
                    }
                    Some(EXIT_REBOOT) => {
                        eprintln!("launcher: {} reboots", l.node.name);
                        l.spawn()?;
                    }
                    other => {
                        // Like firmware after a crash: start again, after a pause.
                        eprintln!("launcher: {} stopped unexpectedly ({other:?}); starting it again", l.node.name);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if !l.off {
                            l.spawn()?;
                        }
                    }
                }
            }
            () = async {
                match l.watchdog {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => l.watchdog_fired().await?,
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    continue;
                }
                let reply = match Command::parse(line.trim()) {
                    None => Reply {
                        ok: false,
                        error: format!(
                            "unknown command {:?}: use status, poweroff, poweron, reset, pause, resume, link-down or link-up",
                            line.trim()
                        ),
                        status: None,
                    },
                    Some(cmd) => match l.command(cmd).await {
                        Ok(()) => Reply { ok: true, error: String::new(), status: Some(l.status()) },
                        Err(error) => Reply { ok: false, error, status: None },
                    },
                };
                let text = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".to_owned());
                let _ = w.write_all(format!("{text}\n").as_bytes()).await;
            }
            _ = term.recv() => {
                l.hard_off().await;
                let _ = std::fs::remove_file(&socket);
                return Ok(());
            }
        }
    }
}
