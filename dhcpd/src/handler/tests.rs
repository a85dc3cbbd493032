//! The RFC 2131 rules of the handler, without sockets.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::{BootConfig, Pool};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 5, 0, 1);
const NOW: u64 = 1_000_000;

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn config() -> Config {
    let mut c = Config::new(SERVER, "10.5.0.0/24".parse().unwrap());
    c.router = Some(SERVER);
    c.dns_servers = vec![ip("10.5.0.53")];
    c.domain_name = Some("lab.test".into());
    c.mtu = Some(1450);
    c.static_leases = vec![StaticLease {
        mac: mac(2),
        address: ip("10.5.0.2"),
        hostname: Some("cp-1".into()),
        mtu: Some(1400),
        router: None,
        dns_servers: None,
    }];
    c.validate().unwrap();
    c
}

fn with_pool(mut c: Config, start: &str, end: &str) -> Config {
    c.pool = Some(Pool {
        start: ip(start),
        end: ip(end),
    });
    c
}

fn handler(c: Config) -> Handler {
    Handler::new(c, LeaseTable::in_memory(), 67)
}

/// A client message.
fn msg(m: Mac, kind: MessageType, opts: Vec<DhcpOption>) -> Message {
    let mut msg = Message::new(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &m.0,
    );
    msg.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        msg.opts_mut().insert(o);
    }
    msg
}

fn bytes(m: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

fn reply(h: &mut Handler, m: &Message) -> (Reply, Message) {
    match h.handle(&bytes(m), NOW).unwrap() {
        Outcome::Reply(r) => {
            let decoded = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
            (r, decoded)
        }
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn ignored(h: &mut Handler, m: &Message) -> IgnoreReason {
    match h.handle(&bytes(m), NOW).unwrap() {
        Outcome::Ignored(why) => why,
        other => panic!("expected no reply, got {other:?}"),
    }
}

fn dropped(h: &mut Handler, b: &[u8]) -> DropReason {
    match h.handle(b, NOW).unwrap() {
        Outcome::Dropped(why) => why,
        other => panic!("expected a drop, got {other:?}"),
    }
}

fn select(m: Mac, address: Ipv4Addr) -> Message {
    msg(
        m,
        MessageType::Request,
        vec![
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(address),
        ],
    )
}

const BROADCAST_68: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);

#[test]
fn static_client_gets_its_address_and_options_by_broadcast() {
    let mut h = handler(config());
    let (r, offer) = reply(&mut h, &msg(mac(2), MessageType::Discover, vec![]));
    assert_eq!(r.kind, MessageType::Offer);
    assert_eq!(offer.yiaddr(), ip("10.5.0.2"));
    assert_eq!(offer.xid(), bytes_xid(&r.bytes));
    // No broadcast flag, no address yet: broadcast all the same.
    assert_eq!(r.to, BROADCAST_68);
    let o = offer.opts();
    assert_eq!(
        o.get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        o.get(OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
    );
    assert_eq!(
        o.get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![SERVER]))
    );
    assert_eq!(
        o.get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![ip("10.5.0.53")]))
    );
    assert_eq!(
        o.get(OptionCode::Hostname),
        Some(&DhcpOption::Hostname("cp-1".into()))
    );
    assert_eq!(
        o.get(OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(1400)),
        "per-host MTU wins"
    );
    assert_eq!(
        o.get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(1800)));
    assert_eq!(
        o.get(OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(3150))
    );
    assert_eq!(
        o.get(OptionCode::BroadcastAddr),
        Some(&DhcpOption::BroadcastAddr(ip("10.5.0.255")))
    );

    let (r, ack) = reply(&mut h, &select(mac(2), ip("10.5.0.2")));
    assert_eq!(r.kind, MessageType::Ack);
    assert_eq!(ack.yiaddr(), ip("10.5.0.2"));
    assert_eq!(r.to, BROADCAST_68);
    assert_eq!(h.table().leases()[0].hostname.as_deref(), Some("cp-1"));
    assert!(r.bytes.len() >= 300);
}

fn fname(m: &Message) -> &str {
    m.fname_str().unwrap().unwrap().trim_end_matches('\0')
}

fn bytes_xid(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[4], b[5], b[6], b[7]])
}

#[test]
fn unknown_mac_without_pool_gets_nothing() {
    let mut h = handler(config());
    assert_eq!(
        ignored(&mut h, &msg(mac(9), MessageType::Discover, vec![])),
        IgnoreReason::UnknownClient
    );
    assert_eq!(
        ignored(&mut h, &select(mac(9), ip("10.5.0.9"))),
        IgnoreReason::UnknownClient
    );
}

#[test]
fn parameter_request_list_is_honoured() {
    let mut h = handler(config());
    let prl = DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]);
    let (_, offer) = reply(&mut h, &msg(mac(2), MessageType::Discover, vec![prl]));
    let o = offer.opts();
    assert!(o.contains(OptionCode::Router));
    assert!(o.contains(OptionCode::AddressLeaseTime) && o.contains(OptionCode::ServerIdentifier));
    for absent in [
        OptionCode::DomainNameServer,
        OptionCode::InterfaceMtu,
        OptionCode::Hostname,
        OptionCode::DomainName,
    ] {
        assert!(!o.contains(absent), "{absent:?} was not asked for");
    }
}

#[test]
fn choosing_another_server_frees_the_offer() {
    let mut h = handler(with_pool(config(), "10.5.0.100", "10.5.0.100"));
    let (_, offer) = reply(&mut h, &msg(mac(7), MessageType::Discover, vec![]));
    assert_eq!(offer.yiaddr(), ip("10.5.0.100"));
    // Pool of one: a second client finds it held.
    assert_eq!(
        ignored(&mut h, &msg(mac(8), MessageType::Discover, vec![])),
        IgnoreReason::PoolExhausted
    );
    let other = msg(
        mac(7),
        MessageType::Request,
        vec![
            DhcpOption::ServerIdentifier(ip("10.5.0.254")),
            DhcpOption::RequestedIpAddress(ip("10.5.0.200")),
        ],
    );
    assert_eq!(ignored(&mut h, &other), IgnoreReason::OtherServer);
    let (_, offer) = reply(&mut h, &msg(mac(8), MessageType::Discover, vec![]));
    assert_eq!(offer.yiaddr(), ip("10.5.0.100"));
}

#[test]
fn init_reboot_checks_the_address_and_the_network() {
    let mut h = handler(config());
    let ask = |a: &str| {
        msg(
            mac(2),
            MessageType::Request,
            vec![DhcpOption::RequestedIpAddress(ip(a))],
        )
    };
    let (r, _) = reply(&mut h, &ask("10.5.0.2"));
    assert_eq!(r.kind, MessageType::Ack);
    let (r, nak) = reply(&mut h, &ask("10.5.0.3"));
    assert_eq!(
        (r.kind, r.to, nak.yiaddr()),
        (MessageType::Nak, BROADCAST_68, Ipv4Addr::UNSPECIFIED)
    );
    let (r, _) = reply(&mut h, &ask("192.168.1.7"));
    assert_eq!(r.kind, MessageType::Nak, "wrong network");
    // A pool client we never saw: silence, as RFC 2131 asks.
    let mut h = handler(with_pool(config(), "10.5.0.100", "10.5.0.110"));
    let stranger = msg(
        mac(9),
        MessageType::Request,
        vec![DhcpOption::RequestedIpAddress(ip("10.5.0.105"))],
    );
    assert_eq!(ignored(&mut h, &stranger), IgnoreReason::NoRecord);
}

#[test]
fn renew_is_unicast_to_ciaddr_and_rebind_too() {
    let mut h = handler(config());
    reply(&mut h, &select(mac(2), ip("10.5.0.2")));
    let mut renew = msg(mac(2), MessageType::Request, vec![]);
    renew.set_ciaddr(ip("10.5.0.2"));
    let (r, ack) = reply(&mut h, &renew);
    assert_eq!(r.kind, MessageType::Ack);
    assert_eq!(r.to, SocketAddrV4::new(ip("10.5.0.2"), 68));
    assert_eq!(ack.ciaddr(), ip("10.5.0.2"));
    let mut rebind = renew.clone();
    rebind.set_flags(Flags::default().set_broadcast());
    let (r, _) = reply(&mut h, &rebind);
    assert_eq!(
        (r.kind, r.to),
        (MessageType::Ack, SocketAddrV4::new(ip("10.5.0.2"), 68))
    );
    // Renewing an address that is not its own: NAK, broadcast.
    let mut wrong = renew.clone();
    wrong.set_ciaddr(ip("10.5.0.3"));
    let (r, _) = reply(&mut h, &wrong);
    assert_eq!((r.kind, r.to), (MessageType::Nak, BROADCAST_68));
}

#[test]
fn released_address_is_free_for_another_client() {
    let mut h = handler(with_pool(config(), "10.5.0.100", "10.5.0.100"));
    reply(&mut h, &msg(mac(7), MessageType::Discover, vec![]));
    let (r, _) = reply(&mut h, &select(mac(7), ip("10.5.0.100")));
    assert_eq!(r.kind, MessageType::Ack);
    assert_eq!(
        ignored(&mut h, &msg(mac(8), MessageType::Discover, vec![])),
        IgnoreReason::PoolExhausted
    );
    let mut release = msg(
        mac(7),
        MessageType::Release,
        vec![DhcpOption::ServerIdentifier(SERVER)],
    );
    release.set_ciaddr(ip("10.5.0.100"));
    assert_eq!(ignored(&mut h, &release), IgnoreReason::NoReplyDue);
    assert!(h.table().leases().is_empty());
    let (_, offer) = reply(&mut h, &msg(mac(8), MessageType::Discover, vec![]));
    assert_eq!(offer.yiaddr(), ip("10.5.0.100"));
}

#[test]
fn declined_address_is_quarantined() {
    let mut h = handler(with_pool(config(), "10.5.0.100", "10.5.0.101"));
    reply(&mut h, &msg(mac(7), MessageType::Discover, vec![]));
    reply(&mut h, &select(mac(7), ip("10.5.0.100")));
    let decline = msg(
        mac(7),
        MessageType::Decline,
        vec![
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(ip("10.5.0.100")),
        ],
    );
    assert_eq!(ignored(&mut h, &decline), IgnoreReason::NoReplyDue);
    let (_, offer) = reply(&mut h, &msg(mac(7), MessageType::Discover, vec![]));
    assert_eq!(offer.yiaddr(), ip("10.5.0.101"));
}

#[test]
fn expired_leases_are_reused_and_pool_addresses_skip_static_ones() {
    let mut c = with_pool(config(), "10.5.0.2", "10.5.0.3");
    c.lease_secs = 60;
    let mut h = handler(c);
    // 10.5.0.2 is mac(2)'s static address: the pool skips it.
    let (_, offer) = reply(&mut h, &msg(mac(7), MessageType::Discover, vec![]));
    assert_eq!(offer.yiaddr(), ip("10.5.0.3"));
    reply(&mut h, &select(mac(7), ip("10.5.0.3")));
    assert!(matches!(
        h.handle(
            &bytes(&msg(mac(8), MessageType::Discover, vec![])),
            NOW + 30
        )
        .unwrap(),
        Outcome::Ignored(IgnoreReason::PoolExhausted)
    ));
    let Outcome::Reply(r) = h
        .handle(
            &bytes(&msg(mac(8), MessageType::Discover, vec![])),
            NOW + 61,
        )
        .unwrap()
    else {
        panic!("expired lease not reused");
    };
    assert_eq!(r.address, ip("10.5.0.3"));
}

#[test]
fn relayed_requests_are_answered_to_the_relay() {
    let mut h = handler(with_pool(config(), "10.5.0.100", "10.5.0.110"));
    let mut d = msg(mac(7), MessageType::Discover, vec![]);
    d.set_giaddr(ip("10.5.0.254"));
    let (r, offer) = reply(&mut h, &d);
    assert_eq!(r.to, SocketAddrV4::new(ip("10.5.0.254"), 67));
    assert_eq!(offer.giaddr(), ip("10.5.0.254"));
    let mut bad = select(mac(7), ip("10.5.0.109"));
    bad.set_giaddr(ip("10.5.0.254"));
    let (r, nak) = reply(&mut h, &bad);
    assert_eq!(r.kind, MessageType::Nak);
    assert!(nak.flags().broadcast(), "a relay broadcasts a NAK");
    let mut foreign = msg(mac(7), MessageType::Discover, vec![]);
    foreign.set_giaddr(ip("172.16.0.1"));
    assert_eq!(ignored(&mut h, &foreign), IgnoreReason::OtherNetwork);
}

#[test]
fn inform_gets_options_without_a_lease() {
    let mut h = handler(config());
    let mut inform = msg(mac(2), MessageType::Inform, vec![]);
    inform.set_ciaddr(ip("10.5.0.2"));
    let (r, ack) = reply(&mut h, &inform);
    assert_eq!(
        (r.kind, r.to),
        (MessageType::Ack, SocketAddrV4::new(ip("10.5.0.2"), 68))
    );
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(!ack.opts().contains(OptionCode::AddressLeaseTime));
    assert!(ack.opts().contains(OptionCode::Router));
    assert!(h.table().leases().is_empty());
}

fn boot_config() -> Config {
    let mut c = config();
    c.boot = Some(BootConfig {
        next_server: Some(ip("10.5.0.69")),
        files: [(0, "pxelinux.0".to_owned()), (7, "ipxe.efi".to_owned())].into(),
        ipxe_script_url: Some("http://10.5.0.1:8080/boot.ipxe".into()),
        tftp_root: None,
    });
    c
}

#[test]
fn pxe_clients_get_the_boot_file_for_their_architecture() {
    let mut h = handler(boot_config());
    let pxe = |arch: u16| {
        msg(
            mac(2),
            MessageType::Discover,
            vec![
                DhcpOption::ClientSystemArchitecture(Architecture(arch)),
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
            ],
        )
    };
    let (_, offer) = reply(&mut h, &pxe(7));
    assert_eq!(fname(&offer), "ipxe.efi");
    assert_eq!(offer.siaddr(), ip("10.5.0.69"));
    assert_eq!(
        offer.opts().get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(b"ipxe.efi".to_vec()))
    );
    let (_, offer) = reply(&mut h, &pxe(0));
    assert_eq!(fname(&offer), "pxelinux.0");
    // An architecture with no file: no boot options.
    let (_, offer) = reply(&mut h, &pxe(11));
    assert!(offer.fname().is_none());
    // Not a PXE client: none either.
    let (_, offer) = reply(&mut h, &msg(mac(2), MessageType::Discover, vec![]));
    assert!(offer.fname().is_none());
}

#[test]
fn ipxe_gets_the_script_url() {
    let mut h = handler(boot_config());
    for class in [b"iPXE".to_vec(), b"\x04iPXE".to_vec()] {
        let d = msg(
            mac(2),
            MessageType::Discover,
            vec![
                DhcpOption::UserClass(class),
                DhcpOption::ClientSystemArchitecture(Architecture(7)),
            ],
        );
        let (_, offer) = reply(&mut h, &d);
        assert_eq!(fname(&offer), "http://10.5.0.1:8080/boot.ipxe");
    }
}

#[test]
fn overloaded_request_options_are_read_from_file_and_sname() {
    let mut h = handler(config());
    // A DISCOVER whose message type and request list live in `file`.
    let mut m = msg(
        mac(2),
        MessageType::Discover,
        vec![DhcpOption::OptionOverload(1)],
    );
    m.opts_mut().remove(OptionCode::MessageType);
    let mut b = bytes(&m);
    let file = [53, 1, 1, 55, 2, 1, 3, 255];
    b[FILE.start..FILE.start + file.len()].copy_from_slice(&file);
    let Outcome::Reply(r) = h.handle(&b, NOW).unwrap() else {
        panic!("the overloaded message type was not read");
    };
    assert_eq!(r.kind, MessageType::Offer);
    let offer = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
    assert!(
        !offer.opts().contains(OptionCode::DomainNameServer),
        "the overloaded request list was not honoured"
    );
}

#[test]
fn a_reply_too_big_for_the_client_overflows_into_file_and_sname() {
    let mut c = config();
    c.static_leases[0].hostname = Some("h".repeat(100));
    c.domain_name = Some("d".repeat(50));
    c.dns_servers = (0..60).map(|i| Ipv4Addr::new(10, 5, 0, 100 + i)).collect();
    let mut h = handler(c);
    let (r, offer) = reply(
        &mut h,
        &msg(
            mac(2),
            MessageType::Discover,
            vec![DhcpOption::MaxMessageSize(576)],
        ),
    );
    assert!(
        r.bytes.len() <= 576 - 28,
        "{} bytes: {offer:?}",
        r.bytes.len()
    );
    assert_eq!(
        offer.opts().get(OptionCode::OptionOverload),
        Some(&DhcpOption::OptionOverload(3))
    );
    // Every option is still there once file and sname are read as options.
    let file = DhcpOptions::decode(&mut Decoder::new(&r.bytes[FILE])).unwrap();
    let sname = DhcpOptions::decode(&mut Decoder::new(&r.bytes[SNAME])).unwrap();
    let all: Vec<OptionCode> = offer
        .opts()
        .iter()
        .chain(file.iter())
        .chain(sname.iter())
        .map(|(c, _)| *c)
        .collect();
    for code in [
        OptionCode::Hostname,
        OptionCode::DomainName,
        OptionCode::MessageType,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
    ] {
        assert!(all.contains(&code), "{code:?} lost");
    }
}

#[test]
fn bad_datagrams_are_dropped_with_a_reason() {
    let mut h = handler(config());
    let good = bytes(&msg(mac(2), MessageType::Discover, vec![]));
    assert_eq!(dropped(&mut h, &good[..100]), DropReason::Truncated);
    assert_eq!(
        dropped(&mut h, &vec![0u8; MAX_DATAGRAM + 1]),
        DropReason::Oversized
    );
    let mut bad_magic = good.clone();
    bad_magic[236] = 0;
    assert_eq!(dropped(&mut h, &bad_magic), DropReason::Malformed);
    let mut reply_op = good.clone();
    reply_op[0] = 2;
    assert_eq!(dropped(&mut h, &reply_op), DropReason::Malformed);
    // hlen 17 would make dhcproto's chaddr() slice out of bounds.
    let mut long_hlen = good.clone();
    long_hlen[2] = 17;
    assert_eq!(dropped(&mut h, &long_hlen), DropReason::UnsupportedHardware);
    let no_type = bytes(&{
        let mut m = msg(mac(2), MessageType::Discover, vec![]);
        m.opts_mut().remove(OptionCode::MessageType);
        m
    });
    assert_eq!(dropped(&mut h, &no_type), DropReason::UnknownMessageType);
    let offer_from_client = bytes(&msg(mac(2), MessageType::Offer, vec![]));
    assert_eq!(
        dropped(&mut h, &offer_from_client),
        DropReason::UnknownMessageType
    );
}

#[test]
fn options_that_crash_dhcproto_are_skipped_not_fatal() {
    let mut h = handler(config());
    let good = bytes(&msg(mac(2), MessageType::Discover, vec![]));
    // Replace END with: bulk-leasequery base time of length 3 (a debug assertion in
    // dhcproto), a classless route with prefix 40 (an unwrap), then END.
    let mut b = good[..good.len() - 1].to_vec();
    b.extend_from_slice(&[91, 3, 1, 2, 3, 121, 5, 40, 10, 0, 0, 1, 255]);
    let Outcome::Reply(r) = h.handle(&b, NOW).unwrap() else {
        panic!("the request was not answered");
    };
    assert_eq!(r.kind, MessageType::Offer);
}

#[test]
fn a_reloaded_configuration_applies_and_keeps_the_leases() {
    let mut h = handler(config());
    reply(&mut h, &select(mac(2), ip("10.5.0.2")));
    assert_eq!(
        ignored(&mut h, &msg(mac(3), MessageType::Discover, vec![])),
        IgnoreReason::UnknownClient
    );
    let mut c = config();
    c.static_leases.push(StaticLease {
        mac: mac(3),
        address: ip("10.5.0.3"),
        hostname: Some("w-1".into()),
        mtu: None,
        router: None,
        dns_servers: None,
    });
    h.reconfigure(c);
    let (_, offer) = reply(&mut h, &msg(mac(3), MessageType::Discover, vec![]));
    assert_eq!(offer.yiaddr(), ip("10.5.0.3"));
    assert_eq!(
        h.table().leases().len(),
        1,
        "the lease bound before the reload is kept"
    );
}

#[test]
fn relay_agent_information_is_echoed_to_the_relay() {
    let mut h = handler(with_pool(config(), "10.5.0.100", "10.5.0.110"));
    let mut d = msg(mac(7), MessageType::Discover, vec![]);
    d.set_giaddr(ip("10.5.0.254"));
    let mut b = bytes(&d);
    b.pop();
    // Circuit id "eth7", remote id "sw1".
    let option82 = [82, 11, 1, 4, b'e', b't', b'h', b'7', 2, 3, b's', b'w', b'1'];
    b.extend_from_slice(&option82);
    b.push(255);
    let Outcome::Reply(r) = h.handle(&b, NOW).unwrap() else {
        panic!("no reply");
    };
    let at = r
        .bytes
        .windows(option82.len())
        .position(|w| w == option82)
        .expect("option 82 not echoed");
    assert_eq!(
        r.bytes[at + option82.len()],
        255,
        "option 82 must be the last option"
    );
    Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
    // Not relayed: nothing to echo.
    let mut direct = bytes(&msg(mac(8), MessageType::Discover, vec![]));
    direct.pop();
    direct.extend_from_slice(&option82);
    direct.push(255);
    let Outcome::Reply(r) = h.handle(&direct, NOW).unwrap() else {
        panic!("no reply");
    };
    assert!(!r.bytes.windows(option82.len()).any(|w| w == option82));
}
