//! A DHCPv4 client built on `dhcproto`: DISCOVER → OFFER → REQUEST → ACK on one link, over a
//! UDP socket bound to the link (`SO_BINDTODEVICE`) before it has an address. It always sets
//! the broadcast flag: clients that ask for unicast replies lost them when several VMs booted
//! at once. The exchange is pure ([`Exchange`]) so it is tested without a network.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable as _, Decoder, Encodable as _, Encoder};
use tokio::net::UdpSocket;

/// What the server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length (from the subnet mask; 24 without one).
    pub prefix: u8,
    /// The default gateway.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Host name.
    pub hostname: Option<String>,
    /// Link MTU.
    pub mtu: Option<u16>,
    /// The server.
    pub server: Ipv4Addr,
    /// Lease time.
    pub lease_time: Duration,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The socket could not be made.
    #[error("DHCP socket on {link}: {source}")]
    Socket {
        /// The link.
        link: String,
        /// The error.
        source: std::io::Error,
    },
    /// No usable answer in time.
    #[error(
        "no DHCP {waiting_for} on {link} within {timeout:?}: is the lab's DHCP server running (kiln cluster show lists it) and does it have a lease for this MAC?"
    )]
    Timeout {
        /// The link.
        link: String,
        /// OFFER or ACK.
        waiting_for: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The server refused.
    #[error("the DHCP server {server} sent NAK on {link}")]
    Nak {
        /// The link.
        link: String,
        /// The server.
        server: Ipv4Addr,
    },
}

/// The pure part of an exchange: builds requests, reads replies.
#[derive(Debug, Clone)]
pub struct Exchange {
    mac: [u8; 6],
    xid: u32,
    hostname: Option<String>,
}

impl Exchange {
    /// An exchange for the link with `mac`, transaction id `xid`.
    pub fn new(mac: [u8; 6], xid: u32) -> Self {
        Self {
            mac,
            xid,
            hostname: None,
        }
    }

    fn base(&self, kind: MessageType, ciaddr: Ipv4Addr) -> Message {
        let mut m = Message::new(
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        m.set_xid(self.xid);
        m.set_flags(Flags::default().set_broadcast());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::Hostname,
            OptionCode::InterfaceMtu,
        ]));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        o.insert(DhcpOption::ClientIdentifier(id));
        if let Some(h) = &self.hostname {
            o.insert(DhcpOption::Hostname(h.clone()));
        }
        m
    }

    /// DISCOVER.
    pub fn discover(&self) -> Message {
        self.base(MessageType::Discover, Ipv4Addr::UNSPECIFIED)
    }

    /// REQUEST for what `offer` offered.
    pub fn request(&self, offer: &Lease) -> Message {
        let mut m = self.base(MessageType::Request, Ipv4Addr::UNSPECIFIED);
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.address));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(offer.server));
        m
    }

    /// A reply of kind `kind` to this exchange, read as a lease; `None` when the packet is not
    /// for us or not of that kind. NAK is reported as an error.
    pub fn read(
        &self,
        packet: &[u8],
        kind: MessageType,
        link: &str,
    ) -> Result<Option<Lease>, DhcpError> {
        let Ok(m) = Message::decode(&mut Decoder::new(packet)) else {
            return Ok(None);
        };
        if m.xid() != self.xid || m.chaddr().get(..6) != Some(&self.mac[..]) {
            return Ok(None);
        }
        let o = m.opts();
        let server = match o.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => *s,
            _ => m.siaddr(),
        };
        match o.msg_type() {
            Some(MessageType::Nak) => {
                return Err(DhcpError::Nak {
                    link: link.to_owned(),
                    server,
                });
            }
            Some(k) if k == kind => {}
            _ => return Ok(None),
        }
        let prefix = match o.get(OptionCode::SubnetMask) {
            Some(DhcpOption::SubnetMask(mask)) => u32::from(*mask).count_ones() as u8,
            _ => 24,
        };
        Ok(Some(Lease {
            address: m.yiaddr(),
            prefix,
            router: match o.get(OptionCode::Router) {
                Some(DhcpOption::Router(r)) => r.first().copied(),
                _ => None,
            },
            dns: match o.get(OptionCode::DomainNameServer) {
                Some(DhcpOption::DomainNameServer(d)) => d.clone(),
                _ => vec![],
            },
            hostname: match o.get(OptionCode::Hostname) {
                Some(DhcpOption::Hostname(h)) => Some(h.clone()),
                _ => None,
            },
            mtu: match o.get(OptionCode::InterfaceMtu) {
                Some(DhcpOption::InterfaceMtu(m)) => Some(*m),
                _ => None,
            },
            server,
            lease_time: match o.get(OptionCode::AddressLeaseTime) {
                Some(DhcpOption::AddressLeaseTime(t)) => Duration::from_secs(u64::from(*t)),
                _ => Duration::from_secs(3600),
            },
        }))
    }
}

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(576);
    // Encoding into a Vec fails only on lengths no option here has.
    let _ = m.encode(&mut Encoder::new(&mut buf));
    buf
}

fn socket(link: &str) -> Result<UdpSocket, DhcpError> {
    let err = |source| DhcpError::Socket {
        link: link.to_owned(),
        source,
    };
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_broadcast(true).map_err(err)?;
    s.bind_device(Some(link.as_bytes())).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())
        .map_err(err)?;
    UdpSocket::from_std(s.into()).map_err(err)
}

/// Sends `msg` every second until a reply of `kind` arrives or `timeout` passes.
async fn ask(
    sock: &UdpSocket,
    ex: &Exchange,
    msg: &Message,
    kind: MessageType,
    link: &str,
    timeout: Duration,
) -> Result<Lease, DhcpError> {
    let packet = encode(msg);
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 1500];
    while tokio::time::Instant::now() < deadline {
        let _ = sock.send_to(&packet, to).await;
        let resend = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(resend.min(deadline), sock.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Err(_)) => break,
                Ok(Ok((n, _))) => {
                    if let Some(lease) = ex.read(&buf[..n], kind, link)? {
                        return Ok(lease);
                    }
                }
            }
        }
    }
    Err(DhcpError::Timeout {
        link: link.to_owned(),
        waiting_for: match kind {
            MessageType::Offer => "OFFER",
            _ => "ACK",
        },
        timeout,
    })
}

/// Runs DISCOVER → ACK on `link` (whose MAC is `mac`).
pub async fn acquire(link: &str, mac: [u8; 6], timeout: Duration) -> Result<Lease, DhcpError> {
    let sock = socket(link)?;
    let xid = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let ex = Exchange::new(mac, xid);
    let offer = ask(
        &sock,
        &ex,
        &ex.discover(),
        MessageType::Offer,
        link,
        timeout,
    )
    .await?;
    ask(
        &sock,
        &ex,
        &ex.request(&offer),
        MessageType::Ack,
        link,
        timeout,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn reply(kind: MessageType, xid: u32, mac: [u8; 6]) -> Vec<u8> {
        let mut m = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 5, 0, 2),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_xid(xid);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 5, 0, 1)));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 5, 0, 1)]));
        o.insert(DhcpOption::Hostname("cp-1".into()));
        o.insert(DhcpOption::AddressLeaseTime(600));
        encode(&m)
    }

    #[test]
    fn requests_ask_for_a_broadcast_reply_and_name_the_offer() {
        let ex = Exchange::new(MAC, 7);
        assert!(ex.discover().flags().broadcast());
        let offer = ex
            .read(
                &reply(MessageType::Offer, 7, MAC),
                MessageType::Offer,
                "eth0",
            )
            .unwrap()
            .unwrap();
        let req = ex.request(&offer);
        assert_eq!(
            req.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 5, 0, 2)))
        );
        assert_eq!(
            req.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 5, 0, 1)))
        );
    }

    #[test]
    fn an_ack_becomes_a_lease_and_other_traffic_is_ignored() {
        let ex = Exchange::new(MAC, 7);
        let lease = ex
            .read(&reply(MessageType::Ack, 7, MAC), MessageType::Ack, "eth0")
            .unwrap()
            .unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 5, 0, 2));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 5, 0, 1)));
        assert_eq!(lease.hostname.as_deref(), Some("cp-1"));
        assert_eq!(lease.lease_time, Duration::from_secs(600));
        // Another transaction, another client, or the wrong kind: not ours.
        assert!(
            ex.read(&reply(MessageType::Ack, 8, MAC), MessageType::Ack, "eth0")
                .unwrap()
                .is_none()
        );
        assert!(
            ex.read(
                &reply(MessageType::Ack, 7, [9; 6]),
                MessageType::Ack,
                "eth0"
            )
            .unwrap()
            .is_none()
        );
        assert!(
            ex.read(&reply(MessageType::Offer, 7, MAC), MessageType::Ack, "eth0")
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            ex.read(&reply(MessageType::Nak, 7, MAC), MessageType::Ack, "eth0"),
            Err(DhcpError::Nak { .. })
        ));
    }
}
