//! The egress audit log: one JSON line per attempt to reach something (a proxied connection or
//! request, a DNS name the lab had to forward or refused), appended by the proxy and the DNS
//! helpers to one file, and read back by `kiln airgap audit`.

use std::fs::File;
use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// File name of the audit log in a cluster's state directory.
pub const AUDIT_FILE: &str = "airgap-audit.jsonl";

/// Which helper saw the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The HTTP/HTTPS proxy.
    Proxy,
    /// The lab DNS server.
    Dns,
}

/// What the helper decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Let through (the proxy connected, the DNS server forwarded).
    Allowed,
    /// Refused by the allow list or by air-gapped mode.
    Denied,
    /// The request could not be understood (answered 400 / FORMERR).
    Malformed,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// RFC 3339 UTC time the attempt was decided.
    pub time: String,
    /// The helper that saw it.
    pub source: Source,
    /// The client's address.
    pub client: String,
    /// HTTP method (`CONNECT`, `GET`, ...) or DNS query type (`A`, `AAAA`, ...).
    pub method: String,
    /// `host:port` for the proxy, the query name for DNS (empty when malformed).
    pub destination: String,
    /// `true` when the attempt was let through.
    pub allowed: bool,
    /// The decision in more detail.
    pub decision: Decision,
    /// Bytes from the client to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the client.
    pub bytes_received: u64,
    /// Why it was denied or failed, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditEvent {
    /// A new event stamped now, with no bytes counted yet.
    pub fn new(
        source: Source,
        client: SocketAddr,
        method: impl Into<String>,
        destination: impl Into<String>,
        decision: Decision,
    ) -> Self {
        Self {
            time: now_rfc3339(),
            source,
            client: client.to_string(),
            method: method.into(),
            destination: destination.into(),
            allowed: decision == Decision::Allowed,
            decision,
            bytes_sent: 0,
            bytes_received: 0,
            reason: None,
        }
    }

    /// The same event with a reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Opening, writing or reading the audit log failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened.
    #[error("opening audit log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line could not be read.
    #[error("reading audit log {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not an audit event.
    #[error(
        "audit log {path} line {line} is not an audit event ({source}); was the file written by \
         another program?"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Appends events to the audit log; cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct AuditLog {
    file: Option<Arc<Mutex<File>>>,
    echo: bool,
}

impl AuditLog {
    /// Opens (creating) `path` for appending. Several helpers may append to the same file: each
    /// event is one `write` of one line on an `O_APPEND` file.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: Some(Arc::new(Mutex::new(file))),
            echo: false,
        })
    }

    /// A log that keeps nothing (events are still traced).
    pub fn discard() -> Self {
        Self {
            file: None,
            echo: false,
        }
    }

    /// The same log, also printing each event on stdout in the guide's log format
    /// (`2022/08/04 16:43:14 CONNECT host:443`), as `kiln debug air-gapped` does.
    pub fn with_echo(mut self) -> Self {
        self.echo = true;
        self
    }

    /// Records one event (and traces it). A write error is traced, not returned: the proxy
    /// keeps serving when the disk is full.
    pub fn record(&self, event: &AuditEvent) {
        tracing::info!(
            source = ?event.source,
            client = %event.client,
            method = %event.method,
            destination = %event.destination,
            decision = ?event.decision,
            bytes_sent = event.bytes_sent,
            bytes_received = event.bytes_received,
            reason = event.reason.as_deref().unwrap_or(""),
            "egress attempt"
        );
        if self.echo {
            let verdict = match event.decision {
                Decision::Allowed => String::new(),
                Decision::Denied => " (denied)".to_owned(),
                Decision::Malformed => " (malformed)".to_owned(),
            };
            crate::debug::log_line(&format!("{} {}{verdict}", event.method, event.destination));
        }
        let Some(file) = &self.file else { return };
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "cannot encode an audit event");
                return;
            }
        };
        line.push(b'\n');
        let mut f = file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = f.write_all(&line) {
            tracing::warn!(%error, "cannot append to the audit log");
        }
    }
}

/// Reads every event from `path` (a missing file is an empty log: nothing was attempted).
pub fn read(path: &Path) -> Result<Vec<AuditEvent>, AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Open {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut events = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| AuditError::Read {
            path: path.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line).map_err(|source| AuditError::Parse {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        events.push(event);
    }
    Ok(events)
}

/// Counts over a log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Every attempt.
    pub attempts: usize,
    /// Let through.
    pub allowed: usize,
    /// Refused.
    pub denied: usize,
    /// Not understood.
    pub malformed: usize,
    /// Distinct destinations that were let through.
    pub allowed_destinations: Vec<String>,
    /// Distinct destinations that were refused.
    pub denied_destinations: Vec<String>,
}

impl Summary {
    /// Counts `events`.
    pub fn of(events: &[AuditEvent]) -> Self {
        let mut s = Summary {
            attempts: events.len(),
            ..Summary::default()
        };
        let mut allowed = std::collections::BTreeSet::new();
        let mut denied = std::collections::BTreeSet::new();
        for e in events {
            match e.decision {
                Decision::Allowed => {
                    s.allowed += 1;
                    allowed.insert(e.destination.clone());
                }
                Decision::Denied => {
                    s.denied += 1;
                    denied.insert(e.destination.clone());
                }
                Decision::Malformed => s.malformed += 1,
            }
        }
        s.allowed_destinations = allowed.into_iter().collect();
        s.denied_destinations = denied.into_iter().collect();
        s
    }

    /// `true` when nothing was refused (malformed requests count as refused: something tried).
    pub fn clean(&self) -> bool {
        self.denied == 0 && self.malformed == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(&path).unwrap();
        let client: SocketAddr = "10.5.0.2:40000".parse().unwrap();
        let mut ok = AuditEvent::new(
            Source::Proxy,
            client,
            "CONNECT",
            "registry.lab:5000",
            Decision::Allowed,
        );
        ok.bytes_sent = 10;
        ok.bytes_received = 20;
        log.record(&ok);
        let denied = AuditEvent::new(Source::Dns, client, "A", "example.com.", Decision::Denied)
            .with_reason("air-gapped");
        log.record(&denied);
        let events = read(&path).unwrap();
        assert_eq!(events, vec![ok, denied]);
        let s = Summary::of(&events);
        assert_eq!((s.attempts, s.allowed, s.denied), (2, 1, 1));
        assert_eq!(s.denied_destinations, vec!["example.com.".to_owned()]);
        assert!(!s.clean());
    }

    #[test]
    fn a_missing_log_is_empty_and_a_foreign_line_names_its_number() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("none")).unwrap().is_empty());
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "\n{\"not\": \"an event\"}\n").unwrap();
        match read(&path) {
            Err(AuditError::Parse { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }
}
