//! The node launcher of the qemu provisioner: each node's power switch and firmware. It
//! serves the node's configuration over HTTP on the cluster gateway (the node finds it through
//! `kiln.config=` on its kernel command line), runs QEMU, and takes the process launcher's
//! one-line commands on the node's Unix socket, carried out through QMP: `poweroff` (the ACPI
//! power button, then `quit` after a grace period), `poweron`, `reset` (hard), `pause` /
//! `resume` (`stop` / `cont`), `link-down` / `link-up` (`set_link` of the first NIC), and
//! `nic-down N` / `nic-up N` ([`NicCommand`]: `set_link` of NIC N, counted from 0, for nodes
//! with several NICs).
//!
//! QEMU runs with `-no-reboot`, so a guest reboot ends it; a second QMP socket reports the
//! `SHUTDOWN` event's reason, and the launcher starts QEMU again after a reboot (reading the
//! kernel and initramfs anew: the guides' development loop) and stays off after a power-off.
//!
//! With direct kernel boot the launcher is also the node's bootloader: at every power-on it
//! picks the slot from the node's boot disk ([`super::bootdisk`]) and boots that slot's kernel
//! and initramfs (the image's for the built-in release), naming the slot on the kernel command
//! line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, UnixListener};

use super::accel::{Accel, AccelChoice};
use super::launch::{Boot, Nic, NodeLaunch, OVMF_CODE, OVMF_VARS};
use super::qmp::Qmp;
use super::{NAME, QemuNode};
use crate::provision::process::launcher::{Command, LaunchError, Reply};
use crate::provision::{NodeStatus, PowerState};
use crate::state::{NodeState, StateDir};

/// The node's QMP socket (commands).
pub fn qmp_socket(dir: &StateDir, node: &str) -> PathBuf {
    dir.socket_file(&format!("{node}.qmp"))
}

/// The node's second QMP socket, which the launcher reads events from.
pub fn qmp_events_socket(dir: &StateDir, node: &str) -> PathBuf {
    dir.socket_file(&format!("{node}.qmp-events"))
}

/// The node's human monitor socket (`echo q | socat - unix-connect:<node>.monitor`).
pub fn monitor_socket(dir: &StateDir, node: &str) -> PathBuf {
    dir.socket_file(&format!("{node}.monitor"))
}

/// Where the cluster records the accelerator its nodes use (`cluster show`).
pub fn accel_file(dir: &StateDir) -> PathBuf {
    dir.dir.join("accel.json")
}

/// Link down or up of one of a node's NICs (`nic-down 1`), the launcher's command for
/// `kiln cluster node link-down NODE --nic N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicCommand {
    /// The NIC, counted from 0 in the order QEMU gets them (`eth0`, `eth1`, ... in the guest).
    pub nic: usize,
    /// Link up (`true`) or down.
    pub up: bool,
}

impl NicCommand {
    /// The command's word (`nic-up` / `nic-down`).
    pub fn word(self) -> &'static str {
        if self.up { "nic-up" } else { "nic-down" }
    }

    /// The line the launcher reads.
    pub fn line(self) -> String {
        format!("{} {}", self.word(), self.nic)
    }

    /// The command a line names.
    pub fn parse(line: &str) -> Option<Self> {
        let (word, nic) = line.trim().split_once(' ')?;
        let up = match word {
            "nic-up" => true,
            "nic-down" => false,
            _ => return None,
        };
        Some(Self {
            nic: nic.trim().parse().ok()?,
            up,
        })
    }
}

/// How long an ACPI power-off may take before QEMU is stopped hard.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let action = action.into();
    move |source| LaunchError::Io { action, source }
}

/// Why QEMU last stopped, from the `SHUTDOWN` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The guest rebooted (or panicked, or QMP reset it): start again.
    Reboot,
    /// The guest or the host powered it off: stay off.
    PowerOff,
}

/// Reads the `SHUTDOWN` event's reason on the events socket, for the current QEMU.
fn watch_events(path: PathBuf, last: Arc<Mutex<Option<Stopped>>>) {
    use std::io::{BufRead as _, Write as _};
    std::thread::spawn(move || {
        let mut stream = None;
        for _ in 0..200 {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&path) {
                stream = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let Some(mut stream) = stream else {
            eprintln!("launcher: no QMP event socket at {}", path.display());
            return;
        };
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        let _ = stream.write_all(b"{\"execute\":\"qmp_capabilities\"}\n");
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["event"] == "SHUTDOWN" {
                let reason = v["data"]["reason"].as_str().unwrap_or_default();
                let stopped = match reason {
                    "guest-reset" | "guest-panic" | "host-qmp-system-reset" => Stopped::Reboot,
                    _ => Stopped::PowerOff,
                };
                eprintln!("launcher: QEMU shuts down ({reason})");
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(stopped);
            }
        }
    });
}

/// The kernel argument naming the control-plane nodes a node joins through and asks for its
/// API certificate (machined's `--join-peer` on `metal`).
pub const PEERS_ARG: &str = "kiln.peers";

struct Launcher {
    dir: StateDir,
    node: NodeState,
    peers: Vec<String>,
    qemu: QemuNode,
    accel: Accel,
    config_url: Option<String>,
    child: Option<tokio::process::Child>,
    stopped: Arc<Mutex<Option<Stopped>>>,
    paused: bool,
    off: bool,
    boots: u32,
    link_up: bool,
    /// How the last boot ended (for the slot record when a new release never confirmed).
    last_end: String,
}

impl Launcher {
    /// The node's boot disk, when it has slots (direct kernel boot).
    fn boot_disk(&self) -> Option<PathBuf> {
        (!self.qemu.options.uefi).then(|| super::bootdisk::path(&self.dir, &self.node.name))
    }

    fn launch(&self, slot: Option<&super::bootdisk::Booted>) -> Result<NodeLaunch, LaunchError> {
        let o = &self.qemu.options;
        let boot = if o.uefi {
            let vars = self.dir.dir.join(format!("{}.vars.fd", self.node.name));
            if !vars.exists() {
                std::fs::copy(OVMF_VARS, &vars)
                    .map_err(io(format!("copying {OVMF_VARS} (install ovmf)")))?;
            }
            Boot::Uefi {
                code: OVMF_CODE.into(),
                vars,
            }
        } else {
            let mut extra = String::new();
            if let Some(url) = &self.config_url {
                extra.push_str(&format!("kiln.config={url} "));
            }
            if !self.peers.is_empty() {
                extra.push_str(&format!("{}={} ", PEERS_ARG, self.peers.join(",")));
            }
            if let Some(slot) = slot {
                extra.push_str(&slot.cmdline_arg());
                extra.push(' ');
            }
            extra.push_str(&o.extra_cmdline);
            // The development loop: a rebuilt image is what the next boot runs, unless the
            // slot holds a release of its own.
            let (kernel, initrd) = slot
                .and_then(|s| s.files.clone())
                .or_else(|| o.image_store.as_deref().and_then(super::newest_image))
                .unwrap_or_else(|| (o.kernel.clone(), o.initrd.clone()));
            Boot::Direct {
                kernel,
                initrd,
                extra_cmdline: extra,
            }
        };
        Ok(NodeLaunch {
            qemu: o.qemu.clone(),
            name: self.node.name.clone(),
            memory_mib: self
                .node
                .resources
                .and_then(|r| r.memory)
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(o.memory_mib),
            cpus: self.node.resources.and_then(|r| r.cpus).unwrap_or(o.cpus),
            accel: self.accel,
            boot,
            disk: Some(self.qemu.disk.clone()),
            boot_disk: slot.and(self.boot_disk()),
            nics: self.qemu.nics(),
            console_log: self.dir.log(&self.node.name),
            qmp_socket: qmp_socket(&self.dir, &self.node.name),
            monitor_socket: monitor_socket(&self.dir, &self.node.name),
        })
    }

    fn spawn(&mut self) -> Result<(), LaunchError> {
        let slot = match self.boot_disk() {
            Some(disk) => {
                let scratch = self.dir.node_root(&self.node.name).join("boot-kernels");
                let booted = super::bootdisk::choose(&disk, &scratch, &self.last_end)
                    .map_err(|e| io("choosing the boot slot")(std::io::Error::other(e)))?;
                if let Some(failed) = &booted.choice.fell_back {
                    eprintln!("launcher: {}: {}", self.node.name, failed.reason);
                }
                eprintln!(
                    "launcher: {} boots slot {} ({})",
                    self.node.name,
                    booted.choice.slot,
                    booted
                        .choice
                        .content
                        .as_ref()
                        .map_or("empty", |c| c.version.as_str())
                );
                Some(booted)
            }
            None => None,
        };
        let launch = self.launch(slot.as_ref())?;
        let events = qmp_events_socket(&self.dir, &self.node.name);
        for s in [&launch.qmp_socket, &launch.monitor_socket, &events] {
            let _ = std::fs::remove_file(s);
        }
        use std::os::unix::process::CommandExt as _;
        let mut cmd = launch.command();
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", events.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0);
        prepare_child(&mut cmd);
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(io(format!("starting {}", launch.qemu.display())))?;
        if let Some(pid) = child.id() {
            crate::daemon::write_pidfile(&self.dir.pidfile(&self.node.name), pid)?;
        }
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = None;
        watch_events(events, self.stopped.clone());
        self.child = Some(child);
        self.boots += 1;
        self.paused = false;
        self.off = false;
        self.link_up = true;
        Ok(())
    }

    async fn qmp<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Qmp) -> Result<T, super::qmp::QmpError> + Send + 'static,
    ) -> Result<T, String> {
        if self.child.is_none() {
            return Err("the node is off: `kiln cluster node start` it first".to_owned());
        }
        let path = qmp_socket(&self.dir, &self.node.name);
        tokio::task::spawn_blocking(move || {
            let mut q = Qmp::connect(&path, Duration::from_secs(10)).map_err(|e| e.to_string())?;
            f(&mut q).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn hard_off(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
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
                self.off = true;
                if self.child.is_none() {
                    return Ok(());
                }
                if self.paused {
                    let _ = self.qmp(|q| q.resume()).await;
                }
                let acpi = self.qmp(|q| q.powerdown()).await;
                let ended = match (acpi, self.child.as_mut()) {
                    (Ok(()), Some(child)) => tokio::time::timeout(POWEROFF_GRACE, child.wait())
                        .await
                        .is_ok(),
                    _ => false,
                };
                if !ended {
                    eprintln!(
                        "launcher: {} did not power off within {POWEROFF_GRACE:?}; stopping QEMU",
                        self.node.name
                    );
                }
                self.hard_off().await;
            }
            Command::Poweron => {
                if self.child.is_none() {
                    self.spawn().map_err(|e| e.to_string())?;
                }
            }
            Command::Reset => {
                self.hard_off().await;
                self.last_end = "reset".to_owned();
                self.spawn().map_err(|e| e.to_string())?;
            }
            Command::Pause => {
                self.qmp(|q| q.pause()).await?;
                self.paused = true;
            }
            Command::Resume => {
                self.qmp(|q| q.resume()).await?;
                self.paused = false;
            }
            Command::LinkDown | Command::LinkUp => {
                self.nic_link(NicCommand {
                    nic: 0,
                    up: cmd == Command::LinkUp,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// `set_link` of one NIC; the node's link state is its first NIC's.
    async fn nic_link(&mut self, c: NicCommand) -> Result<(), String> {
        let count = self.qemu.nics().len();
        if c.nic >= count {
            return Err(format!(
                "{} has {count} NIC(s), numbered from 0: there is no NIC {} (give nodes more with `cluster create --nics N`)",
                self.node.name, c.nic
            ));
        }
        self.qmp(move |q| q.set_link(&Nic::id(c.nic), c.up)).await?;
        if c.nic == 0 {
            self.link_up = c.up;
        }
        Ok(())
    }
}

/// The child dies with the launcher (the launcher is the node's power switch).
#[allow(unsafe_code)]
fn prepare_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// Serves `config` to every HTTP GET on `listener` (the node's `kiln.config=` URL). Hand-made:
/// one fixed document, HTTP/1.0, no keep-alive; a web framework would be most of the launcher.
async fn serve_config(listener: TcpListener, config: Arc<Vec<u8>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let config = config.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                config.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&config).await;
            let _ = stream.shutdown().await;
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
    let qemu: QemuNode = me
        .provider_state(NAME)
        .ok_or_else(|| LaunchError::NoSuchNode {
            node: format!("{node} (qemu section)"),
            path: sd.state_file(),
        })?;
    let accel = std::fs::read(accel_file(&sd))
        .ok()
        .and_then(|b| serde_json::from_slice::<AccelChoice>(&b).ok())
        .map_or(Accel::Tcg, |c| c.accel);
    let config_url = if me.inject_config {
        let config = std::fs::read(&me.config).map_err(io(format!(
            "reading the configuration {}",
            me.config.display()
        )))?;
        let listener = TcpListener::bind(SocketAddr::new(state.network.gateway, 0))
            .await
            .map_err(io(format!(
                "binding the configuration server on {}",
                state.network.gateway
            )))?;
        let port = listener.local_addr().map_err(io("its port"))?.port();
        tokio::spawn(serve_config(listener, Arc::new(config)));
        Some(match state.network.gateway {
            IpAddr::V4(gw) => format!("http://{gw}:{port}/config.yaml"),
            IpAddr::V6(gw) => format!("http://[{gw}]:{port}/config.yaml"),
        })
    } else {
        None
    };
    let socket = sd.socket(&node);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).map_err(io(format!("binding {}", socket.display())))?;
    let peers = state
        .control_plane()
        .map(|n| n.address.to_string())
        .collect();
    let mut l = Launcher {
        dir: sd,
        peers,
        node: me,
        qemu,
        accel,
        config_url,
        child: None,
        stopped: Arc::new(Mutex::new(None)),
        paused: false,
        off: false,
        boots: 0,
        link_up: true,
        last_end: "power-on".to_owned(),
    };
    if let Some(disk) = l.boot_disk() {
        let seed = crate::install::boot_dir(&l.dir, &l.node.name);
        super::bootdisk::ensure(&disk, &seed)
            .map_err(|e| io("making the boot disk")(std::io::Error::other(e)))?;
    }
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
                let _ = std::fs::remove_file(l.dir.pidfile(&l.node.name));
                // The event arrives just before QEMU exits; give its reader a moment.
                let mut why = None;
                for _ in 0..20 {
                    why = *l.stopped.lock().unwrap_or_else(|e| e.into_inner());
                    if why.is_some() { break; }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                l.last_end = match why {
                    Some(Stopped::PowerOff) => "it powered off".to_owned(),
                    Some(Stopped::Reboot) => "the guest reset (a reboot or a kernel panic)".to_owned(),
                    None => format!("QEMU stopped unexpectedly ({status:?})"),
                };
                match why {
                    Some(Stopped::PowerOff) => {
                        eprintln!("launcher: {} powered off", l.node.name);
                        l.off = true;
                    }
                    Some(Stopped::Reboot) => {
                        eprintln!("launcher: {} reboots", l.node.name);
                        if !l.off { l.spawn()?; }
                    }
                    None => {
                        eprintln!("launcher: QEMU of {} stopped unexpectedly ({status:?}); starting it again", l.node.name);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if !l.off { l.spawn()?; }
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
                let reply = match (Command::parse(line.trim()), NicCommand::parse(&line)) {
                    (None, Some(nic)) => match l.nic_link(nic).await {
                        Ok(()) => Reply::status(l.status()),
                        Err(error) => Reply::error(error),
                    },
                    (None, None) => Reply::error(format!(
                        "unknown command {:?}: use status, poweroff, poweron, reset, pause, resume, link-down, link-up, nic-down N or nic-up N",
                        line.trim()
                    )),
                    (Some(cmd), _) => match l.command(cmd).await {
                        Ok(()) => Reply::status(l.status()),
                        Err(error) => Reply::error(error),
                    },
                };
                let _ = w.write_all(reply.line().as_bytes()).await;
            }
            _ = term.recv() => {
                l.hard_off().await;
                let _ = std::fs::remove_file(&socket);
                return Ok(());
            }
        }
    }
}
