//! The lease table: which MAC holds which address until when, kept in memory and journaled to
//! `leases.jsonl` in the state directory so that a restart hands no address to two clients.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Mac;

/// The journal's file name inside the state directory.
pub const JOURNAL_FILE: &str = "leases.jsonl";

/// What a record in the journal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LeaseState {
    /// The client holds the address until `expires`.
    Bound,
    /// The client gave the address back (RELEASE): it is free.
    Released,
    /// A client found the address in use (DECLINE): nobody gets it until `expires`.
    Declined,
}

/// One line of the journal, and one entry of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The client (for a declined address: the client that declined it).
    pub mac: Mac,
    /// The address.
    pub address: Ipv4Addr,
    /// Bound, released or declined.
    pub state: LeaseState,
    /// Unix time (seconds) when the lease or the decline ends.
    pub expires: u64,
    /// The host name the client was given, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Why the lease journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading, writing or renaming the journal failed.
    #[error("cannot use the lease journal {}: {source}; check the state directory's permissions and free space", path.display())]
    Io {
        /// The journal (or its temporary copy).
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An address held for a client: a lease, or an offer waiting for its REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding {
    pub(crate) address: Ipv4Addr,
    pub(crate) expires: u64,
    pub(crate) bound: bool,
}

/// Leases and offers in memory, with bound/released/declined changes journaled to disk.
#[derive(Debug)]
pub struct LeaseTable {
    by_mac: HashMap<Mac, Binding>,
    by_address: HashMap<Ipv4Addr, Mac>,
    declined: HashMap<Ipv4Addr, u64>,
    hostnames: HashMap<Mac, String>,
    journal: Option<Journal>,
}

#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl LeaseTable {
    /// A table kept in memory only (tests, benchmarks that compare without disk).
    pub fn in_memory() -> Self {
        Self {
            by_mac: HashMap::new(),
            by_address: HashMap::new(),
            declined: HashMap::new(),
            hostnames: HashMap::new(),
            journal: None,
        }
    }

    /// Opens the journal in `state_dir` (creating it), replays it and rewrites it compactly,
    /// dropping records that ended before `now` (Unix seconds).
    pub fn open(state_dir: &Path, now: u64) -> Result<Self, LeaseError> {
        let path = state_dir.join(JOURNAL_FILE);
        let mut table = Self::in_memory();
        for lease in read_journal(&path)? {
            if lease.expires > now {
                table.apply(&lease);
            } else {
                table.forget(lease.mac, lease.address);
            }
        }
        table.journal = Some(Journal::rewrite(&path, &table.leases())?);
        Ok(table)
    }

    fn apply(&mut self, lease: &Lease) {
        match lease.state {
            LeaseState::Bound => {
                self.set(lease.mac, lease.address, lease.expires, true);
                if let Some(h) = &lease.hostname {
                    self.hostnames.insert(lease.mac, h.clone());
                }
            }
            LeaseState::Released => self.forget(lease.mac, lease.address),
            LeaseState::Declined => {
                self.forget(lease.mac, lease.address);
                self.declined.insert(lease.address, lease.expires);
            }
        }
    }

    /// Every live lease and decline, for saving and for `kiln cluster show`.
    pub fn leases(&self) -> Vec<Lease> {
        let mut out: Vec<Lease> = self
            .by_mac
            .iter()
            .filter(|(_, b)| b.bound)
            .map(|(mac, b)| Lease {
                mac: *mac,
                address: b.address,
                state: LeaseState::Bound,
                expires: b.expires,
                hostname: self.hostnames.get(mac).cloned(),
            })
            .collect();
        out.extend(self.declined.iter().map(|(a, e)| Lease {
            mac: Mac([0; 6]),
            address: *a,
            state: LeaseState::Declined,
            expires: *e,
            hostname: None,
        }));
        out.sort_by_key(|l| u32::from(l.address));
        out
    }

    pub(crate) fn binding(&self, mac: Mac) -> Option<Binding> {
        self.by_mac.get(&mac).copied()
    }

    /// Who holds `address` (bound, or offered and not yet expired at `now`), if anybody.
    pub(crate) fn holder(&self, address: Ipv4Addr, now: u64) -> Option<Mac> {
        let mac = *self.by_address.get(&address)?;
        let b = self.by_mac.get(&mac)?;
        (b.address == address && b.expires > now).then_some(mac)
    }

    /// Whether `address` is declined at `now`.
    pub(crate) fn is_declined(&self, address: Ipv4Addr, now: u64) -> bool {
        self.declined.get(&address).is_some_and(|e| *e > now)
    }

    /// Holds `address` for `mac` as an offer until `expires` (not journaled: an offer is not a
    /// lease). A bound lease on the same address stays bound.
    pub(crate) fn offer(&mut self, mac: Mac, address: Ipv4Addr, expires: u64) {
        match self.by_mac.get(&mac) {
            Some(b) if b.bound && b.address == address => {}
            _ => self.set(mac, address, expires, false),
        }
    }

    /// Binds `address` to `mac` until `expires` and journals it before returning.
    pub(crate) fn bind(
        &mut self,
        mac: Mac,
        address: Ipv4Addr,
        expires: u64,
        hostname: Option<&str>,
    ) -> Result<(), LeaseError> {
        self.set(mac, address, expires, true);
        match hostname {
            Some(h) => self.hostnames.insert(mac, h.to_owned()),
            None => self.hostnames.remove(&mac),
        };
        self.record(Lease {
            mac,
            address,
            state: LeaseState::Bound,
            expires,
            hostname: hostname.map(str::to_owned),
        })
    }

    /// Frees `address` held by `mac` (RELEASE, or an offer the client turned down).
    pub(crate) fn release(&mut self, mac: Mac, address: Ipv4Addr) -> Result<(), LeaseError> {
        let was_bound = self.by_mac.get(&mac).is_some_and(|b| b.bound);
        self.forget(mac, address);
        if was_bound {
            self.record(Lease {
                mac,
                address,
                state: LeaseState::Released,
                expires: 0,
                hostname: None,
            })?;
        }
        Ok(())
    }

    /// Marks `address` unusable until `expires` (DECLINE) and drops `mac`'s hold on it.
    pub(crate) fn decline(
        &mut self,
        mac: Mac,
        address: Ipv4Addr,
        expires: u64,
    ) -> Result<(), LeaseError> {
        self.forget(mac, address);
        self.declined.insert(address, expires);
        self.record(Lease {
            mac,
            address,
            state: LeaseState::Declined,
            expires,
            hostname: None,
        })
    }

    fn set(&mut self, mac: Mac, address: Ipv4Addr, expires: u64, bound: bool) {
        if let Some(old) = self.by_mac.insert(
            mac,
            Binding {
                address,
                expires,
                bound,
            },
        ) && old.address != address
            && self.by_address.get(&old.address) == Some(&mac)
        {
            self.by_address.remove(&old.address);
        }
        self.by_address.insert(address, mac);
    }

    fn forget(&mut self, mac: Mac, address: Ipv4Addr) {
        if self.by_mac.get(&mac).is_some_and(|b| b.address == address) {
            self.by_mac.remove(&mac);
            self.hostnames.remove(&mac);
        }
        if self.by_address.get(&address) == Some(&mac) {
            self.by_address.remove(&address);
        }
    }

    fn record(&mut self, lease: Lease) -> Result<(), LeaseError> {
        let Some(journal) = &mut self.journal else {
            return Ok(());
        };
        journal.append(&lease)?;
        // Compact when the journal holds mostly history.
        if journal.lines > 1024 && journal.lines > 4 * self.by_mac.len() {
            let path = journal.path.clone();
            self.journal = Some(Journal::rewrite(&path, &self.leases())?);
        }
        Ok(())
    }
}

impl Journal {
    /// Writes `leases` to a temporary file, renames it over `path`, and opens it to append.
    fn rewrite(path: &Path, leases: &[Lease]) -> Result<Self, LeaseError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LeaseError::Io { path, source }
        };
        let tmp = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for lease in leases {
            // Serialising these plain fields cannot fail.
            text.push_str(&serde_json::to_string(lease).unwrap_or_default());
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            lines: leases.len(),
        })
    }

    /// Appends one record with one `write` (in the page cache before the reply goes out).
    fn append(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        let mut line = serde_json::to_vec(lease).unwrap_or_default();
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|source| LeaseError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.lines += 1;
        Ok(())
    }
}

/// Reads the journal in order; a missing file is empty, a torn last line (crash while
/// writing) is skipped.
pub fn read_journal(path: &Path) -> Result<Vec<Lease>, LeaseError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LeaseError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| LeaseError::Io {
            path: path.to_owned(),
            source,
        })?;
        match serde_json::from_str::<Lease>(&line) {
            Ok(lease) => out.push(lease),
            Err(e) => {
                tracing::warn!(journal = %path.display(), "skipping a damaged lease record: {e}")
            }
        }
    }
    Ok(out)
}

/// The live leases in a state directory, as the running server last journaled them (for
/// `kiln cluster show`): bound leases not expired at `now`.
pub fn current_leases(state_dir: &Path, now: u64) -> Result<Vec<Lease>, LeaseError> {
    let mut table = LeaseTable::in_memory();
    for lease in read_journal(&state_dir.join(JOURNAL_FILE))? {
        table.apply(&lease);
    }
    Ok(table
        .leases()
        .into_iter()
        .filter(|l| l.state == LeaseState::Bound && l.expires > now)
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn journal_survives_reopen_and_drops_expired_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let a: Ipv4Addr = "10.5.0.10".parse().unwrap();
        let b: Ipv4Addr = "10.5.0.11".parse().unwrap();
        let c: Ipv4Addr = "10.5.0.12".parse().unwrap();
        {
            let mut t = LeaseTable::open(dir.path(), 100).unwrap();
            t.bind(mac(1), a, 1000, Some("one")).unwrap();
            t.bind(mac(2), b, 150, None).unwrap();
            t.bind(mac(3), c, 1000, None).unwrap();
            t.release(mac(3), c).unwrap();
            t.decline(mac(4), "10.5.0.13".parse().unwrap(), 900)
                .unwrap();
            // An offer is not persisted.
            t.offer(mac(5), "10.5.0.14".parse().unwrap(), 1000);
        }
        let t = LeaseTable::open(dir.path(), 200).unwrap();
        assert_eq!(t.holder(a, 200), Some(mac(1)));
        assert_eq!(t.holder(b, 200), None, "expired before the restart");
        assert_eq!(t.holder(c, 200), None, "released");
        assert!(t.is_declined("10.5.0.13".parse().unwrap(), 200));
        assert_eq!(t.holder("10.5.0.14".parse().unwrap(), 200), None);
        let shown = current_leases(dir.path(), 200).unwrap();
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].hostname.as_deref(), Some("one"));
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut t = LeaseTable::open(dir.path(), 0).unwrap();
            t.bind(mac(1), "10.5.0.10".parse().unwrap(), 1000, None)
                .unwrap();
        }
        let path = dir.path().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"mac\":\"52:54:00:00").unwrap();
        let t = LeaseTable::open(dir.path(), 0).unwrap();
        assert_eq!(t.leases().len(), 1);
    }

    #[test]
    fn the_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = LeaseTable::open(dir.path(), 0).unwrap();
        for i in 0..3000u64 {
            t.bind(mac(1), "10.5.0.10".parse().unwrap(), 1000 + i, None)
                .unwrap();
        }
        let lines = std::fs::read_to_string(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 1025, "{lines} lines");
        let t = LeaseTable::open(dir.path(), 0).unwrap();
        assert_eq!(t.binding(mac(1)).unwrap().expires, 3999);
    }
}
