//! The server loop on loopback, unprivileged: it answers on the socket it was given, counts and
//! drops bad datagrams without stopping, and returns its state on shutdown.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable as _, Decoder, Encodable as _, Encoder};
use kiln_dhcpd::{Config, Counters, Handler, LeaseTable, Mac, StaticLease, server};
use tokio::net::UdpSocket;

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 5];

fn request(kind: MessageType) -> Vec<u8> {
    let mut m = Message::new(
        CLIENT,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &MAC,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

async fn answer(client: &UdpSocket) -> Message {
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf))
        .await
        .expect("no reply within 10 s")
        .unwrap();
    Message::decode(&mut Decoder::new(&buf[..n])).unwrap()
}

#[tokio::test]
async fn serves_on_the_given_socket_counts_bad_datagrams_and_stops() {
    let socket = UdpSocket::bind(SocketAddrV4::new(SERVER, 0)).await.unwrap();
    let server_addr = socket.local_addr().unwrap();
    let client = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0)).await.unwrap();

    let mut config = Config::new(SERVER, "127.0.0.0/8".parse().unwrap());
    config.client_port = client.local_addr().unwrap().port();
    config.static_leases = vec![StaticLease {
        mac: Mac(MAC),
        address: CLIENT,
        hostname: Some("cp-1".into()),
        mtu: Some(1400),
        router: None,
        dns_servers: None,
    }];
    config.validate().unwrap();
    let counters = Arc::new(Counters::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(
        socket,
        Handler::new(config, LeaseTable::in_memory(), server_addr.port()),
        counters.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    // Garbage first: none of it may stop the server.
    client.send_to(&[1, 2, 3], server_addr).await.unwrap();
    client.send_to(&vec![0u8; 1600], server_addr).await.unwrap();
    let mut no_type = request(MessageType::Inform);
    no_type.truncate(240);
    no_type.push(255);
    client.send_to(&no_type, server_addr).await.unwrap();

    // A bound client renewing (unicast, ciaddr set) gets its ACK at its address.
    client
        .send_to(&request(MessageType::Request), server_addr)
        .await
        .unwrap();
    let ack = answer(&client).await;
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), CLIENT);
    assert_eq!(
        ack.opts().get(dhcproto::v4::OptionCode::Hostname),
        Some(&DhcpOption::Hostname("cp-1".into()))
    );

    client
        .send_to(&request(MessageType::Inform), server_addr)
        .await
        .unwrap();
    let inform = answer(&client).await;
    assert_eq!(inform.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(inform.yiaddr(), Ipv4Addr::UNSPECIFIED);

    let c = counters.snapshot();
    assert_eq!(
        (c.received, c.truncated, c.oversized, c.unknown_type, c.acks),
        (5, 1, 1, 1, 2),
        "{c:?}"
    );

    let _ = stop.send(());
    let handler = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    let leases = handler.table().leases();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].address, CLIENT);
}
