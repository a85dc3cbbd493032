//! `kiln-dhcpd`: the lab's DHCPv4 server. It runs on the cluster bridge (as `kiln dhcpd run`)
//! and gives each node its static address, gateway, DNS servers, host name and MTU by MAC, as
//! a DHCP server on a real network would; PXE and iPXE clients also get their boot file or
//! boot script, and boot files are served over TFTP.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kiln_dhcpd::daemon::{self, RunOptions};
//! let (listen, tftp_listen) = daemon::default_listen();
//! let opts = RunOptions {
//!     config_path: "dhcpd.yaml".into(),
//!     state_dir: "/var/lib/kiln/dhcpd".into(),
//!     interface: Some("kiln-br0".into()),
//!     listen,
//!     tftp_listen,
//! };
//! daemon::run(&opts, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! - **Packets** are decoded and encoded with `dhcproto`. [`handler::Handler`] is pure
//!   protocol logic: one datagram and the time in, an [`handler::Outcome`] out (a reply with
//!   its destination, or why there is none). Only the lease journal is I/O, so the RFC 2131
//!   rules are unit-tested without sockets and fuzzed with proptest.
//! - **RFC 2131.** DISCOVER → OFFER; REQUEST in SELECTING (server identifier: ours or not),
//!   INIT-REBOOT (requested address, no `ciaddr`), RENEWING and REBINDING (`ciaddr`) → ACK or
//!   NAK, silence for clients we have no record of; RELEASE and DECLINE free or quarantine the
//!   address; INFORM → ACK without lease times. Relayed requests (`giaddr`) are answered to
//!   the relay on the server port, NAKs through a relay with the broadcast bit, with the
//!   relay agent information (option 82) echoed as the last option (RFC 3046).
//! - **Replies to clients without an address are broadcast**, whether or not they set the
//!   broadcast flag: unicasting to `yiaddr` needs an ARP entry a UDP socket cannot add, and
//!   VMs booting together lost such replies with dnsmasq. Renewals go to `ciaddr`.
//! - **Options.** Lease, T1 (1/2) and T2 (7/8), server identifier and subnet mask always; router,
//!   DNS servers, host name, domain name, MTU and broadcast address when configured and, if
//!   the client sent a parameter request list (55), asked for. Per-host overrides of router,
//!   DNS and MTU come with the static lease. Requests with option overload (52) have their
//!   `file`/`sname` options merged; a reply too big for the client's maximum message size
//!   (57, at least 576) overflows into `file` and `sname` with option 52.
//! - **Addresses.** A MAC with a static lease always gets its address; other MACs get one
//!   from the pool (their last one if still free, else the requested one, else the next free
//!   one after the last handed out); with no pool they get no answer. An OFFER holds its
//!   address for 60 s. Declined addresses are quarantined for one lease time.
//! - **Leases survive restarts**: bound, released and declined changes are appended to
//!   `leases.jsonl` in the state directory (one `write` per change, before the ACK is sent;
//!   no fsync, as Kea's memfile), replayed and compacted at start, so no address is handed to
//!   two clients across a restart. [`lease::current_leases`] reads it for `kiln cluster show`.
//! - **Serving** ([`server::serve`]) takes an already-bound socket (bound to the bridge with
//!   `SO_BINDTODEVICE`, see [`daemon::bind_udp`]) and a shutdown future. Malformed,
//!   truncated, oversized and unknown packets are counted ([`server::Counters`]) and dropped;
//!   per-packet logs go through a rate limiter.
//! - **Reload.** On SIGHUP [`daemon::run`] re-reads the file and the server loop swaps it in
//!   between two datagrams ([`handler::Handler::reconfigure`]); leases are kept, a bad file
//!   keeps the running configuration.
//! - **TFTP** ([`tftp`]) is `async-tftp` serving one directory read only.
//!
//! # Limitations
//!
//! - IPv4 only, one subnet per server, Ethernet hardware addresses only; clients are keyed by
//!   MAC, not by client identifier (61).
//! - Replies to address-less clients are always broadcast: on a busy shared segment that is
//!   more traffic than unicast to the MAC would be.
//! - The journal is not fsynced per lease: a host crash (not a server crash) can lose the
//!   last leases, like Kea's memfile backend.
//! - Options are only the ones listed above; no vendor-specific options, no classless
//!   static routes, no DHCP failover, no DDNS.
//! - TFTP serves a directory; a symlink inside it that points out of it is followed. A
//!   reload does not move the TFTP root or the listen addresses (restart for that).

pub mod config;
pub mod daemon;
pub mod handler;
pub mod lease;
mod ratelimit;
pub mod server;
pub mod tftp;

pub use config::{BootConfig, Config, ConfigError, Mac, Pool, StaticLease};
pub use handler::{DropReason, Handler, IgnoreReason, Outcome, Reply};
pub use lease::{Lease, LeaseError, LeaseState, LeaseTable};
pub use server::{CounterSnapshot, Counters};
