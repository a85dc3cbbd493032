//! A QMP client for a node's power switch, over QEMU's QMP Unix socket, with the `qapi` crate's
//! generated commands: pause/resume (`stop`/`cont`), `system_reset`, `system_powerdown` (ACPI
//! power button), `quit`, `set_link` and `query-status`.
//!
//! Blocking by design (one short request at a time); async callers use `spawn_blocking`.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use qapi::qmp::RunState;
use thiserror::Error;

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("connecting to the QMP socket {path}: {source} (is the node's QEMU running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// QEMU's greeting or the capabilities negotiation failed.
    #[error("QMP handshake on {path}: {source}")]
    Handshake {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: qapi::ExecuteError,
    },
    /// A command failed or got no answer.
    #[error("QMP {command} on {path}: {source}")]
    Command {
        /// The QMP command.
        command: &'static str,
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: qapi::ExecuteError,
    },
}

/// What `query-status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Whether the vCPUs run.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `shutdown`, `internal-error`, ...).
    pub state: RunState,
}

/// A QMP session with one QEMU.
pub struct Qmp {
    inner: qapi::Qmp<Stream>,
    path: PathBuf,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Qmp {
    /// Connects to the socket at `path` and negotiates capabilities; every read and write is
    /// cut off after `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let connect = |source| QmpError::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect)?;
        stream.set_read_timeout(Some(timeout)).map_err(connect)?;
        stream.set_write_timeout(Some(timeout)).map_err(connect)?;
        let reader = BufReader::new(stream.try_clone().map_err(connect)?);
        let mut inner = qapi::Qmp::new(qapi::Stream::new(reader, stream));
        inner.handshake().map_err(|source| QmpError::Handshake {
            path: path.to_owned(),
            source,
        })?;
        Ok(Qmp {
            inner,
            path: path.to_owned(),
        })
    }

    fn run<C: qapi::Command>(
        &mut self,
        name: &'static str,
        command: &C,
    ) -> Result<C::Ok, QmpError> {
        tracing::debug!(command = name, socket = %self.path.display(), "qmp");
        // Events that arrived between commands are not needed by the power switch.
        self.inner.events().for_each(drop);
        self.inner
            .execute(command)
            .map_err(|source| QmpError::Command {
                command: name,
                path: self.path.clone(),
                source,
            })
    }

    /// Pauses the vCPUs (`stop`).
    pub fn pause(&mut self) -> Result<(), QmpError> {
        self.run("stop", &qapi::qmp::stop {}).map(drop)
    }

    /// Resumes the vCPUs (`cont`).
    pub fn resume(&mut self) -> Result<(), QmpError> {
        self.run("cont", &qapi::qmp::cont {}).map(drop)
    }

    /// Hard reset (`system_reset`).
    pub fn reset(&mut self) -> Result<(), QmpError> {
        self.run("system_reset", &qapi::qmp::system_reset {})
            .map(drop)
    }

    /// Presses the ACPI power button (`system_powerdown`); ignored unless the guest handles it.
    pub fn powerdown(&mut self) -> Result<(), QmpError> {
        self.run("system_powerdown", &qapi::qmp::system_powerdown {})
            .map(drop)
    }

    /// Ends QEMU at once (`quit`): hard power-off.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        self.run("quit", &qapi::qmp::quit {}).map(drop)
    }

    /// Sets a NIC's link up or down (`set_link`; `name` is the device id, see
    /// [`super::launch::Nic::id`]).
    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), QmpError> {
        self.run(
            "set_link",
            &qapi::qmp::set_link {
                name: name.to_owned(),
                up,
            },
        )
        .map(drop)
    }

    /// The run state (`query-status`).
    pub fn status(&mut self) -> Result<Status, QmpError> {
        let info = self.run("query-status", &qapi::qmp::query_status {})?;
        Ok(Status {
            running: info.running,
            state: info.status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, Write as _};
    use std::os::unix::net::UnixListener;

    /// A scripted QEMU: greets, then answers each command from `answers` by its name, and
    /// returns the commands it received.
    fn fake_qemu(
        listener: UnixListener,
        answers: Vec<(&'static str, &'static str)>,
    ) -> std::thread::JoinHandle<Vec<serde_json::Value>> {
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut out = conn.try_clone().unwrap();
            let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
            writeln!(out, "{greeting}").unwrap();
            let mut seen = Vec::new();
            for line in std::io::BufReader::new(conn).lines() {
                let Ok(line) = line else { break };
                let cmd: serde_json::Value = serde_json::from_str(&line).unwrap();
                let name = cmd["execute"].as_str().unwrap_or_default().to_owned();
                let answer = answers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(r#"{"return": {}}"#, |(_, a)| *a);
                // An event before the answer, as QEMU sends them: it must not confuse the client.
                writeln!(
                    out,
                    r#"{{"event": "RESUME", "timestamp": {{"seconds": 1, "microseconds": 2}}}}"#
                )
                .unwrap();
                writeln!(out, "{answer}").unwrap();
                seen.push(cmd);
            }
            seen
        })
    }

    #[test]
    fn commands_are_sent_and_answers_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qemu(
            UnixListener::bind(&sock).unwrap(),
            vec![(
                "query-status",
                r#"{"return": {"status": "paused", "running": false}}"#,
            )],
        );
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        qmp.pause().unwrap();
        assert_eq!(
            qmp.status().unwrap(),
            Status {
                running: false,
                state: RunState::paused
            }
        );
        qmp.set_link("nic0", false).unwrap();
        qmp.resume().unwrap();
        qmp.reset().unwrap();
        qmp.powerdown().unwrap();
        qmp.quit().unwrap();
        drop(qmp);
        let seen = server.join().unwrap();
        let names: Vec<&str> = seen
            .iter()
            .map(|c| c["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "qmp_capabilities",
                "stop",
                "query-status",
                "set_link",
                "cont",
                "system_reset",
                "system_powerdown",
                "quit"
            ]
        );
        assert_eq!(
            seen[3]["arguments"],
            serde_json::json!({"name": "nic0", "up": false})
        );
    }

    #[test]
    fn an_error_answer_names_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let _server = fake_qemu(
            UnixListener::bind(&sock).unwrap(),
            vec![(
                "set_link",
                r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"}}"#,
            )],
        );
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let err = qmp.set_link("nic9", true).unwrap_err();
        assert!(matches!(
            err,
            QmpError::Command {
                command: "set_link",
                ..
            }
        ));
    }

    #[test]
    fn a_missing_socket_says_so() {
        let err =
            Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }));
    }
}
