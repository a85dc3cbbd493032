//! The packet handler: one received datagram in, at most one reply out, following RFC 2131
//! (server identifier, `ciaddr`, broadcast flag, relays) with no I/O but the lease journal.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{
    Architecture, DhcpOption, DhcpOptions, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use dhcproto::{Decodable as _, Decoder, Encodable as _, Encoder};

use crate::config::{Config, Mac, StaticLease};
use crate::lease::{LeaseError, LeaseTable};

/// Datagrams longer than this are dropped as oversized (an Ethernet MTU's worth).
pub const MAX_DATAGRAM: usize = 1500;
/// The fixed BOOTP header plus the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;
/// How long an OFFER holds its address for the REQUEST that should follow.
const OFFER_SECS: u64 = 60;
/// The smallest message every client must accept (RFC 2131), IP and UDP headers included.
const MIN_MAX_MESSAGE: usize = 576;
const IP_UDP_HEADERS: usize = 28;

/// Why a datagram was dropped without a look at its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than a BOOTP header and magic cookie.
    Truncated,
    /// Longer than [`MAX_DATAGRAM`].
    Oversized,
    /// Not decodable, a bad magic cookie, or not a BOOTREQUEST.
    Malformed,
    /// Hardware type or address length other than Ethernet's.
    UnsupportedHardware,
    /// No DHCP message type, or one a server does not handle.
    UnknownMessageType,
}

/// Why a well-formed request got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// The MAC has no static lease and there is no pool.
    UnknownClient,
    /// The pool has no free address.
    PoolExhausted,
    /// The client chose another server's offer.
    OtherServer,
    /// INIT-REBOOT, RENEW or REBIND from a client this server has no record of.
    NoRecord,
    /// Relayed from a network this server does not serve.
    OtherNetwork,
    /// DECLINE or RELEASE: no reply is due.
    NoReplyDue,
    /// A REQUEST with neither server identifier, requested address nor `ciaddr`.
    IncompleteRequest,
}

/// What became of a datagram.
#[derive(Debug)]
pub enum Outcome {
    /// Send `bytes` to `to`.
    Reply(Reply),
    /// Well-formed, but no reply.
    Ignored(IgnoreReason),
    /// Not a usable request.
    Dropped(DropReason),
}

/// A reply and where it goes.
#[derive(Debug)]
pub struct Reply {
    /// The message type (OFFER, ACK or NAK).
    pub kind: MessageType,
    /// The client.
    pub mac: Mac,
    /// The address given (`yiaddr`), unspecified for NAK and INFORM.
    pub address: Ipv4Addr,
    /// Destination: a relay, the client's address, or 255.255.255.255.
    pub to: SocketAddrV4,
    /// The encoded message.
    pub bytes: Vec<u8>,
}

/// The request, decoded and with its overloaded options merged.
struct Request {
    msg: Message,
    mac: Mac,
    kind: MessageType,
    opts: DhcpOptions,
    /// Relay agent information (option 82) as received, code and length included, to echo
    /// back to the relay (RFC 3046).
    relay_info: Vec<u8>,
}

/// The server's state: configuration, static leases by MAC and address, and the lease table.
#[derive(Debug)]
pub struct Handler {
    config: Config,
    statics: HashMap<Mac, StaticLease>,
    static_addresses: HashMap<Ipv4Addr, Mac>,
    table: LeaseTable,
    pool_cursor: u32,
    /// The port replies to relays go to (the server's own port).
    server_port: u16,
}

impl Handler {
    /// A handler for `config` (already validated) with `table` as its lease state, answering
    /// relays on `server_port`.
    pub fn new(config: Config, table: LeaseTable, server_port: u16) -> Self {
        let statics: HashMap<Mac, StaticLease> = config
            .static_leases
            .iter()
            .map(|l| (l.mac, l.clone()))
            .collect();
        let static_addresses = config
            .static_leases
            .iter()
            .map(|l| (l.address, l.mac))
            .collect();
        let pool_cursor = config.pool.map(|p| u32::from(p.start)).unwrap_or(0);
        Self {
            config,
            statics,
            static_addresses,
            table,
            pool_cursor,
            server_port,
        }
    }

    /// Replaces the configuration (a reloaded file), keeping the lease table: static leases,
    /// options, pool and boot settings apply from the next datagram on. Leases handed out
    /// before stay until they end or are released.
    pub fn reconfigure(&mut self, config: Config) {
        let table = std::mem::replace(&mut self.table, LeaseTable::in_memory());
        let cursor = self.pool_cursor;
        let same_pool = self.config.pool == config.pool;
        *self = Handler::new(config, table, self.server_port);
        if same_pool {
            self.pool_cursor = cursor;
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The lease table.
    pub fn table(&self) -> &LeaseTable {
        &self.table
    }

    /// Handles one datagram received at Unix time `now` (seconds). Only a lease journal write
    /// can fail; then no reply is sent, so no client holds an address the journal lacks.
    pub fn handle(&mut self, datagram: &[u8], now: u64) -> Result<Outcome, LeaseError> {
        let req = match parse(datagram) {
            Ok(r) => r,
            Err(reason) => return Ok(Outcome::Dropped(reason)),
        };
        let giaddr = req.msg.giaddr();
        if !giaddr.is_unspecified() && !self.config.subnet.contains(giaddr) {
            return Ok(Outcome::Ignored(IgnoreReason::OtherNetwork));
        }
        if !self.statics.contains_key(&req.mac) && self.config.pool.is_none() {
            return Ok(Outcome::Ignored(IgnoreReason::UnknownClient));
        }
        match req.kind {
            MessageType::Discover => Ok(self.discover(&req, now)),
            MessageType::Request => self.request(&req, now),
            MessageType::Decline => self.decline(&req, now),
            MessageType::Release => self.release(&req),
            MessageType::Inform => Ok(Outcome::Reply(self.reply(
                &req,
                MessageType::Ack,
                Ipv4Addr::UNSPECIFIED,
            ))),
            _ => Ok(Outcome::Dropped(DropReason::UnknownMessageType)),
        }
    }

    fn discover(&mut self, req: &Request, now: u64) -> Outcome {
        let Some(address) = self.choose_address(req, now) else {
            return Outcome::Ignored(IgnoreReason::PoolExhausted);
        };
        self.table.offer(req.mac, address, now + OFFER_SECS);
        Outcome::Reply(self.reply(req, MessageType::Offer, address))
    }

    fn request(&mut self, req: &Request, now: u64) -> Result<Outcome, LeaseError> {
        let requested = requested_address(&req.opts);
        let ciaddr = req.msg.ciaddr();
        let expected = self.known_address(req.mac);
        let wanted = match (server_id(&req.opts), requested) {
            // SELECTING: the client answers an OFFER, ours or another server's.
            (Some(id), _) if id != self.config.server_address => {
                if let Some(b) = self.table.binding(req.mac)
                    && !b.bound
                {
                    self.table.release(req.mac, b.address)?;
                }
                return Ok(Outcome::Ignored(IgnoreReason::OtherServer));
            }
            (Some(_), Some(r)) => r,
            (Some(_), None) if !ciaddr.is_unspecified() => ciaddr,
            // INIT-REBOOT: a client that remembers an address; wrong network means NAK.
            (None, Some(r)) if ciaddr.is_unspecified() => {
                if !self.config.subnet.contains(r) {
                    return Ok(Outcome::Reply(self.nak(req)));
                }
                if expected.is_none() {
                    return Ok(Outcome::Ignored(IgnoreReason::NoRecord));
                }
                r
            }
            // RENEWING (unicast) or REBINDING (broadcast).
            (None, _) if !ciaddr.is_unspecified() => {
                if expected.is_none() {
                    return Ok(Outcome::Ignored(IgnoreReason::NoRecord));
                }
                ciaddr
            }
            _ => return Ok(Outcome::Ignored(IgnoreReason::IncompleteRequest)),
        };
        let held_by_other = self.table.holder(wanted, now).is_some_and(|m| m != req.mac);
        if expected != Some(wanted) || held_by_other || self.table.is_declined(wanted, now) {
            return Ok(Outcome::Reply(self.nak(req)));
        }
        let expires = now + u64::from(self.config.lease_secs);
        let hostname = self
            .statics
            .get(&req.mac)
            .and_then(|s| s.hostname.clone())
            .or_else(|| match req.opts.get(OptionCode::Hostname) {
                Some(DhcpOption::Hostname(h)) => Some(h.clone()),
                _ => None,
            });
        self.table
            .bind(req.mac, wanted, expires, hostname.as_deref())?;
        Ok(Outcome::Reply(self.reply(req, MessageType::Ack, wanted)))
    }

    fn decline(&mut self, req: &Request, now: u64) -> Result<Outcome, LeaseError> {
        if server_id(&req.opts).is_some_and(|id| id != self.config.server_address) {
            return Ok(Outcome::Ignored(IgnoreReason::OtherServer));
        }
        if let Some(address) = requested_address(&req.opts)
            && self.known_address(req.mac) == Some(address)
        {
            tracing::warn!(mac = %req.mac, %address, "client declined its address: it is in use by another host");
            self.table
                .decline(req.mac, address, now + u64::from(self.config.lease_secs))?;
        }
        Ok(Outcome::Ignored(IgnoreReason::NoReplyDue))
    }

    fn release(&mut self, req: &Request) -> Result<Outcome, LeaseError> {
        if server_id(&req.opts).is_some_and(|id| id != self.config.server_address) {
            return Ok(Outcome::Ignored(IgnoreReason::OtherServer));
        }
        let ciaddr = req.msg.ciaddr();
        if self
            .table
            .binding(req.mac)
            .is_some_and(|b| b.address == ciaddr)
        {
            self.table.release(req.mac, ciaddr)?;
        }
        Ok(Outcome::Ignored(IgnoreReason::NoReplyDue))
    }

    /// The address this client should have: its static one, or what it was last offered or
    /// bound (even expired: it may still be free).
    fn known_address(&self, mac: Mac) -> Option<Ipv4Addr> {
        if let Some(s) = self.statics.get(&mac) {
            return Some(s.address);
        }
        self.table.binding(mac).map(|b| b.address)
    }

    fn usable_for(&self, mac: Mac, address: Ipv4Addr, now: u64) -> bool {
        self.table.holder(address, now).is_none_or(|m| m == mac)
            && !self.table.is_declined(address, now)
            && self
                .static_addresses
                .get(&address)
                .is_none_or(|m| *m == mac)
            && address != self.config.server_address
            && self.in_pool(address)
    }

    fn in_pool(&self, address: Ipv4Addr) -> bool {
        self.config
            .pool
            .is_some_and(|p| (u32::from(p.start)..=u32::from(p.end)).contains(&u32::from(address)))
    }

    fn choose_address(&mut self, req: &Request, now: u64) -> Option<Ipv4Addr> {
        if let Some(s) = self.statics.get(&req.mac) {
            return Some(s.address);
        }
        if let Some(b) = self.table.binding(req.mac)
            && self.usable_for(req.mac, b.address, now)
        {
            return Some(b.address);
        }
        if let Some(r) = requested_address(&req.opts)
            && self.usable_for(req.mac, r, now)
        {
            return Some(r);
        }
        let pool = self.config.pool?;
        let (start, end) = (u32::from(pool.start), u32::from(pool.end));
        let size = u64::from(end - start) + 1;
        let mut candidate = self.pool_cursor.clamp(start, end);
        for _ in 0..size {
            let address = Ipv4Addr::from(candidate);
            candidate = if candidate >= end {
                start
            } else {
                candidate + 1
            };
            if self.usable_for(req.mac, address, now) {
                self.pool_cursor = candidate;
                return Some(address);
            }
        }
        None
    }

    fn nak(&self, req: &Request) -> Reply {
        self.reply(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED)
    }

    /// Builds an OFFER, ACK (`address` unspecified: answer to INFORM) or NAK.
    fn reply(&self, req: &Request, kind: MessageType, address: Ipv4Addr) -> Reply {
        let inform = req.kind == MessageType::Inform;
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_xid(req.msg.xid())
            .set_flags(req.msg.flags())
            .set_giaddr(req.msg.giaddr())
            .set_chaddr(&req.mac.0)
            .set_yiaddr(address);
        if kind != MessageType::Nak && (inform || !req.msg.ciaddr().is_unspecified()) {
            msg.set_ciaddr(req.msg.ciaddr());
        }
        let mut opts = DhcpOptions::new();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.config.server_address));
        if kind != MessageType::Nak {
            self.add_options(req, &mut opts, inform);
            self.add_boot(req, &mut msg, &mut opts);
        }
        msg.set_opts(opts);
        let giaddr = req.msg.giaddr();
        let to = if !giaddr.is_unspecified() {
            if kind == MessageType::Nak {
                msg.set_flags(Flags::default().set_broadcast());
            }
            SocketAddrV4::new(giaddr, self.server_port)
        } else if kind != MessageType::Nak && !req.msg.ciaddr().is_unspecified() {
            SocketAddrV4::new(req.msg.ciaddr(), self.config.client_port)
        } else {
            // A client without an address cannot take a unicast IP datagram without an ARP
            // entry we cannot add from a UDP socket: broadcast, whatever the flag says.
            SocketAddrV4::new(Ipv4Addr::BROADCAST, self.config.client_port)
        };
        let limit = max_message_size(&req.opts);
        Reply {
            kind,
            mac: req.mac,
            address,
            to,
            bytes: encode(&msg, limit, &req.relay_info),
        }
    }

    fn add_options(&self, req: &Request, opts: &mut DhcpOptions, inform: bool) {
        let host = self.statics.get(&req.mac);
        let subnet = self.config.subnet;
        if !inform {
            let lease = self.config.lease_secs;
            opts.insert(DhcpOption::AddressLeaseTime(lease));
            opts.insert(DhcpOption::Renewal(lease / 2));
            opts.insert(DhcpOption::Rebinding(
                u32::try_from(u64::from(lease) * 7 / 8).unwrap_or(lease),
            ));
        }
        opts.insert(DhcpOption::SubnetMask(subnet.mask()));
        let requested: Option<Vec<OptionCode>> =
            match req.opts.get(OptionCode::ParameterRequestList) {
                Some(DhcpOption::ParameterRequestList(list)) => Some(list.clone()),
                _ => None,
            };
        // Without a request list the client gets everything configured; with one, what it
        // asked for.
        let wants = |code: OptionCode| requested.as_ref().is_none_or(|l| l.contains(&code));
        let mut add = |opt: DhcpOption| {
            if wants(OptionCode::from(&opt)) {
                opts.insert(opt);
            }
        };
        if let Some(r) = host.and_then(|h| h.router).or(self.config.router) {
            add(DhcpOption::Router(vec![r]));
        }
        let dns = host
            .and_then(|h| h.dns_servers.clone())
            .unwrap_or_else(|| self.config.dns_servers.clone());
        if !dns.is_empty() {
            add(DhcpOption::DomainNameServer(dns));
        }
        if let Some(name) = host.and_then(|h| h.hostname.clone()) {
            add(DhcpOption::Hostname(name));
        }
        if let Some(domain) = &self.config.domain_name {
            add(DhcpOption::DomainName(domain.clone()));
        }
        if let Some(mtu) = host.and_then(|h| h.mtu).or(self.config.mtu) {
            add(DhcpOption::InterfaceMtu(mtu));
        }
        add(DhcpOption::BroadcastAddr(subnet.broadcast()));
    }

    /// PXE: next server and boot file by architecture; iPXE: the boot script URL.
    fn add_boot(&self, req: &Request, msg: &mut Message, opts: &mut DhcpOptions) {
        let Some(boot) = &self.config.boot else {
            return;
        };
        let arch = match req.opts.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(Architecture(a))) => Some(*a),
            _ => None,
        };
        let pxe = arch.is_some()
            || matches!(req.opts.get(OptionCode::ClassIdentifier),
                Some(DhcpOption::ClassIdentifier(c)) if c.starts_with(b"PXEClient"));
        let file = if is_ipxe(&req.opts) {
            boot.ipxe_script_url.clone()
        } else if pxe {
            boot.files.get(&arch.unwrap_or(0)).cloned()
        } else {
            None
        };
        let Some(file) = file else {
            return;
        };
        let next = boot.next_server.unwrap_or(self.config.server_address);
        msg.set_siaddr(next);
        // `file` is 128 bytes with its NUL; a longer name goes in option 67 only.
        if file.len() < 128 {
            msg.set_fname_str(&file);
        }
        opts.insert(DhcpOption::BootfileName(file.into_bytes()));
        if matches!(req.opts.get(OptionCode::ClassIdentifier),
            Some(DhcpOption::ClassIdentifier(c)) if c.starts_with(b"PXEClient"))
        {
            // PXE firmware wants the vendor class echoed.
            opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        }
    }
}

/// Whether option 77 says iPXE, raw (`iPXE`, as iPXE sends it) or RFC 3004 length-prefixed.
fn is_ipxe(opts: &DhcpOptions) -> bool {
    match opts.get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(c)) => {
            c.as_slice() == b"iPXE" || (c.len() == 5 && c[0] == 4 && &c[1..] == b"iPXE")
        }
        _ => false,
    }
}

fn server_id(opts: &DhcpOptions) -> Option<Ipv4Addr> {
    match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(a)) => Some(*a),
        _ => None,
    }
}

fn requested_address(opts: &DhcpOptions) -> Option<Ipv4Addr> {
    match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(a)) => Some(*a),
        _ => None,
    }
}

/// The largest reply the client takes, without IP and UDP headers.
fn max_message_size(opts: &DhcpOptions) -> usize {
    let max = match opts.get(OptionCode::MaxMessageSize) {
        Some(DhcpOption::MaxMessageSize(n)) => usize::from(*n).max(MIN_MAX_MESSAGE),
        _ => MIN_MAX_MESSAGE,
    };
    max.min(MAX_DATAGRAM + IP_UDP_HEADERS) - IP_UDP_HEADERS
}

/// Decodes and checks a request, merging options overloaded into `file` and `sname`.
fn parse(datagram: &[u8]) -> Result<Request, DropReason> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DropReason::Oversized);
    }
    if datagram.len() < HEADER_LEN {
        return Err(DropReason::Truncated);
    }
    if datagram[236..240] != MAGIC {
        return Err(DropReason::Malformed);
    }
    // dhcproto panics (debug assertions, an unwrap) on some malformed options the server has
    // no use for: decode only the options it reads, with lengths checked.
    let mut clean = datagram[..HEADER_LEN].to_vec();
    clean.extend(options_we_read(&datagram[HEADER_LEN..]));
    let msg = Message::decode(&mut Decoder::new(&clean)).map_err(|_| DropReason::Malformed)?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(DropReason::Malformed);
    }
    // `Message::chaddr` slices by `hlen`, which must be checked first.
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Err(DropReason::UnsupportedHardware);
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(msg.chaddr());
    let mut opts = msg.opts().clone();
    if let Some(DhcpOption::OptionOverload(o)) = opts.get(OptionCode::OptionOverload).cloned() {
        // RFC 2131 4.1: `file` first, then `sname`; options already seen win.
        for (bit, range) in [(1, FILE), (2, SNAME)] {
            if o & bit != 0
                && let Ok(extra) =
                    DhcpOptions::decode(&mut Decoder::new(&options_we_read(&datagram[range])))
            {
                for (code, opt) in extra.iter() {
                    if !opts.contains(*code) {
                        opts.insert(opt.clone());
                    }
                }
            }
        }
    }
    let kind = opts.msg_type().ok_or(DropReason::UnknownMessageType)?;
    let relay_info = if msg.giaddr().is_unspecified() {
        Vec::new()
    } else {
        relay_agent_information(&datagram[HEADER_LEN..])
    };
    Ok(Request {
        msg,
        mac: Mac(mac),
        kind,
        opts,
        relay_info,
    })
}

/// The options the server reads, copied from an options area with their lengths checked,
/// ending with END; everything else (and anything after a truncated option) is left out.
fn options_we_read(area: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(area.len() + 1);
    let mut i = 0;
    while let Some(&code) = area.get(i) {
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = area.get(i + 1) else { break };
        let Some(value) = area.get(i + 2..i + 2 + usize::from(len)) else {
            break;
        };
        let keep = match code {
            // Host name, parameter request list, class and client identifiers, user class.
            12 | 55 | 60 | 61 | 77 => len >= 1,
            // Requested address, lease time, server identifier.
            50 | 51 | 54 => len == 4,
            // Overload, message type.
            52 | 53 => len == 1,
            // Maximum message size.
            57 => len == 2,
            // Client architectures: a list of 16-bit types.
            93 => len >= 2 && len % 2 == 0,
            _ => false,
        };
        if keep {
            out.extend_from_slice(&[code, len]);
            out.extend_from_slice(value);
        }
        i += 2 + usize::from(len);
    }
    out.push(255);
    out
}

/// Option 82 from an options area, code and length included (empty when absent or cut).
fn relay_agent_information(area: &[u8]) -> Vec<u8> {
    let mut i = 0;
    while let Some(&code) = area.get(i) {
        match code {
            0 => i += 1,
            255 => break,
            _ => {
                let Some(&len) = area.get(i + 1) else { break };
                let Some(option) = area.get(i..i + 2 + usize::from(len)) else {
                    break;
                };
                if code == 82 {
                    return option.to_vec();
                }
                i += option.len();
            }
        }
    }
    Vec::new()
}

/// Encodes a reply; when the options do not fit in `limit` bytes, moves some into `file`
/// (and then `sname`) with option 52, as RFC 2131 allows, if those fields are unused.
/// `last` (raw options) goes right before END, as RFC 3046 wants option 82.
fn encode(msg: &Message, limit: usize, last: &[u8]) -> Vec<u8> {
    let mut plain = encode_plain(msg);
    if plain.last() == Some(&255) {
        plain.pop();
        plain.extend_from_slice(last);
        plain.push(255);
    }
    if plain.len() <= limit || msg.fname().is_some() || msg.sname().is_some() {
        return pad(plain);
    }
    let mut header_only = msg.clone();
    header_only.set_opts(DhcpOptions::new());
    let mut out = encode_plain(&header_only);
    out.truncate(HEADER_LEN);
    // Keep the message type and server identifier in the main area; the rest in order.
    let mut main_budget = limit.saturating_sub(HEADER_LEN + 3 + 1 + last.len());
    let mut main = Vec::new();
    let mut areas: [(std::ops::Range<usize>, Vec<u8>); 2] =
        [(FILE, Vec::new()), (SNAME, Vec::new())];
    let mut used = 0u8;
    for (code, opt) in msg.opts().iter() {
        let mut bytes = Vec::new();
        if opt.encode(&mut Encoder::new(&mut bytes)).is_err() {
            continue;
        }
        let essential = matches!(code, OptionCode::MessageType | OptionCode::ServerIdentifier);
        if essential || bytes.len() <= main_budget {
            main_budget = main_budget.saturating_sub(bytes.len());
            main.extend_from_slice(&bytes);
            continue;
        }
        if let Some((i, (_, area))) = areas
            .iter_mut()
            .enumerate()
            .find(|(_, (range, area))| area.len() + bytes.len() < range.len())
        {
            area.extend_from_slice(&bytes);
            used |= 1 << i;
        }
        // An option that fits nowhere is left out.
    }
    for (range, area) in &areas {
        if !area.is_empty() {
            out[range.start..range.start + area.len()].copy_from_slice(area);
            out[range.start + area.len()] = 255;
        }
    }
    out.extend_from_slice(&main);
    if used != 0 {
        out.extend_from_slice(&[52, 1, used]);
    }
    out.extend_from_slice(last);
    out.push(255);
    pad(out)
}

fn encode_plain(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    // Encoding into a Vec only fails on lengths dhcproto cannot represent; then send what
    // was written, which the client rejects, rather than panic.
    let _ = msg.encode(&mut Encoder::new(&mut buf));
    buf
}

/// BOOTP relays and old clients expect at least 300 bytes.
fn pad(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() < 300 {
        bytes.resize(300, 0);
    }
    bytes
}

#[cfg(test)]
mod tests;
