//! Property-based fuzzing of the packet handler with random and mutated datagrams: it never
//! panics, never answers garbage, and never gives one address to two clients. The number of
//! cases comes from KILN_FUZZ_CASES (scripts/test sets it).

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

use std::collections::HashMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable as _, Decoder, Encodable as _, Encoder};
use kiln_dhcpd::{Config, Handler, LeaseTable, Mac, Outcome, Pool, StaticLease};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 5, 0, 1);

fn handler() -> Handler {
    let mut c = Config::new(SERVER, "10.5.0.0/24".parse().unwrap());
    c.router = Some(SERVER);
    c.dns_servers = vec![SERVER];
    c.mtu = Some(1450);
    c.static_leases = (2..6)
        .map(|i| StaticLease {
            mac: Mac([0x52, 0x54, 0, 0, 0, i]),
            address: Ipv4Addr::new(10, 5, 0, i),
            hostname: Some(format!("node-{i}")),
            mtu: None,
            router: None,
            dns_servers: None,
        })
        .collect();
    // A small pool, so that clients compete for addresses.
    c.pool = Some(Pool {
        start: Ipv4Addr::new(10, 5, 0, 100),
        end: Ipv4Addr::new(10, 5, 0, 103),
    });
    c.boot = Some(kiln_dhcpd::BootConfig {
        files: [(7, "ipxe.efi".to_owned())].into(),
        ipxe_script_url: Some("http://10.5.0.1/boot.ipxe".into()),
        ..Default::default()
    });
    c.validate().unwrap();
    Handler::new(c, LeaseTable::in_memory(), 67)
}

/// A well-formed client message with fuzzed fields and options.
fn client_message() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        Just(MessageType::Discover),
        Just(MessageType::Request),
        Just(MessageType::Release),
        Just(MessageType::Decline),
        Just(MessageType::Inform),
        Just(MessageType::Offer),
        Just(MessageType::Ack),
    ];
    let address = prop_oneof![
        Just(Ipv4Addr::UNSPECIFIED),
        (0u8..8).prop_map(|i| Ipv4Addr::new(10, 5, 0, i)),
        (98u8..106).prop_map(|i| Ipv4Addr::new(10, 5, 0, i)),
        any::<u32>().prop_map(Ipv4Addr::from),
    ];
    (
        kind,
        0u8..12,
        address.clone(),
        address.clone(),
        prop::option::of(address.clone()),
        prop::option::of(prop_oneof![Just(SERVER), address]),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        prop::option::of(any::<u16>()),
        prop::option::of(any::<u16>()),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(
            |(
                kind,
                m,
                ciaddr,
                giaddr,
                requested,
                server_id,
                prl,
                max,
                arch,
                broadcast,
                overload,
            )| {
                let mut msg = Message::new(
                    ciaddr,
                    Ipv4Addr::UNSPECIFIED,
                    Ipv4Addr::UNSPECIFIED,
                    giaddr,
                    &[0x52, 0x54, 0, 0, 0, m],
                );
                if broadcast {
                    msg.set_flags(dhcproto::v4::Flags::default().set_broadcast());
                }
                let o = msg.opts_mut();
                o.insert(DhcpOption::MessageType(kind));
                if let Some(r) = requested {
                    o.insert(DhcpOption::RequestedIpAddress(r));
                }
                if let Some(s) = server_id {
                    o.insert(DhcpOption::ServerIdentifier(s));
                }
                if let Some(p) = prl {
                    o.insert(DhcpOption::ParameterRequestList(
                        p.into_iter().map(OptionCode::from).collect(),
                    ));
                }
                if let Some(n) = max {
                    o.insert(DhcpOption::MaxMessageSize(n));
                }
                if let Some(a) = arch {
                    o.insert(DhcpOption::ClientSystemArchitecture(Architecture(a)));
                    o.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
                }
                if overload % 4 == 0 {
                    o.insert(DhcpOption::OptionOverload(overload % 7));
                }
                let mut buf = Vec::new();
                msg.encode(&mut Encoder::new(&mut buf)).unwrap();
                buf
            },
        )
}

/// A valid message with bytes flipped, cut, or extended.
fn mutated_message() -> impl Strategy<Value = Vec<u8>> {
    (
        client_message(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        prop::option::of(any::<prop::sample::Index>()),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(mut b, flips, cut, tail)| {
            for (i, v) in flips {
                let i = i.index(b.len());
                b[i] = v;
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len() + 1));
            }
            b.extend(tail);
            b
        })
}

fn check(h: &mut Handler, datagram: &[u8]) {
    let outcome = h.handle(datagram, 1_000_000).unwrap();
    if let Outcome::Reply(r) = outcome {
        // Every reply decodes, is a BOOTREPLY to the asking MAC, and fits the datagram limit.
        let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
        assert_eq!(m.opcode(), dhcproto::v4::Opcode::BootReply);
        assert_eq!(m.chaddr(), &datagram[28..34]);
        assert!(r.bytes.len() <= kiln_dhcpd::handler::MAX_DATAGRAM);
    }
    // No address is held by two MACs.
    let mut seen = HashMap::new();
    for lease in h.table().leases() {
        if lease.state == kiln_dhcpd::LeaseState::Bound {
            assert_eq!(
                seen.insert(lease.address, lease.mac),
                None,
                "{} given twice",
                lease.address
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(datagrams in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..1600), 1..8)) {
        let mut h = handler();
        for d in &datagrams {
            check(&mut h, d);
        }
    }

    #[test]
    fn sequences_of_client_messages_keep_the_table_sound(datagrams in prop::collection::vec(client_message(), 1..40)) {
        let mut h = handler();
        for d in &datagrams {
            check(&mut h, d);
        }
    }

    #[test]
    fn mutated_messages_never_panic(datagrams in prop::collection::vec(mutated_message(), 1..20)) {
        let mut h = handler();
        for d in &datagrams {
            check(&mut h, d);
        }
    }
}
