//! `kiln-airgap`: what makes a lab cluster air-gapped and proves it stayed so. The lab DNS
//! server ([`dns`]), the egress-auditing HTTP/HTTPS proxy ([`proxy`]) with its allow list
//! ([`allow`]) and audit log ([`audit`]), the `kiln debug air-gapped` servers and config patch
//! ([`debug`]), and the entry points the lab calls to run them for a cluster ([`lab`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kiln_airgap::{audit::AuditLog, dns};
//! let mut config = dns::DnsConfig::new(vec!["127.0.0.1:5353".parse()?]);
//! config.records.insert("cp-1".into(), vec!["10.5.0.2".parse()?]);
//! config.airgapped = true;
//! let handler = dns::LabDns::new(&config, AuditLog::discard(), "/etc/resolv.conf".as_ref())?;
//! let sockets = dns::DnsSockets::bind(&config.listen).await?;
//! dns::serve(sockets, handler, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! - **DNS.** [`dns::LabDns`] is a hickory-server `RequestHandler`. A name in the zone gets its
//!   A / AAAA records (authoritative); another name under the lab domain gets NXDOMAIN and is
//!   never forwarded; every other name is forwarded, as the client's own packet, to the
//!   upstreams in order (UDP, TCP when truncated), or in air-gapped mode answered REFUSED. Both
//!   forwarded and refused names are audited. A single-label name in the zone (a node's host
//!   name) is answered on its own too, so nodes without a search domain resolve each other.
//! - **Proxy.** Hand-written on `httparse` rather than hyper because the proxy needs the raw
//!   connection: the request head is read up to a size cap, then a `CONNECT` becomes a byte
//!   tunnel and an absolute-form request is rewritten to origin form with `Connection: close`
//!   and relayed byte for byte, so bodies of any framing pass unparsed and every byte is
//!   counted for the audit. A destination is allowed by name (`host`, `*.domain`) or, for a
//!   name that only a network rule could allow, by resolving it once and checking every
//!   address; the proxy connects to exactly the addresses it checked.
//! - **Audit.** One JSON line per attempt ([`audit::AuditEvent`]), appended with one `write`
//!   on an `O_APPEND` file so the DNS and proxy helpers can share `airgap-audit.jsonl`.
//! - **Servers** take bound sockets and a shutdown future; the proxy caps connections with a
//!   semaphore and the DNS server caps forwarded queries in flight.
//!
//! # Limitations
//!
//! - The plain HTTP proxy serves one request per client connection (like tinyproxy); clients
//!   open a new connection for the next request. `CONNECT` tunnels are unaffected.
//! - The lab zone holds A and AAAA records only; other types for lab names get an empty answer,
//!   and NXDOMAIN carries no SOA (negative answers are not cached by clients for long).
//! - hickory-server spawns a task per UDP query and per TCP connection and does not cap them;
//!   only the forwarded queries in flight are capped here.
//! - The proxy does not authenticate clients: it is bound to the lab bridge.

pub mod allow;
pub mod audit;
pub mod debug;
pub mod dns;
pub mod lab;
pub mod proxy;
pub mod tls;
