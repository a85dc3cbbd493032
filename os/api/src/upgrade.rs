//! Following a node's upgrade from the client side: its `upgrade` events (machined publishes
//! every step as a machine event with id [`EVENT_ID`]) across the reboot, until one ends the
//! upgrade. Used by `kiln upgrade` and the scenarios.

use std::collections::HashSet;
use std::time::Duration;

use tonic::transport::Channel;

use crate::pb;
use crate::pb::machine_service_client::MachineServiceClient;
use crate::wait::{Poll, TimedOut, until};

/// The event id of upgrade steps.
pub const EVENT_ID: &str = "upgrade";

/// How an upgrade ended, from its last event's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeEnd {
    /// The new release runs and its slot is permanent (`confirmed`).
    Confirmed,
    /// The release is written and boots at the next reboot (`staged`).
    Staged,
    /// The new release did not come up; the node runs the old one (`failed`).
    RolledBack,
    /// Nothing was changed (`aborted`: bad reference, failed pull, quorum).
    Aborted,
}

impl UpgradeEnd {
    /// The end an event state means, if it ends an upgrade.
    pub fn of(state: &str) -> Option<UpgradeEnd> {
        match state {
            "confirmed" => Some(UpgradeEnd::Confirmed),
            "staged" => Some(UpgradeEnd::Staged),
            "failed" => Some(UpgradeEnd::RolledBack),
            "aborted" => Some(UpgradeEnd::Aborted),
            _ => None,
        }
    }
}

/// Follows the upgrade events of `node` (empty: the endpoint node) newer than `since` (Unix
/// milliseconds), calling `print` for each once, reconnecting while the node reboots.
pub async fn follow(
    client: &MachineServiceClient<Channel>,
    node: &str,
    since: i64,
    timeout: Duration,
    print: &(dyn Fn(&pb::Event) + Sync),
) -> Result<UpgradeEnd, TimedOut<String>> {
    let seen = std::sync::Mutex::new(HashSet::<(i64, String)>::new());
    let nodes: Vec<String> = if node.is_empty() {
        vec![]
    } else {
        vec![node.to_owned()]
    };
    until(
        format!(
            "the end of the upgrade of {}",
            if node.is_empty() { "the node" } else { node }
        ),
        Poll::every(Duration::from_secs(1), timeout),
        || {
            let mut client = client.clone();
            let req = crate::client::request(
                pb::EventsRequest {
                    follow: true,
                    tail_events: -1,
                },
                &nodes,
            );
            let seen = &seen;
            async move {
                let mut stream = client
                    .events(req)
                    .await
                    .map_err(|s| s.message().to_owned())?
                    .into_inner();
                while let Some(e) = stream.message().await.map_err(|s| s.message().to_owned())? {
                    if e.id != EVENT_ID || e.unix_millis < since {
                        continue;
                    }
                    let fresh = seen
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((e.unix_millis, e.message.clone()));
                    if !fresh {
                        continue;
                    }
                    print(&e);
                    if let Some(end) = UpgradeEnd::of(&e.state) {
                        return Ok(end);
                    }
                }
                Err("the node's event stream ended (rebooting)".to_owned())
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_end_the_follow() {
        assert_eq!(UpgradeEnd::of("confirmed"), Some(UpgradeEnd::Confirmed));
        assert_eq!(UpgradeEnd::of("aborted"), Some(UpgradeEnd::Aborted));
        assert_eq!(UpgradeEnd::of("failed"), Some(UpgradeEnd::RolledBack));
        assert_eq!(UpgradeEnd::of("staged"), Some(UpgradeEnd::Staged));
        assert_eq!(UpgradeEnd::of("pulling"), None);
    }
}
