//! The node launcher: each node's power switch and firmware. It starts machined (as `kiln
//! machined`, in the node's network namespace when there is one, in its own process group),
//! starts it again when it exits with the reboot code or crashes, stays off on the power-off
//! code, and takes commands on a Unix socket: `status`, `poweroff` (hard), `poweron`, `reset`
//! (hard restart), `pause` / `resume` (SIGSTOP / SIGCONT of the node's processes), `link-down`
//! / `link-up` (the host side of its veth, bridge mode only).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kiln_os_api::contract::{EXIT_REBOOT, EXIT_SHUTDOWN};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::state::{NodeState, StateDir};

/// What a launcher reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LauncherStatus {
    /// `running`, `paused` or `off`.
    pub state: String,
    /// machined's pid when running.
    pub pid: Option<u32>,
    /// How many times machined started.
    pub boots: u32,
    /// Whether the node's link is up (bridge mode).
    pub link_up: bool,
}

/// Sends a command to the launcher listening on `socket`.
pub async fn send(socket: &Path, command: &str) -> anyhow::Result<LauncherStatus> {
    let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow::anyhow!("{}: the launcher did not answer", socket.display()))?
        .with_context(|| {
            format!(
                "{}: the node launcher is not running (is the cluster up? `kiln cluster show`)",
                socket.display()
            )
        })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{command}\n").as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{}: no answer to {command}", socket.display()))??;
    #[derive(Deserialize)]
    struct Reply {
        ok: bool,
        #[serde(default)]
        error: String,
        status: Option<LauncherStatus>,
    }
    let reply: Reply = serde_json::from_str(&line)
        .with_context(|| format!("malformed launcher answer {line:?}"))?;
    if !reply.ok {
        bail!("{command}: {}", reply.error);
    }
    reply.status.context("the launcher sent no status")
}

struct Launcher {
    dir: StateDir,
    node: NodeState,
    peers: Vec<String>,
    child: Option<tokio::process::Child>,
    paused: bool,
    /// Powered off on purpose (power-off code or `poweroff`).
    off: bool,
    boots: u32,
    link_up: bool,
}

impl Launcher {
    fn spawn(&mut self) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let exe = crate::daemon::kiln_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.log(&self.node.name))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("machined")
            .arg("--root")
            .arg(self.dir.node_root(&self.node.name))
            .arg("--address")
            .arg(self.node.address.to_string())
            .arg("--hostname")
            .arg(&self.node.name);
        if self.node.inject_config {
            cmd.arg("--config").arg(&self.node.config);
        }
        for p in &self.peers {
            cmd.arg("--join-peer").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if let Some(ns) = &self.node.netns {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
                .with_context(|| format!("opening network namespace {ns}"))?;
            enter_netns_before_exec(&mut cmd, file);
        }
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .context("starting machined")?;
        if let Some(pid) = child.id() {
            std::fs::write(self.dir.pidfile(&self.node.name), format!("{pid}\n"))?;
        }
        self.child = Some(child);
        self.boots += 1;
        self.paused = false;
        self.off = false;
        Ok(())
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

    fn status(&self) -> LauncherStatus {
        LauncherStatus {
            state: if self.child.is_none() {
                "off"
            } else if self.paused {
                "paused"
            } else {
                "running"
            }
            .to_owned(),
            pid: self.child.as_ref().and_then(tokio::process::Child::id),
            boots: self.boots,
            link_up: self.link_up,
        }
    }

    async fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        match cmd {
            "status" => {}
            "poweroff" => {
                self.hard_off().await;
                self.off = true;
            }
            "poweron" => {
                if self.child.is_none() {
                    self.spawn()?;
                }
            }
            "reset" => {
                self.hard_off().await;
                self.spawn()?;
            }
            "pause" => {
                if self.child.is_none() {
                    bail!("the node is off");
                }
                self.signal_group(Signal::SIGSTOP);
                self.paused = true;
            }
            "resume" => {
                self.signal_group(Signal::SIGCONT);
                self.paused = false;
            }
            "link-down" | "link-up" => {
                let veth = self
                    .node
                    .veth
                    .clone()
                    .context("cutting a node's link needs the bridge network (run as root)")?;
                let handle = crate::network::netlink::connect()?;
                crate::network::netlink::set_link(&handle, &veth, cmd == "link-up").await?;
                self.link_up = cmd == "link-up";
            }
            other => bail!(
                "unknown command {other:?}: use status, poweroff, poweron, reset, pause, resume, link-down or link-up"
            ),
        }
        Ok(())
    }
}

/// Makes the child enter the network namespace `ns` before exec.
#[allow(unsafe_code)]
fn enter_netns_before_exec(cmd: &mut std::process::Command, ns: std::fs::File) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2) on a file
    // descriptor opened before the fork; it allocates nothing and touches no parent state.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}

/// Runs the launcher of `node` in the cluster whose state is in `dir` until SIGTERM.
pub async fn run(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let sd = StateDir { dir };
    let state = sd.load()?;
    let me = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .cloned()
        .with_context(|| format!("node {node:?} is not in {}", sd.state_file().display()))?;
    let peers = state
        .nodes
        .iter()
        .filter(|n| n.role == "controlplane")
        .map(|n| n.address.to_string())
        .collect();
    let socket = sd.socket(&node);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    let mut l = Launcher {
        dir: sd,
        node: me,
        peers,
        child: None,
        paused: false,
        off: false,
        boots: 0,
        link_up: true,
    };
    l.spawn()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    continue;
                }
                let reply = match l.command(line.trim()).await {
                    Ok(()) => serde_json::json!({"ok": true, "status": l.status()}),
                    Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
                };
                let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
            }
            _ = term.recv() => {
                l.hard_off().await;
                let _ = std::fs::remove_file(&socket);
                return Ok(());
            }
        }
    }
}
