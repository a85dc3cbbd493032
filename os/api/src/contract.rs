//! Numbers and names `kiln`, the node launcher and `machined` agree on.

/// OS API port (mutual TLS).
pub const API_PORT: u16 = 50000;
/// Certificate service port (server-only TLS, machine token).
pub const TRUST_PORT: u16 = 50001;
/// etcd client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd peer port.
pub const ETCD_PEER_PORT: u16 = 2380;

/// `machined` exit code asking the launcher to start it again (reboot).
pub const EXIT_REBOOT: i32 = 80;
/// `machined` exit code asking the launcher to stop (power off).
pub const EXIT_SHUTDOWN: i32 = 81;
/// `machined` exit code on the `container` platform for power off: 0, so that the container's
/// `on-failure` restart policy leaves it stopped, while [`EXIT_REBOOT`] (or a crash) restarts it.
pub const EXIT_CONTAINER_SHUTDOWN: i32 = 0;

/// Request metadata: comma-separated target nodes of a call.
pub const NODES_METADATA: &str = "nodes";
/// Request metadata set by a forwarding node: the role of the original caller.
pub const ROLE_METADATA: &str = "x-kiln-role";
/// Organisation of the certificates nodes use to forward calls: such a caller acts with the
/// role given in [`ROLE_METADATA`].
pub const ROLE_IMPERSONATOR: &str = "os:impersonator";

/// Environment variable holding a machine configuration (base64 of the YAML document).
pub const CONFIG_DATA_ENV: &str = "KILN_CONFIG_DATA";
/// Environment variable holding a path or http(s) URL of a machine configuration.
pub const CONFIG_ENV: &str = "KILN_CONFIG";
/// Environment variable a provisioner sets (`1`) on a container node of an air-gapped
/// cluster: machined removes the default route the engine gave the container at every boot.
pub const NO_DEFAULT_ROUTE_ENV: &str = "KILN_NO_DEFAULT_ROUTE";
/// The first argument that makes a container's machined hold its network namespace instead
/// of booting a node: the lab's gateway container of a Docker Swarm cluster.
pub const HOLD_ARG: &str = "--hold";

/// Volume labels.
pub const LABEL_STATE: &str = "STATE";
/// Volume labels.
pub const LABEL_EPHEMERAL: &str = "EPHEMERAL";
/// Volume labels.
pub const LABEL_META: &str = "META";

/// META key holding network configuration.
pub const META_KEY_NETWORK: u32 = 0xa;

/// A machine event as machined prints it on its console (stderr, which the lab keeps in
/// `<node>.log`), one line each, so the lab names a node's stage and last event even when its
/// API cannot be reached: `kiln-event {"time":<unix millis>,"stage":"<stage>","message":".."}`.
/// The stage is a [`pb::Stage`] name (`booting`, `maintenance`, `running`, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleEvent {
    /// Milliseconds since the Unix epoch.
    #[serde(rename = "time")]
    pub unix_millis: u64,
    /// The machine's stage ([`pb::Stage::name`]).
    pub stage: String,
    /// What happened, or what the node waits for and why it is not there yet.
    pub message: String,
}

impl ConsoleEvent {
    /// The line's prefix.
    pub const PREFIX: &'static str = "kiln-event ";

    /// The console line for this event (no newline; the JSON escapes line breaks).
    pub fn line(&self) -> String {
        // Serializing three plain fields cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{}{json}", Self::PREFIX)
    }

    /// Parses a console line; `None` for any other line. Text before the prefix (a log
    /// timestamp) is skipped.
    pub fn parse(line: &str) -> Option<ConsoleEvent> {
        let at = line.find(Self::PREFIX)?;
        serde_json::from_str(line[at + Self::PREFIX.len()..].trim_end()).ok()
    }

    /// The stage as the enum, when it names one.
    pub fn stage(&self) -> Option<pb::Stage> {
        pb::Stage::from_name(&self.stage)
    }

    /// The last event in a console log (the text of `<node>.log`).
    pub fn last_in(log: &str) -> Option<ConsoleEvent> {
        log.lines().rev().find_map(Self::parse)
    }
}

// ---- typed names: how the enums of the API print (the guides' spelling) ----

use std::fmt;

use crate::pb;

impl pb::ServiceState {
    /// The state's name as the guides print it (`Running`, `Failed`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "Unknown",
            Self::Waiting => "Waiting",
            Self::Preparing => "Preparing",
            Self::Running => "Running",
            Self::Finished => "Finished",
            Self::Failed => "Failed",
            Self::Skipped => "Skipped",
        }
    }
}

impl fmt::Display for pb::ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for pb::Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl pb::Stage {
    /// The stage's name as the console, the API listing and [`ConsoleEvent`] spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unknown",
            Self::Booting => "booting",
            Self::Maintenance => "maintenance",
            Self::Running => "running",
            Self::Resetting => "resetting",
            Self::Rebooting => "rebooting",
            Self::ShuttingDown => "shutting down",
        }
    }

    /// The stage named `name` (as [`pb::Stage::name`] spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Unspecified,
            Self::Booting,
            Self::Maintenance,
            Self::Running,
            Self::Resetting,
            Self::Rebooting,
            Self::ShuttingDown,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

impl fmt::Display for pb::MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match kiln_config::MachineType::try_from(*self) {
            Ok(t) => t.fmt(f),
            Err(_) => f.write_str("unknown"),
        }
    }
}

impl From<kiln_config::MachineType> for pb::MachineType {
    fn from(t: kiln_config::MachineType) -> Self {
        match t {
            kiln_config::MachineType::Controlplane => Self::Controlplane,
            kiln_config::MachineType::Worker => Self::Worker,
        }
    }
}

/// The wire said "unspecified": the node has no configuration yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node reports no machine type (it has no configuration yet)")]
pub struct UnspecifiedMachineType;

impl TryFrom<pb::MachineType> for kiln_config::MachineType {
    type Error = UnspecifiedMachineType;
    fn try_from(t: pb::MachineType) -> Result<Self, Self::Error> {
        match t {
            pb::MachineType::Controlplane => Ok(Self::Controlplane),
            pb::MachineType::Worker => Ok(Self::Worker),
            pb::MachineType::Unspecified => Err(UnspecifiedMachineType),
        }
    }
}

impl fmt::Display for pb::EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unknown",
            Self::Machine => "machine",
            Self::Service => "service",
            Self::Config => "config",
        })
    }
}

impl fmt::Display for pb::ApplyResultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unknown",
            Self::NoReboot => "no-reboot",
            Self::Reboot => "reboot",
            Self::Staged => "staged",
            Self::Try => "try",
            Self::Maintenance => "maintenance",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_events_round_trip_and_other_lines_are_ignored() {
        let e = ConsoleEvent {
            unix_millis: 1_700_000_000_123,
            stage: pb::Stage::Booting.name().into(),
            message: "waiting for its API certificate from 10.5.0.2: connect timed out".into(),
        };
        let line = e.line();
        assert!(line.starts_with("kiln-event {\"time\":1700000000123,\"stage\":\"booting\""));
        assert_eq!(ConsoleEvent::parse(&line), Some(e.clone()));
        assert_eq!(ConsoleEvent::parse(&format!("{line}\n")), Some(e.clone()));
        assert_eq!(e.stage(), Some(pb::Stage::Booting));
        assert_eq!(ConsoleEvent::parse("2024 INFO etcd started"), None);
        assert_eq!(ConsoleEvent::parse("kiln-event not json"), None);
        let odd = ConsoleEvent {
            unix_millis: 1,
            stage: "shutting down".into(),
            message: "line\nbreak \"quoted\"".into(),
        };
        assert!(!odd.line().contains('\n'));
        assert_eq!(ConsoleEvent::parse(&odd.line()), Some(odd.clone()));
        let log = format!("noise\n{line}\nmore noise\n{}\ntrailing\n", odd.line());
        assert_eq!(ConsoleEvent::last_in(&log), Some(odd));
    }

    #[test]
    fn names_print_as_the_guides_spell_them() {
        assert_eq!(pb::ServiceState::Running.to_string(), "Running");
        assert_eq!(pb::ServiceState::Failed.to_string(), "Failed");
        assert_eq!(pb::Stage::ShuttingDown.to_string(), "shutting down");
        assert_eq!(pb::MachineType::Controlplane.to_string(), "controlplane");
        assert_eq!(pb::ApplyResultMode::NoReboot.to_string(), "no-reboot");
        for s in [
            pb::Stage::Booting,
            pb::Stage::Running,
            pb::Stage::ShuttingDown,
        ] {
            assert_eq!(pb::Stage::from_name(s.name()), Some(s));
        }
        assert_eq!(
            kiln_config::MachineType::try_from(pb::MachineType::from(
                kiln_config::MachineType::Worker
            )),
            Ok(kiln_config::MachineType::Worker)
        );
    }
}
